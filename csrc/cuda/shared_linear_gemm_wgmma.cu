// shared_linear for fp16/bf16 activations and many rows of x with Hopper's warpgroup mma (sm_90a, 1-8 bits): the
// fused GEMM of shared_linear_gemm_mma.cu with wgmma in place of mma.sync. The packed indices become the same codes
// and the same A fragments in registers (FusedGemmLayout<BITS, 8>); x is no longer loaded into registers by
// ldmatrix: the tensor cores read it from shared memory through a matrix descriptor (128-byte swizzle,
// WgmmaTileLayout), one m64nNk16 instruction per warpgroup, 64-row tile (two per warpgroup with pair codes, one
// with the single codes of 5-8 bits) and k16 step, asynchronously while the next step's A fragments are decoded.
//
// Why: mma.sync is issued per warp per 16x8x16 tile with its B fragment in registers, and on Hopper it reaches only
// part of the tensor cores' rate; cuBLAS's fp16 GEMMs there use wgmma. For 256 rows of x the product is compute-bound
// (cuBLAS: 50 us at 8192 x 8192 on the H200, ~690 TFLOPS; the index stream is 8 us of HBM), so the fused kernel
// can only approach cuBLAS with the same instruction.
//
// Per 128-index unit: cp.async of x (3 stages, each thread fencing its copies into the async proxy before the
// barrier); per k16 step: decode the step's A fragments (its 64-row tiles) into one of two register sets, fence,
// issue the step's wgmma, commit, and wait until at most this step's group runs (so the other register set is free);
// after step 0 a second barrier (every warpgroup has then retired the previous unit's groups) and the refill of the
// previous unit's x stage; the unit ends staging the next unit's codes, its last group still running.
//
// Status: written and compiled for sm_90a (2026-12-01), its layout checked on the host
// (tests/native/fused_gemm_layout_check.cpp); not yet run on a GPU, so only WS_CUDA_LINEAR=wgmma takes it, and only
// in a build for "9.0a" (WS_SM90A).
#include "shared_linear_gemm_wgmma.h"

#include <cstdlib>
#include <string_view>

#include "weightshare/dispatch.h"
#include "weightshare/fused_gemm_layout.h"
#include "fused_gemm_staging.h"
#include "mma_ptx.h"
#include "wgmma_ptx.h"

namespace weightshare::cuda {
namespace {

template <int BITS, int NB>
constexpr int wgmma_smem_bytes() {
  using L = FusedGemmLayout<BITS, 8>;
  using X = WgmmaLayoutFor<BITS, NB>;
  return 1024 + X::kStages * X::kStageBytes + 4 * (L::kTableWords + 2 * L::kCodeBufferWords);  // 1024: alignment
}

// grid: (output blocks of 256 / 128 rows x blocks of NB rows of x, splits of the units); 256 threads.
// PIPE: the tensor pipe is kept fed across units: a unit does not wait for its last group; the stage it read is
// refilled only after a second barrier, behind the next unit's first step, by which every warpgroup has retired the
// group (its wait_group 1 there). Else (WS_CUDA_WGMMA_DRAIN=1, the first form, kept to compare) each unit ends with
// wait_group 0 and the next starts from an empty pipe.
template <typename T, int BITS, int NB, bool PIPE>
__global__ void __launch_bounds__(256, 1) gemm_wgmma_kernel(const FusedArgs a) {
  using L = FusedGemmLayout<BITS, 8>;
  using X = WgmmaLayoutFor<BITS, NB>;
  static_assert(L::kBlockOut == X::kBlockOut && L::kThreads == X::kThreads, "the code layout's block rows");
  constexpr int S = X::kStages, R = NB / 2, TILES = X::kTiles, CW = L::kCodeWords;  // R: registers per tile
  extern __shared__ __align__(16) uint32_t smem[];
  __shared__ uint16_t values[1 << BITS];
  const uint32_t smem_base = shared_address(smem);
  const uint32_t pad = ((smem_base + 1023u) & ~1023u) - smem_base;  // x's atoms start 1024-byte aligned
  const uint32_t xs_base = smem_base + pad;
  uint32_t* const tab = smem + (pad + S * X::kStageBytes) / 4;
  uint32_t* const codes = tab + L::kTableWords;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wg = warp >> 2, wj = warp & 3;
  const int64_t n0 = int64_t(blockIdx.x / a.mblocks) * L::kBlockOut;
  const int64_t m0 = int64_t(blockIdx.x % a.mblocks) * NB;
  const int64_t M = a.out.M, N = a.w.N, kin = a.w.kin;
  const int64_t u_begin = int64_t(blockIdx.y) * a.units_per_split;
  const int nu = static_cast<int>(min(a.units - u_begin, a.units_per_split));  // >= 1: no split is empty

  IndexStager<L, BITS> stager(a.w, n0, tid);
  auto load_x = [&](int64_t u, int stage) {  // unit u of x into a stage, K-major in the 128-byte swizzle
    load_x_tile<T, X::kThreads, NB>(xs_base + stage * X::kStageBytes, static_cast<const T*>(a.x), m0, M, kin, u, tid,
                                    [](int r, int c) { return X::chunk_byte(r, c); });
  };

  // Prologue as the mma.sync kernel's: loads past the split's last unit reload that unit into space nobody reads.
#pragma unroll
  for (int st = 0; st < S - 1; ++st) {
    load_x(u_begin + min(st, nu - 1), st);
    cp_async_commit();
  }
  stager.load(u_begin);
  stage_table<L, T, BITS>(a.w, n0 / a.w.rows_per_group, values, tab, tid);  // the block's one codebook
  stager.store(codes, tid);
  stager.load(u_begin + min(1, nu - 1));

  const uint32_t tab_base = shared_address(tab);
  const uint32_t codes_base = shared_address(codes);
  float acc[TILES][R];  // no zeroing: the first wgmma overwrites (wgmma_rs's accumulate)
  // [step parity][64-row tile]: a step's registers stay untouched while its wgmma runs (PIPE: into the next unit;
  // 8 steps a unit, so the parity carries over)
  uint32_t af[2][TILES][4];
  for (int it = 0; it < nu; ++it) {
    cp_async_wait<S - 2>();      // this thread's copies of unit it have landed
    fence_proxy_async_shared();  // ... and are visible to the tensor cores' reads
    __syncthreads();             // everyone's; unit it's codes; every decode of unit it - 1 done
    auto refill = [&] {          // unit it + S - 1 into unit it - 1's stage (call it once that stage's wgmma retired)
      load_x(u_begin + min(it + S - 1, nu - 1), (it + S - 1) % S);
      cp_async_commit();
    };
    if constexpr (!PIPE) refill();  // unit it - 1 ended with wait_group 0 in every warpgroup, before the barrier

    const uint32_t cbuf = codes_base + 4u * (it & 1) * L::kCodeBufferWords;
    const uint32_t xstage = xs_base + (it % S) * X::kStageBytes;
#pragma unroll
    for (int s = 0; s < L::kSteps; ++s) {
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
        const int row = X::block_row(wg, i, wj, g, 0);
        uint32_t c0[CW], c1[CW];
        load_codes<L>(cbuf, row, s, t, c0, c1);
        L::decode_a(c0, c1, [&](uint32_t offset) { return lds_u32(tab_base + offset); }, af[s & 1][i]);
      }
      wgmma_fence();
      const uint64_t desc = sw128_descriptor(xstage + X::step_start(s), X::kAtomStride);
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
        pin_registers(acc[i]);
        wgmma_rs<T, NB>(acc[i], af[s & 1][i], desc, it > 0 || s > 0);
        pin_registers(acc[i]);
      }
      wgmma_commit();
      wgmma_wait<1>();  // step s - 1's group is done: its register set is written next step
      if constexpr (PIPE) {
        if (s == 0) {  // this warpgroup's groups of unit it - 1 are done; after the barrier everyone's are
          __syncthreads();
          refill();
        }
      }
    }
    if constexpr (!PIPE) {
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < TILES; ++i) pin_registers(acc[i]);
    }
    stager.store(codes + ((it + 1) & 1) * L::kCodeBufferWords, tid);  // read last in unit it - 1: past the barrier
    stager.load(u_begin + min(it + 2, nu - 1));
  }
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < TILES; ++i) pin_registers(acc[i]);
  cp_async_wait<0>();  // the reloads past the split's end: none in flight at exit

  // D of tile i: d[4 j + 2 h + e] = (block row of fragment row g + 8 h, row of x 8 j + 2t + e).
#pragma unroll
  for (int i = 0; i < TILES; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = n0 + X::block_row(wg, i, wj, g, h);
      if (n >= N) continue;
      const float b = row_bias(a.out, n);
#pragma unroll
      for (int j = 0; j < NB / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t m = m0 + 8 * j + 2 * t + e;
          if (m < M) put_output<T>(a.out, m, n, acc[i][4 * j + 2 * h + e], b);
        }
      }
    }
  }
}

template <typename F>
void dispatch_wgmma(int64_t bits, int nb, F&& f) {
  WS_DISPATCH_BITS(bits, BITS, [&] {
    if (nb == 64) {
      f.template operator()<BITS, 64>();
    } else {
      f.template operator()<BITS, 128>();
    }
  });
}

int rows_of_x_per_block(int64_t M) { return M <= 64 ? 64 : 128; }

}  // namespace

bool gemm_wgmma_takes(const at::Tensor& x, const at::Tensor& packed, int64_t bits, int64_t M, int64_t out_features,
                      int64_t in_features, int64_t rows_per_group) {
  const FusedAsk ask = fused_ask();
  if (ask != FusedAsk::Wgmma && (ask != FusedAsk::Default || M < kFusedDefaultFirstM)) return false;
  const int64_t block_out = bits <= 4 ? 256 : 128;
#if defined(WS_SM90A)
  if (!fused_shape_ok(x, packed, M, in_features) ||
      !one_codebook_per_block(out_features, rows_per_group, block_out)) {
    return false;
  }
  const int device = x.get_device();
  if (device_attribute<cudaDevAttrComputeCapabilityMajor>(device) != 9 ||
      device_attribute<cudaDevAttrComputeCapabilityMinor>(device) != 0) {
    return false;  // sm_90a code runs on compute capability 9.0 only
  }
  int bytes = 0;
  dispatch_wgmma(bits, rows_of_x_per_block(M), [&]<int BITS, int NB>() {
    bytes = wgmma_smem_bytes<BITS, NB>() + int(sizeof(uint16_t)) * (1 << BITS);
  });
  const int64_t blocks = ceil_div(out_features, block_out) * ceil_div(M, rows_of_x_per_block(M));
  return bytes <= device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device) && blocks <= INT32_MAX;
#else
  return false;  // built without sm_90a (TORCH_CUDA_ARCH_LIST="9.0a")
#endif
}

void launch_gemm_wgmma(const PackedRows& w, const at::Tensor& x, int bits, Epilogue out, int sms) {
  const char* drain = std::getenv("WS_CUDA_WGMMA_DRAIN");  // read per call: "1" times the first form
  const bool pipe = drain == nullptr || std::string_view(drain) != "1";
  dispatch_wgmma(bits, rows_of_x_per_block(out.M), [&]<int BITS, int NB>() {
    constexpr int kSmem = wgmma_smem_bytes<BITS, NB>(), kOut = WgmmaLayoutFor<BITS, NB>::kBlockOut;
    auto go = [&]<bool PIPE>() {
      if (x.scalar_type() == at::kHalf) {
        launch_fused<gemm_wgmma_kernel<__half, BITS, NB, PIPE>>(w, x, out, 256, kSmem, kOut, NB, sms);
      } else {
        launch_fused<gemm_wgmma_kernel<__nv_bfloat16, BITS, NB, PIPE>>(w, x, out, 256, kSmem, kOut, NB, sms);
      }
    };
    if (pipe) {
      go.template operator()<true>();
    } else {
      go.template operator()<false>();
    }
  });
}

}  // namespace weightshare::cuda
