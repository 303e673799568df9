#pragma once
// The register-blocked GEMM micro-kernels of the CPU convolutions (direct_conv.cpp, winograd_conv.cpp): C [OC x
// positions] (+)= A [OC x K] x B [K x positions], with A repacked as [K][MR] panels and row k of B found at
// x + koff[k] (an input row segment of the direct conv, a transformed-tile row of the Winograd conv). Outputs are
// "wide" positions of which the real ones are compress-stored (direct_conv.cpp explains the layout).
#include <algorithm>
#include <cstdint>

#include "weightshare/cpu_features.h"

namespace weightshare::cpu::conv_gemm {

// One call's geometry. `wide` positions per image: OH wide rows of Wp columns.
struct Plan {
  int64_t C, OC, OH, OW, Wp, plane, K, wide, out_plane, off_max;
  const int64_t* koff;  // [K]: c * plane + ky * dh * Wp + kx * dw
};

// The number of real outputs before wide position q (real outputs are stored consecutively).
inline int64_t outputs_before(const Plan& p, int64_t q) {
  return (q / p.Wp) * p.OW + std::min(q % p.Wp, p.OW);
}

// Bit j set iff wide position q + j is a real output.
inline uint32_t real_lanes(const Plan& p, int64_t q, int lanes) {
  uint32_t m = 0;
  for (int j = 0; j < lanes; ++j) {
    const int64_t pos = q + j;
    if (pos < p.wide && pos % p.Wp < p.OW) m |= 1u << j;
  }
  return m;
}

// The per-vector facts of one tile (NR vectors starting at wide position q0).
template <int NR, int V>
struct Tile {
  uint32_t store[NR];  // real output lanes
  uint32_t load[NR];   // lanes to load: all, except near the end of the input where only real lanes are safe
  int64_t out[NR];     // output index (within a plane) of each vector's first real lane
  bool tail;           // some vector loads a subset of its lanes
  void init(const Plan& p, int64_t q0, int64_t input_end) {
    tail = false;
    // a tile is safe to load whole if its furthest read stays inside the input
    const bool whole = q0 + NR * V - 1 + p.off_max < input_end;
    for (int n = 0; n < NR; ++n) {
      const int64_t q = q0 + n * V;
      store[n] = real_lanes(p, q, V);
      load[n] = whole ? (1u << V) - 1 : store[n];  // V = 8 or 16 lanes
      tail |= !whole;
      out[n] = outputs_before(p, q);
    }
  }
};

#ifdef WS_X86
constexpr int kMr512 = 8, kNr512 = 3, kV512 = 16;
constexpr int kMr256 = 4, kNr256 = 3, kV256 = 8;

// One MR x (NR x 16) block (NR = 3, or fewer for a short last tile): a = the [K][MR] weight panel, x = the image's input at wide position q0, y = the output
// of the block's first channel (plane-strided), bias = MR values.
template <int NR, bool kMasked>
WS_AVX512 void block_avx512(const Plan& p, const float* a, const float* x, const float* bias, int rows,
                            const Tile<NR, kV512>& t, float* y) {
  __m512 acc[kMr512][NR];
#pragma GCC unroll 8
  for (int m = 0; m < kMr512; ++m) {
    const __m512 b = _mm512_set1_ps(bias[m]);
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) acc[m][n] = b;
  }
  __mmask16 lm[NR];
#pragma GCC unroll 8
  for (int n = 0; n < NR; ++n) lm[n] = static_cast<__mmask16>(t.load[n]);
  for (int64_t k = 0; k < p.K; ++k) {
    const float* b = x + p.koff[k];
    __m512 bv[NR];
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n)
      bv[n] = kMasked ? _mm512_maskz_loadu_ps(lm[n], b + 16 * n) : _mm512_loadu_ps(b + 16 * n);
    const float* ak = a + k * kMr512;
#pragma GCC unroll 8
    for (int m = 0; m < kMr512; ++m) {
      const __m512 w = _mm512_set1_ps(ak[m]);
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_fmadd_ps(w, bv[n], acc[m][n]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < kMr512; ++m) {
    if (m >= rows) break;
    float* ym = y + m * p.out_plane;
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      const __mmask16 s = static_cast<__mmask16>(t.store[n]);
      if (s == 0xffff) {
        _mm512_storeu_ps(ym + t.out[n], acc[m][n]);
      } else if (s != 0) {
        const __mmask16 first = static_cast<__mmask16>((1u << __builtin_popcount(s)) - 1u);
        _mm512_mask_storeu_ps(ym + t.out[n], first, _mm512_maskz_compress_ps(s, acc[m][n]));
      }
    }
  }
}

template <int NR, bool kMasked>
WS_AVX2 void block_avx2(const Plan& p, const float* a, const float* x, const float* bias, int rows,
                        const Tile<NR, kV256>& t, float* y) {
  alignas(32) static const int32_t bit[8] = {1, 2, 4, 8, 16, 32, 64, 128};
  const __m256i lane_bit = _mm256_load_si256(reinterpret_cast<const __m256i*>(bit));
  __m256i lm[NR];
  for (int n = 0; n < NR; ++n) {
    lm[n] = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(t.load[n])), lane_bit), lane_bit);
  }
  __m256 acc[kMr256][NR];
#pragma GCC unroll 4
  for (int m = 0; m < kMr256; ++m) {
    const __m256 b = _mm256_set1_ps(bias[m]);
#pragma GCC unroll 3
    for (int n = 0; n < NR; ++n) acc[m][n] = b;
  }
  for (int64_t k = 0; k < p.K; ++k) {
    const float* b = x + p.koff[k];
    __m256 bv[NR];
#pragma GCC unroll 3
    for (int n = 0; n < NR; ++n) bv[n] = kMasked ? _mm256_maskload_ps(b + 8 * n, lm[n]) : _mm256_loadu_ps(b + 8 * n);
    const float* ak = a + k * kMr256;
#pragma GCC unroll 4
    for (int m = 0; m < kMr256; ++m) {
      const __m256 w = _mm256_broadcast_ss(ak + m);
#pragma GCC unroll 3
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_fmadd_ps(w, bv[n], acc[m][n]);
    }
  }
  // fully unrolled like the k loop (a runtime-indexed accumulator would live in memory)
#pragma GCC unroll 4
  for (int m = 0; m < kMr256; ++m) {
    if (m >= rows) break;
    float* ym = y + m * p.out_plane;
#pragma GCC unroll 3
    for (int n = 0; n < NR; ++n) {
      const uint32_t s = t.store[n];
      if (s == 0xffu) {
        _mm256_storeu_ps(ym + t.out[n], acc[m][n]);
      } else if (s != 0) {  // no compress instruction in AVX2: the real lanes one by one
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, acc[m][n]);
        float* o = ym + t.out[n];
        for (int j = 0; j < 8; ++j)
          if (s >> j & 1u) *o++ = tmp[j];
      }
    }
  }
}

#endif  // WS_X86

}  // namespace weightshare::cpu::conv_gemm
