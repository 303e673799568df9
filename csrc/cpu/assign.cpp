// CPU nearest-entry assignment (search tables from search_table.h) and loss-aware assignment.
// Streams over the weights with runtime-selected AVX-512 / AVX2 / scalar paths (cpu_features.h; the tests run
// every path the CPU has and compare each with the reference bit for bit).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "weightshare/checks.h"
#include "weightshare/cpu_features.h"
#include "weightshare/dispatch.h"
#include "weightshare/parallel.h"
#include "weightshare/search_table.h"

namespace weightshare {
namespace {

constexpr int64_t kGrain = 32768;

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

// Per-group search tables on the host: thr [G, P-1], order [G, P + 16] (padded so SIMD reads stay inside),
// value [G, P].
struct SearchTables {
  int P;
  std::vector<float> thr;
  std::vector<uint8_t> order;
  int64_t thr_stride, order_stride;
};

SearchTables build_tables(const at::Tensor& codebook) {
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  const int64_t G = cb.size(0);
  const int K = static_cast<int>(cb.size(1));
  SearchTables t;
  t.P = next_pow2(K);
  t.thr_stride = std::max(1, t.P - 1);
  t.order_stride = t.P + 16;
  t.thr.assign(G * t.thr_stride, 0.0f);
  t.order.assign(G * t.order_stride, 0);
  const float* c = cb.data_ptr<float>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, G, 16, [&](int64_t b, int64_t e) {
    std::vector<float> value(t.P);
    for (int64_t g = b; g < e; ++g) {
      uint8_t* ord = t.order.data() + g * t.order_stride;
      if (build_search_table(c + g * K, K, t.thr.data() + g * t.thr_stride, ord, value.data()) < 0) bad = true;
      for (int j = t.P; j < t.order_stride; ++j) ord[j] = ord[t.P - 1];
    }
  });
  if (bad) fail_value("codebook contains NaN or Inf; codebook entries must be finite");
  return t;
}

template <typename T>
bool assign_span_scalar(const T* w, uint8_t* out, int64_t n, const float* thr, const uint8_t* order, int P) {
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float x = to_float(w[i]);
    nan |= (x != x);
    out[i] = order[search_position(thr, P, x)];
  }
  return nan;
}

#ifdef WS_X86

template <typename T>
WS_AVX2 inline __m256 load8(const T* p);
template <>
WS_AVX2 inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <>
WS_AVX2 inline __m256 load8<at::Half>(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <>
WS_AVX2 inline __m256 load8<at::BFloat16>(const at::BFloat16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

// Four vectors of 8 int32 lanes (each 0..255) -> 32 bytes in element order.
WS_AVX2 inline __m256i narrow32(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_packs_epi32(a, b);
  const __m256i cd = _mm256_packs_epi32(c, d);
  const __m256i bytes = _mm256_packus_epi16(ab, cd);  // per 128-bit lane: a0-3 b0-3 c0-3 d0-3 | a4-7 ...
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// P <= 16: the P-1 thresholds live in registers; position = number of thresholds below w (compare + subtract),
// then the sorted position maps to the original index with one byte shuffle.
// The P-1 thresholds of a table, padded with +inf to 16 (P <= 16) and its order bytes padded to 16.
struct SmallTable {
  alignas(64) float thr[32];
  alignas(64) int32_t order32[32];
  alignas(16) uint8_t order8[32];
  SmallTable(const float* t, const uint8_t* order, int P) {
    for (int r = 0; r < 32; ++r) {
      thr[r] = r < P - 1 ? t[r] : std::numeric_limits<float>::infinity();
      order8[r] = order[r < P ? r : P - 1];
      order32[r] = order8[r];
    }
  }
};

// P <= 16: position = number of thresholds below w, P-1 compares against thresholds held in registers, then
// the sorted position maps to the original index with one byte shuffle. (A vpermps binary search measured 2x
// slower here: its permutes and blends serialise on one port.)
template <typename T, int P>
WS_AVX2 bool assign_span_avx2_small(const T* w, uint8_t* out, int64_t n, const float* thr, const uint8_t* order) {
  static_assert(P <= 16, "register table holds 16");
  const SmallTable tab(thr, order, P);
  __m256 t[P > 1 ? P - 1 : 1];
  for (int r = 0; r < P - 1; ++r) t[r] = _mm256_set1_ps(tab.thr[r]);
  const __m256i otab = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(tab.order8)));
  __m256 nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i pos[4];
    for (int q = 0; q < 4; ++q) {
      const __m256 x = load8(w + i + 8 * q);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
      __m256i acc = _mm256_setzero_si256();
      for (int r = 0; r < P - 1; ++r)
        acc = _mm256_sub_epi32(acc, _mm256_castps_si256(_mm256_cmp_ps(t[r], x, _CMP_LT_OQ)));
      pos[q] = acc;
    }
    const __m256i idx = _mm256_shuffle_epi8(otab, narrow32(pos[0], pos[1], pos[2], pos[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), idx);
  }
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  return assign_span_scalar(w + i, out + i, n - i, thr, order, P) || any_nan;
}

// P > 16: branch-free binary search with gathers, four independent vectors in flight.
template <typename T, int P>
WS_AVX2 bool assign_span_avx2_gather(const T* w, uint8_t* out, int64_t n, const float* thr, const uint8_t* order) {
  __m256 nan = _mm256_setzero_ps();
  const __m256i low_byte = _mm256_set1_epi32(0xff);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256 x[4];
    __m256i pos[4];
    for (int q = 0; q < 4; ++q) {
      x[q] = load8(w + i + 8 * q);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(x[q], x[q], _CMP_UNORD_Q));
      pos[q] = _mm256_setzero_si256();
    }
    for (int step = P >> 1; step > 0; step >>= 1) {
      const __m256i s = _mm256_set1_epi32(step);
      const __m256i sm1 = _mm256_set1_epi32(step - 1);
      for (int q = 0; q < 4; ++q) {
        const __m256 tv = _mm256_i32gather_ps(thr, _mm256_add_epi32(pos[q], sm1), 4);
        const __m256i lt = _mm256_castps_si256(_mm256_cmp_ps(tv, x[q], _CMP_LT_OQ));
        pos[q] = _mm256_add_epi32(pos[q], _mm256_and_si256(lt, s));
      }
    }
    for (int q = 0; q < 4; ++q)  // order is padded by 16 bytes, so the 4-byte gathers stay inside
      pos[q] = _mm256_and_si256(_mm256_i32gather_epi32(reinterpret_cast<const int*>(order), pos[q], 1), low_byte);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), narrow32(pos[0], pos[1], pos[2], pos[3]));
  }
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  return assign_span_scalar(w + i, out + i, n - i, thr, order, P) || any_nan;
}

// ---- AVX-512: 16 weights per vector, compares into mask registers, the whole table of P <= 32 thresholds in
// two registers (vpermi2ps), so each binary-search step is add + permute + compare + masked add.
template <typename T>
WS_AVX512 inline __m512 load16(const T* p);
template <>
WS_AVX512 inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
WS_AVX512 inline __m512 load16<at::Half>(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <>
WS_AVX512 inline __m512 load16<at::BFloat16>(const at::BFloat16* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}

template <typename T, int P>
WS_AVX512 bool assign_span_avx512_small(const T* w, uint8_t* out, int64_t n, const float* thr, const uint8_t* order) {
  static_assert(P <= 32, "register table holds 32");
  const SmallTable tab(thr, order, P);
  const __m512 t0 = _mm512_load_ps(tab.thr), t1 = _mm512_load_ps(tab.thr + 16);
  const __m512i o0 = _mm512_load_si512(tab.order32), o1 = _mm512_load_si512(tab.order32 + 16);
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = load16(w + i);
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    __m512i p = _mm512_setzero_si512();
    for (int step = P >> 1; step > 0; step >>= 1) {
      const __m512i at = _mm512_add_epi32(p, _mm512_set1_epi32(step - 1));
      const __m512 t = P <= 16 ? _mm512_permutexvar_ps(at, t0) : _mm512_permutex2var_ps(t0, at, t1);
      const __mmask16 lt = _mm512_cmp_ps_mask(t, x, _CMP_LT_OQ);
      p = _mm512_mask_add_epi32(p, lt, p, _mm512_set1_epi32(step));
    }
    const __m512i idx = P <= 16 ? _mm512_permutexvar_epi32(p, o0) : _mm512_permutex2var_epi32(o0, p, o1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(idx));
  }
  return assign_span_scalar(w + i, out + i, n - i, thr, order, P) || nan != 0;
}

#endif  // WS_X86

at::Tensor assign_cpu(const at::Tensor& w, const at::Tensor& codebook) {
  const Grouping gr = check_assign(w, codebook);
  const SearchTables tab = build_tables(codebook);
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kByte));
  uint8_t* o = out.data_ptr<uint8_t>();
  std::atomic<bool> nan{false};
  const Simd simd = simd_level();
  WS_DISPATCH_FLOAT(w.scalar_type(), "weightshare::assign", [&] {
    const scalar_t* x = w.data_ptr<scalar_t>();
    WS_DISPATCH_POW2(tab.P, P, [&] {
      for_each_group_range(gr, kGrain, [&](int64_t g, int64_t b, int64_t e) {
        const float* thr = tab.thr.data() + g * tab.thr_stride;
        const uint8_t* ord = tab.order.data() + g * tab.order_stride;
        bool found_nan;
#ifdef WS_X86
        if (simd == Simd::Avx512 && P <= 32)
          found_nan = assign_span_avx512_small<scalar_t, std::min(P, 32)>(x + b, o + b, e - b, thr, ord);
        else if (simd == Simd::Avx2 && P <= 16)
          found_nan = assign_span_avx2_small<scalar_t, std::min(P, 16)>(x + b, o + b, e - b, thr, ord);
        else if (simd != Simd::Scalar)  // P > 32 with AVX-512 too: its gathers measured slower than AVX2's
          found_nan = assign_span_avx2_gather<scalar_t, P>(x + b, o + b, e - b, thr, ord);
        else
#endif
          found_nan = assign_span_scalar(x + b, o + b, e - b, thr, ord, P);
        if (found_nan) nan = true;
      });
    });
  });
  if (nan) fail_value("w contains NaN; NaN weights have no nearest codebook entry");
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Loss-aware assignment: per weight, argmin_j (0.5*h*d + g)*d + p_j with d = c_j - w, in fp32 with the rounding
// order of the reference (no FMA contraction), ties to the lowest j. Non-finite w/grad/hdiag are rejected.

struct LossAwareTables {
  at::Tensor c, p;  // float32 [G, K]
};

template <typename T>
bool loss_aware_span_scalar(const T* w, const float* g, const float* h, uint8_t* out, int64_t n, const float* c,
                            const float* p, int K) {
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    const float x = to_float(w[i]);
    const float gi = g ? to_float(g[i]) : 0.0f;
    const float hh = 0.5f * to_float(h[i]);
    bad |= !(is_finite_f(x) && is_finite_f(gi) && is_finite_f(hh));
    float best = 0.0f;
    int arg = 0;
    for (int j = 0; j < K; ++j) {
      const float d = c[j] - x;
      const float obj = (hh * d + gi) * d + p[j];
      if (j == 0 || obj < best) {
        best = obj;
        arg = j;
      }
    }
    out[i] = static_cast<uint8_t>(arg);
  }
  return bad;
}

#ifdef WS_X86
template <typename T>
WS_AVX2 bool loss_aware_span_avx2(const T* w, const float* g, const float* h, uint8_t* out, int64_t n, const float* c,
                                  const float* p, int K) {
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 exp_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7f800000));
  __m256 bad = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256 x[4], gi[4], hh[4], best[4];
    __m256i arg[4];
    for (int q = 0; q < 4; ++q) {
      x[q] = load8(w + i + 8 * q);
      gi[q] = g ? load8(g + i + 8 * q) : _mm256_setzero_ps();
      hh[q] = _mm256_mul_ps(half, load8(h + i + 8 * q));
      // non-finite: exponent bits all ones in any of the three
      const __m256 e0 = _mm256_cmp_ps(_mm256_and_ps(x[q], exp_mask), exp_mask, _CMP_EQ_OQ);
      const __m256 e1 = _mm256_cmp_ps(_mm256_and_ps(gi[q], exp_mask), exp_mask, _CMP_EQ_OQ);
      const __m256 e2 = _mm256_cmp_ps(_mm256_and_ps(hh[q], exp_mask), exp_mask, _CMP_EQ_OQ);
      bad = _mm256_or_ps(bad, _mm256_or_ps(e0, _mm256_or_ps(e1, e2)));
      const __m256 d = _mm256_sub_ps(_mm256_set1_ps(c[0]), x[q]);
      best[q] = _mm256_add_ps(_mm256_mul_ps(_mm256_add_ps(_mm256_mul_ps(hh[q], d), gi[q]), d), _mm256_set1_ps(p[0]));
      arg[q] = _mm256_setzero_si256();
    }
    for (int j = 1; j < K; ++j) {
      const __m256 cj = _mm256_set1_ps(c[j]);
      const __m256 pj = _mm256_set1_ps(p[j]);
      const __m256i jv = _mm256_set1_epi32(j);
      for (int q = 0; q < 4; ++q) {
        const __m256 d = _mm256_sub_ps(cj, x[q]);
        const __m256 obj = _mm256_add_ps(_mm256_mul_ps(_mm256_add_ps(_mm256_mul_ps(hh[q], d), gi[q]), d), pj);
        const __m256 lt = _mm256_cmp_ps(obj, best[q], _CMP_LT_OQ);
        best[q] = _mm256_blendv_ps(best[q], obj, lt);
        arg[q] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(arg[q]), _mm256_castsi256_ps(jv), lt));
      }
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), narrow32(arg[0], arg[1], arg[2], arg[3]));
  }
  const bool any_bad = _mm256_movemask_ps(bad) != 0;
  return loss_aware_span_scalar(w + i, g ? g + i : nullptr, h + i, out + i, n - i, c, p, K) || any_bad;
}
#endif  // WS_X86

at::Tensor loss_aware_assign_cpu(const at::Tensor& w, const std::optional<at::Tensor>& grad, const at::Tensor& hdiag,
                                 const at::Tensor& codebook, const std::optional<at::Tensor>& penalty) {
  const Grouping gr = check_loss_aware_assign(w, grad, hdiag, codebook, penalty);
  const at::Tensor c = codebook.to(at::kFloat).contiguous();
  const at::Tensor p = penalty.has_value() ? penalty->to(at::kFloat).contiguous() : at::zeros_like(c);
  const float* cp = c.data_ptr<float>();
  const float* pp = p.data_ptr<float>();
  for (int64_t i = 0; i < c.numel(); ++i) {
    if (!is_finite_f(cp[i])) fail_value("codebook contains NaN or Inf; codebook entries must be finite");
    // +inf forbids an entry; NaN and -inf have no meaning as a cost
    if (pp[i] != pp[i] || pp[i] == -std::numeric_limits<float>::infinity())
      fail_value("penalty contains NaN or -Inf; use +inf to forbid an entry");
  }
  const int K = static_cast<int>(c.size(1));
  // grad/hdiag are read as fp32 whatever w's dtype, as the reference reads them: in w's dtype an fp16 w would
  // round them to 11 bits and turn values above 65504 into Inf
  const at::Tensor g = grad.has_value() ? grad->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor h = hdiag.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kByte));
  uint8_t* o = out.data_ptr<uint8_t>();
  std::atomic<bool> bad{false};
  const bool simd = simd_level() >= Simd::Avx2;
  WS_DISPATCH_FLOAT(w.scalar_type(), "weightshare::loss_aware_assign", [&] {
    const scalar_t* x = w.data_ptr<scalar_t>();
    const float* gx = g.defined() ? g.data_ptr<float>() : nullptr;
    const float* hx = h.data_ptr<float>();
    for_each_group_range(gr, kGrain / 4, [&](int64_t grp, int64_t b, int64_t e) {
      const float* cg = cp + grp * K;
      const float* pg = pp + grp * K;
      const float* gb = gx ? gx + b : nullptr;
      bool found;
#ifdef WS_X86
      if (simd)
        found = loss_aware_span_avx2(x + b, gb, hx + b, o + b, e - b, cg, pg, K);
      else
#endif
        found = loss_aware_span_scalar(x + b, gb, hx + b, o + b, e - b, cg, pg, K);
      if (found) bad = true;
    });
  });
  if (bad) fail_value("w, grad or hdiag contains NaN or Inf; the loss-change model needs finite values");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, CPU, m) {
  m.impl("assign", &assign_cpu);
  m.impl("loss_aware_assign", &loss_aware_assign_cpu);
}

}  // namespace weightshare
