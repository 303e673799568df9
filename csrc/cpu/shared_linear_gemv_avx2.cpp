// CPU shared_linear, float path, up to kGemvRows rows of x on an AVX2 CPU (no AVX-512): the GEMV.
//
// Bits 1 to 3 (codebooks of at most 8 entries): one vpermps per 8 weights on a register table (rows_permute).
// 4096x4096 at batch 1, AVX2 emulated, same run (session 10): 1 and 2 bits 0.455 -> 0.350 ms against the byte
// planes below, 3 bits 0.864 -> 0.423 ms against the planes on unpacked indices.
// Bit 4 (16 entries): the fp32 table is split into four byte planes (byte b of every entry), each a 16-entry pshufb
// table. 32 indices, one per byte, look up their four bytes with four pshufb, and the bytes are put back together
// into 32 floats (planes_to_floats). AVX2 has no 16-entry float permute; two vpermps and a blend per 8 weights
// measured 2.7x dense in the sketch against 5.3x for the byte planes (and 0.58 vs 0.44 ms here). The
// floats come out in a fixed permuted order and x is permuted to match once per call (x_order below). The indices
// of a byte are split off with a shift and an AND, "the s-th index of every byte" per vector, which is again a
// fixed order.
// Bit 5: the same byte planes (two 16-entry halves per plane, picked by the index's bit 4) on indices unpacked to
// bytes, 32 at a time (Avx2Unpack32 in cpu_decode.h).
// Bits 6, 7, 8: each weight's table entry loaded by a scalar index (lookup8_scalar): a cost per weight that does
// not grow with the table, where the planes need a pshufb and a blend per 16 entries. 4096x4096 at batch 1, AVX2
// emulated on the Zen 4 VM (dense fp32 3.2 ms): the gathers this replaced ran 3.1-3.3 ms at 6-8 bits (dense
// speed), four-chunk byte planes 2.26-2.4 ms at 6 bits; the scalar lookups 1.7-2.0 ms. At 5 bits the planes stay
// ahead (1.47 vs 1.95 ms). On cores whose gathers are fast (Intel without the gather-data-sampling microcode) the
// same loop gathers instead (lookup8_gather, chosen by lookup8_gathers()): on the Intel VM, AVX2 emulated, 4096x4096
// from cache, rounds in one run, 6/7/8 bits 1.92/1.91/1.82 -> 1.68/1.62/1.52 ms (0.64-0.69x -> 0.76-0.82x of a dense
// GEMV served from its 480 MiB L3), 11008x4096 1.06-1.11x -> 1.24-1.32x dense; at 5 bits gathers tied the planes
// (1.63 vs 1.66 ms), which stay.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "shared_linear.h"
#include "weightshare/dispatch.h"

namespace weightshare::cpu {
namespace {

// Widths whose codebook (at most 8 entries) is one vpermps table.
constexpr bool permute_table(int bits) { return bits <= 3; }

// Widths whose codebook (16 entries) is looked up in byte planes on indices that tile bytes.
constexpr bool byte_planes(int bits) { return bits == 4; }

// Widths whose indices are unpacked to bytes for the byte planes (two 16-entry halves). 6 to 8 bits: scalar lookups
// (lookup8_scalar).
constexpr bool unpacked_planes(int bits) { return bits == 5; }

// 16-entry halves of a width's table.
constexpr int plane_chunks(int bits) { return bits <= 4 ? 1 : (1 << bits) / 16; }

#ifdef WS_X86
// The packed bytes at `offset` of the row two rows on, into L1. Intel's hardware prefetchers alone left these
// kernels' weight stream from DRAM at a third of its speed from cache (4-bit float batch 1, 4096x4096, AVX2 on the
// Intel VM: 1.80 ms from DRAM, 0.59 ms from cache; the AVX-512 kernels, which prefetch so, 0.50 ms). A prefetch
// never faults, so rows past the tensor's end are harmless.
inline void prefetch_two_rows_on(const uint8_t* row, int64_t row_bytes, int64_t offset) {
  _mm_prefetch(reinterpret_cast<const char*>(row + 2 * row_bytes + offset), _MM_HINT_T0);
}

// Weights per step of the byte-plane path: 32 packed bytes.
template <int BITS>
constexpr int64_t step_weights() {
  return 32 * (8 / BITS);
}

// The byte of a 32-byte plane vector whose weight float lane l of planes_to_floats' output k holds.
constexpr int plane_byte(int k, int l) {
  const int j = l % 4;  // dword within the 128-bit lane
  return (l / 4) * 16 + (k == 0 ? 2 * j : k == 1 ? 2 * j + 1 : k == 2 ? 8 + j : 12 + j);
}

// Byte-plane path: the weight that float lane l of output vector (s, k) holds, within a step: byte p of the step's
// 32 bytes, index s of that byte.
template <int BITS>
inline int64_t x_order(int s, int k, int l) {
  return int64_t{plane_byte(k, l)} * (8 / BITS) + s;
}

// x rows permuted per step to the byte-plane order, zero past `in` (a padded last step; a row tail the steps do not
// cover keeps x's order).
template <int BITS>
std::vector<float> permute_x(const float* x, int64_t M, int64_t in, int64_t steps) {
  constexpr int E = 8 / BITS;
  std::vector<float> xp(static_cast<size_t>(M * steps * step_weights<BITS>()));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t st = 0; st < steps; ++st) {
      float* dst = xp.data() + (m * steps + st) * step_weights<BITS>();
      const int64_t base = st * step_weights<BITS>();
      for (int s = 0; s < E; ++s)
        for (int k = 0; k < 4; ++k)
          for (int l = 0; l < 8; ++l) {
            const int64_t i = base + x_order<BITS>(s, k, l);
            dst[(s * 4 + k) * 8 + l] = i < in ? x[m * in + i] : 0.0f;
          }
    }
  return xp;
}

// Whether every codebook entry is finite: then a padded last step's junk indices (past the row's end) meet x's zeros
// and add exact zeros; an Inf or NaN entry would turn them into NaN.
inline bool codebook_finite(const PackedLinear& w) {
  for (int64_t i = 0; i < w.groups * w.K; ++i)
    if (!std::isfinite(w.codebook[i])) return false;
  return true;
}

// plane[h][q]: byte q of entries 16 h .. 16 h + 15 (H halves: 1 for up to 16 entries, 2 for 32).
template <int H = 1>
struct BytePlanes {
  __m256i plane[H][4];
  // planes_to_floats' multiplier: 1 << 16 per dword, i.e. words (0, 1). Hidden from the optimiser, which would
  // otherwise turn the multiply by 65536 into vpslld, a shift on the two shuffle pipes the lookups already fill
  // (4096x4096 float batch 1, one thread, Zen 3, a stand-alone loop of this kernel: 1.174 -> 1.116-1.153 ms).
  __m256i word_move;
  WS_AVX2 explicit BytePlanes(const DecodeTable& t) {
    word_move = _mm256_set1_epi32(1 << 16);
    asm("" : "+x"(word_move));
    for (int h = 0; h < H; ++h) {
      alignas(16) uint8_t b[4][16];
      for (int j = 0; j < 16; ++j) {
        uint32_t u;
        std::memcpy(&u, t.v + 16 * h + j, 4);
        for (int q = 0; q < 4; ++q) b[q][j] = static_cast<uint8_t>(u >> (8 * q));
      }
      for (int q = 0; q < 4; ++q)
        plane[h][q] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(b[q])));
    }
  }
  // 32 byte indices -> the four planes' bytes (idx < 16 H; for H = 2 bit 4 picks the half)
  WS_AVX2 inline void lookup(__m256i idx, __m256i (&p)[4]) const {
    if constexpr (H == 1) {
      for (int q = 0; q < 4; ++q) p[q] = _mm256_shuffle_epi8(plane[0][q], idx);
    } else {
      static_assert(H == 2, "one or two 16-entry halves");
      const __m256i lo = _mm256_and_si256(idx, _mm256_set1_epi8(0x0f));
      const __m256i upper = _mm256_slli_epi16(idx, 3);  // bit 4 -> bit 7 of each byte: blendv's selector
      for (int q = 0; q < 4; ++q)
        p[q] = _mm256_blendv_epi8(_mm256_shuffle_epi8(plane[0][q], lo), _mm256_shuffle_epi8(plane[1][q], lo), upper);
    }
  }
};

// Four byte planes -> 32 floats, float lane l of vector k holding the weight at byte plane_byte(k, l).
// Bytes to 16-bit halves by unpacks, halves to floats: for vectors 2 and 3 by unpacks too, for 0 and 1 by moving
// one half across its dword with an integer multiply (x 65536 moves the low word up; vpmaddwd by (0, 1) moves the
// high word down, its sign-extended top then overwritten) and a word blend. On Zen 3 the shuffles and shifts share
// two pipes while the multiplies have two others and the blends any of four: the all-unpack form (12 shuffles per
// 32 floats) was bound by those two pipes. 4096x4096 float batch 1, one thread, Zen 3 (2026-12-01): 3.8 -> 4.3
// weights a cycle (all four word steps by multiplies: 4.1; a stand-alone loop of this form reached 4.5).
// word_move: BytePlanes::word_move.
WS_AVX2 inline void planes_to_floats(const __m256i (&p)[4], __m256i word_move, __m256 (&f)[4]) {
  const __m256i lo01 = _mm256_unpacklo_epi8(p[0], p[1]), hi01 = _mm256_unpackhi_epi8(p[0], p[1]);
  const __m256i lo23 = _mm256_unpacklo_epi8(p[2], p[3]), hi23 = _mm256_unpackhi_epi8(p[2], p[3]);
  const __m256i low_word_up = _mm256_mullo_epi32(lo23, word_move);
  const __m256i high_word_down = _mm256_madd_epi16(lo01, word_move);
  f[0] = _mm256_castsi256_ps(_mm256_blend_epi16(lo01, low_word_up, 0xAA));
  f[1] = _mm256_castsi256_ps(_mm256_blend_epi16(high_word_down, lo23, 0xAA));
  f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
  f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
}

// 32 weights from byte indices (four plane lookups, interleaved), multiply-added with each x row's 32 values in the
// same order: row m's at xv + m * x_stride, into its NA chains.
template <int H, int M, int NA>
WS_AVX2 inline __attribute__((always_inline)) void planes_fma(const BytePlanes<H>& t, __m256i idx, const float* xv,
                                                              int64_t x_stride, __m256 (&acc)[M][NA]) {
  __m256i p[4];
  t.lookup(idx, p);
  __m256 f[4];
  planes_to_floats(p, t.word_move, f);
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k)
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
      acc[m][k % NA] = _mm256_fmadd_ps(f[k], _mm256_loadu_ps(xv + m * x_stride + 8 * k), acc[m][k % NA]);
}

// A row's dot product: the vector accumulator's lanes summed, after the weights from `from` on (the row's tail,
// fewer than one step; `from` a multiple of 8) are added in x's own order: whole 8-index groups by scalar table
// loads (the group's BITS bytes read exactly), then one by one (a 4-bit row of 300 had 44 single weights: 100x300
// at batch 1 8.7 -> 6.5 us).
template <int BITS>
WS_AVX2 float row_total(__m256 acc, const uint8_t* row, const float* table, const float* xm, int64_t from,
                        int64_t in) {
  int64_t i = from;
  for (; i + 8 <= in; i += 8) {
    uint64_t v = 0;
    std::memcpy(&v, row + i / 8 * BITS, BITS);
    acc = _mm256_fmadd_ps(lookup8_scalar<BITS>(v, table), _mm256_loadu_ps(xm + i), acc);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; i < in; ++i) sum += table[unpack_one(row, i, BITS)] * xm[i];
  return sum;
}

template <int BITS, int M>
WS_AVX2 void rows_byte_planes(const PackedLinear& w, const float* x, const float* xp, int64_t steps, int64_t r0,
                              int64_t r1, float* y) {
  constexpr int E = 8 / BITS;
  constexpr int64_t S = step_weights<BITS>();
  constexpr int NA = M == 1 ? 4 : M == 2 ? 2 : 1;  // independent FMA chains per x row
  const __m256i low = _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1));
  GroupTable gt;
  BytePlanes<1> t(gt.get(w, r0));  // rebuilt when the codebook group changes (a scalar loop: ~5 % of a 4096 row)
  int64_t planes_group = gt.group;
  // a padded last step (steps * 32 > row_bytes) reads past the row; for the last rows, past the tensor: those read
  // their last step from a zeroed copy
  const int64_t packed_bytes = w.out_features * w.row_bytes;
  alignas(32) uint8_t last_step[32];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.packed + r * w.row_bytes;
    const bool copy_last = r * w.row_bytes + steps * 32 > packed_bytes;
    const DecodeTable& dt = gt.get(w, r);
    if (gt.group != planes_group) {
      planes_group = gt.group;
      t = BytePlanes<1>(dt);
    }
    __m256 acc[M][NA];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
    for (int64_t st = 0; st < steps; ++st) {
      prefetch_two_rows_on(row, w.row_bytes, st * 32);
      const uint8_t* src = row + st * 32;
      if (copy_last && st + 1 == steps) {
        std::memset(last_step, 0, sizeof(last_step));
        std::memcpy(last_step, src, static_cast<size_t>(std::max<int64_t>(0, w.row_bytes - st * 32)));
        src = last_step;
      }
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
#pragma GCC unroll 8
      for (int s = 0; s < E; ++s) {
        // the shift as a multiply-high (s > 0): a multiply pipe, not the shuffle pipes the planes fill
        const __m256i idx =
            _mm256_and_si256(s == 0 ? bytes : _mm256_mulhi_epu16(bytes, _mm256_set1_epi16(1 << (16 - s * BITS))), low);
        planes_fma<1, M, NA>(t, idx, xp + st * S + s * 32, steps * S, acc);
      }
    }
    for (int m = 0; m < M; ++m) {
      __m256 a = acc[m][0];
      for (int k = 1; k < NA; ++k) a = _mm256_add_ps(a, acc[m][k]);
      y[m * w.out_features + r] = row_total<BITS>(a, row, dt.v, x + m * w.in_features, steps * S, w.in_features);
    }
  }
}

// Bits 3 and 5: steps of 32 indices (4 BITS bytes) unpacked to bytes in order, then as the byte planes (E = 1).
template <int BITS, int M>
WS_AVX2 void rows_unpacked_planes(const PackedLinear& w, const float* x, const float* xp, int64_t steps, int64_t r0,
                                  int64_t r1, float* y) {
  constexpr int NA = M == 1 ? 4 : M == 2 ? 2 : 1;  // independent FMA chains per x row
  const Avx2Unpack32<BITS> unpack;
  GroupTable gt;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.packed + r * w.row_bytes;
    const DecodeTable& dt = gt.get(w, r);
    const BytePlanes<plane_chunks(BITS)> t(dt);
    __m256 acc[M][NA];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
    for (int64_t st = 0; st < steps; ++st) {
      prefetch_two_rows_on(row, w.row_bytes, st * 4 * BITS);  // 12 or 20 bytes a step: a line every 3-5 steps
      const __m256i idx = unpack.raw32(row + st * 4 * BITS);  // the planes read bits 0-4 only
      planes_fma<plane_chunks(BITS), M, NA>(t, idx, xp + st * 32, steps * 32, acc);
    }
    for (int m = 0; m < M; ++m) {
      __m256 a = acc[m][0];
      for (int k = 1; k < NA; ++k) a = _mm256_add_ps(a, acc[m][k]);
      y[m * w.out_features + r] = row_total<BITS>(a, row, dt.v, x + m * w.in_features, steps * 32, w.in_features);
    }
  }
}

// Bits 1 to 3 (at most 8 entries): one vpermps looks up 8 weights in a register table. The 8 indices (BITS bytes)
// come from a 4-byte load broadcast to the 8 lanes and shifted right by BITS x lane (vpsrlvd); vpermps reads only
// each lane's low 3 bits, and the table repeats with period 2**BITS, so the next indices' bits above need no mask.
// 3 vector uops per 8 weights (shift, permute, FMA; the broadcast is a load), x in its own order.
template <int BITS, int M>
WS_AVX2 void rows_permute(const PackedLinear& w, const float* x, int64_t r0, int64_t r1, float* y) {
  static_assert(BITS <= 3, "an 8-entry table");
  constexpr int NA = M == 1 ? 4 : M == 2 ? 2 : 1;  // independent FMA chains per x row
  // 8-index steps whose 4-byte load stays inside the row
  const int64_t steps =
      std::min(w.in_features / 8, w.row_bytes >= 4 ? (w.row_bytes - 4) / BITS + 1 : int64_t(0));
  const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
  GroupTable gt;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.packed + r * w.row_bytes;
    const DecodeTable& dt = gt.get(w, r);
    alignas(32) float rep[8];
    for (int j = 0; j < 8; ++j) rep[j] = dt.v[j % (1 << BITS)];
    const __m256 table = _mm256_load_ps(rep);
    __m256 acc[M][NA];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
    int64_t st = 0;
    for (; st + NA <= steps; st += NA) {
      if (((st * BITS) & 63) < NA * BITS) prefetch_two_rows_on(row, w.row_bytes, st * BITS);  // once per line
#pragma GCC unroll 4
      for (int a = 0; a < NA; ++a) {
        int32_t bits;
        std::memcpy(&bits, row + (st + a) * BITS, 4);
        const __m256 wv = _mm256_permutevar8x32_ps(table, _mm256_srlv_epi32(_mm256_set1_epi32(bits), shifts));
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m)
          acc[m][a] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * w.in_features + (st + a) * 8), acc[m][a]);
      }
    }
    for (int m = 0; m < M; ++m) {
      __m256 a = acc[m][0];
      for (int k = 1; k < NA; ++k) a = _mm256_add_ps(a, acc[m][k]);
      y[m * w.out_features + r] = row_total<BITS>(a, row, dt.v, x + m * w.in_features, st * 8, w.in_features);
    }
  }
}

template <int BITS, int M, bool GATHER>
WS_AVX2 void rows_lookup(const PackedLinear& w, const float* x, int64_t r0, int64_t r1, float* y) {
  const int64_t steps = steps8_in_row(w.row_bytes, BITS, w.in_features / 8);
  GroupTable gt;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.packed + r * w.row_bytes;
    const DecodeTable& dt = gt.get(w, r);
    __m256 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    int64_t st = 0;
    for (; st + 2 <= steps; st += 2) {  // two steps, two chains
      if (((st * BITS) & 63) < 2 * BITS) prefetch_two_rows_on(row, w.row_bytes, st * BITS);  // once per line
      const __m256 w0 = lookup8<BITS, GATHER>(load_step8(row, st, BITS), dt.v);
      const __m256 w1 = lookup8<BITS, GATHER>(load_step8(row, st + 1, BITS), dt.v);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * w.in_features + st * 8;
        acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), acc[m][1]);
      }
    }
    if (st < steps) {
      const __m256 w0 = lookup8<BITS, GATHER>(load_step8(row, st, BITS), dt.v);
      for (int m = 0; m < M; ++m)
        acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * w.in_features + st * 8), acc[m][0]);
    }
    for (int m = 0; m < M; ++m) {
      y[m * w.out_features + r] = row_total<BITS>(_mm256_add_ps(acc[m][0], acc[m][1]), row, dt.v,
                                                  x + m * w.in_features, steps * 8, w.in_features);
    }
  }
}

template <int BITS, int M>
void gemv_m(const PackedLinear& w, const float* x, float* y) {
  const int64_t grain = std::max<int64_t>(1, 65536 / w.in_features);
  if constexpr (permute_table(BITS)) {
    at::parallel_for(0, w.out_features, grain,
                     [&](int64_t r0, int64_t r1) { rows_permute<BITS, M>(w, x, r0, r1, y); });
    return;
  }
  if constexpr (byte_planes(BITS)) {  // 4 bits
    // whole steps, or with a finite codebook one more, padded: the row's tail then costs one vector step instead of
    // a scalar lookup per weight (in the profile of 100x300 at batch 1 the tail's loop took as long as the row's
    // four whole steps). AVX2 emulated on Zen 4, same-process A/B, us: 100x300 5.45 -> 5.1 (one thread), 7.9 ->
    // 6.85 (two); 4096x1000 (a 40-weight tail) 154 -> 134 (two threads); 300x784 (16) within noise.
    constexpr int64_t S = step_weights<BITS>();
    const int64_t whole = std::min(w.in_features / S, w.row_bytes / 32);
    const int64_t steps = whole * S < w.in_features && codebook_finite(w) ? (w.in_features + S - 1) / S : whole;
    const std::vector<float> xp = permute_x<BITS>(x, M, w.in_features, steps);
    at::parallel_for(0, w.out_features, grain, [&](int64_t r0, int64_t r1) {
      rows_byte_planes<BITS, M>(w, x, xp.data(), steps, r0, r1, y);
    });
  } else if constexpr (unpacked_planes(BITS)) {
    // whole 32-index steps whose second 16-byte load (at 2 BITS bytes into the step) stays inside the row
    const int64_t fit = w.row_bytes >= 16 + 2 * BITS ? (w.row_bytes - 16 - 2 * BITS) / (4 * BITS) + 1 : 0;
    const int64_t steps = std::min(w.in_features / 32, fit);
    // x per 32-weight step in planes_to_floats' order
    std::vector<float> xp(static_cast<size_t>(M * steps * 32));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t st = 0; st < steps; ++st)
        for (int k = 0; k < 4; ++k)
          for (int l = 0; l < 8; ++l)
            xp[(m * steps + st) * 32 + 8 * k + l] = x[m * w.in_features + st * 32 + plane_byte(k, l)];
    at::parallel_for(0, w.out_features, grain, [&](int64_t r0, int64_t r1) {
      rows_unpacked_planes<BITS, M>(w, x, xp.data(), steps, r0, r1, y);
    });
  } else if (lookup8_gathers()) {
    at::parallel_for(0, w.out_features, grain,
                     [&](int64_t r0, int64_t r1) { rows_lookup<BITS, M, true>(w, x, r0, r1, y); });
  } else {
    at::parallel_for(0, w.out_features, grain,
                     [&](int64_t r0, int64_t r1) { rows_lookup<BITS, M, false>(w, x, r0, r1, y); });
  }
}
#endif

}  // namespace

bool gemv_avx2(const PackedLinear& w, const float* x, int64_t M, float* y) {
#ifdef WS_X86
  if (simd_level() < Simd::Avx2 || M < 1 || M > 4) return false;
  WS_DISPATCH_BITS(w.bits, BITS, [&] {
    switch (M) {
      case 1: return gemv_m<BITS, 1>(w, x, y);
      case 2: return gemv_m<BITS, 2>(w, x, y);
      case 3: return gemv_m<BITS, 3>(w, x, y);
      default: return gemv_m<BITS, 4>(w, x, y);
    }
  });
  return true;
#else
  return false;
#endif
}

}  // namespace weightshare::cpu
