#pragma once
// Nearest-codebook-entry search tables, built once per codebook group, shared by the CPU and CUDA kernels and
// mirrored exactly by reference.py (so assignments are bit-identical on every device).
//
// Definition of "nearest" (documented in ops.py): sort the group's K entries by value, keep for each distinct
// value its lowest original index, and between neighbouring sorted values a < b place the threshold
//     t = clamp(0.5*a + 0.5*b, a, float_below(b))         (fp32)
// lowered by one ulp (t = float_below(t), then clamped again) when b has the lower original index, so that a
// weight exactly on the midpoint goes to the lower index. A weight w is given sorted position j = #{t < w}, i.e.
// the entry whose threshold interval holds it. The clamp makes every entry win its own value exactly.
// +-Inf weights go to the largest/smallest entry; NaN weights are reported as an error by the kernels.
#include <cstdint>
#include <cstring>

#include "weightshare/macros.h"

namespace weightshare {

constexpr int kMaxCodebook = 256;

WS_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}
WS_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#endif
}
// The largest float strictly below a finite x.
WS_HD float float_below(float x) {
  if (x == 0.0f) return bits_float(0x80000001u);  // -smallest denormal
  const uint32_t u = float_bits(x);
  return bits_float(x > 0.0f ? u - 1u : u + 1u);
}
WS_HD bool is_finite_f(float x) { return (float_bits(x) & 0x7f800000u) != 0x7f800000u; }

WS_HD int next_pow2(int k) {
  int p = 1;
  while (p < k) p <<= 1;
  return p;
}

// Round-to-nearest multiply/add that the compiler may not contract into an FMA: the thresholds and the
// loss-aware objective must round exactly as the fp32 PyTorch reference does.
WS_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // host code is compiled with -ffp-contract=off
#endif
}
WS_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Fills one group's table from its K codebook values (fp32).
//   thr[0 .. P-2]: thresholds, +inf beyond the distinct count; P = next_pow2(K)
//   order[0 .. P-1]: original index of sorted position j (padding repeats the last)
//   value[0 .. P-1]: the sorted distinct values (padding repeats the last)
// Returns the number of distinct values, or -1 when a value is not finite.
// O(K^2) ranking: K <= 256 and it runs once per group (one CUDA thread per group).
WS_HD int build_search_table(const float* c, int K, float* thr, uint8_t* order, float* value) {
  const int P = next_pow2(K);
  bool first[kMaxCodebook];  // first occurrence of its value: the lowest original index represents it
  for (int j = 0; j < K; ++j) {
    if (!is_finite_f(c[j])) return -1;
    bool f = true;
    for (int l = 0; l < j; ++l) f = f && !(c[l] == c[j]);
    first[j] = f;
  }
  int distinct = 0;
  for (int j = 0; j < K; ++j) {
    if (!first[j]) continue;
    int rank = 0;  // distinct values below c[j]
    for (int l = 0; l < K; ++l) rank += (first[l] && c[l] < c[j]) ? 1 : 0;
    order[rank] = static_cast<uint8_t>(j);
    value[rank] = c[j];
    ++distinct;
  }
  const float inf = bits_float(0x7f800000u);
  for (int j = 0; j + 1 < P; ++j) {
    if (j + 1 < distinct) {
      const float a = value[j], b = value[j + 1];
      const float hi = float_below(b);
      float t = add_rn(mul_rn(0.5f, a), mul_rn(0.5f, b));  // no overflow for finite a, b
      if (order[j + 1] < order[j]) t = float_below(t);
      t = t < a ? a : t;
      t = t > hi ? hi : t;
      thr[j] = t;
    } else {
      thr[j] = inf;
    }
  }
  for (int j = distinct; j < P; ++j) {
    order[j] = order[distinct - 1];
    value[j] = value[distinct - 1];
  }
  return distinct;
}

// Sorted position of w among P entries (P a power of two): branch-free binary search over P-1 thresholds.
WS_HD int search_position(const float* thr, int P, float w) {
  int j = 0;
  for (int step = P >> 1; step > 0; step >>= 1) j += (thr[j + step - 1] < w) ? step : 0;
  return j;
}

}  // namespace weightshare
