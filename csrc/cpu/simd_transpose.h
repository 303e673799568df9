#pragma once
// An 8 x 8 float transpose in AVX2 registers, shared by the Winograd weight transform (rows of decoded weights ->
// output channels as lanes), the int8 blocked kernel's epilogue (output rows x batch lanes -> y's rows) and the
// float blocked GEMM's layout changes (transpose_f32).
#include "weightshare/cpu_features.h"

#ifdef WS_X86
namespace weightshare::cpu {

// Rows r[0..8) of 8 floats -> r[j] = column j (lane m of r[j] = element j of input row m).
WS_AVX2 inline void transpose8x8(__m256 (&r)[8]) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m256 q[8];
  for (int h = 0; h < 2; ++h) {  // rows 0-3 (h = 0) and 4-7 (h = 1)
    q[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
    q[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
    q[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    q[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(q[j], q[j + 4], 0x20);
    r[j + 4] = _mm256_permute2f128_ps(q[j], q[j + 4], 0x31);
  }
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols: whole 8 x 8 blocks in registers, the edges one
// element at a time. The float blocked GEMM transposes x and y with it (element by element, its x transpose took 13 %
// of a 196 x 2304 x 256 product's profile).
WS_AVX2 inline void transpose_f32(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows,
                                  int64_t cols) {
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int64_t r = 0; r < r8; r += 8) {
    for (int64_t c = 0; c < c8; c += 8) {
      __m256 v[8];
      for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(src + (r + i) * ld_src + c);
      transpose8x8(v);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (c + j) * ld_dst + r, v[j]);
    }
    for (int64_t c = c8; c < cols; ++c)
      for (int64_t i = r; i < r + 8; ++i) dst[c * ld_dst + i] = src[i * ld_src + c];
  }
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t i = r8; i < rows; ++i) dst[c * ld_dst + i] = src[i * ld_src + c];
}

}  // namespace weightshare::cpu
#endif
