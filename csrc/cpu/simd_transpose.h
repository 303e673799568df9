#pragma once
// An 8 x 8 float transpose in AVX2 registers, shared by the Winograd weight transform (rows of decoded weights ->
// output channels as lanes) and the int8 blocked kernel's epilogue (output rows x batch lanes -> y's rows).
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

}  // namespace weightshare::cpu
#endif
