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
// the rows kernel at every batch (linear_int8_blocked_avx2 declines it).
int64_t avx2_blocked_min_rows(int bits) { return bits == 2 || bits == 4 ? 9 : 5; }

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
        a = _mm512_dpbusd_epi32(a, wu[i], xv);
      }
    }
    int8_unpacked_steps<BITS, M, R, NA, U_ + 1, U>(lookup, unpack64, row, row_bytes, st, x, stride, acc);
  }
}

// Rows [r0, r1) of W, R at a time, against x rows [m0, m0 + M): y[m][r] by the int8 definition.
// One x row (the GEMV, R = 1) has only its own chain of vpdpbusd, whose latency (4-5 cycles) then paces the loop
// (the profile showed it waiting with two chains), so U steps are unrolled into 8 chains (slot = u * E + s).
// With 2-4 x rows (R = 2), two weight rows share each x vector load: with one x load per vpdpbusd (R = 1) the loop
// took 22 cycles per 16 vpdpbusd even with x in L1 (a microbenchmark of that loop on this Zen 4 VM; 16 without the
// loads), and 8 x rows ran at 0.72x of torch's int8 Linear.
template <int BITS, int M, int R>
WS_AVX512 void int8_rows_avx512(const PackedLinear& w, const QuantizedX& xq, const QuantizedCodebook& cq,
                                int64_t m0, int64_t r0, int64_t r1, float* y) {
  constexpr int E = byte_aligned(BITS) ? 8 / BITS : 1;
  constexpr int U = M == 1 ? (E < 8 ? 8 / E : 1) : 1;
  constexpr int NA = M == 1 ? U * E : 1;
  const ByteSteps steps{w.row_bytes};
  const Unpack64<BITS> unpack64;  // widths that are not byte aligned
  const int64_t nsteps = xq.stride / step_elems(BITS);
  const int8_t* xrow = xq.q + m0 * xq.stride;
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    ByteLookup<BITS> lookup[R];
    const uint8_t* row[R];
    for (int i = 0; i < R; ++i) {
      lookup[i] = ByteLookup<BITS>(cq.biased_table((r + i) / w.rows_per_group));
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
        __m512i total = acc[i][m][0];
        for (int a = 1; a < NA; ++a) total = _mm512_add_epi32(total, acc[i][m][a]);
        y[(m0 + m) * w.out_features + r + i] = int8_output(reduce_epi32_as_64(total) - 128 * xq.sum[m0 + m], xq, cq,
                                                           m0 + m, (r + i) / w.rows_per_group);
      }
    }
  }
  if constexpr (R > 1) {
    if (r < r1) int8_rows_avx512<BITS, M, 1>(w, xq, cq, m0, r, r1, y);
  }
}

// AVX2 (no VNNI), every width. The weights stay signed and products go through vpmaddubsw (u8 x s8 pairs into s16)
// as |x| x (w * sign(x)): each pair is at most 2 x 127 x 127 = 32258, so the s16 never saturates and the sums are
// exact. Each 32 weights are decoded once (Avx2Int8Decoder's lookup) and multiplied with the M x rows straight from
// registers. The x layout is the AVX-512 kernel's: byte-aligned widths in 64-byte steps (two 32-byte halves here,
// "the s-th index of every byte" by a shift and a mask), the others in natural order (64-index steps of 8 BITS
// bytes, two halves of 32 unpacked by Avx2Unpack32). Before, 3 and 5-8 bits decoded each row into an L1 buffer and
// then dotted it: 4096x4096 at batch 1 3 bits 0.52 -> 0.37 ms (with Avx2Unpack32's one-load form), 5 bits
// 0.63 -> 0.49, 8 bits 1.48 -> 1.37. At 1 bit there is no lookup (kBitPlane below): batch 1 0.18 -> 0.11 ms.
// U (2-4 bits, a codebook of K <= 16: QuantizedCodebook::offset): the table holds q + offset in [0, 127], which
// vpmaddubsw takes as its unsigned operand straight against x (pairs within +-32258: exact), and offset * sum(x)
// comes off at the end: no sign transfer and no |x| loads (the reason for the 7-bit affine grid).
template <int BITS, int M, bool U>
WS_AVX2 void int8_rows_avx2(const PackedLinear& w, const QuantizedX& xq, const QuantizedCodebook& cq, int64_t m0,
                            int64_t r0, int64_t r1, float* y) {
  constexpr bool kAligned = byte_aligned(BITS);
  constexpr int E = kAligned ? 8 / BITS : 1;         // indices per byte, each a 32-index vector per half
  constexpr int64_t S = step_elems(BITS);            // indices per step
  constexpr int64_t kStepBytes = S * BITS / 8;       // packed bytes per step (64, or 8 BITS)
  constexpr int64_t kHalfBytes = kStepBytes / 2;
  // the last byte a step reads: the second half's second 16-byte load (Avx2Unpack32) ends 6 BITS + 16 bytes in
  constexpr int64_t kStepReach = kAligned ? kStepBytes : 6 * BITS + 16;
  const int64_t nsteps = xq.stride / S;
  // Steps read whole from the packed tensor: indices read past a row's end (the next row's bytes) meet x's zero
  // padding and add nothing, so only the reads past the tensor's end go through a zeroed copy (before, every row's
  // last step did: a 4096x64 4-bit layer at batch 1 took 52 us, 24 us now).
  const int64_t packed_bytes = w.out_features * w.row_bytes;
  const auto whole_steps = [&](int64_t r) {
    const int64_t avail = packed_bytes - r * w.row_bytes;  // bytes from row r's start to the tensor's end
    return avail >= kStepReach ? std::min(nsteps, (avail - kStepReach) / kStepBytes + 1) : int64_t{0};
  };
  const __m256i ones = _mm256_set1_epi16(1);
  // 1 bit: no lookup. sum_j q[b_j] x_j = q[0] sum(x) + (q[1] - q[0]) sum_j b_j x_j, and the 0/1 index bytes go
  // straight into vpmaddubsw as its unsigned operand (pairs within +-254, so the 16 of a step add up in int16 and
  // widen once per step): 2 multiply-pipe uops per 32 weights instead of 3 (sign, pairs, widening) and no shuffle.
  constexpr bool kBitPlane = BITS == 1;
  static_assert(!U || (BITS >= 2 && BITS <= 4), "the unsigned table is one 16-entry pshufb");
  // an int32 lane gains per step 2E vectors of 4 products (<= 127 x 127 each), or at 1 bit two int16 lanes of 2E
  // pair sums (<= 254 each): fold into int64 before 2^31
  constexpr int64_t kFold = (int64_t{1} << 31) / (kBitPlane ? 2 * 254 * 2 * E : 127 * 127 * 4 * 2 * E);
  Avx2Int8Decoder<BITS> decoder;
  // |x| of the M rows, taken once here rather than per weight row (not read at 1 bit)
  thread_local std::vector<int8_t> abs_buf;
  constexpr bool kAbsX = !kBitPlane && !U;
  int8_t* ax = kAbsX ? aligned64(grown(abs_buf, static_cast<size_t>(M * xq.stride + 64))) : nullptr;
  for (int m = 0; m < (kAbsX ? M : 0); ++m)
    for (int64_t i = 0; i < xq.stride; i += 32) {
      const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(xq.q + (m0 + m) * xq.stride + i));
      _mm256_store_si256(reinterpret_cast<__m256i*>(ax + m * xq.stride + i), _mm256_abs_epi8(v));
    }
  int64_t group = -1;
  for (int64_t r = r0; r < r1; ++r) {
    if (r / w.rows_per_group != group) {
      group = r / w.rows_per_group;
      if constexpr (U) {
        decoder.set_table_offset(cq.table(group), cq.offset[group]);
      } else if constexpr (!kBitPlane) {
        decoder.set_table(cq.table(group));
      }
    }
    const uint8_t* row = w.packed + r * w.row_bytes;
    const int64_t whole = whole_steps(r);
    int64_t total[M] = {};
    for (int64_t f0 = 0; f0 < nsteps; f0 += kFold) {
      __m256i acc[M];
      for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_si256();
      for (int64_t st = f0; st < std::min(nsteps, f0 + kFold); ++st) {
        [[maybe_unused]] __m256i acc16[M];
        if constexpr (kBitPlane)
          for (int m = 0; m < M; ++m) acc16[m] = _mm256_setzero_si256();
        const uint8_t* src = row + st * kStepBytes;
        // the row two rows on into L1, a step (64 or 8 BITS bytes) at a time: Intel's hardware prefetchers alone
        // left this stream from DRAM at 0.70 ms against the AVX-512 kernel's 0.47 (4096x4096 4 bits, batch 1)
        _mm_prefetch(reinterpret_cast<const char*>(src + 2 * w.row_bytes), _MM_HINT_T0);
        alignas(32) uint8_t tail[128];
        if (st >= whole) {  // the last rows' last steps: zero bytes past the tensor's end
          std::memset(tail, 0, sizeof(tail));
          std::memcpy(tail, src,
                      static_cast<size_t>(std::clamp<int64_t>(packed_bytes - (src - w.packed), 0, 128)));
          src = tail;
        }
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          [[maybe_unused]] __m256i bytes;
          if constexpr (kAligned) bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * h));
#pragma GCC unroll 8
          for (int s = 0; s < E; ++s) {
            __m256i idx;
            if constexpr (kAligned) {
              idx = decoder.byte_indices(bytes, s);
            } else {
              idx = decoder.unpacked32(src + kHalfBytes * h);
            }
            const int64_t at = st * S + s * 64 + 32 * h;  // the layout's position of these 32 weights
            if constexpr (kBitPlane) {
#pragma GCC unroll 4
              for (int m = 0; m < M; ++m) {
                const __m256i xv = _mm256_load_si256(reinterpret_cast<const __m256i*>(xq.q + (m0 + m) * xq.stride + at));
                acc16[m] = _mm256_add_epi16(acc16[m], _mm256_maddubs_epi16(idx, xv));
              }
              continue;
            }
            const __m256i wq = decoder.lookup(idx);
            if constexpr (U) {
#pragma GCC unroll 4
              for (int m = 0; m < M; ++m) {
                const __m256i xv =
                    _mm256_load_si256(reinterpret_cast<const __m256i*>(xq.q + (m0 + m) * xq.stride + at));
                acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(_mm256_maddubs_epi16(wq, xv), ones));
              }
              continue;
            }
#pragma GCC unroll 4
            for (int m = 0; m < M; ++m) {
              const __m256i xv = _mm256_load_si256(reinterpret_cast<const __m256i*>(xq.q + (m0 + m) * xq.stride + at));
              const __m256i av = _mm256_load_si256(reinterpret_cast<const __m256i*>(ax + m * xq.stride + at));
              const __m256i prod = _mm256_maddubs_epi16(av, _mm256_sign_epi8(wq, xv));
              acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(prod, ones));
            }
          }
        }
        if constexpr (kBitPlane)
          for (int m = 0; m < M; ++m) acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(acc16[m], ones));
      }
      for (int m = 0; m < M; ++m) {
        alignas(32) int32_t lanes[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[m]);
        for (int j = 0; j < 8; ++j) total[m] += lanes[j];
      }
    }
    if constexpr (kBitPlane) {
      const int64_t q0 = cq.table(group)[0], q1 = cq.table(group)[1];
      for (int m = 0; m < M; ++m) total[m] = q0 * xq.sum[m0 + m] + (q1 - q0) * total[m];
    }
    if constexpr (U)
      for (int m = 0; m < M; ++m) total[m] -= int64_t{cq.offset[group]} * xq.sum[m0 + m];
    for (int m = 0; m < M; ++m) y[(m0 + m) * w.out_features + r] = int8_output(total[m], xq, cq, m0 + m, group);
  }
}

// The unsigned-table form where the codebook has one (2-4 bits), else the signed one.
template <int BITS, int M>
WS_AVX2 void int8_rows_avx2_any(const PackedLinear& w, const QuantizedX& xq, const QuantizedCodebook& cq, int64_t m0,
                                int64_t r0, int64_t r1, float* y) {
  if constexpr (BITS >= 2 && BITS <= 4) {
    if (cq.offset != nullptr) return int8_rows_avx2<BITS, M, true>(w, xq, cq, m0, r0, r1, y);
  }
  int8_rows_avx2<BITS, M, false>(w, xq, cq, m0, r0, r1, y);
}

#endif

// float(acc) * (scale_x * scale_w) for every output, by the kernel that suits the batch and the CPU
void run_int8_kernels(const PackedLinear& w, const QuantizedX& xq, const QuantizedCodebook& cq, int64_t M, float* y) {
  if (use_blocked(M) && linear_int8_blocked(w, xq, cq, M, y)) return;
  if (M >= avx2_blocked_min_rows(w.bits) && linear_int8_blocked_avx2(w, xq, cq, M, y)) return;
  const Simd simd = simd_level();
  WS_DISPATCH_BITS(w.bits, BITS, [&] {
    at::parallel_for(0, w.out_features, std::max<int64_t>(1, 65536 / w.in_features), [&](int64_t r0, int64_t r1) {
#ifdef WS_X86
      if (simd == Simd::Avx512) {
        // one x row: the 8-chain GEMV; more: groups of up to 4 x rows, two weight rows at a time
        if (M == 1) {
          int8_rows_avx512<BITS, 1, 1>(w, xq, cq, 0, r0, r1, y);
          return;
        }
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
          switch (std::min<int64_t>(4, M - m0)) {
            case 1: int8_rows_avx512<BITS, 1, 2>(w, xq, cq, m0, r0, r1, y); break;
            case 2: int8_rows_avx512<BITS, 2, 2>(w, xq, cq, m0, r0, r1, y); break;
            case 3: int8_rows_avx512<BITS, 3, 2>(w, xq, cq, m0, r0, r1, y); break;
            default: int8_rows_avx512<BITS, 4, 2>(w, xq, cq, m0, r0, r1, y); break;
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
            case 1: int8_rows_avx2_any<BITS, 1>(w, xq, cq, m0, r0, r1, y); break;
            case 2: int8_rows_avx2_any<BITS, 2>(w, xq, cq, m0, r0, r1, y); break;
            case 3: int8_rows_avx2_any<BITS, 3>(w, xq, cq, m0, r0, r1, y); break;
            default: int8_rows_avx2_any<BITS, 4>(w, xq, cq, m0, r0, r1, y); break;
          }
        }
        return;
      }
#endif
      int8_rows_portable<BITS>(w, xq, cq, M, r0, r1, y);
    });
  });
}

}  // namespace

void linear_int8(const PackedLinear& w, const at::Tensor& x_f32, float* y) {
  const int64_t M = x_f32.size(0);
  const QuantizedX xq = quantize_x(x_f32, w.bits);
  const QuantizedCodebook cq = quantize_codebook(w);
  run_int8_kernels(w, xq, cq, M, y);
  add_int8_zero_terms(w, xq, cq, M, y);
}

}  // namespace weightshare::cpu
