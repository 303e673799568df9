// CPU grad_x of shared_linear: grad_x [M, in] = grad_out [M, out] @ W [out, in], W decoded tile by tile next to
// the registers that use it.
//
// Why not decoded panels + ATen's GEMM (the form before, still the scalar path's): each panel (up to 8 MiB of fp32)
// was written by the decode and read back by MKL, and grad_x was zero-filled and accumulated panel by panel; at
// 300x784, batch 64, that took 244 us against 184 us for the dense grad_x GEMM.
//
// Layout: the columns of grad_x are the vector dimension. A tile of W, kRc rows x TW columns (TW = 64 with AVX-512,
// 24 with AVX2), is decoded into a per-thread L1 buffer; the micro-kernel keeps R = 4 rows of grad_x x TW columns in
// registers and per row r of the tile loads TW / V vectors of W and broadcasts R values of grad_out. The sums go
// over all of out in row tiles, the accumulators parked in grad_x between tiles (in fixed order: each element is
// summed by one thread, so the result does not depend on the thread count). Each thread owns a range of column
// blocks.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "decode_scratch.h"
#include "shared_linear.h"
#include "weightshare/dispatch.h"

namespace weightshare::cpu {
namespace {

constexpr int kR = 4;          // grad_x rows per register tile
constexpr int64_t kRc = 64;    // rows of W per decoded tile: 64 x 64 floats = 16 KiB (L1)

#ifdef WS_X86
// gx rows [0, R) x columns [0, 16 NV) (+)= g rows [0, R) x tile rows [0, rc): the tile is [rc][ld] floats.
template <int R, int NV, bool kFirst>
WS_AVX512 void tile_avx512(const float* g, int64_t ldg, const float* tile, int64_t ld, int64_t rc, float* gx,
                           int64_t ldx, int64_t cols) {
  __m512 acc[R][NV];
  __mmask16 keep[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t n = std::min<int64_t>(16, std::max<int64_t>(0, cols - 16 * v));
    keep[v] = static_cast<__mmask16>((1u << n) - 1u);
  }
#pragma GCC unroll 4
  for (int q = 0; q < R; ++q)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[q][v] = kFirst ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(keep[v], gx + q * ldx + 16 * v);
  for (int64_t k = 0; k < rc; ++k) {
    __m512 wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(tile + k * ld + 16 * v);
#pragma GCC unroll 4
    for (int q = 0; q < R; ++q) {
      const __m512 gb = _mm512_set1_ps(g[q * ldg + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[q][v] = _mm512_fmadd_ps(gb, wv[v], acc[q][v]);
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < R; ++q)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(gx + q * ldx + 16 * v, keep[v], acc[q][v]);
}

template <int R, int NV, bool kFirst>
WS_AVX2 void tile_avx2(const float* g, int64_t ldg, const float* tile, int64_t ld, int64_t rc, float* gx,
                       int64_t ldx, int64_t cols) {
  // a block narrower than the tile (the row's last) goes through a local copy: AVX2's masked loads and stores are
  // slow on AMD, and this is one block per row of grad_x
  alignas(32) float part[kR][8 * NV];
  const bool whole = cols >= 8 * NV;
  __m256 acc[R][NV];
#pragma GCC unroll 4
  for (int q = 0; q < R; ++q) {
    if (!kFirst && !whole) {
      std::fill(part[q], part[q] + 8 * NV, 0.0f);
      std::copy(gx + q * ldx, gx + q * ldx + cols, part[q]);
    }
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[q][v] = kFirst ? _mm256_setzero_ps()
                         : _mm256_loadu_ps(whole ? gx + q * ldx + 8 * v : part[q] + 8 * v);
  }
  for (int64_t k = 0; k < rc; ++k) {
    __m256 wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[v] = _mm256_loadu_ps(tile + k * ld + 8 * v);
#pragma GCC unroll 4
    for (int q = 0; q < R; ++q) {
      const __m256 gb = _mm256_broadcast_ss(g + q * ldg + k);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[q][v] = _mm256_fmadd_ps(gb, wv[v], acc[q][v]);
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < R; ++q) {
    if (whole) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) _mm256_storeu_ps(gx + q * ldx + 8 * v, acc[q][v]);
    } else {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) _mm256_store_ps(part[q] + 8 * v, acc[q][v]);
      std::copy(part[q], part[q] + cols, gx + q * ldx);
    }
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, int64_t);

template <bool kFirst>
TileFn pick(Simd simd, int64_t R) {
  static constexpr TileFn avx512[kR] = {tile_avx512<1, 4, kFirst>, tile_avx512<2, 4, kFirst>,
                                        tile_avx512<3, 4, kFirst>, tile_avx512<4, 4, kFirst>};
  static constexpr TileFn avx2[kR] = {tile_avx2<1, 3, kFirst>, tile_avx2<2, 3, kFirst>, tile_avx2<3, 3, kFirst>,
                                      tile_avx2<4, 3, kFirst>};
  return (simd == Simd::Avx512 ? avx512 : avx2)[R - 1];
}
#endif

}  // namespace

bool grad_x_fused(const PackedLinear& w, const float* g, int64_t M, float* gx) {
#ifdef WS_X86
  const Simd simd = simd_level();
  if (simd == Simd::Scalar) return false;
  const int64_t in = w.in_features, out = w.out_features;
  const int64_t TW = simd == Simd::Avx512 ? 64 : 24;  // columns per block (16 x 4 / 8 x 3 accumulators per row)
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
          for (int64_t m = 0; m < M; m += kR) {
            const int64_t R = std::min<int64_t>(kR, M - m);
            (r0 == 0 ? pick<true>(simd, R) : pick<false>(simd, R))(g + m * out + r0, out, tile, TW, rc,
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
