#pragma once
// The packed-index layout, the single definition every kernel (CPU and CUDA) and formats.py follow.
//
// A tensor of indices [..., n] (each < 2**bits, bits in 1..8) packs row by row (a row = the last dimension):
//   * a row is a little-endian bit stream: index i occupies stream bits [i*bits, (i+1)*bits), least significant
//     bit first, and stream bit s lives in byte s/8 at bit position s%8;
//   * each row is padded with zero bits to a whole number of 32-bit words, so every row starts 4-byte aligned
//     and kernels may read a row as little-endian uint32 words;
//   * the packed tensor is uint8 [..., packed_row_bytes(n, bits)].
// For bits in {1, 2, 4, 8} no index straddles a byte; for 3, 5, 6, 7 an index may span two bytes.
#include <cstdint>

#include "weightshare/macros.h"

namespace weightshare {

constexpr int kMinBits = 1;
constexpr int kMaxBits = 8;
// The int8 path quantizes codebooks of at most this many entries to a 7-bit affine grid, longer ones to symmetric
// int8 (reference.quantize_int8_codebook, INT8_AFFINE_MAX_K); CPU and CUDA kernels follow it.
constexpr int kInt8AffineMaxK = 16;
// That grid's search for a layer-wide codebook (reference.INT8_STEPS, INT8_PHASES): candidate steps, and phases per
// step (sub-grid positions; the CUDA form gives each its own lane of a warp).
constexpr int kInt8AffineSteps = 8;
constexpr int kInt8AffinePhases = 32;

WS_HD int64_t packed_row_words(int64_t n, int bits) { return (n * bits + 31) / 32; }
WS_HD int64_t packed_row_bytes(int64_t n, int bits) { return packed_row_words(n, bits) * 4; }

// Index i of a packed row (reads only bytes that hold its bits).
WS_HD uint32_t unpack_one(const uint8_t* row, int64_t i, int bits) {
  const int64_t bit = i * bits;
  const uint8_t* p = row + (bit >> 3);
  const int shift = static_cast<int>(bit & 7);
  uint32_t v = p[0];
  if (shift + bits > 8) v |= static_cast<uint32_t>(p[1]) << 8;
  return (v >> shift) & ((1u << bits) - 1u);
}

// Word w (bits [32w, 32w+32) of the stream) of a row of n indices, index i being index(i). Sets *bad when an index
// is >= 2**bits.
template <typename Index>
WS_HD uint32_t pack_word_of(Index index, int64_t n, int bits, int64_t w, bool* bad) {
  const int64_t first_bit = 32 * w;
  const int64_t first = first_bit / bits;
  int64_t last = (first_bit + 31) / bits;
  if (last > n - 1) last = n - 1;
  const uint32_t limit = 1u << bits;
  uint32_t word = 0;
  for (int64_t i = first; i <= last; ++i) {
    const uint32_t v = index(i);
    if (v >= limit) *bad = true;
    const int64_t s = i * bits - first_bit;  // may be negative: the index started in the previous word
    word |= s >= 0 ? (v << s) : (v >> -s);
  }
  return word;
}

// The same from a row of indices, one byte each.
WS_HD uint32_t pack_word(const uint8_t* idx_row, int64_t n, int bits, int64_t w, bool* bad) {
  return pack_word_of([idx_row](int64_t i) { return uint32_t(idx_row[i]); }, n, bits, w, bad);
}

// Where one of 32 lanes finds its indices when a warp reads a packed row 256 indices (a "span", 8 * BITS words) at a
// time and lane l takes indices [8 l, 8 l + 8) of each span, so that the lanes' reads of the matching activations
// are contiguous (the CUDA GEMV). Those 8 indices are the span's stream bits [8 l BITS, 8 (l + 1) BITS): they start
// at bit shift(l) of word first_word(l), and kLoad words from there hold them all.
template <int BITS>
struct LaneSpan {
  static constexpr int kSpan = 256;
  static constexpr int kSpanWords = 8 * BITS;
  static constexpr int kShiftMax = BITS % 4 == 0 ? 0 : (BITS % 2 == 0 ? 16 : 24);
  static constexpr int kLoad = (kShiftMax + 8 * BITS + 31) / 32;  // words a lane reads (1, 2 or 3)
  static constexpr int kWords = (8 * BITS + 31) / 32;             // words its 8 indices fill from bit 0
  // (the same for any group number g of 8 indices counted from a row's start, as dequantize uses them)
  WS_HD static int64_t first_word(int64_t lane) { return (lane * BITS) >> 2; }
  WS_HD static int shift(int64_t lane) { return 8 * static_cast<int>((lane * BITS) & 3); }
  // v = the lane's 8 * BITS bits from bit 0, out of the kLoad words w read at first_word (shift = shift(lane)).
  WS_HD static void align(const uint32_t (&w)[kLoad], int shift, uint32_t (&v)[kWords]) {
    for (int i = 0; i < kWords; ++i) {
      const uint64_t pair = w[i] | (i + 1 < kLoad ? uint64_t{w[i + 1]} << 32 : 0);
      v[i] = static_cast<uint32_t>(pair >> shift);
    }
  }
};

// Field e of B bits of the little-endian bit string in v (bits [e B, e B + B)), moved to bit AT and masked there:
// the byte offset of entry `field` in a table of 2**AT-byte entries, which the CUDA GEMVs OR or add into a table's
// address (entry_address, pair_offset). A field that straddles two words is one funnel shift.
template <int B, int AT>
WS_HD uint32_t field_at(const uint32_t* v, int e) {
  static_assert(B >= 1 && B <= 16 && AT >= 0 && AT <= 8, "a field of at most 16 bits, moved by at most 8");
  constexpr uint32_t kMask = ((1u << B) - 1u) << AT;
  const int bit = e * B, word = bit >> 5, shift = bit & 31;
  uint32_t r;
  if (shift + B > 32) {  // then shift >= 17 > AT
    r = static_cast<uint32_t>(((uint64_t{v[word + 1]} << 32) | v[word]) >> (shift - AT));
  } else {
    r = shift >= AT ? v[word] >> (shift - AT) : v[word] << (AT - shift);
  }
  return r & kMask;
}

}  // namespace weightshare
