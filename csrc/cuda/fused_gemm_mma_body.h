#pragma once
// The body of the fused mma.sync GEMM (see shared_linear_gemm_mma.cu for its design), shared by its two kernels:
// shared_linear's (x rows read as rows) and the implicit-GEMM convolution's (shared_conv_implicit.cu: x rows are
// output pixels, each 16-byte chunk of a unit copied from the input pixel its tap reads, implicit_conv.h). Only
// the x tile's source differs; codes, tables, pipeline and epilogue are one code.
#include "weightshare/fused_gemm_layout.h"
#include "weightshare/implicit_conv.h"
#include "fused_gemm_staging.h"
#include "mma_ptx.h"

namespace weightshare::cuda {

// Dynamic shared memory of one kernel: tables, code buffers, x stages, and for CONV the block's pixel origins.
template <int BITS, int NT, bool ROWS, bool CONV, int TM = 0>
constexpr int fused_mma_smem_bytes() {
  using L = FusedGemmLayout<BITS, NT, ROWS, TM>;
  return L::kSmemBytes + (CONV ? int(sizeof(PixelOrigin)) * L::kBlockBatch : 0);
}

// One block's work. grid: (output blocks x x blocks, splits of the 128-index units); L::kThreads threads;
// fused_mma_smem_bytes dynamic. CONV: rows of x are a.conv's output pixels (implicit_conv.h). TM: the layout's
// tiles of W per warp (FusedGemmLayout).
template <typename T, int BITS, int NT, bool ROWS, bool CONV, int TM = 0>
__device__ __forceinline__ void fused_gemm_mma(const FusedArgs& a) {
  using L = FusedGemmLayout<BITS, NT, ROWS, TM>;
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
  PixelOrigin* const origins = reinterpret_cast<PixelOrigin*>(xs + S * L::kXBytes);  // CONV only
  if constexpr (CONV) {
    for (int i = tid; i < L::kBlockBatch; i += L::kThreads) origins[i] = pixel_origin(a.conv, m0 + i, M);
    __syncthreads();
  }
  auto load_x = [&](int64_t u, int stage) {  // unit u of x into a stage, chunks in their swizzled slots
    const auto place = [](int r, int c) { return 16 * L::x_chunk_slot(r, c); };
    if constexpr (CONV) {
      load_conv_tile<T, L::kThreads, L::kBlockBatch>(xs_base + stage * L::kXBytes, static_cast<const T*>(a.x),
                                                     a.conv, origins, u, tid, place);
    } else {
      load_x_tile<T, L::kThreads, L::kBlockBatch>(xs_base + stage * L::kXBytes, static_cast<const T*>(a.x), m0, M,
                                                  kin, u, tid, place);
    }
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

}  // namespace weightshare::cuda
