#pragma once
// Symmetric int8 quantization of float rows (scale max|.| / 127, round half to even, clamp to [-127, 127]): the
// primitives shared by x's per-row quantization (shared_linear_int8_quantize_x.cpp) and the symmetric codebook
// grid for K > 16 (shared_linear_int8_quantize.cpp), so both round exactly as reference.py does.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "weightshare/cpu_features.h"

namespace weightshare::cpu {

// Symmetric int8 scale max|.| / 127 (1 for an all-zero slice). A slice with NaN or Inf gets a NaN scale, so its
// outputs are NaN, as on the float path, rather than finite garbage.
inline float int8_scale(float amax, bool finite) {
  if (!finite) return std::numeric_limits<float>::quiet_NaN();
  const float scale = amax / 127.0f;
  return scale > 0.0f ? scale : 1.0f;
}

// round-half-even(v / scale) clamped to [-127, 127]; a NaN (from a NaN scale) becomes -127 as std::max makes it.
inline int8_t quantize_one(float v, float scale) {
  return static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(v / scale))));
}

// max|row[0, n)| / 127 (int8_scale's rules), by ISA.
float row_scale_scalar(const float* row, int64_t n);
// row quantized in natural order into q, zero up to `padded`; returns the sum of q.
int64_t quantize_row_scalar(const float* row, int64_t n, int64_t padded, float scale, int8_t* q);

#ifdef WS_X86
WS_AVX512 float row_scale_avx512(const float* row, int64_t n);
WS_AVX2 float row_scale_avx2(const float* row, int64_t n);
WS_AVX2 int64_t quantize_row_avx2(const float* row, int64_t n, int64_t padded, float scale, int8_t* q);

// 16 values quantized to int32 lanes (lanes outside k are 0).
WS_AVX512 inline __m512i quantize16_avx512(const float* p, __mmask16 k, __m512 scale) {
  __m512 t = _mm512_div_ps(_mm512_maskz_loadu_ps(k, p), scale);
  t = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // vmaxps returns its second operand when one is NaN: -127, as std::max(-127.0f, NaN) does
  t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
  return _mm512_maskz_mov_epi32(k, _mm512_cvtps_epi32(t));
}
#endif

}  // namespace weightshare::cpu
