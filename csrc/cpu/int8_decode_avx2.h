#pragma once
// AVX2: a packed weight row (or a K chunk of it) decoded into its int8 codebook values, in the k order of the
// quantized-x layout (shared_linear_int8.h), so a decoded weight and the x value it multiplies sit at the same
// position. The AVX2 row kernel (shared_linear_int8.cpp) looks 32 weights at a time up into a register with its
// index extraction and lookup; the AVX2 blocked kernel (shared_linear_int8_blocked_avx2.cpp) decodes panels.
//
// Byte-aligned widths (1, 2, 4, 8): a 64-byte step holds S = 512 / BITS positions; 32-byte half h gives, for each
// s < 8 / BITS, "the s-th index of every byte" (one shift and one AND) = positions s * 64 + 32 h + [0, 32) of the
// step. Other widths (3, 5, 6, 7) are in natural order, 32 indices at a time by Avx2Unpack32. The int8 table is
// 16 entries per pshufb; wider codebooks pick their 16-entry chunk with the index's high nibble.
#include <cstdint>

#include "shared_linear_int8.h"
#include "weightshare/cpu_decode.h"

namespace weightshare::cpu {

#ifdef WS_X86
template <int BITS>
struct Avx2Int8Decoder {
  static constexpr int kChunks = (1 << BITS) <= 16 ? 1 : (1 << BITS) / 16;
  // Bytes the decode of n positions may read past the chunk's n * BITS / 8: Avx2Unpack32's second 16-byte load
  // starts 2 * BITS bytes into a 4 * BITS-byte group.
  static constexpr int64_t kOverread = byte_aligned(BITS) ? 0 : 16;
  __m256i tab[kChunks];
  Avx2Unpack32<(BITS < 8 ? BITS : 1)> unpack;

  // A group's int8 table (QuantizedCodebook::table: max(16, 2**BITS) entries).
  WS_AVX2 void set_table(const int8_t* table) {
    for (int c = 0; c < kChunks; ++c)
      tab[c] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table + 16 * c)));
  }

  // The same table + offset, as unsigned bytes (QuantizedCodebook::table_offset: the 7-bit table of a K <= 16
  // codebook, or q + 128).
  WS_AVX2 void set_table_offset(const int8_t* table, int offset) {
    const __m128i o = _mm_set1_epi8(static_cast<char>(offset));
    for (int c = 0; c < kChunks; ++c)
      tab[c] = _mm256_broadcastsi128_si256(
          _mm_add_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table + 16 * c)), o));
  }

  WS_AVX2 inline __m256i lookup(__m256i idx) const {
    if constexpr (kChunks == 1) {
      return _mm256_shuffle_epi8(tab[0], idx);  // idx < 16: bit 7 clear
    } else {
      // every chunk's pshufb on the low nibble, then a tree of blends: index bit 4 picks between chunk pairs, bit 5
      // between pairs of pairs, ...; vpblendvb reads each mask byte's top bit, so bit b is shifted up to bit 7
      // (junk above the index is fine: only bit 7 is read). 15 blends, BITS - 4 shifts; a chain of compares and
      // blends (one per chunk) took 15 more compares and 4 more uops at 8 bits.
      const __m256i lo = _mm256_and_si256(idx, _mm256_set1_epi8(0x0f));  // pshufb zeroes a lane whose bit 7 is set
      __m256i v[kChunks];
      for (int c = 0; c < kChunks; ++c) v[c] = _mm256_shuffle_epi8(tab[c], lo);
      for (int level = 0, n = kChunks; n > 1; ++level, n /= 2) {
        const __m256i sel = _mm256_slli_epi16(idx, 3 - level);  // bit 4 + level -> bit 7 (16-bit shift: in-byte bits)
        for (int c = 0; c < n / 2; ++c) v[c] = _mm256_blendv_epi8(v[2 * c], v[2 * c + 1], sel);
      }
      return v[0];
    }
  }

  // Byte-aligned widths: "the s-th index of every byte" of 32 packed bytes (a 16-bit shift drags the upper byte's
  // bits into the lower one, above its low BITS: masked off).
  WS_AVX2 inline __m256i byte_indices(__m256i bytes, int s) const {
    if constexpr (BITS == 8) return bytes;
    return _mm256_and_si256(_mm256_srli_epi16(bytes, s * BITS), _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1)));
  }

  // Other widths: the 32 indices at src (4 BITS bytes; Avx2Unpack32 reads up to kOverread past them) as the lookup
  // needs them: above 16 entries it reads the index's bits only (junk above is fine), at 16 pshufb reads bit 7 too.
  WS_AVX2 inline __m256i unpacked32(const uint8_t* src) const {
    if constexpr (kChunks > 1) return unpack.raw32(src);
    return unpack.bytes32(src);
  }

  // Positions [0, n) of the layout from the packed bytes at src (n a multiple of step_elems(BITS); src readable for
  // n * BITS / 8 + kOverread bytes, zero where past the row) into out (32-byte aligned).
  WS_AVX2 void decode(const uint8_t* src, int64_t n, int8_t* out) const {
    if constexpr (byte_aligned(BITS)) {
      constexpr int E = 8 / BITS;
      constexpr int64_t S = step_elems(BITS);
      for (int64_t st = 0; st < n / S; ++st)
        for (int h = 0; h < 2; ++h) {
          const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64 * st + 32 * h));
#pragma GCC unroll 8
          for (int s = 0; s < E; ++s)
            _mm256_store_si256(reinterpret_cast<__m256i*>(out + S * st + 64 * s + 32 * h),
                               lookup(byte_indices(bytes, s)));
        }
    } else {
      for (int64_t i0 = 0; i0 < n; i0 += 32)
        _mm256_store_si256(reinterpret_cast<__m256i*>(out + i0), lookup(unpacked32(src + i0 / 8 * BITS)));
    }
  }
};
#endif

}  // namespace weightshare::cpu
