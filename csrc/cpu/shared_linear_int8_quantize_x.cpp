// The int8 path's x operand (definition: reference.shared_linear, activation="int8"): each row quantized to
// symmetric int8 on every call, into the layout the kernels read (shared_linear_int8.h), with its scale and sum.
//
// x is quantized on every call, so it is vectorised: the scalar loop (a division, a rounding and the layout's
// index arithmetic per element) took 4.4 ns per element, 1.1 ms of a 7 ms batch-64 call on a 4096-wide layer.
// The vector forms compute the same IEEE division and rounding, so the bits equal the scalar form's.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "decode_scratch.h"
#include "int8_rows.h"
#include "shared_linear_int8.h"

// GCC 12 reports its own _mm512_undefined_*() (the pass-through operand of unmasked AVX-512 intrinsics) as "used
// uninitialized" once they are inlined here; a false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace weightshare::cpu {

// Row m of x into q (natural order, n values, zero up to `padded`); returns the sum of q.
int64_t quantize_row_scalar(const float* row, int64_t n, int64_t padded, float scale, int8_t* q) {
  int64_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    q[i] = quantize_one(row[i], scale);
    sum += q[i];
  }
  std::fill(q + n, q + padded, int8_t(0));
  return sum;
}

float row_scale_scalar(const float* row, int64_t n) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    amax = std::max(amax, std::fabs(row[i]));
    finite = finite && std::isfinite(row[i]);
  }
  return int8_scale(amax, finite);
}

#ifdef WS_X86
WS_AVX512 float row_scale_avx512(const float* row, int64_t n) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512 big = _mm512_set1_ps(FLT_MAX);
  __m512 amax = _mm512_setzero_ps();
  __mmask16 finite = 0xffff;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1u);
    const __m512 a = _mm512_and_ps(_mm512_maskz_loadu_ps(k, row + i), abs_mask);
    amax = _mm512_max_ps(amax, a);
    finite &= _mm512_cmp_ps_mask(a, big, _CMP_LE_OQ);  // false for NaN and Inf; padding lanes are 0
  }
  return int8_scale(_mm512_reduce_max_ps(amax), finite == 0xffff);
}

WS_AVX2 float row_scale_avx2(const float* row, int64_t n) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 big = _mm256_set1_ps(FLT_MAX);
  __m256 amax = _mm256_setzero_ps();
  __m256 finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(row + i), abs_mask);
    amax = _mm256_max_ps(amax, a);
    finite = _mm256_and_ps(finite, _mm256_cmp_ps(a, big, _CMP_LE_OQ));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, amax);
  float m = 0.0f;
  for (float l : lanes) m = std::max(m, l);
  bool ok = _mm256_movemask_ps(finite) == 0xff;
  for (; i < n; ++i) {
    m = std::max(m, std::fabs(row[i]));
    ok = ok && std::isfinite(row[i]);
  }
  return int8_scale(m, ok);
}

// Row of x quantized in natural order (zero up to `padded`); returns the sum.
WS_AVX2 int64_t quantize_row_avx2(const float* row, int64_t n, int64_t padded, float scale, int8_t* q) {
  const __m256 sv = _mm256_set1_ps(scale);
  int64_t sum = 0;
  int64_t i = 0;
  __m256i lane_sum = _mm256_setzero_si256();
  for (; i + 8 <= n; i += 8) {
    __m256 t = _mm256_div_ps(_mm256_loadu_ps(row + i), sv);
    t = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
    const __m256i qi = _mm256_cvtps_epi32(t);
    lane_sum = _mm256_add_epi32(lane_sum, qi);
    // int32 -> int8 (values in range, so the saturating packs are exact); packs work per 128-bit lane
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(w16, w16));
    if ((i & 4095) == 4088) {  // fold the lanes before they could overflow
      alignas(32) int32_t l[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(l), lane_sum);
      for (int32_t v : l) sum += v;
      lane_sum = _mm256_setzero_si256();
    }
  }
  alignas(32) int32_t l[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l), lane_sum);
  for (int32_t v : l) sum += v;
  return sum + quantize_row_scalar(row + i, n - i, padded - i, scale, q + i);
}
#endif

namespace {

// The byte-aligned layout from natural order, one block of S = 64 E values: element t E + s goes to s 64 + t.
void permute_block_scalar(const int8_t* in, int E, int8_t* out) {
  for (int s = 0; s < E; ++s)
    for (int t = 0; t < 64; ++t) out[s * 64 + t] = in[t * E + s];
}

#ifdef WS_X86
// out[s] byte t = byte t E + s of the E vectors v (E = 2, 4, 8): the byte-aligned layout of one block.
template <int E>
WS_AVX512 inline void deinterleave_avx512(const __m512i* v, const __m512i* idx, __m512i* out) {
  for (int s = 0; s < E; ++s) {
    // each pair of vectors (128 bytes) supplies 128 / E consecutive bytes of out[s]
    if constexpr (E == 2) {
      out[s] = _mm512_permutex2var_epi8(v[0], idx[s], v[1]);
    } else if constexpr (E == 4) {
      const __m512i lo = _mm512_permutex2var_epi8(v[0], idx[s], v[1]);
      const __m512i hi = _mm512_permutex2var_epi8(v[2], idx[s], v[3]);
      out[s] = _mm512_inserti64x4(lo, _mm512_castsi512_si256(hi), 1);
    } else {
      __m512i r = _mm512_permutex2var_epi8(v[0], idx[s], v[1]);
      r = _mm512_inserti32x4(r, _mm512_castsi512_si128(_mm512_permutex2var_epi8(v[2], idx[s], v[3])), 1);
      r = _mm512_inserti32x4(r, _mm512_castsi512_si128(_mm512_permutex2var_epi8(v[4], idx[s], v[5])), 2);
      out[s] = _mm512_inserti32x4(r, _mm512_castsi512_si128(_mm512_permutex2var_epi8(v[6], idx[s], v[7])), 3);
    }
  }
}

// Row of x into the layout: blocks of S = 64 E values (E = 1 for widths that are not byte aligned). Returns the sum.
template <int E>
WS_AVX512 int64_t quantize_row_avx512(const float* row, int64_t n, int64_t padded, float scale, int8_t* q) {
  const __m512 sv = _mm512_set1_ps(scale);
  __m512i idx[E > 1 ? E : 1];
  if constexpr (E > 1) {
    alignas(64) uint8_t b[64];
    for (int s = 0; s < E; ++s) {
      for (int j = 0; j < 64; ++j) b[j] = static_cast<uint8_t>((j * E + s) & 127);
      idx[s] = _mm512_load_si512(b);
    }
  }
  int64_t sum = 0;
  for (int64_t blk = 0; blk < padded; blk += 64 * E) {
    __m512i v[E];
    __m512i lane_sum = _mm512_setzero_si512();
    for (int e = 0; e < E; ++e) {
      __m128i part[4];
      for (int u = 0; u < 4; ++u) {
        const int64_t i = blk + 64 * e + 16 * u;
        const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, n - i));
        const __m512i qi = quantize16_avx512(row + std::min(i, n), __mmask16((1u << left) - 1u), sv);
        lane_sum = _mm512_add_epi32(lane_sum, qi);
        part[u] = _mm512_cvtepi32_epi8(qi);
      }
      __m512i r = _mm512_castsi128_si512(part[0]);
      r = _mm512_inserti32x4(r, part[1], 1);
      r = _mm512_inserti32x4(r, part[2], 2);
      v[e] = _mm512_inserti32x4(r, part[3], 3);
    }
    sum += _mm512_reduce_add_epi32(lane_sum);
    if constexpr (E == 1) {
      _mm512_storeu_si512(q + blk, v[0]);
    } else {
      __m512i out[E];
      deinterleave_avx512<E>(v, idx, out);
      for (int s = 0; s < E; ++s) _mm512_storeu_si512(q + blk + 64 * s, out[s]);
    }
  }
  return sum;
}
#endif

}  // namespace

QuantizedX quantize_x(const at::Tensor& x, int bits) {
  const int64_t M = x.size(0), in = x.size(1);
  const int64_t S = step_elems(bits);
  const int E = byte_aligned(bits) ? 8 / bits : 1;
  thread_local std::vector<int8_t> q_buf;
  thread_local std::vector<float> scale_buf;
  thread_local std::vector<int64_t> sum_buf;
  QuantizedX out;
  out.stride = (in + S - 1) / S * S;
  out.q = aligned64(grown(q_buf, static_cast<size_t>(M * out.stride + 64)));
  out.scale = grown(scale_buf, static_cast<size_t>(M));
  out.sum = grown(sum_buf, static_cast<size_t>(M));
  const float* xp = x.data_ptr<float>();
  const Simd simd = simd_level();
  at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
    std::vector<int8_t> natural;
    for (int64_t m = b; m < e; ++m) {
      const float* row = xp + m * in;
      int8_t* q = out.q + m * out.stride;
#ifdef WS_X86
      if (simd == Simd::Avx512) {
        const float scale = row_scale_avx512(row, in);
        out.scale[m] = scale;
        switch (E) {
          case 1: out.sum[m] = quantize_row_avx512<1>(row, in, out.stride, scale, q); break;
          case 2: out.sum[m] = quantize_row_avx512<2>(row, in, out.stride, scale, q); break;
          case 4: out.sum[m] = quantize_row_avx512<4>(row, in, out.stride, scale, q); break;
          default: out.sum[m] = quantize_row_avx512<8>(row, in, out.stride, scale, q); break;
        }
        continue;
      }
#endif
      // natural order straight into q, or into a buffer that is then permuted block by block
      int8_t* dst = q;
      if (E > 1) {
        natural.resize(out.stride);
        dst = natural.data();
      }
#ifdef WS_X86
      if (simd == Simd::Avx2) {
        out.scale[m] = row_scale_avx2(row, in);
        out.sum[m] = quantize_row_avx2(row, in, out.stride, out.scale[m], dst);
      } else
#endif
      {
        out.scale[m] = row_scale_scalar(row, in);
        out.sum[m] = quantize_row_scalar(row, in, out.stride, out.scale[m], dst);
      }
      if (E > 1)
        for (int64_t blk = 0; blk < out.stride; blk += S) permute_block_scalar(dst + blk, E, q + blk);
    }
  });
  return out;
}

}  // namespace weightshare::cpu
