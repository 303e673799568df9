// Host check of the index arithmetic the CUDA kernels use (packing.h): LaneSpan (which packed words lane l of a warp
// reads for indices [8 l, 8 l + 8) of a 256-index span, and where its bits start; dequantize applies it to any group
// of 8) and field_at (an index moved to a table entry's byte offset), against unpack_one, the layout's definition. Built and run by test_lane_layout.py;
// exits non-zero and names the first failure.
#include <cstdio>
#include <cstdint>
#include <random>
#include <vector>

#include "weightshare/packing.h"

using namespace weightshare;

static int failures = 0;

static void fail(const char* what, int bits, long a, long b) {
  if (failures++ < 10) std::printf("FAIL %s bits=%d (%ld, %ld)\n", what, bits, a, b);
}

// A packed row of n random indices (the packing.h layout, written bit by bit).
static std::vector<uint32_t> random_row(int n, int bits, std::mt19937& gen, int extra_words) {
  std::vector<uint32_t> words(packed_row_words(n, bits) + extra_words, 0u);
  for (int i = 0; i < n; ++i) {
    const uint32_t v = gen() & ((1u << bits) - 1u);
    for (int j = 0; j < bits; ++j) {
      const int64_t b = int64_t(i) * bits + j;
      if ((v >> j) & 1u) words[b / 32] |= 1u << (b % 32);
    }
  }
  return words;
}

// The kLoad words from word q of a row (past the row: 0, as the kernels' guarded loads), aligned from bit `shift`.
template <int BITS>
static void load_aligned(const std::vector<uint32_t>& words, int64_t row_words, int64_t q, int shift,
                         uint32_t (&v)[LaneSpan<BITS>::kWords]) {
  uint32_t w[LaneSpan<BITS>::kLoad];
  for (int i = 0; i < LaneSpan<BITS>::kLoad; ++i) w[i] = q + i < row_words ? words[q + i] : 0u;
  LaneSpan<BITS>::align(w, shift, v);
}

template <int BITS>
static void check_lane_span(std::mt19937& gen) {
  using L = LaneSpan<BITS>;
  for (int n : {256, 512, 1024, 300, 777}) {
    const std::vector<uint32_t> words = random_row(n, BITS, gen, 3);
    const auto* bytes = reinterpret_cast<const uint8_t*>(words.data());
    const int64_t row_words = packed_row_words(n, BITS);
    for (int sp = 0; sp < n / L::kSpan; ++sp) {
      for (int lane = 0; lane < 32; ++lane) {
        const int64_t q = sp * L::kSpanWords + L::first_word(lane);
        uint32_t v[L::kWords];
        load_aligned<BITS>(words, row_words, q, L::shift(lane), v);
        for (int e = 0; e < 8; ++e) {
          const uint32_t want = unpack_one(bytes, sp * L::kSpan + 8 * lane + e, BITS);
          if (field_at<BITS, 0>(v, e) != want) fail("LaneSpan index", BITS, sp * L::kSpan + 8 * lane + e, want);
          // the GEMV's lookup: the index as a byte offset into a float table
          if (field_at<BITS, 2>(v, e) != 4 * want) fail("field_at<BITS, 2>", BITS, e, want);
        }
        // a lane reads at most one word past its span (the kernels' bounds: inside the row, or guarded)
        if (q + L::kLoad > (sp + 1) * int64_t(L::kSpanWords) + 1) fail("LaneSpan reads past its span", BITS, q, 0);
        // spans the kernels load unchecked (their safe_end) read only words of the row
        const bool unchecked = (sp + 1) * int64_t(L::kSpanWords) + (L::kLoad > 1 ? 1 : 0) <= row_words;
        if (unchecked && q + L::kLoad > row_words) fail("unchecked span reads past the row", BITS, sp, row_words);
      }
    }
  }
}

// dequantize's threads: group g of 8 indices anywhere in a row (LaneSpan's formulas with g for the lane), the last
// group partial, words past the row reading 0.
template <int BITS>
static void check_groups(std::mt19937& gen) {
  using L = LaneSpan<BITS>;
  for (int n : {8, 27, 256, 1030, 4608}) {
    const std::vector<uint32_t> words = random_row(n, BITS, gen, 0);
    const auto* bytes = reinterpret_cast<const uint8_t*>(words.data());
    const int64_t row_words = packed_row_words(n, BITS);
    for (int64_t g = 0; 8 * g < n; ++g) {
      uint32_t v[L::kWords];
      load_aligned<BITS>(words, row_words, L::first_word(g), L::shift(g), v);
      for (int e = 0; e < 8 && 8 * g + e < n; ++e) {
        const uint32_t want = unpack_one(bytes, 8 * g + e, BITS);
        if (field_at<BITS, 0>(v, e) != want) fail("group of 8", BITS, 8 * g + e, want);
      }
    }
  }
}

// The tensor-core GEMV's pair lookups: pair j (2 BITS bits) of a 32-index chunk (BITS words) as a byte offset into
// a table of 128-byte rows (entry p = i0 | i1 << BITS at p << 7).
template <int BITS>
static void check_pairs(std::mt19937& gen) {
  if constexpr (BITS <= 4) {
    for (int trial = 0; trial < 200; ++trial) {
      const std::vector<uint32_t> w = random_row(32, BITS, gen, 1);
      const auto* bytes = reinterpret_cast<const uint8_t*>(w.data());
      for (int j = 0; j < 16; ++j) {
        const uint32_t p = unpack_one(bytes, 2 * j, BITS) | (unpack_one(bytes, 2 * j + 1, BITS) << BITS);
        if (field_at<2 * BITS, 7>(w.data(), j) != p << 7) fail("field_at<2 BITS, 7>", BITS, j, p);
      }
    }
  }
}

template <int BITS>
static void check(std::mt19937& gen) {
  check_lane_span<BITS>(gen);
  check_groups<BITS>(gen);
  check_pairs<BITS>(gen);
}

int main() {
  std::mt19937 gen(2026);
  check<1>(gen);
  check<2>(gen);
  check<3>(gen);
  check<4>(gen);
  check<5>(gen);
  check<6>(gen);
  check<7>(gen);
  check<8>(gen);
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
