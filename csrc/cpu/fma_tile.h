#pragma once
// The register-tiled FMA micro-kernel shared by the CPU gradients of shared_linear: C [R][cols] (+)= sum over k of
// A[q][k] x B[k][0, cols), with R x NV vector accumulators; per k, NV vector loads of B's row and R broadcasts of A.
// A is read with strides (a[q * aq + k * ak]), so one kernel serves dL/dW = grad_out^T x (codebook_grad.cpp: A =
// grad_out transposed, B = x) and grad_x = grad_out W (shared_linear_grad_x.cpp: A = grad_out, B = a decoded tile
// of W). Two functions, not one template over the ISA: GCC compiles each function for one target.
#include <algorithm>
#include <cstdint>

#include "weightshare/cpu_features.h"

namespace weightshare::cpu {

#ifdef WS_X86
// Columns per tile: 16 x 4 (AVX-512) and 8 x 3 (AVX2: 4 x 3 accumulators + 3 loads + a broadcast = 16 registers).
constexpr int kTileRows = 4;
constexpr int64_t kTileColsAvx512 = 64, kTileColsAvx2 = 24;

// kFirst: C starts at zero, else at its stored values. cols <= 16 NV; lanes past cols are neither read nor written.
template <int R, int NV, bool kFirst>
WS_AVX512 void fma_tile_avx512(const float* a, int64_t aq, int64_t ak, const float* b, int64_t ldb, int64_t K,
                               float* c, int64_t ldc, int64_t cols) {
  __mmask16 keep[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t n = std::min<int64_t>(16, std::max<int64_t>(0, cols - 16 * v));
    keep[v] = static_cast<__mmask16>((1u << n) - 1u);
  }
  __m512 acc[R][NV];
#pragma GCC unroll 4
  for (int q = 0; q < R; ++q)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[q][v] = kFirst ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(keep[v], c + q * ldc + 16 * v);
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + k * ldb + 16 * v);
#pragma GCC unroll 4
    for (int q = 0; q < R; ++q) {
      const __m512 av = _mm512_set1_ps(a[q * aq + k * ak]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[q][v] = _mm512_fmadd_ps(av, bv[v], acc[q][v]);
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < R; ++q)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(c + q * ldc + 16 * v, keep[v], acc[q][v]);
}

// The same on AVX2. B must be readable for 8 NV columns of every row (the callers pad it); a C narrower than the
// tile goes through a local copy (AVX2's masked loads and stores are slow on AMD, and it is one block per row).
template <int R, int NV, bool kFirst>
WS_AVX2 void fma_tile_avx2(const float* a, int64_t aq, int64_t ak, const float* b, int64_t ldb, int64_t K, float* c,
                           int64_t ldc, int64_t cols) {
  alignas(32) float part[R][8 * NV];
  const bool whole = cols >= 8 * NV;
  __m256 acc[R][NV];
#pragma GCC unroll 4
  for (int q = 0; q < R; ++q) {
    if (!kFirst && !whole) {
      std::fill(part[q], part[q] + 8 * NV, 0.0f);
      std::copy(c + q * ldc, c + q * ldc + cols, part[q]);
    }
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[q][v] = kFirst ? _mm256_setzero_ps() : _mm256_loadu_ps(whole ? c + q * ldc + 8 * v : part[q] + 8 * v);
  }
  for (int64_t k = 0; k < K; ++k) {
    __m256 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + k * ldb + 8 * v);
#pragma GCC unroll 4
    for (int q = 0; q < R; ++q) {
      const __m256 av = _mm256_broadcast_ss(a + q * aq + k * ak);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[q][v] = _mm256_fmadd_ps(av, bv[v], acc[q][v]);
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < R; ++q) {
    if (whole) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + q * ldc + 8 * v, acc[q][v]);
    } else {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) _mm256_store_ps(part[q] + 8 * v, acc[q][v]);
      std::copy(part[q], part[q] + cols, c + q * ldc);
    }
  }
}

using FmaTileFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t, int64_t);

// The kernel for R rows (1..kTileRows) on the CPU's path (AVX-512: 64 columns, AVX2: 24).
template <bool kFirst>
inline FmaTileFn fma_tile(Simd simd, int64_t R) {
  static constexpr FmaTileFn avx512[kTileRows] = {fma_tile_avx512<1, 4, kFirst>, fma_tile_avx512<2, 4, kFirst>,
                                                  fma_tile_avx512<3, 4, kFirst>, fma_tile_avx512<4, 4, kFirst>};
  static constexpr FmaTileFn avx2[kTileRows] = {fma_tile_avx2<1, 3, kFirst>, fma_tile_avx2<2, 3, kFirst>,
                                                fma_tile_avx2<3, 3, kFirst>, fma_tile_avx2<4, 3, kFirst>};
  return (simd == Simd::Avx512 ? avx512 : avx2)[R - 1];
}

inline int64_t tile_cols(Simd simd) { return simd == Simd::Avx512 ? kTileColsAvx512 : kTileColsAvx2; }
#endif

}  // namespace weightshare::cpu
