#pragma once
// CPU decoding of packed index rows (layout: packing.h) into codebook values, shared by dequantize and the
// shared-weight matmuls. A block of 16 indices always starts on a byte boundary (16 * bits bits = 2 * bits bytes),
// so the SIMD decoder handles whole 16-blocks and a scalar loop the row's tail.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "weightshare/cpu_features.h"
#include "weightshare/packing.h"

namespace weightshare {

// A group's codebook as a 2**bits-entry fp32 table (entries >= K are NaN: an index >= K is corrupt data and must
// show, not pass silently), 64-byte aligned for the permute-based lookups. Only the first max(16, 2**bits) entries
// are written: no reader looks further (indices are < 2**bits; register tables load at least 16), and with a
// codebook per output row the table is refilled per row (per K chunk in the batched kernel: filling all 256 entries
// made 4-bit batch 64 1.5x slower than with one codebook).
struct DecodeTable {
  alignas(64) float v[256];
  void fill(const float* codebook, int K, int bits) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const int n = std::max(16, 1 << bits), k = std::min(K, 1 << bits);
    std::copy(codebook, codebook + k, v);
    std::fill(v + k, v + n, nan);
  }
};

template <int BITS>
inline void decode_scalar(const uint8_t* row, int64_t begin, int64_t count, const float* table, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = table[unpack_one(row, begin + i, BITS)];
}

#ifdef WS_X86

// Constant byte-permute pattern and shifts that move index j of a 16-block (2*BITS bytes) into the low bits of
// 32-bit lane j: lane j takes bytes (j*BITS)/8 and the next one, then shifts right by (j*BITS)%8.
template <int BITS>
struct Avx512Unpack16 {
  __m512i pattern, shifts, mask;
  WS_AVX512 Avx512Unpack16() {
    alignas(64) uint8_t p[64];
    alignas(64) int32_t s[16];
    for (int j = 0; j < 16; ++j) {
      const int bit = j * BITS;
      p[4 * j] = static_cast<uint8_t>(bit / 8);
      p[4 * j + 1] = static_cast<uint8_t>(bit / 8 + 1 < 16 ? bit / 8 + 1 : 15);
      p[4 * j + 2] = p[4 * j + 3] = 0;
      s[j] = bit % 8;
    }
    pattern = _mm512_load_si512(p);
    shifts = _mm512_load_si512(s);
    mask = _mm512_set1_epi32((1 << BITS) - 1);
  }
  // Indices [16*blk, 16*blk + 16) of the row as int32 lanes. The masked load reads only the block's 2*BITS bytes.
  WS_AVX512 inline __m512i indices(const uint8_t* row, int64_t blk) const {
    const __m128i bytes = _mm_maskz_loadu_epi8((__mmask16)((1u << (2 * BITS)) - 1u), row + blk * 2 * BITS);
    const __m512i v = _mm512_permutexvar_epi8(pattern, _mm512_broadcast_i32x4(bytes));
    return _mm512_and_si512(_mm512_srlv_epi32(v, shifts), mask);
  }
  // The first `count` (1..15) indices of block blk, a row's last partial block: only their bytes are read (the
  // lanes past `count` hold index bits of zero bytes; the caller masks them).
  WS_AVX512 inline __m512i partial_indices(const uint8_t* row, int64_t blk, int count) const {
    const int nbytes = (count * BITS + 7) / 8;
    const __m128i bytes = _mm_maskz_loadu_epi8((__mmask16)((1u << nbytes) - 1u), row + blk * 2 * BITS);
    const __m512i v = _mm512_permutexvar_epi8(pattern, _mm512_broadcast_i32x4(bytes));
    return _mm512_and_si512(_mm512_srlv_epi32(v, shifts), mask);
  }
};

// The codebook table in registers: 16 entries in one register (bits <= 4), 32 in two (5), up to 256 in 16 (6-8).
template <int BITS>
struct Avx512Lookup {
  static constexpr int kRegs = BITS <= 4 ? 1 : (1 << BITS) / 16;
  __m512 t[kRegs];
  WS_AVX512 explicit Avx512Lookup(const DecodeTable& table) {
    for (int r = 0; r < kRegs; ++r) t[r] = _mm512_load_ps(table.v + 16 * r);
  }
  WS_AVX512 inline __m512 operator()(__m512i idx) const {
    if constexpr (BITS <= 4) {
      return _mm512_permutexvar_ps(idx, t[0]);
    } else {
      __m512 r = _mm512_permutex2var_ps(t[0], idx, t[1]);
      for (int p = 1; p < kRegs / 2; ++p) {  // 32-entry pairs selected by index bits 5..7
        const __mmask16 k = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(idx, 5), _mm512_set1_epi32(p));
        r = _mm512_mask_mov_ps(r, k, _mm512_permutex2var_ps(t[2 * p], idx, t[2 * p + 1]));
      }
      return r;
    }
  }
};

// 32 indices of BITS bits (4 * BITS bytes from a byte boundary) unpacked to 32 bytes in order (the AVX2 int8
// decode, int8_decode_avx2.h, and the AVX2 float GEMV's 5-bit byte planes use it). 128-bit lane l takes indices
// 16 l .. 16 l + 15: up to 3 bits all 32 come from one 16-byte load broadcast to both lanes, wider ones from a
// 16-byte load per lane (lane 1's at src + 2 * BITS). AVX2 has no per-16-bit variable shift, so the shifts are
// multiplies: one pshufb puts each even index's two-byte window in a 16-bit slot and a vpmulhuw by 2^(16 - shift)
// moves it to the slot's low byte; another pshufb and a vpmullw by 2^(8 - shift) lift each odd index to the slot's
// high byte; two ANDs and an OR keep the indices and join them. On the Zen 4 VM (a loop of decode, pshufb lookup
// and vpmaddubsw dot, L1) 3 bits take 4.1 cycles per 32 weights, 4.8 with a byte blend and separate lane loads,
// and the form before (vpmullw, a shift and one pack per half: 7 uops on the shuffle/shift pipes) more: shuffles,
// blends and lane inserts share two pipes there, the multiplies two others, ANDs and ORs any of four.
template <int BITS>
struct Avx2Unpack32 {
  static_assert(BITS >= 1 && BITS <= 7, "two-byte windows");
  static constexpr bool kOneLoad = BITS <= 3;  // 32 indices (+ the last window's next byte) within 16 bytes
  __m256i pick_even, pick_odd, mul_even, mul_odd, keep_even, keep_odd, odd_bytes;
  WS_AVX2 Avx2Unpack32() {
    alignas(32) uint8_t pe[32], po[32];
    alignas(32) uint16_t me[16], mo[16];
    for (int lane = 0; lane < 2; ++lane)
      for (int s = 0; s < 8; ++s) {
        const int w = 8 * lane + s;  // 16-bit slot of the vector, bytes 2s and 2s + 1 of the lane
        const int first = kOneLoad ? 16 * lane * BITS : 0;  // the lane's first bit in its load
        // even index 2s: if it lies in byte b alone, the window is bytes (b - 1, b) (byte -1 reads as zero: pshufb
        // index 0x80) and the shift 8 + offset; else (b, b + 1) and the offset, >= 1 then. Either way 1..15, so
        // the multiplier 2^(16 - shift) fits 16 bits.
        const int be = first + 2 * s * BITS, b = be / 8, o = be % 8;
        const bool alone = o + BITS <= 8;
        pe[16 * lane + 2 * s] = alone ? (b == 0 ? 0x80 : static_cast<uint8_t>(b - 1)) : static_cast<uint8_t>(b);
        pe[16 * lane + 2 * s + 1] = static_cast<uint8_t>(alone ? b : b + 1);
        me[w] = static_cast<uint16_t>(1u << (16 - (alone ? 8 + o : o)));
        // odd index 2s + 1: window (b, b + 1) (b + 1 <= 14 at 7 bits, 12 at 3), shifted up by 8 - offset
        const int bo = first + (2 * s + 1) * BITS;
        po[16 * lane + 2 * s] = static_cast<uint8_t>(bo / 8);
        po[16 * lane + 2 * s + 1] = static_cast<uint8_t>(bo / 8 + 1);
        mo[w] = static_cast<uint16_t>(1u << (8 - bo % 8));
      }
    pick_even = _mm256_load_si256(reinterpret_cast<const __m256i*>(pe));
    pick_odd = _mm256_load_si256(reinterpret_cast<const __m256i*>(po));
    mul_even = _mm256_load_si256(reinterpret_cast<const __m256i*>(me));
    mul_odd = _mm256_load_si256(reinterpret_cast<const __m256i*>(mo));
    keep_even = _mm256_set1_epi16(static_cast<short>((1 << BITS) - 1));
    keep_odd = _mm256_set1_epi16(static_cast<short>(((1 << BITS) - 1) << 8));
    odd_bytes = _mm256_set1_epi16(static_cast<short>(0xff00));
  }
  // Byte j = index j. Reads 16 bytes at src (and, above 3 bits, 16 at src + 2 * BITS).
  WS_AVX2 inline __m256i bytes32(const uint8_t* src) const {
    __m256i even, odd;
    windows(src, even, odd);
    return _mm256_or_si256(_mm256_and_si256(even, keep_even), _mm256_and_si256(odd, keep_odd));
  }
  // Index j in the low BITS bits of byte j, the packed bits that followed it above (any may be set, bit 7 too), for
  // lookups that read only the index's bits: one byte blend (a shuffle-pipe uop) instead of three any-pipe ones;
  // at 5-7 bits the int8 row kernel ran 0.49 ms this way against 0.53 with the masks (4096x4096, batch 1).
  WS_AVX2 inline __m256i raw32(const uint8_t* src) const {
    __m256i even, odd;
    windows(src, even, odd);
    return _mm256_blendv_epi8(even, odd, odd_bytes);
  }

 private:
  // even: each even index at the bottom of its slot's low byte; odd: each odd index at the bottom of the high byte
  WS_AVX2 inline void windows(const uint8_t* src, __m256i& even, __m256i& odd) const {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m256i v = kOneLoad ? _mm256_broadcastsi128_si256(lo)
                               : _mm256_inserti128_si256(_mm256_castsi128_si256(lo),
                                                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * BITS)), 1);
    even = _mm256_mulhi_epu16(_mm256_shuffle_epi8(v, pick_even), mul_even);
    odd = _mm256_mullo_epi16(_mm256_shuffle_epi8(v, pick_odd), mul_odd);
  }
};

// The table entries of 8 indices without a gather: the indices (BITS bits each, packed from bit 0 of `v`, as 8
// indices occupy BITS bytes of a row) split off with scalar shifts, each entry loaded straight into its lane
// (vmovd / vpinsrd with a memory operand), the two 4-lane halves joined. On the Zen 4 VM, 8-bit indices, table in
// L1: 5.3-5.7 cycles per 8 entries against 10.0 for vgatherdps (AVX2 gathers are microcoded and slow on AMD, and
// slow again on Intel since the 2023 gather-data-sampling microcode); broadcasts + blends measured the same 5.6-6.2.
template <int BITS>
WS_AVX2 inline __m256 lookup8_scalar(uint64_t v, const float* table) {
  constexpr uint64_t mask = (uint64_t{1} << BITS) - 1;
  const auto entry = [&](int j) {
    int32_t e;  // the float's bits: vpinsrd takes an integer
    std::memcpy(&e, table + ((v >> (j * BITS)) & mask), sizeof e);
    return e;
  };
  __m128i lo = _mm_cvtsi32_si128(entry(0)), hi = _mm_cvtsi32_si128(entry(4));
  lo = _mm_insert_epi32(lo, entry(1), 1);
  hi = _mm_insert_epi32(hi, entry(5), 1);
  lo = _mm_insert_epi32(lo, entry(2), 2);
  hi = _mm_insert_epi32(hi, entry(6), 2);
  lo = _mm_insert_epi32(lo, entry(3), 3);
  hi = _mm_insert_epi32(hi, entry(7), 3);
  return _mm256_castsi256_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
}

// lookup8_scalar's 8 entries by one vgatherdps: the indices widened to dwords (8 bits: one vpmovzxbd; 5-7 bits:
// two 64-bit variable shifts of the broadcast step put index 2q in qword q's low dword and 2q + 1 in its high one).
// Which of the two is faster depends on the core, not the width: on the Zen 4 VM the gather took 10 cycles per 8
// entries against 5.3-5.7, on the Intel VM (Xeon, no gather-data-sampling mitigation) 4.1 against 5.9
// (benchmarks/bench_linear_widths.py records both), so lookup8_gathers() measures them once per process.
template <int BITS>
WS_AVX2 inline __m256 lookup8_gather(uint64_t v, const float* table) {
  __m256i idx;
  if constexpr (BITS == 8) {
    idx = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(v)));
  } else {
    const __m256i b = _mm256_set1_epi64x(static_cast<long long>(v));
    const __m256i even = _mm256_srlv_epi64(b, _mm256_setr_epi64x(0, 2 * BITS, 4 * BITS, 6 * BITS));
    const __m256i odd = _mm256_srlv_epi64(b, _mm256_setr_epi64x(BITS, 3 * BITS, 5 * BITS, 7 * BITS));
    idx = _mm256_and_si256(_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA),
                           _mm256_set1_epi32((1 << BITS) - 1));
  }
  return _mm256_i32gather_ps(table, idx, 4);
}

// One of the two, chosen at compile time (a function with the AVX2 target: a lambda would not inherit it).
template <int BITS, bool GATHER>
WS_AVX2 inline __m256 lookup8(uint64_t v, const float* table) {
  if constexpr (GATHER) {
    return lookup8_gather<BITS>(v, table);
  } else {
    return lookup8_scalar<BITS>(v, table);
  }
}

// Whether the AVX2 GEMV looks 6-8-bit codebooks up by gathers (lookup8_gather) rather than scalar loads
// (lookup8_scalar), from WS_CPU_LOOKUP8 = gather | scalar (read on every call, so tests and benchmarks can compare
// them); unset: whichever ran faster on this core in a timing of both taken at the first call
// (csrc/cpu/lookup8_choice.cpp). The results are the same bits either way.
bool lookup8_gathers();

// The 8 indices of 8-index step `step` of a row (BITS bytes from byte step * BITS) as one 64-bit load; the caller
// keeps step * BITS + 8 <= row_bytes.
inline uint64_t load_step8(const uint8_t* row, int64_t step, int bits) {
  uint64_t v;
  std::memcpy(&v, row + step * bits, sizeof v);
  return v;
}

// Whole 8-index steps of a row whose 8-byte load stays inside it: at most `limit`.
inline int64_t steps8_in_row(int64_t row_bytes, int bits, int64_t limit) {
  return row_bytes >= 8 ? std::min(limit, (row_bytes - 8) / bits + 1) : 0;
}

// Columns [begin, begin + count) of a row of row_bytes bytes (begin a multiple of 8) decoded 8 at a time by
// lookup8_scalar, as far as each step's 8-byte load stays inside the row; returns the columns covered (the caller
// decodes the rest with decode_scalar).
template <int BITS>
WS_AVX2 int64_t decode_blocks_avx2(const uint8_t* row, int64_t row_bytes, const DecodeTable& table, int64_t begin,
                                   int64_t count, float* out) {
  const int64_t first = begin / 8;
  const int64_t n = std::max<int64_t>(0, steps8_in_row(row_bytes, BITS, first + count / 8) - first);
  for (int64_t i = 0; i < n; ++i)
    _mm256_storeu_ps(out + 8 * i, lookup8_scalar<BITS>(load_step8(row, first + i, BITS), table.v));
  return n * 8;
}

// decode_blocks_avx2 for codebooks of at most 16 entries (BITS <= 4), in vpermps registers instead of scalar loads:
// the 8 indices of one 4-byte load (BITS bytes of the row) shifted into 8 lanes, one vpermps on the table repeated
// to 8 entries (BITS <= 3: vpermps reads a lane's low 3 bits only), or two on its halves and a blend by bit 3
// (BITS = 4). Two shuffle-port uops per 8 weights where the scalar form's inserts take 8 or more: the batched path's
// panel decode, AVX2 on the Intel VM, 4096x4096 4 bits, same-run A/B over 4 rounds: batch 16 6.3 -> 6.0 ms, batch 64
// 18.6 -> 17.7 ms (the decode's share of the profile 16 % -> 11 % at batch 64).
template <int BITS>
WS_AVX2 int64_t decode_blocks_permute_avx2(const uint8_t* row, int64_t row_bytes, const float* table, int64_t begin,
                                           int64_t count, float* out) {
  static_assert(BITS <= 4, "a 16-entry table at most");
  const int64_t first = begin / 8;
  // 8-index steps whose 4-byte load stays inside the row
  const int64_t last = row_bytes >= 4 ? std::min(first + count / 8, (row_bytes - 4) / BITS + 1) : 0;
  const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
  alignas(32) float rep[8];
  for (int j = 0; j < 8; ++j) rep[j] = table[j % (1 << std::min(BITS, 3))];
  const __m256 lo = _mm256_load_ps(rep), hi = _mm256_loadu_ps(table + 8);
  int64_t i = first;
  for (; i < last; ++i) {
    // vbroadcastss from memory: a load only, where vmovd + vpbroadcastd from a register take the shuffle port twice
    const __m256i word = _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(row + i * BITS)));
    const __m256i idx = _mm256_srlv_epi32(word, shifts);
    __m256 v = _mm256_permutevar8x32_ps(lo, idx);
    if constexpr (BITS == 4)  // bit 3 to the sign bit: blendv's selector
      v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(hi, idx), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    _mm256_storeu_ps(out + 8 * (i - first), v);
  }
  return std::max<int64_t>(0, i - first) * 8;
}

// The AVX2 row decoder for a width: register tables up to 16 entries, scalar loads above.
template <int BITS>
WS_AVX2 inline int64_t decode_row_blocks_avx2(const uint8_t* row, int64_t row_bytes, const DecodeTable& table,
                                              int64_t begin, int64_t count, float* out) {
  if constexpr (BITS <= 4)
    return decode_blocks_permute_avx2<BITS>(row, row_bytes, table.v, begin, count, out);
  else
    return decode_blocks_avx2<BITS>(row, row_bytes, table, begin, count, out);
}

// Whole 16-blocks of columns [begin, begin + count) of a row (begin a multiple of 16) decoded into out; returns
// the columns covered (count rounded down to 16; the caller decodes the rest with decode_scalar).
template <int BITS>
WS_AVX512 int64_t decode_blocks_avx512(const uint8_t* row, const DecodeTable& table, int64_t begin, int64_t count,
                                       float* out) {
  const Avx512Unpack16<BITS> unpack;
  const Avx512Lookup<BITS> lookup(table);
  const int64_t n = count / 16;
  for (int64_t i = 0; i < n; ++i) _mm512_storeu_ps(out + 16 * i, lookup(unpack.indices(row, begin / 16 + i)));
  return n * 16;
}

#endif  // WS_X86

}  // namespace weightshare
