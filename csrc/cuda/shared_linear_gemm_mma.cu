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
#include "fused_gemm_staging.h"
#include "mma_ptx.h"

namespace weightshare::cuda {
namespace {

// grid: (output blocks x x blocks, splits of the 128-index units); L::kThreads threads; L::kSmemBytes dynamic.
template <typename T, int BITS, int NT, bool ROWS>
__global__ void __launch_bounds__(FusedGemmLayout<BITS, NT, ROWS>::kThreads, 1) gemm_mma_kernel(const FusedArgs a) {
  using L = FusedGemmLayout<BITS, NT, ROWS>;
  constexpr int MT = L::kTilesM, CW = L::kCodeWords, S = L::kStages;
  extern __shared__ __align__(16) uint32_t smem[];
  __shared__ uint16_t values[1 << BITS];
  uint32_t* const tab = smem;
  uint32_t* const codes = smem + L::kTableWords;
  unsigned char* const xs = reinterpret_cast<unsigned char*>(codes + 2 * L::kCodeBufferWords);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wo = warp % L::kWarpsOut, wb = warp / L::kWarpsOut;
  const int64_t n0 = int64_t(blockIdx.x / a.mblocks) * L::kBlockOut;
  const int64_t m0 = int64_t(blockIdx.x % a.mblocks) * L::kBlockBatch;
  const int64_t M = a.out.M, N = a.w.N, kin = a.w.kin;
  const int64_t u_begin = int64_t(blockIdx.y) * a.units_per_split;
  const int nu = static_cast<int>(min(a.units - u_begin, a.units_per_split));  // >= 1: no split is empty

  IndexStager<L, BITS> stager(a.w, n0, tid);
  const uint32_t xs_base = shared_address(xs);
  auto load_x = [&](int64_t u, int stage) {  // unit u of x into a stage, chunks in their swizzled slots
    load_x_tile<T, L::kThreads, L::kBlockBatch>(xs_base + stage * L::kXBytes, static_cast<const T*>(a.x), m0, M, kin,
                                                u, tid, [](int r, int c) { return 16 * L::x_chunk_slot(r, c); });
  };

  // Prologue: x of the first S - 1 units in flight, the first unit's indices (while the tables are staged). Loads
  // of units past the split's last one load that last unit again, into a stage or code buffer nobody reads: no
  // branch, so the loop body below is one basic block and ptxas overlaps these loads and stores with the mma.
#pragma unroll
  for (int st = 0; st < S - 1; ++st) {
    load_x(u_begin + min(st, nu - 1), st);
    cp_async_commit();  // one group per unit: the waits below count groups
  }
  stager.load(u_begin);
  if constexpr (ROWS) {
    stage_row_tables<L, T, BITS>(a.w, n0, tab, tid);
  } else {
    stage_table<L, T, BITS>(a.w, n0 / a.w.rows_per_group, values, tab, tid);  // the block's one codebook
  }
  stager.store(codes, tid);
  stager.load(u_begin + min(1, nu - 1));

  const uint32_t tab_base = shared_address(tab);
  const uint32_t codes_base = shared_address(codes);
  float acc[MT][NT][4] = {};
  for (int it = 0; it < nu; ++it) {
    cp_async_wait<S - 2>();  // this thread's copies of unit it have landed
    __syncthreads();         // everyone's, and unit it's codes; everyone is done with unit it - 1's buffers
    load_x(u_begin + min(it + S - 1, nu - 1), (it + S - 1) % S);  // into unit it - 1's stage
    cp_async_commit();

    const uint32_t cbuf = codes_base + 4u * (it & 1) * L::kCodeBufferWords;
    const uint32_t xbuf = xs_base + (it % S) * L::kXBytes;
#pragma unroll
    for (int s = 0; s < L::kSteps; ++s) {
      uint32_t b[NT][2];
#pragma unroll
      for (int jj = 0; jj < NT / 2; ++jj) {
        uint32_t r[4];
        ldmatrix_x4(xbuf + 16 * L::ldmatrix_slot(lane, wb, jj, s), r);
        b[2 * jj][0] = r[0];
        b[2 * jj][1] = r[1];
        b[2 * jj + 1][0] = r[2];
        b[2 * jj + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int row = wo * L::kWarpOut + 16 * i + g;
        uint32_t c0[CW], c1[CW];
        load_codes<L>(cbuf, row, s, t, c0, c1);
        uint32_t af[4];
        L::decode_a(c0, c1, [&](uint32_t offset) {
          if constexpr (ROWS) {
            return lds_u16(tab_base + offset);
          } else {
            return lds_u32(tab_base + offset);
          }
        }, af);
#pragma unroll
        for (int j = 0; j < NT; ++j) mma16816<T>(acc[i][j], af, b[j][0], b[j][1]);
      }
    }

    stager.store(codes + ((it + 1) & 1) * L::kCodeBufferWords, tid);  // read last in unit it - 1: past the barrier
    stager.load(u_begin + min(it + 2, nu - 1));
  }
  cp_async_wait<0>();  // the reloads past the split's end: none in flight at exit

  // D of tile (i, j): rows = output rows 16 i + g (+8 for r >= 2), columns = rows of x 8 j + 2t + (r & 1). (A bias
  // array filled before these loops pushed the 4-bit, 8-tile kernel past 255 registers into spills.)
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = n0 + wo * L::kWarpOut + 16 * i + g + 8 * h;
      if (n >= N) continue;
      const float b = row_bias(a.out, n);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t m = m0 + wb * L::kWarpBatch + 8 * j + 2 * t + e;
          if (m < M) put_output<T>(a.out, m, n, acc[i][j][2 * h + e], b);
        }
      }
    }
  }
}

int tiles_n_for(int64_t M) { return M <= 32 ? 2 : (M <= 64 ? 4 : 8); }

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
