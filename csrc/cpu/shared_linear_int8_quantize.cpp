// The int8 path's codebook operand (definition: reference.shared_linear, activation="int8"): each group's entries as
// integers (reference.quantize_int8_codebook: a 7-bit affine grid for K <= 16 entries, its step and phase searched
// for a layer-wide codebook; symmetric int8 above, through int8_rows.h), rounding half to even, and the per-group
// zero points that cancel the rounding residuals (reference.int8_zero_points). x's rows:
// shared_linear_int8_quantize_x.cpp.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "decode_scratch.h"
#include "int8_rows.h"
#include "shared_linear_int8.h"
#include "weightshare/dispatch.h"

// GCC 12 reports its own _mm512_undefined_*() (the pass-through operand of unmasked AVX-512 intrinsics) as "used
// uninitialized" once they are inlined here; a false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace weightshare::cpu {
namespace {

// The index frequencies as integer weights (reference.int8_zero_weights): w[k] = round(2**14 * count[k] / total),
// half up, for k < K (an index >= K is corrupt data, not counted); 0 elsewhere. They weigh the affine grid's phase
// search and the zero points.
struct ZeroWeights {
  alignas(64) int32_t w[256];
  int64_t sum = 0;  // of w (at most 2**14 + 128)
};

// The 7-bit affine grid of a codebook of K <= 16 entries (reference.quantize_int8_codebook): over [lo, hi] =
// [min(c, 0), max(c, 0)] the step s_t = hi / (126 - t) - lo / (126 - t) (1 where that is 0, NaN where the group holds
// NaN or Inf; not (hi - lo) / (126 - t), which overflows above 1.7e38); entry positions on a sub-grid of kPhases per
// step, a = rint(kPhases * (c / s)); for the grid's phase p, q = floor((a - p + 16) / 32), offset min(-min(q, 0), 127),
// q clamped to [-offset, 127 - offset]: q + offset is an unsigned 7-bit table, which the AVX2 row kernel multiplies
// with signed x bytes in one vpmaddubsw (no sign transfer, no int16 saturation). t and p are searched for a
// layer-wide codebook (affine_search), 0 and 0 for codebooks per group of rows.
constexpr int kPhases = kInt8AffinePhases, kSteps = kInt8AffineSteps;

// lo, hi: the group's min and max entries (either may be on the wrong side of 0: clamped here)
inline float affine_scale(float lo, float hi, bool finite, int t = 0) {
  if (!finite) return std::numeric_limits<float>::quiet_NaN();
  lo = std::min(lo, 0.0f);
  hi = std::max(hi, 0.0f);
  const float den = static_cast<float>(126 - t);
  const float s = hi / den - lo / den;
  return s > 0.0f ? s : 1.0f;
}

// The grid's phase p in [-16, 16) on one step (reference.quantize_int8_codebook): the first minimum of the residuals'
// weighted variance F = W * sum w d^2 - (sum w d)^2 (d = ((a - p + 16) mod 32) - 16) over p = 0, 1, ..., 15, -16,
// ..., -1; *best gets that F. One step of p lowers every d by one but for the entries at d = -16, which wrap to 15,
// so with H[m] the weight of the entries whose (a + 16) mod 32 is m the sums update in O(1) a step (S2 first: it
// reads the old S1); exact in int64 (F < 2**37).
int affine_phase(const int32_t* a, int64_t K, const ZeroWeights& zw, int64_t* best) {
  int64_t H[kPhases] = {}, S1 = 0, S2 = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int m = (a[k] + kPhases / 2) & (kPhases - 1), d = m - kPhases / 2;
    H[m] += zw.w[k];
    S1 += int64_t{zw.w[k]} * d;
    S2 += int64_t{zw.w[k]} * d * d;
  }
  const int64_t W = zw.sum;
  *best = W * S2 - S1 * S1;
  int best_step = 0;
  for (int j = 0; j + 1 < kPhases; ++j) {
    S2 += W - 2 * S1 - 2 * kPhases * H[j];
    S1 += kPhases * H[j] - W;
    const int64_t F = W * S2 - S1 * S1;
    if (F < *best) {
      *best = F;
      best_step = j + 1;
    }
  }
  return best_step < kPhases / 2 ? best_step : best_step - kPhases;
}

struct AffineChoice {
  float scale;
  int phase;
};

// The step and phase of a finite layer-wide codebook: per candidate step its best phase, then the first step
// minimising fp64(fp64(s * s) * F), the weighted variance in absolute units (times 1024 W^2). ~0.7 us; the CPUs
// with AVX2 take affine_search_avx2.
AffineChoice affine_search(const float* c, int64_t K, float lo, float hi, const ZeroWeights& zw) {
  AffineChoice out{affine_scale(lo, hi, true), 0};
  double best = std::numeric_limits<double>::infinity();
  for (int t = 0; t < kSteps; ++t) {
    const float s = affine_scale(lo, hi, true, t);
    int32_t a[16];
    for (int64_t k = 0; k < K; ++k) a[k] = static_cast<int32_t>(std::nearbyint(c[k] / s * kPhases));
    int64_t F = 0;
    const int phase = affine_phase(a, K, zw, &F);
    const double obj = (static_cast<double>(s) * static_cast<double>(s)) * static_cast<double>(F);
    if (obj < best) {
      best = obj;
      out = {s, phase};
    }
  }
  return out;
}

// One group's q (zero past K up to q_stride; all zero, offset 0, where the scale is NaN: those outputs are NaN
// anyway). search: the index weights for affine_search, or null for step 0 and phase 0 (codebooks per group of rows).
float quantize_group16_affine_scalar(const float* c, int64_t K, int8_t* q, int64_t q_stride, int32_t* offset,
                                     const ZeroWeights* search) {
  float lo = 0.0f, hi = 0.0f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    finite = finite && std::isfinite(c[k]);
    lo = std::min(lo, c[k]);
    hi = std::max(hi, c[k]);
  }
  std::fill(q, q + q_stride, int8_t(0));
  *offset = 0;
  if (!finite) return affine_scale(lo, hi, false);
  const AffineChoice g =
      search != nullptr ? affine_search(c, K, lo, hi, *search) : AffineChoice{affine_scale(lo, hi, true), 0};
  int32_t v[16];
  int qmin = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int32_t a = static_cast<int32_t>(std::nearbyint(c[k] / g.scale * kPhases));
    v[k] = (a - g.phase + kPhases / 2) >> 5;  // arithmetic shift: floor
    qmin = std::min(qmin, v[k]);
  }
  *offset = std::min(-qmin, 127);
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(std::clamp(v[k], -*offset, 127 - *offset));
  return g.scale;
}

#ifdef WS_X86
// F = W * S2 - S1 * S1 of 8 steps' sums (int32 lanes) as two float64 vectors, steps 0-3 and 4-7 (exact)
WS_AVX2 inline void phase_objective(__m256i s1, __m256i s2, __m256d w, __m256d* f) {
  const __m128i s1_lanes[2] = {_mm256_castsi256_si128(s1), _mm256_extracti128_si256(s1, 1)};
  const __m128i s2_lanes[2] = {_mm256_castsi256_si128(s2), _mm256_extracti128_si256(s2, 1)};
  for (int h = 0; h < 2; ++h) {
    const __m256d a = _mm256_cvtepi32_pd(s1_lanes[h]);
    f[h] = _mm256_fmsub_pd(w, _mm256_cvtepi32_pd(s2_lanes[h]), _mm256_mul_pd(a, a));
  }
}

// affine_search's result with the 8 candidate steps in the lanes of AVX2 registers (~0.2 us a group against ~0.7
// for the scalar form: a 10x100 layer's batch-1 call took 4.5-4.7 us before the search, 5.4 with the scalar form,
// 4.8 with this). Exact integer sums as there: S1
// and S2 fit int32 lanes (|S1| < 2**19, S2 < 2**23), F = W * S2 - S1 * S1 is formed in float64 lanes (every
// product below 2**41: exact), each lane keeps its first minimum over the phases, then the first step minimising
// fp64(s * s) * F, all as affine_search.
WS_AVX2 AffineChoice affine_search_avx2(const float* c, int64_t K, float lo, float hi, const ZeroWeights& zw) {
  lo = std::min(lo, 0.0f);
  hi = std::max(hi, 0.0f);
  const __m256 den = _mm256_setr_ps(126, 125, 124, 123, 122, 121, 120, 119);
  __m256 s = _mm256_sub_ps(_mm256_div_ps(_mm256_set1_ps(hi), den), _mm256_div_ps(_mm256_set1_ps(lo), den));
  s = _mm256_blendv_ps(_mm256_set1_ps(1.0f), s, _mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_GT_OQ));
  alignas(32) int32_t H[kPhases][kSteps] = {};
  __m256i S1 = _mm256_setzero_si256(), S2 = _mm256_setzero_si256();
  for (int64_t k = 0; k < K; ++k) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_round_ps(
        _mm256_mul_ps(_mm256_div_ps(_mm256_set1_ps(c[k]), s), _mm256_set1_ps(float(kPhases))),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i m = _mm256_and_si256(_mm256_add_epi32(a, _mm256_set1_epi32(kPhases / 2)),
                                       _mm256_set1_epi32(kPhases - 1));
    const __m256i d = _mm256_sub_epi32(m, _mm256_set1_epi32(kPhases / 2));
    const __m256i wd = _mm256_mullo_epi32(d, _mm256_set1_epi32(zw.w[k]));
    S1 = _mm256_add_epi32(S1, wd);
    S2 = _mm256_add_epi32(S2, _mm256_mullo_epi32(wd, d));
    alignas(32) int32_t ml[kSteps];
    _mm256_store_si256(reinterpret_cast<__m256i*>(ml), m);
    for (int t = 0; t < kSteps; ++t) H[ml[t]][t] += zw.w[k];
  }
  const int32_t W = static_cast<int32_t>(zw.sum);
  const __m256i Wv = _mm256_set1_epi32(W);
  const __m256d Wd = _mm256_set1_pd(W);
  __m256d best[2], best_j[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
  phase_objective(S1, S2, Wd, best);
  for (int j = 0; j + 1 < kPhases; ++j) {
    const __m256i h = _mm256_load_si256(reinterpret_cast<const __m256i*>(H[j]));
    S2 = _mm256_add_epi32(S2, _mm256_sub_epi32(_mm256_sub_epi32(Wv, _mm256_slli_epi32(S1, 1)),
                                               _mm256_slli_epi32(h, 6)));  // W - 2 S1 - 64 H: S2 first
    S1 = _mm256_add_epi32(S1, _mm256_sub_epi32(_mm256_slli_epi32(h, 5), Wv));
    __m256d f[2];
    phase_objective(S1, S2, Wd, f);
    for (int v = 0; v < 2; ++v) {
      const __m256d lt = _mm256_cmp_pd(f[v], best[v], _CMP_LT_OQ);
      best[v] = _mm256_blendv_pd(best[v], f[v], lt);
      best_j[v] = _mm256_blendv_pd(best_j[v], _mm256_set1_pd(j + 1), lt);
    }
  }
  alignas(32) double F[kSteps], J[kSteps];
  alignas(32) float sl[kSteps];
  for (int v = 0; v < 2; ++v) {
    _mm256_store_pd(F + 4 * v, best[v]);
    _mm256_store_pd(J + 4 * v, best_j[v]);
  }
  _mm256_store_ps(sl, s);
  AffineChoice out{sl[0], 0};
  double best_obj = std::numeric_limits<double>::infinity();
  for (int t = 0; t < kSteps; ++t) {
    const double obj = (static_cast<double>(sl[t]) * static_cast<double>(sl[t])) * F[t];
    if (obj < best_obj) {
      best_obj = obj;
      const int step = static_cast<int>(J[t]);
      out = {sl[t], step < kPhases / 2 ? step : step - kPhases};
    }
  }
  return out;
}

// A finite group's grid: searched (search: the index weights) or step 0 and phase 0.
WS_AVX2 inline AffineChoice affine_choice_avx2(const float* c, int64_t K, float lo, float hi,
                                               const ZeroWeights* search) {
  return search != nullptr ? affine_search_avx2(c, K, lo, hi, *search) : AffineChoice{affine_scale(lo, hi, true), 0};
}

// One group of K <= 16 entries (a codebook per output row is usually that): the affine grid, q (zero past K) and the
// biased table, as the scalar form computes them, in a few vector instructions instead of ~50 ns of scalar work per
// group.
WS_AVX512 float quantize_group16_avx512(const float* c, int64_t K, int bits, int8_t* q, int64_t q_stride, uint8_t* b,
                                        int64_t b_stride, int32_t* offset, const ZeroWeights* search) {
  const __mmask16 k = static_cast<__mmask16>((1u << K) - 1u);
  const __m512 v = _mm512_maskz_loadu_ps(k, c);  // zero past K: inside [lo, hi], which holds 0
  const __m512 a = _mm512_and_ps(v, _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff)));
  const bool finite = _mm512_cmp_ps_mask(a, _mm512_set1_ps(FLT_MAX), _CMP_LE_OQ) == 0xffff;
  const float lo = _mm512_reduce_min_ps(v), hi = _mm512_reduce_max_ps(v);
  float s = affine_scale(lo, hi, finite);
  __m512i qi = _mm512_setzero_si512();
  int o = 0;
  if (finite) {
    const AffineChoice g = affine_choice_avx2(c, K, lo, hi, search);
    s = g.scale;
    const int phase = g.phase;
    // sub-grid positions: an exact scaling by 32 of the rounded quotient, then rint
    const __m512i pos = _mm512_cvtps_epi32(
        _mm512_roundscale_ps(_mm512_mul_ps(_mm512_div_ps(v, _mm512_set1_ps(s)), _mm512_set1_ps(float(kPhases))),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    qi = _mm512_maskz_mov_epi32(k, _mm512_srai_epi32(_mm512_add_epi32(pos, _mm512_set1_epi32(kPhases / 2 - phase)), 5));
    o = std::min(-std::min(_mm512_reduce_min_epi32(qi), 0), 127);  // lanes past K are 0
    qi = _mm512_min_epi32(_mm512_max_epi32(qi, _mm512_set1_epi32(-o)), _mm512_set1_epi32(127 - o));
  }
  const __m128i q16 = _mm512_cvtepi32_epi8(qi);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), q16);
  for (int64_t j = 16; j < q_stride; ++j) q[j] = 0;
  // biased entry e = q[e mod 2**bits] + 128 for e < 64: a byte permute of q (zero past 16) by e & (2**bits - 1)
  alignas(64) uint8_t idx[64];
  for (int e = 0; e < 64; ++e) idx[e] = static_cast<uint8_t>(e & ((1 << bits) - 1));
  const __m512i tb = _mm512_permutexvar_epi8(_mm512_load_si512(idx), _mm512_zextsi128_si512(q16));
  _mm512_storeu_si512(b, _mm512_xor_si512(tb, _mm512_set1_epi8(static_cast<char>(0x80))));
  for (int64_t e = 64; e < b_stride; ++e) b[e] = 128;  // 7 and 8 bits: entries past 16 are 0
  *offset = o;
  return s;
}

// One group of 16 < K <= 256 entries (5- to 8-bit codebooks), with the same arithmetic as the x rows' quantizer
// (row_scale_avx512, quantize16_avx512), 16 entries a step straight into q, and the biased table as whole 64-byte
// copies of q's period. Before, each group went through the x-row quantizer into a 256-byte buffer, was copied out
// and zero-filled, and the biased table was built byte by byte. A 4096x64 layer with a codebook per row, batch 1
// (the codebooks' quantization most of the call): 5 bits 77-80 -> 48-55 us, 8 bits 174 -> 131-141 us; what remains
// at 8 bits is mostly the 256 divisions per row (vdivps; a multiply by the reciprocal would round differently).
WS_AVX512 float quantize_group_avx512(const float* c, int64_t K, int bits, int8_t* q, int64_t q_stride, uint8_t* b,
                                      int64_t b_stride) {
  const float scale = row_scale_avx512(c, K);
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < q_stride; j += 16) {  // q_stride = 2**bits >= K, a multiple of 16: zero past K
    const int64_t left = std::clamp<int64_t>(K - j, 0, 16);
    const __m512i qi = quantize16_avx512(c + std::min(j, K), __mmask16((1u << left) - 1u), sv);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), _mm512_maskz_cvtepi32_epi8(0xffff, qi));
  }
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  if (q_stride == 32) {  // 5 bits: the 64-entry table is q's 32 entries twice
    const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
    _mm512_storeu_si512(b, _mm512_xor_si512(v, bias));
  } else {  // 6-8 bits: b_stride = q_stride
    for (int64_t e = 0; e < b_stride; e += 64)
      _mm512_storeu_si512(b + e, _mm512_xor_si512(_mm512_loadu_si512(q + e), bias));
  }
  return scale;
}

// rint(32 * (v / scale)), as int32 lanes: the entries' sub-grid positions
WS_AVX2 inline __m256i subgrid8(__m256 v, __m256 scale) {
  return _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_div_ps(v, scale), _mm256_set1_ps(float(kPhases))),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The affine grid and q of a group of K <= 16 entries (quantize_group16_affine_scalar's bits), in two 8-lane halves.
WS_AVX2 float quantize_group16_avx2(const float* c, int64_t K, int8_t* q, int64_t q_stride, int32_t* offset,
                                    const ZeroWeights* search) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i in0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(K)), lane),
                in1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(K) - 8), lane);
  // zero past K (masked lanes are not read): inside [lo, hi], which holds 0
  const __m256 v0 = _mm256_maskload_ps(c, in0), v1 = _mm256_maskload_ps(c + 8, in1);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(FLT_MAX);
  const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(_mm256_and_ps(v0, abs_mask), big, _CMP_LE_OQ),
                                  _mm256_cmp_ps(_mm256_and_ps(v1, abs_mask), big, _CMP_LE_OQ));
  const bool finite = _mm256_movemask_ps(ok) == 0xff;
  __m256 mn = _mm256_min_ps(v0, v1), mx = _mm256_max_ps(v0, v1);
  __m128 mn4 = _mm_min_ps(_mm256_castps256_ps128(mn), _mm256_extractf128_ps(mn, 1));
  __m128 mx4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  mn4 = _mm_min_ps(mn4, _mm_movehl_ps(mn4, mn4));
  mx4 = _mm_max_ps(mx4, _mm_movehl_ps(mx4, mx4));
  mn4 = _mm_min_ss(mn4, _mm_shuffle_ps(mn4, mn4, 1));
  mx4 = _mm_max_ss(mx4, _mm_shuffle_ps(mx4, mx4, 1));
  const float lo = _mm_cvtss_f32(mn4), hi = _mm_cvtss_f32(mx4);
  float s = affine_scale(lo, hi, finite);
  __m128i q16 = _mm_setzero_si128();
  int o = 0;
  if (finite) {
    const AffineChoice g = affine_choice_avx2(c, K, lo, hi, search);
    s = g.scale;
    const int phase = g.phase;
    const __m256 sv = _mm256_set1_ps(s);
    const __m256i a0 = subgrid8(v0, sv), a1 = subgrid8(v1, sv);
    const __m256i shift = _mm256_set1_epi32(kPhases / 2 - phase);
    __m256i q0 = _mm256_and_si256(in0, _mm256_srai_epi32(_mm256_add_epi32(a0, shift), 5));  // zero past K
    __m256i q1 = _mm256_and_si256(in1, _mm256_srai_epi32(_mm256_add_epi32(a1, shift), 5));
    __m128i m4 = _mm_min_epi32(_mm256_castsi256_si128(_mm256_min_epi32(q0, q1)),
                               _mm256_extracti128_si256(_mm256_min_epi32(q0, q1), 1));
    m4 = _mm_min_epi32(m4, _mm_shuffle_epi32(m4, 0x4e));
    m4 = _mm_min_epi32(m4, _mm_shuffle_epi32(m4, 0xb1));
    o = std::min(-std::min(_mm_cvtsi128_si32(m4), 0), 127);
    const __m256i lo_q = _mm256_set1_epi32(-o), hi_q = _mm256_set1_epi32(127 - o);
    q0 = _mm256_min_epi32(_mm256_max_epi32(q0, lo_q), hi_q);
    q1 = _mm256_min_epi32(_mm256_max_epi32(q1, lo_q), hi_q);
    // int32 -> int16 -> int8 (values in range: the saturating packs are exact); packs work per 128-bit lane
    const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xd8);
    q16 = _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), q16);
  for (int64_t j = 16; j < q_stride; ++j) q[j] = 0;
  *offset = o;
  return s;
}

#endif

}  // namespace

namespace {

// The int8 zero points (definition and why: reference.int8_zero_points). Index counts over whole rows spread evenly
// over the layer, about kSampleTarget indices (a few microseconds: BITS bytes hold 8 indices, read as one word).
constexpr int64_t kSampleTarget = 8192, kSampleMaxCols = int64_t{1} << 20;

// Byte-aligned widths: a histogram of the row's whole bytes (one increment per byte, 4 tables so that no increment
// waits on the previous one's store), unfolded into index counts by the caller; other widths count their indices,
// 8 at a time from BITS bytes read as one word.
template <int BITS>
void count_row_indices(const uint8_t* row, int64_t cols, uint32_t (&bytes)[4][256], int64_t* counts) {
  constexpr uint64_t mask = (uint64_t{1} << BITS) - 1;
  int64_t i = 0;
  if constexpr (BITS == 1 || BITS == 2 || BITS == 4 || BITS == 8) {
    const int64_t whole = cols * BITS / 8;
    for (int64_t b = 0; b < whole; ++b) ++bytes[b & 3][row[b]];
    i = whole * 8 / BITS;
  } else {
    for (; i + 8 <= cols; i += 8) {
      uint64_t v = 0;
      std::memcpy(&v, row + i / 8 * BITS, BITS);  // indices i..i+7, little-endian bit order
      for (int e = 0; e < 8; ++e) ++bytes[e & 3][(v >> (e * BITS)) & mask];  // here the tables count indices
    }
  }
  for (; i < cols; ++i) ++counts[unpack_one(row, i, BITS)];
}

// The rows zero_weights samples: n rows spread evenly over the layer (row i * out / n), the first `cols` indices of
// each (`bytes` packed bytes).
struct SampledRows {
  int64_t n, cols, bytes;
  explicit SampledRows(const PackedLinear& w) : cols(std::min(w.in_features, kSampleMaxCols)) {
    bytes = (cols * w.bits + 7) / 8;
    n = std::min(w.out_features, std::max<int64_t>(1, (kSampleTarget + cols - 1) / cols));
  }
  const uint8_t* row(const PackedLinear& w, int64_t i) const { return w.packed + i * w.out_features / n * w.row_bytes; }
};

ZeroWeights zero_weights(const PackedLinear& w, int64_t K) {
  const SampledRows rows(w);
  const int64_t n = rows.n, cols = rows.cols;
  uint32_t part[4][256] = {};  // at most 2**21 indices: no overflow
  int64_t counts[256] = {};
  WS_DISPATCH_BITS(w.bits, BITS, [&] {
    for (int64_t i = 0; i < n; ++i) count_row_indices<BITS>(rows.row(w, i), cols, part, counts);
  });
  const bool byte_hist = byte_aligned(w.bits);
  const int per_byte = byte_hist ? 8 / w.bits : 1, mask = (1 << w.bits) - 1;
  for (int v = 0; v < 256; ++v) {
    const int64_t h = int64_t{part[0][v]} + part[1][v] + part[2][v] + part[3][v];
    for (int e = 0; e < per_byte; ++e) counts[byte_hist ? (v >> (e * w.bits)) & mask : v] += h;
  }
  int64_t total = 0;
  for (int64_t k = 0; k < K; ++k) total += counts[k];
  ZeroWeights out{};
  for (int64_t k = 0; k < K && total > 0; ++k) {
    out.w[k] = static_cast<int32_t>((counts[k] * (int64_t{2} << 14) + total) / (2 * total));
    out.sum += out.w[k];
  }
  return out;
}

// 2**p as a float (|p| <= 126) or a double (|p| <= 1022), built from the bits: no libm call per group
inline float pow2f(int p) {
  const uint32_t bits = static_cast<uint32_t>(127 + p) << 23;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}
inline double pow2(int p) {
  const uint64_t bits = static_cast<uint64_t>(1023 + p) << 52;
  double v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// The exponent e with |scale| in [2**(e-1), 2**e) (frexp's), from the bits where scale is a normal float.
inline int scale_exponent(float scale) {
  uint32_t bits;
  std::memcpy(&bits, &scale, sizeof(bits));
  const int biased = static_cast<int>((bits >> 23) & 0xff);
  if (biased != 0) return biased - 126;
  int e = 0;
  std::frexp(scale, &e);  // subnormal: max|c| below 2**-119
  return e;
}

// The zero point's residuals on their grid: g = rint(r * 2**(15 - e)), r = fp32(c - q * scale). The scaling is two
// multiplications by powers of two that stay inside float's range (exact: |r| is at most a step and 1/64 with the
// affine grid's phase, so |g| < 1.02 * 2**15, and no intermediate underflows), so the vector forms compute it in
// fp32 lanes, and the sums fit int32 lanes (|S| < 2**30).
struct ZeroGrid {
  int e;
  float up_a, up_b;  // 2**a * 2**b = 2**(15 - e)
};

inline ZeroGrid zero_grid(float scale) {
  const int e = scale_exponent(scale);
  const int a = std::clamp(15 - e, -100, 100);
  return {e, pow2f(a), pow2f(15 - e - a)};
}

// z = fp32(S * 2**(e - 29)), S = sum_k w[k] * g[k] (an integer, |S| < 2**30)
inline float zero_from_sum(int64_t S, int e) { return static_cast<float>(static_cast<double>(S) * pow2(e - 29)); }

float zero_point_scalar(const float* c, const int8_t* q, int64_t K, float scale, const ZeroWeights& zw) {
  if (!std::isfinite(scale)) return std::numeric_limits<float>::quiet_NaN();
  const ZeroGrid zg = zero_grid(scale);
  int64_t S = 0;
  for (int64_t k = 0; k < K; ++k) {
    // the exact residual rounded once (an fma's result); then exact power-of-two scalings and rint (half to even)
    const float r = static_cast<float>(static_cast<double>(c[k]) - static_cast<double>(q[k]) * scale);
    S += zw.w[k] * static_cast<int64_t>(std::nearbyint((r * zg.up_a) * zg.up_b));
  }
  return zero_from_sum(S, zg.e);
}

#ifdef WS_X86
// The same for groups [g0, g1), 8 entries per step in fp32 / int32 lanes (vfnmadd's single rounding is the
// residual's; vcvtps2dq rounds half to even): a codebook per output row has thousands of groups, each quantized on
// every call (the first form, float64 lanes and a division per group, added 46-74 us to 4096x4096 4-bit batch 1
// on AVX-512 and 110 us at 8 bits). The AVX-512 path runs it too: a 16-lane form measured the same on this Zen 4.
WS_AVX2 void zero_points_avx2(const PackedLinear& w, const QuantizedCodebook& cq, int64_t entries,
                              const ZeroWeights& zw, int64_t g0, int64_t g1) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t g = g0; g < g1; ++g) {
    const float scale = cq.scale[g];
    if (!std::isfinite(scale)) {
      cq.zero[g] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float* c = w.codebook + g * w.K;
    const int8_t* q = cq.table(g);  // entries up to q_stride >= 16, zero past K
    const ZeroGrid zg = zero_grid(scale);
    const __m256 sv = _mm256_set1_ps(scale), ua = _mm256_set1_ps(zg.up_a), ub = _mm256_set1_ps(zg.up_b);
    __m256i acc = _mm256_setzero_si256();
    for (int64_t k = 0; k < entries; k += 8) {
      // zero past K, as q is there (a masked load only for a partial last step: on this Zen 4 vmaskmovps in every
      // step made the pass 2x slower)
      const __m256 cv = k + 8 <= entries ? _mm256_loadu_ps(c + k)
                                         : _mm256_maskload_ps(c + k, _mm256_cmpgt_epi32(
                                                                         _mm256_set1_epi32(int(entries - k)), lane));
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k));
      const __m256 qv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
      const __m256 r = _mm256_fnmadd_ps(qv, sv, cv);
      const __m256i gi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(r, ua), ub));
      const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(zw.w + k));
      acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(gi, wv));
    }
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
    cq.zero[g] = zero_from_sum(_mm_cvtsi128_si32(h), zg.e);
  }
}
#endif

}  // namespace

void add_int8_zero_terms(const PackedLinear& w, const QuantizedX& xq, const QuantizedCodebook& cq, int64_t M,
                         const float* bias, float* y) {
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / w.out_features), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float sum = static_cast<float>(xq.sum[m]);
      float* row = y + m * w.out_features;
      // one product of two roundings, as the reference (the build keeps fp contraction off: no fma)
      const float sx = xq.scale[m];
      if (w.rows_per_group == 1) {  // a codebook per row: one vectorisable pass
        for (int64_t r = 0; r < w.out_features; ++r) row[r] += (sx * cq.zero[r]) * sum;
      } else {
        for (int64_t g = 0; g < w.groups; ++g) {
          const float term = (sx * cq.zero[g]) * sum;
          float* rows = row + g * w.rows_per_group;
          for (int64_t r = 0; r < w.rows_per_group; ++r) rows[r] += term;
        }
      }
      if (bias != nullptr) {  // in the same pass over y (it was a pass of its own)
        for (int64_t r = 0; r < w.out_features; ++r) row[r] += bias[r];
      }
    }
  });
}

namespace {

// The quantized codebook computed afresh (quantize_codebook serves it from its cache where it can).
QuantizedCodebook quantize_codebook_now(const PackedLinear& w) {
  QuantizedCodebook out;
  const int64_t period = int64_t(1) << w.bits, entries = std::min<int64_t>(w.K, period);
  const Simd simd = simd_level();
  // the biased tables feed only the AVX-512 kernels' vpdpbusd; elsewhere they are not built (AVX2, 4096 per-row
  // codebooks of 2 entries: their period-2 copies cost about half as much as the kernel)
  const bool biased = simd == Simd::Avx512;
  out.q_stride = std::max<int64_t>(16, period);
  out.biased_stride = biased ? std::max<int64_t>(64, period) : 0;
  thread_local std::vector<int8_t> q_buf;
  thread_local std::vector<uint8_t> biased_buf;
  thread_local std::vector<float> scale_buf, zero_buf;
  thread_local std::vector<int32_t> offset_buf;
  const bool affine = w.K <= kInt8AffineMaxK;
  out.offset = affine ? grown(offset_buf, static_cast<size_t>(w.groups)) : nullptr;
  out.q = grown(q_buf, static_cast<size_t>(w.groups * out.q_stride));
  out.zero = grown(zero_buf, static_cast<size_t>(w.groups));
  const ZeroWeights zw = zero_weights(w, entries);  // the zero points' index frequencies
  // the affine grid's step and phase are searched for a layer-wide codebook (reference.quantize_int8_codebook)
  const ZeroWeights* search = w.groups == 1 ? &zw : nullptr;
  out.biased = grown(biased_buf, static_cast<size_t>(w.groups * out.biased_stride + 1));  // + 1: never null
  out.scale = grown(scale_buf, static_cast<size_t>(w.groups));
  // groups in parallel: with a codebook per output row there are thousands, and this runs on every call (the serial
  // form, 256-entry tables with a modulo each, took 3.6 ms of a 3.8 ms batch-1 call on a 4096x4096 layer)
  at::parallel_for(0, w.groups, 256, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const float* c = w.codebook + g * w.K;
      int8_t* q = out.q + g * out.q_stride;
#ifdef WS_X86
      if (simd == Simd::Avx512) {  // q and the biased table
        out.scale[g] = affine ? quantize_group16_avx512(c, w.K, w.bits, q, out.q_stride,
                                                        out.biased + g * out.biased_stride, out.biased_stride,
                                                        out.offset + g, search)
                              : quantize_group_avx512(c, entries, w.bits, q, out.q_stride,
                                                      out.biased + g * out.biased_stride, out.biased_stride);
        continue;
      }
      if (simd == Simd::Avx2) {
        if (affine) {
          out.scale[g] = quantize_group16_avx2(c, w.K, q, out.q_stride, out.offset + g, search);
        } else {  // the AVX2 row quantizer (per-row 8-bit: 3.85 ms a call before)
          out.scale[g] = row_scale_avx2(c, w.K);
          quantize_row_avx2(c, entries, out.q_stride, out.scale[g], q);  // zero fills up to q_stride
        }
        continue;
      }
#endif
      if (affine) {
        out.scale[g] = quantize_group16_affine_scalar(c, w.K, q, out.q_stride, out.offset + g, search);
      } else {
        out.scale[g] = row_scale_scalar(c, w.K);
        for (int64_t j = 0; j < entries; ++j) q[j] = quantize_one(c[j], out.scale[g]);
        std::fill(q + entries, q + out.q_stride, int8_t(0));
      }
      out.zero[g] = zero_point_scalar(c, q, entries, out.scale[g], zw);
    }
#ifdef WS_X86
    if (simd != Simd::Scalar) zero_points_avx2(w, out, entries, zw, g0, g1);
#endif
  });
  return out;
}

// A thread's recently quantized codebooks (layers whose tables are small: a whole transformer's worth). Quantizing
// runs on every int8 call, and its index histogram (zero_weights) cost 40 % as much as the kernel on a 768x768
// layer at batch 1. The result is a function of the codebook's values, the layer's shape and bits, the SIMD level
// and the packed bytes zero_weights samples, and nothing else; an entry is served only when all of those compare
// equal (the codebook and the sampled bytes by memcmp), so a tensor changed in place, through .data, or freed and
// its address reused is never served stale, whatever its version counter says.
struct CachedCodebook {
  int64_t out_features = 0, in_features = 0, groups = 0, K = 0;
  int bits = 0;
  Simd simd = Simd::Scalar;
  std::vector<float> codebook;   // [groups, K], as quantized
  std::vector<uint8_t> sampled;  // the sampled rows' bytes, row after row
  std::vector<int8_t> q;
  std::vector<uint8_t> biased;
  std::vector<float> scale, zero;
  std::vector<int32_t> offset;
  QuantizedCodebook view;  // into the vectors above
  uint64_t last_use = 0;
};

constexpr size_t kCachedCodebooks = 64;             // per thread
constexpr int64_t kCacheMaxTableBytes = 16 << 10;   // codebook + tables of one entry
constexpr int64_t kCacheMaxSampledBytes = 16 << 10;

void gather_sampled(const PackedLinear& w, const SampledRows& rows, uint8_t* dst) {
  for (int64_t i = 0; i < rows.n; ++i) std::memcpy(dst + i * rows.bytes, rows.row(w, i), rows.bytes);
}

bool sampled_equal(const PackedLinear& w, const SampledRows& rows, const uint8_t* saved) {
  for (int64_t i = 0; i < rows.n; ++i)
    if (std::memcmp(saved + i * rows.bytes, rows.row(w, i), rows.bytes) != 0) return false;
  return true;
}

}  // namespace

QuantizedCodebook quantize_codebook(const PackedLinear& w) {
  const Simd simd = simd_level();
  const SampledRows rows(w);
  const int64_t period = int64_t(1) << w.bits;
  const int64_t table_bytes = w.groups * (w.K * 4 + std::max<int64_t>(16, period) + std::max<int64_t>(64, period) + 16);
  if (table_bytes > kCacheMaxTableBytes || rows.n * rows.bytes > kCacheMaxSampledBytes) return quantize_codebook_now(w);
  thread_local std::vector<CachedCodebook> cache;
  thread_local uint64_t clock = 0;
  cache.reserve(kCachedCodebooks);
  const size_t cb_bytes = static_cast<size_t>(w.groups * w.K) * sizeof(float);
  for (CachedCodebook& e : cache) {
    if (e.out_features == w.out_features && e.in_features == w.in_features && e.groups == w.groups && e.K == w.K &&
        e.bits == w.bits && e.simd == simd && std::memcmp(e.codebook.data(), w.codebook, cb_bytes) == 0 &&
        sampled_equal(w, rows, e.sampled.data())) {
      e.last_use = ++clock;
      return e.view;
    }
  }
  const QuantizedCodebook fresh = quantize_codebook_now(w);
  // into the least recently used slot (or a new one)
  CachedCodebook* slot = nullptr;
  if (cache.size() < kCachedCodebooks) {
    slot = &cache.emplace_back();
  } else {
    slot = &*std::min_element(cache.begin(), cache.end(),
                              [](const CachedCodebook& a, const CachedCodebook& b) { return a.last_use < b.last_use; });
  }
  CachedCodebook& e = *slot;
  e.out_features = w.out_features, e.in_features = w.in_features, e.groups = w.groups, e.K = w.K, e.bits = w.bits;
  e.simd = simd;
  e.codebook.assign(w.codebook, w.codebook + w.groups * w.K);
  e.sampled.resize(static_cast<size_t>(rows.n * rows.bytes));
  gather_sampled(w, rows, e.sampled.data());
  const auto copy = [](auto& vec, const auto* src, int64_t count) {
    vec.assign(src, src + (src != nullptr ? count : 0));
    return src != nullptr ? vec.data() : nullptr;
  };
  e.view = fresh;
  e.view.q = copy(e.q, fresh.q, w.groups * fresh.q_stride);
  e.view.biased = copy(e.biased, fresh.biased, w.groups * fresh.biased_stride + 1);
  e.view.scale = copy(e.scale, fresh.scale, w.groups);
  e.view.zero = copy(e.zero, fresh.zero, w.groups);
  e.view.offset = copy(e.offset, fresh.offset, w.groups);
  e.last_use = ++clock;
  return e.view;
}

}  // namespace weightshare::cpu
