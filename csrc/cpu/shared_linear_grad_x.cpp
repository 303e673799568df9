// CPU grad_x of shared_linear: grad_x [M, in] = grad_out [M, out] @ W [out, in], W decoded tile by tile next to
// the registers that use it.
//
// Why not decoded panels + ATen's GEMM (the form before, still the scalar path's): each panel (up to 8 MiB of fp32)
// was written by the decode and read back by MKL, and grad_x was zero-filled and accumulated panel by panel; at
// 300x784, batch 64, that took 244 us against 184 us for the dense grad_x GEMM.
//
// Layout: the columns of grad_x are the vector dimension. A tile of W, kRc rows x TW columns (TW = 64 with AVX-512,
// 24 with AVX2), is decoded into a per-thread L1 buffer; the micro-kernel (fma_tile.h) keeps 4 rows of grad_x x TW
// columns in registers and per row of the tile loads TW / V vectors of W and broadcasts 4 values of grad_out. The
// sums go over all of out in row tiles, the accumulators parked in grad_x between tiles (in fixed order: each
// element is summed by one thread, so the result does not depend on the thread count). Each thread owns a range of
// column blocks.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "decode_scratch.h"
#include "fma_tile.h"
#include "shared_linear.h"
#include "weightshare/dispatch.h"

namespace weightshare::cpu {
namespace {

constexpr int64_t kRc = 64;    // rows of W per decoded tile: 64 x 64 floats = 16 KiB (L1)

}  // namespace

bool grad_x_fused(const PackedLinear& w, const float* g, int64_t M, float* gx) {
#ifdef WS_X86
  const Simd simd = simd_level();
  if (simd == Simd::Scalar) return false;
  const int64_t in = w.in_features, out = w.out_features;
  const int64_t TW = tile_cols(simd);
  const int64_t blocks = (in + TW - 1) / TW;
  WS_DISPATCH_BITS(w.bits, BITS, [&] {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      thread_local std::vector<float> tile_store;
      float* tile = grown(tile_store, static_cast<size_t>(kRc * TW));
      GroupTable gt;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * TW, cols = std::min(TW, in - i0);
        for (int64_t r0 = 0; r0 < out; r0 += kRc) {
          const int64_t rc = std::min(kRc, out - r0);
          // the block's columns of rows [r0, r0 + rc), zero past the row's end
          decode_block<BITS>(w, r0, static_cast<int>(rc), static_cast<int>(rc), i0, cols, simd, gt, tile, TW);
          if (cols < TW)
            for (int64_t k = 0; k < rc; ++k) std::fill(tile + k * TW + cols, tile + (k + 1) * TW, 0.0f);
          for (int64_t m = 0; m < M; m += kTileRows) {
            // grad_x [m + q][i0 + ...] (+)= sum_k g[m + q][r0 + k] W[r0 + k][i0 + ...]
            const int64_t R = std::min<int64_t>(kTileRows, M - m);
            (r0 == 0 ? fma_tile<true>(simd, R) : fma_tile<false>(simd, R))(g + m * out + r0, out, 1, tile, TW, rc,
                                                                              gx + m * in + i0, in, cols);
          }
        }
      }
    });
  });
  return true;
#else
  (void)w, (void)g, (void)M, (void)gx;
  return false;
#endif
}

}  // namespace weightshare::cpu
