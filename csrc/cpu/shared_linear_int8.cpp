// CPU shared_linear, int8 path (definition: reference.shared_linear, activation="int8"): the row kernels (batch 1
// and small batches: each decoded weight vector dotted with the x rows, up to 4 at a time) and the dispatch to the
// blocked kernel (shared_linear_int8_blocked.cpp) for larger batches. The operands are quantized by shared_linear_int8_quantize.cpp;
// the layout and the +128 bias are described in shared_linear_int8.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "decode_scratch.h"
#include "int8_decode_avx2.h"
#include "shared_linear_int8.h"
#include "weightshare/cpu_decode.h"
#include "weightshare/dispatch.h"

namespace weightshare::cpu {
namespace {

// Whether the blocked kernel (each weight decoded once into an L1 panel, then a register-tiled VNNI GEMM) takes a
// batch of M x rows where it applies. It computes 16 x rows at a time, so M is padded to Mp, a multiple of 16; the
// row kernels cost in proportion to M. Measured on a 4096x4096 4-bit layer, one thread: rows 0.107 ms per x row
// (9 rows 1.08 ms, 24 rows 2.58 ms), blocked 1.65 ms per 16 lanes at 16 (1.43 at 64): blocked from 16 rows on where
// padding adds at most 1/8 (24 rows -> 32 lanes: 3.05 ms, so the rows kernel keeps them).
bool use_blocked(int64_t M) {
  const int64_t Mp = (M + 15) / 16 * 16;
  return M >= 16 && (Mp - M) * 8 <= Mp;
}

// From how many x rows the AVX2 blocked kernel beats the AVX2 row kernel (x rows 4 at a time; 2 at 2/4 bits).
// 4096x4096 layer, two threads (blocked vs rows, ms): 4 bits 4 rows 0.80 vs 0.68, 6 rows 0.98 vs 1.02, 16 rows 1.93
// vs 2.72, 64 rows 6.5 vs 10.5; 3 bits 4 rows 0.93 vs 0.83, 5 rows 0.99 vs 1.23; 5 bits 4 rows 1.03 vs 0.97, 5 rows
// 1.14 vs 1.43; 6/7/8 bits at 4 rows 1.23 vs 1.26, 1.65 vs 1.59, 2.05 vs 1.92. The 2/4-bit decode (a shift and a
// mask) is cheaper, so their rows kernel holds out longer: since it takes their x rows in pairs (session 13), up to
// 8 rows (blocked vs rows, ms, 4 bits: 6 rows 1.00-1.07 vs 0.88-0.89, 8 rows 1.19-1.52 vs 1.18-1.21, 9 rows
// 1.39-1.54 vs 1.34-1.39, 10 rows 1.37-1.52 vs 1.47-1.48; 2 bits: 9 rows 1.23-1.27 vs 1.33-1.35). 1 bit stays with
// the rows kernel at every batch (linear_int8_blocked_avx2 declines it). With AVX-VNNI on the 7-bit table (vnni_bytes:
// 2-4 bits, K <= 16) the blocked kernel's multiply is one instruction and it wins from 6 rows at 2 and 4 bits
// (session 14, Intel VM, ms, blocked vs rows: 4 bits 4 rows 0.59-0.60 vs 0.49-0.53, 6 rows 0.62-0.65 vs 0.72-0.74,
// 8 rows 0.77-0.79 vs 0.94-0.95; 2 bits 6 rows 0.56-0.59 vs 0.62; 3 bits equal from 6 rows, so 5 as before).
int64_t avx2_blocked_min_rows(int bits, bool vnni_bytes) {
  if (bits == 2 || bits == 4) return vnni_bytes ? 6 : 9;
  return 5;
}

// Index i of the quantized-x layout (undoes the byte-aligned permutation).
inline int64_t x_pos(int64_t i, int bits) {
  if (!byte_aligned(bits)) return i;
  const int64_t S = step_elems(bits), E = 8 / bits;
  return (i / S) * S + ((i % S) % E) * 64 + (i % S) / E;
}

template <int BITS>
void int8_rows_portable(const PackedLinear& w, const QuantizedX& xq, const QuantizedCodebook& cq, int64_t M,
                        int64_t r0, int64_t r1, float* y) {
  std::vector<int64_t> pos(w.in_features);
  for (int64_t i = 0; i < w.in_features; ++i) pos[i] = x_pos(i, BITS);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.packed + r * w.row_bytes;
    const int8_t* table = cq.table(r / w.rows_per_group);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* q = xq.q + m * xq.stride;
      int64_t s = 0;
      for (int64_t i = 0; i < w.in_features; ++i) s += int64_t(table[unpack_one(row, i, BITS)]) * q[pos[i]];
      y[m * w.out_features + r] = int8_output(s, xq, cq, m, r / w.rows_per_group);
    }
  }
}

// Whether a row's biased int8 sum fits an int32 (products at most 255 * 128 in magnitude; padding adds zeros).
inline bool int8_sums_fit_int32(const PackedLinear& w) {
  return w.in_features <= std::numeric_limits<int32_t>::max() / (255 * 128);
}

#ifdef WS_X86
WS_AVX512 inline int64_t reduce_epi32_as_64(__m512i v) {
  const __m512i lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v));
  const __m512i hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1));
  return _mm512_reduce_add_epi64(_mm512_add_epi64(lo, hi));
}

// The accumulator of step slot u, index s of a byte: u * E + s for one x row (8 chains), else one per (row, x row).
template <int BITS, int M, int NA>
constexpr int int8_slot(int u, int s) {
  return M == 1 ? (u * (8 / BITS) + s) % NA : 0;
}

// One byte-aligned step of R weight rows: 64 packed bytes each -> 8/BITS lookups of 64 weights, each dotted with
// the M x rows (each x vector loaded once for the R rows).
// (Templates rather than lambdas: GCC does not give a lambda its enclosing function's target attribute.)
template <int BITS, int M, int R, int NA, int U_>
WS_AVX512 inline __attribute__((always_inline)) void int8_step(const ByteLookup<BITS> (&lookup)[R],
                                                                 const __m512i (&bytes)[R], int64_t st,
                                                                 const int8_t* x, int64_t stride,
                                                                 __m512i (&acc)[R][M][NA]) {
  constexpr int E = 8 / BITS;
#pragma GCC unroll 8
  for (int s = 0; s < E; ++s) {
    __m512i wu[R];
#pragma GCC unroll 2
    for (int i = 0; i < R; ++i) wu[i] = lookup[i](ByteSteps::extract<BITS>(bytes[i], s));
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_loadu_si512(x + m * stride + st * 512 / BITS + s * 64);
#pragma GCC unroll 2
      for (int i = 0; i < R; ++i) {
        __m512i& a = acc[i][m][int8_slot<BITS, M, NA>(U_, s)];
        a = _mm512_dpbusd_epi32(a, wu[i], xv);
      }
    }
  }
}

// Steps st + U_ .. st + U - 1, unmasked, each into its own accumulator slots.
template <int BITS, int M, int R, int NA, int U_, int U>
WS_AVX512 inline __attribute__((always_inline)) void int8_steps(const ByteLookup<BITS> (&lookup)[R],
                                                                  const uint8_t* const (&row)[R], int64_t st,
                                                                  const int8_t* x, int64_t stride,
                                                                  __m512i (&acc)[R][M][NA]) {
  if constexpr (U_ < U) {
    __m512i bytes[R];
    for (int i = 0; i < R; ++i) bytes[i] = _mm512_loadu_si512(row[i] + (st + U_) * 64);
    int8_step<BITS, M, R, NA, U_>(lookup, bytes, st + U_, x, stride, acc);
    int8_steps<BITS, M, R, NA, U_ + 1, U>(lookup, row, st, x, stride, acc);
  }
}

// Steps st + U_ .. st + U - 1 of the widths that are not byte aligned (one 64-index unpack each), step u into
// accumulator slot u (M == 1) so that the slots are compile-time: a slot picked at run time (st & (NA - 1)) kept
// the accumulators in memory, a load and a store per vpdpbusd.
template <int BITS, int M, int R, int NA, int U_, int U>
WS_AVX512 inline __attribute__((always_inline)) void int8_unpacked_steps(const ByteLookup<BITS> (&lookup)[R],
                                                                           const Unpack64<BITS>& unpack64,
                                                                           const uint8_t* const (&row)[R],
                                                                           int64_t row_bytes, int64_t st,
                                                                           const int8_t* x, int64_t stride,
                                                                           __m512i (&acc)[R][M][NA]) {
  if constexpr (U_ < U) {
    __m512i wu[R];
    for (int i = 0; i < R; ++i) wu[i] = lookup[i](unpack64(row[i], row_bytes, st + U_));
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_loadu_si512(x + m * stride + (st + U_) * 64);
      for (int i = 0; i < R; ++i) {
        __m512i& a = acc[i][m][M == 1 ? U_ % NA : 0];
        if constexpr (M > 4) {  // 8 x rows: GCC copied and spilled accumulators around the value form (3 bits 0.33 ->
          dpbusd_into(a, wu[i], xv);  // 0.30 ms with the asm, 4096x4096 batch 8); at 1-4 rows the asm costs (header)
        } else {
          a = _mm512_dpbusd_epi32(a, wu[i], xv);
        }
      }
    }
    int8_unpacked_steps<BITS, M, R, NA, U_ + 1, U>(lookup, unpack64, row, row_bytes, st, x, stride, acc);
  }
}

// Rows [r, r + R) of W against x rows [m0, m0 + M): total[i][m] holds 16 int32 partial sums whose total is the
// biased dot product of weight row r + i with x row m0 + m.
// One x row (the GEMV, R = 1) has only its own chain of vpdpbusd, whose latency (4-5 cycles) then paces the loop
// (the profile showed it waiting with two chains), so U steps are unrolled into 8 chains (slot = u * E + s).
// With 2-4 x rows (R = 2), two weight rows share each x vector load: with one x load per vpdpbusd (R = 1) the loop
// took 22 cycles per 16 vpdpbusd even with x in L1 (a microbenchmark of that loop on this Zen 4 VM; 16 without the
// loads), and 8 x rows ran at 0.72x of torch's int8 Linear.
template <int BITS, int M, int R>
WS_AVX512 inline __attribute__((always_inline)) void int8_dot_rows(const PackedLinear& w, const QuantizedX& xq,
                                                                     const QuantizedCodebook& cq, int64_t m0,
                                                                     int64_t r, const int64_t (&group)[R],
                                                                     __m512i (&total)[R][M]) {
  constexpr int E = byte_aligned(BITS) ? 8 / BITS : 1;
  constexpr int U = M == 1 ? (E < 8 ? 8 / E : 1) : 1;
  constexpr int NA = M == 1 ? U * E : 1;
  const ByteSteps steps{w.row_bytes};
  const Unpack64<BITS> unpack64;  // widths that are not byte aligned
  const int64_t nsteps = xq.stride / step_elems(BITS);
  const int8_t* xrow = xq.q + m0 * xq.stride;
  ByteLookup<BITS> lookup[R];
  const uint8_t* row[R];
  for (int i = 0; i < R; ++i) {
    lookup[i] = ByteLookup<BITS>(cq.biased_table(group[i]));
    row[i] = w.packed + (r + i) * w.row_bytes;
  }
  __m512i acc[R][M][NA];
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < NA; ++a) acc[i][m][a] = _mm512_setzero_si512();
  if constexpr (byte_aligned(BITS)) {
    // whole 64-byte steps U at a time (unmasked loads), then the rest masked (zero past the row end)
    const int64_t whole = std::min(nsteps, w.row_bytes / 64);
    int64_t st = 0;
    for (; st + U <= whole; st += U) {
      // two rows ahead: the hardware prefetcher alone left the stream at half the bandwidth dense GEMV reaches
      for (int i = 0; i < R; ++i)
        for (int u = 0; u < U; ++u)
          _mm_prefetch(reinterpret_cast<const char*>(row[i] + 2 * R * w.row_bytes + (st + u) * 64), _MM_HINT_T0);
      int8_steps<BITS, M, R, NA, 0, U>(lookup, row, st, xrow, xq.stride, acc);
    }
    for (; st < nsteps; ++st) {
      __m512i bytes[R];
      for (int i = 0; i < R; ++i) bytes[i] = steps.load(row[i], st);
      int8_step<BITS, M, R, NA, 0>(lookup, bytes, st, xrow, xq.stride, acc);
    }
  } else {
    // U steps (U x 8 BITS bytes, at least one cache line) per prefetch of the row two rows ahead
    int64_t st = 0;
    for (; st + U <= nsteps; st += U) {
      for (int i = 0; i < R; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(row[i] + 2 * R * w.row_bytes + st * 8 * BITS), _MM_HINT_T0);
      int8_unpacked_steps<BITS, M, R, NA, 0, U>(lookup, unpack64, row, w.row_bytes, st, xrow, xq.stride, acc);
    }
    for (; st < nsteps; ++st)
      int8_unpacked_steps<BITS, M, R, NA, 0, 1>(lookup, unpack64, row, w.row_bytes, st, xrow, xq.stride, acc);
  }
  for (int i = 0; i < R; ++i) {
    for (int m = 0; m < M; ++m) {
      __m512i t = acc[i][m][0];
      for (int a = 1; a < NA; ++a) t = _mm512_add_epi32(t, acc[i][m][a]);
      total[i][m] = t;
    }
  }
}

// Rows [r0, r1) of W, R at a time, against x rows [m0, m0 + M): y[m][r] by the int8 definition, each sum reduced
// in 64 bits (any row length).
template <int BITS, int M, int R>
WS_AVX512 void int8_rows_avx512(const PackedLinear& w, const QuantizedX& xq, const QuantizedCodebook& cq,
                                int64_t m0, int64_t r0, int64_t r1, float* y) {
  RowGroups groups(w, r0);
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    __m512i total[R][M];
    int64_t group[R];
    for (int i = 0; i < R; ++i) {
      groups.advance(r + i);
      group[i] = groups.group;
    }
    int8_dot_rows<BITS, M, R>(w, xq, cq, m0, r, group, total);
    for (int i = 0; i < R; ++i) {
      for (int m = 0; m < M; ++m) {
        y[(m0 + m) * w.out_features + r + i] = int8_output(reduce_epi32_as_64(total[i][m]) - 128 * xq.sum[m0 + m],
                                                           xq, cq, m0 + m, group[i]);
      }
    }
  }
  if constexpr (R > 1) {
    if (r < r1) int8_rows_avx512<BITS, M, 1>(w, xq, cq, m0, r, r1, y);
  }
}

// Lane i of the result: the sum of the 16 lanes of v[i] (a transposing add tree: 45 instructions for 16 rows,
// where reducing each row on its own took a dozen).
WS_AVX512 inline __m512i reduce16_epi32(const __m512i (&v)[16]) {
  __m512i a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit chunk: rows 2i, 2i+1 interleaved, two lanes each
    a[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                            _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit chunk: rows 4i .. 4i+3, one lane each
    b[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * i], a[2 * i + 1]),
                            _mm512_unpackhi_epi64(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 2; ++i)  // chunk pairs summed: rows 8i .. 8i+7, two chunks each
    c[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0x88),
                            _mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(c[0], c[1], 0x88), _mm512_shuffle_i32x4(c[0], c[1], 0xDD));
}

// One x row, rows [r0, r1), 16 at a time: their lane sums reduced together by reduce16_epi32, then converted and
// scaled as one vector. Only where an int32 total cannot overflow (int8_sums_fit_int32): every biased product is
// at most 255 * 128 in magnitude. The per-row 64-bit reduction and scalar epilogue cost as much as the dot product
// of a 768-long row (4096 x 768, 4 bits, one thread: about 13 ns a row, 6.5 of them the dot product).
template <int BITS>
WS_AVX512 void int8_gemv_avx512(const PackedLinear& w, const QuantizedX& xq, const QuantizedCodebook& cq,
                                int64_t r0, int64_t r1, float* y) {
  const __m512i bias_sum = _mm512_set1_epi32(static_cast<int32_t>(128 * xq.sum[0]));
  const float sx = xq.scale[0];
  alignas(64) float scale[16] = {};
  RowGroups groups(w, r0);
  for (int64_t r = r0; r < r1; r += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, r1 - r));
    __m512i v[16];
    for (int i = 0; i < 16; ++i) {
      if (i < n) {
        groups.advance(r + i);
        __m512i t[1][1];
        const int64_t g[1] = {groups.group};
        int8_dot_rows<BITS, 1, 1>(w, xq, cq, 0, r + i, g, t);
        v[i] = t[0][0];
        scale[i] = sx * cq.scale[groups.group];
      } else {
        v[i] = _mm512_setzero_si512();
      }
    }
    // the reference's float(exact integer sum) * (scale_x * scale_w): int32 -> float rounds as int64 -> float does
    const __m512i sums = _mm512_sub_epi32(reduce16_epi32(v), bias_sum);
    const __m512 out = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_load_ps(scale));
    _mm512_mask_storeu_ps(y + r, static_cast<__mmask16>((1u << n) - 1), out);
  }
}

// The AVX2 row kernel (int8_rows_avx2.inc), as plain AVX2 and with AVX-VNNI.
namespace avx2_plain {
#define WS_INT8_ROWS_TARGET WS_AVX2
#define WS_INT8_ROWS_VNNI 0
#include "int8_rows_avx2.inc"
#undef WS_INT8_ROWS_TARGET
#undef WS_INT8_ROWS_VNNI
}  // namespace avx2_plain
namespace avx2_vnni {
#define WS_INT8_ROWS_TARGET WS_AVX2_VNNI
#define WS_INT8_ROWS_VNNI 1
#include "int8_rows_avx2.inc"
#undef WS_INT8_ROWS_TARGET
#undef WS_INT8_ROWS_VNNI
}  // namespace avx2_vnni

// With AVX-VNNI (`vnni`) the unsigned-table form at every width from 2 bits (vpdpbusd takes any unsigned byte);
// without, where the codebook has the 7-bit table (2-4 bits), else the signed form.
template <int BITS, int M>
WS_AVX2 void int8_rows_avx2_any(const PackedLinear& w, const QuantizedX& xq, const QuantizedCodebook& cq, int64_t m0,
                                int64_t r0, int64_t r1, float* y, bool vnni) {
  if constexpr (BITS >= 2) {
    if (vnni) return avx2_vnni::int8_rows_avx2<BITS, M, true>(w, xq, cq, m0, r0, r1, y);
  }
  if constexpr (BITS >= 2 && BITS <= 4) {
    if (cq.offset != nullptr) return avx2_plain::int8_rows_avx2<BITS, M, true>(w, xq, cq, m0, r0, r1, y);
  }
  avx2_plain::int8_rows_avx2<BITS, M, false>(w, xq, cq, m0, r0, r1, y);
}

#endif

// float(acc) * (scale_x * scale_w) for every output, by the kernel that suits the batch and the CPU
// The kernels' float(acc) * (scale_x * scale_w) into y; true when the blocked VNNI kernel ran, whose epilogue also
// added the zero points' term and the bias.
bool run_int8_kernels(const PackedLinear& w, const QuantizedX& xq, const QuantizedCodebook& cq, int64_t M,
                      const float* bias, float* y) {
  if (use_blocked(M) && linear_int8_blocked(w, xq, cq, M, bias, y)) return true;
  const bool vnni_bytes = simd_level() == Simd::Avx2 && avx_vnni() && w.bits > 1;
  if (M >= avx2_blocked_min_rows(w.bits, vnni_bytes) && linear_int8_blocked_avx2(w, xq, cq, M, y)) return false;
  const Simd simd = simd_level();
  const bool vnni = simd == Simd::Avx2 && avx_vnni();
  WS_DISPATCH_BITS(w.bits, BITS, [&] {
    at::parallel_for(0, w.out_features, std::max<int64_t>(1, 65536 / w.in_features), [&](int64_t r0, int64_t r1) {
#ifdef WS_X86
      if (simd == Simd::Avx512) {
        // one x row: the 8-chain GEMV; more: groups of up to 4 x rows, two weight rows at a time
        if (M == 1) {
          if (int8_sums_fit_int32(w)) {
            int8_gemv_avx512<BITS>(w, xq, cq, r0, r1, y);
          } else {
            int8_rows_avx512<BITS, 1, 1>(w, xq, cq, 0, r0, r1, y);
          }
          return;
        }
        // Widths that are not byte aligned take up to 8 x rows per pass: their decode (an unpack of 64 indices)
        // costs enough that doing it once for 8 rows beats the x rows' reuse from L1 (4096x4096, batch 8, two
        // threads, same-process A/B, ms: 3 bits 0.47 -> 0.30, 5 bits 0.48 -> 0.33, 6 bits 0.37-0.50 -> 0.26-0.36,
        // 7 bits 0.41-0.55 -> 0.32-0.42). Byte-aligned widths (a shift and a permute) ran 2.3x slower so: 4 rows.
        constexpr int64_t kGroup = byte_aligned(BITS) ? 4 : 8;
        for (int64_t m0 = 0; m0 < M; m0 += kGroup) {
          switch (std::min<int64_t>(kGroup, M - m0)) {
            case 1: int8_rows_avx512<BITS, 1, 2>(w, xq, cq, m0, r0, r1, y); break;
            case 2: int8_rows_avx512<BITS, 2, 2>(w, xq, cq, m0, r0, r1, y); break;
            case 3: int8_rows_avx512<BITS, 3, 2>(w, xq, cq, m0, r0, r1, y); break;
            case 4: int8_rows_avx512<BITS, 4, 2>(w, xq, cq, m0, r0, r1, y); break;
            default:
              if constexpr (kGroup == 8) {
                switch (M - m0) {
                  case 5: int8_rows_avx512<BITS, 5, 2>(w, xq, cq, m0, r0, r1, y); break;
                  case 6: int8_rows_avx512<BITS, 6, 2>(w, xq, cq, m0, r0, r1, y); break;
                  case 7: int8_rows_avx512<BITS, 7, 2>(w, xq, cq, m0, r0, r1, y); break;
                  default: int8_rows_avx512<BITS, 8, 2>(w, xq, cq, m0, r0, r1, y); break;
                }
              }
              break;
          }
        }
        return;
      }
      if (simd == Simd::Avx2) {
        // x rows 4 at a time, or at 2 and 4 bits (a cheap decode: a shift and a mask) 2 at a time (3 for an odd
        // remainder of 3): the 4-row loop spills its accumulators, and redecoding costs less than the spills there.
        // 4096x4096, AVX2 emulated, same-run A/B: 4 rows 626-645 -> 588-596 us, 5 rows 798-831 -> 727-731; 3 rows
        // as 2 + 1 would lose 8 %; at 1 bit no gain, at 3 and 5 bits 2-row groups lost 19-33 % (session 12).
        const bool pairs = BITS == 2 || BITS == 4;
        for (int64_t m0 = 0, take = 0; m0 < M; m0 += take) {
          const int64_t rem = M - m0;
          take = !pairs ? std::min<int64_t>(4, rem) : rem == 3 ? 3 : std::min<int64_t>(2, rem);
          switch (take) {
            case 1: int8_rows_avx2_any<BITS, 1>(w, xq, cq, m0, r0, r1, y, vnni); break;
            case 2: int8_rows_avx2_any<BITS, 2>(w, xq, cq, m0, r0, r1, y, vnni); break;
            case 3: int8_rows_avx2_any<BITS, 3>(w, xq, cq, m0, r0, r1, y, vnni); break;
            default: int8_rows_avx2_any<BITS, 4>(w, xq, cq, m0, r0, r1, y, vnni); break;
          }
        }
        return;
      }
#endif
      int8_rows_portable<BITS>(w, xq, cq, M, r0, r1, y);
    });
  });
  return false;
}

}  // namespace

void linear_int8(const PackedLinear& w, const at::Tensor& x_f32, const float* bias, float* y) {
  const int64_t M = x_f32.size(0);
  const QuantizedX xq = quantize_x(x_f32, w.bits);
  const QuantizedCodebook cq = quantize_codebook(w);
  if (!run_int8_kernels(w, xq, cq, M, bias, y)) add_int8_zero_terms(w, xq, cq, M, bias, y);
}

}  // namespace weightshare::cpu
