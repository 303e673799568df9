// shared_linear for fp16/bf16 activations and many rows of x on tensor cores, fused: each block decodes its packed
// indices into mma.sync A fragments in registers (through per-lane table codes, fused_gemm_layout.h), multiplies
// them with x tiles that cp.async streams into shared memory, and writes y. No decoded weight is ever stored.
//
// Why: the panels path (decode a panel of W to memory, then cuBLAS) ran 0.22-0.32x cuBLAS at 16-256 rows on the
// H200 (2026-11-30), its decode writing and reading back 2 bytes per weight; the tile kernels (64x64 tiles, one
// warp's wmma per 16x16) 0.10-0.25x. Here each weight costs its share of a 4-byte table load per index pair (once
// per 64 rows of x), and each 16-byte x chunk feeds 4 m16 tiles of W from registers; with 64x64 warp tiles and
// three x stages in flight the kernel has the shape of a CUTLASS sm80 GEMM, the index stream replacing B's loads.
//
// Layout and data flow: fused_gemm_layout.h (checked on the host by tests/native/fused_gemm_layout_check.cpp).
// Per 128-index unit: a barrier; x of the unit kStages - 1 ahead is issued by cp.async; the block's 8 warps run the
// unit's 8 k16 steps (per step: ldmatrix.x4 for two 8-row tiles of x, per 16-row W tile two code loads and four
// table loads into A, then an mma per x tile); then the next unit's indices, loaded into registers one unit
// earlier, become codes in the other code buffer, and the unit after next is loaded. Split-K over grid.y, the
// partial sums summed in a fixed order by finalize (deterministic).
//
// Status: written and compiled for sm_90 (2026-12-01) with the layout checked on the host; not yet run on a GPU,
// so no call takes it unless WS_CUDA_LINEAR=fused (gemm_mma_takes).
#include "shared_linear_gemm_mma.h"

#include <cstdlib>
#include <string_view>

#include "weightshare/dispatch.h"
#include "weightshare/fused_gemm_layout.h"
#include "weightshare/packing.h"
#include "fused_gemm_mma_body.h"
#include "fused_gemm_staging.h"
#include "mma_ptx.h"

namespace weightshare::cuda {
namespace {

// grid: (output blocks x x blocks, splits of the 128-index units); L::kThreads threads; L::kSmemBytes dynamic.
template <typename T, int BITS, int NT, bool ROWS>
__global__ void __launch_bounds__(FusedGemmLayout<BITS, NT, ROWS>::kThreads, 1) gemm_mma_kernel(const FusedArgs a) {
  fused_gemm_mma<T, BITS, NT, ROWS, false>(a);
}

// Per-row tables (ROWS) are instantiated for the widths the op promises fast (2, 3, 4, 8); other widths with
// codebooks that split blocks take the panels.
constexpr bool rows_instantiated(int64_t bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

// Calls f.template operator()<BITS, NT, ROWS>() for run-time bits, 8-row tile count and table kind.
template <typename F>
void dispatch_shape(int64_t bits, int nt, bool rows, F&& f) {
  WS_DISPATCH_BITS(bits, BITS, [&] {
    auto tables = [&]<int NT>() {
      if constexpr (rows_instantiated(BITS)) {
        if (rows) {
          f.template operator()<BITS, NT, true>();
          return;
        }
      }
      f.template operator()<BITS, NT, false>();
    };
    if (nt == 2) {
      tables.template operator()<2>();
    } else if (nt == 4) {
      tables.template operator()<4>();
    } else {
      tables.template operator()<8>();
    }
  });
}

int smem_bytes(int64_t bits, int nt, bool rows) {
  int bytes = 0;
  dispatch_shape(bits, nt, rows, [&]<int BITS, int NT, bool ROWS>() {
    bytes = FusedGemmLayout<BITS, NT, ROWS>::kSmemBytes + int(sizeof(uint16_t)) * (1 << BITS);
  });
  return bytes;
}

// Whether a layer's codebooks need the per-row tables: some block of the one-table layout would span two.
bool needs_row_tables(int64_t bits, int64_t out_features, int64_t rows_per_group) {
  return !one_codebook_per_block(out_features, rows_per_group, bits <= 4 ? 256 : 128);
}

// Whether the loaded device code has the sm_80 instructions (has_sm80_code), asked once.
bool gemm_compiled() {
  static const bool ok = has_sm80_code(reinterpret_cast<const void*>(gemm_mma_kernel<__half, 4, 8, false>));
  return ok;
}

}  // namespace

FusedAsk fused_ask() {
  const char* sw = std::getenv("WS_CUDA_LINEAR");
  if (sw == nullptr) return FusedAsk::Default;
  const std::string_view mode(sw);
  if (mode == "fused") return FusedAsk::Mma;
  if (mode == "wgmma") return FusedAsk::Wgmma;
  return mode == "panels" || mode == "tiles" ? FusedAsk::Refused : FusedAsk::Default;
}

bool fused_shape_ok(const at::Tensor& x, const at::Tensor& packed, int64_t M, int64_t in_features) {
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16) return false;
  if (M < 1 || in_features % 128 != 0 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) return false;
  return reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0;  // rows: 16 BITS bytes per unit
}

// Splits of the units when the blocks alone leave block slots of the GPU empty: the count with the fewest waves per
// unit of work, a split only where it saves 5 % (each writes and reads back an fp32 copy of y and adds the finalize
// kernel, so a full GPU is never split: at 28672 x 8192 and 256 rows, 1.8 waves instead of 2 would cost 5 fp32
// copies of y, 147 MB).
int choose_splits(int64_t blocks, int64_t units, int64_t slots) {
  if (blocks >= slots) return 1;
  int best = 1;
  double best_cost = 1.0;
  for (int s = 2; s <= 16 && units / s >= 2 && blocks * s <= 2 * slots; ++s) {
    const double cost = double(ceil_div(blocks * s, slots)) / s;
    if (cost < 0.95 * best_cost) {
      best = s;
      best_cost = cost;
    }
  }
  return best;
}

at::Tensor plan_splits(FusedArgs& a, int64_t blocks, int per_sm, int sms, const at::Tensor& like) {
  const int wanted = choose_splits(blocks, a.units, int64_t(per_sm) * sms);
  a.units_per_split = ceil_div(a.units, wanted);
  const int splits = static_cast<int>(ceil_div(a.units, a.units_per_split));  // none empty
  check_grid(splits, 1, blocks);
  return set_splits(a.out, splits, false, like);
}

bool gemm_mma_takes(const at::Tensor& x, const at::Tensor& packed, int64_t bits, int64_t M, int64_t out_features,
                    int64_t in_features, int64_t rows_per_group) {
  const FusedAsk ask = fused_ask();
  if (ask != FusedAsk::Mma && (ask != FusedAsk::Default || M < kFusedDefaultFirstM)) return false;
  if (!fused_shape_ok(x, packed, M, in_features)) return false;
  const bool rows = needs_row_tables(bits, out_features, rows_per_group);
  if (rows && !rows_instantiated(bits)) return false;
  const int device = x.get_device();
  if (device_attribute<cudaDevAttrComputeCapabilityMajor>(device) < 8 || !gemm_compiled()) return false;
  const int nt = tiles_n_for(M);
  const int64_t block_out = bits <= 4 && !rows ? 256 : 128;
  const int64_t blocks = ceil_div(out_features, block_out) * ceil_div(M, 8 * 2 * nt);
  return smem_bytes(bits, nt, rows) <= device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device) &&
         blocks <= INT32_MAX;
}

void launch_gemm_mma(const PackedRows& w, const at::Tensor& x, int bits, Epilogue out, int sms) {
  const bool rows = needs_row_tables(bits, w.N, w.rows_per_group);
  dispatch_shape(bits, tiles_n_for(out.M), rows, [&]<int BITS, int NT, bool ROWS>() {
    using L = FusedGemmLayout<BITS, NT, ROWS>;
    if (x.scalar_type() == at::kHalf) {
      launch_fused<gemm_mma_kernel<__half, BITS, NT, ROWS>>(w, x, out, L::kThreads, L::kSmemBytes, L::kBlockOut,
                                                            L::kBlockBatch, sms);
    } else {
      launch_fused<gemm_mma_kernel<__nv_bfloat16, BITS, NT, ROWS>>(w, x, out, L::kThreads, L::kSmemBytes,
                                                                   L::kBlockOut, L::kBlockBatch, sms);
    }
  });
}

}  // namespace weightshare::cuda
