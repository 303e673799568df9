// CPU shared_linear, float path, batch 1-4, 6- to 8-bit indices on AVX-512 (VBMI): the codebook looked up as four
// byte planes.
//
// Why: the general AVX-512 GEMV (shared_linear.cpp) looks a 256-entry fp32 table up 16 indices at a time with a
// chain of two-register permutes selected by compares (one permute + seven compare/permute/blend rounds per 16
// weights): 4096x4096 at batch 1 took 2.75 ms, 1.25x dense fp32, where 4-bit indices take 0.34 ms. Here each byte
// of the fp32 entries is its own 256-byte table (four registers; BytePlanes, avx512_bytes.h): per 64 indices (one
// load) two vpermi2b and a blend by index bit 7 give one byte plane, four planes and two rounds of unpacks give 64
// floats. The unpacks interleave within 128-bit lanes, so x is stored once per call in that order. Exact: the
// floats are the table's bits. 6 and 7 bits (1.0 and 1.7 ms with the compare chain, 1.8-3.1x dense): indices
// unpacked to bytes by a byte permute and vpmultishiftqb (Unpack64, avx512_bytes.h), one vpermi2b per plane over a
// 128-entry table (6 bits: the table repeated, so the junk seventh index bit is harmless).
#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "avx512_bytes.h"
#include "shared_linear.h"

// GCC 12 reports its own _mm512_undefined_*() (the pass-through operand of unmasked AVX-512 intrinsics) as "used
// uninitialized" once they are inlined here; a false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace weightshare::cpu {
namespace {

constexpr int64_t kBlock = 64;  // indices per step (one 64-byte load of 8-bit indices)

// Position of weight i (of a 64-block) in the unpacks' output: vector j = (i % 16) / 4, lane 4 (i / 16) + i % 4.
inline int64_t unpack_pos(int64_t i) { return 16 * ((i % 16) / 4) + 4 * (i / 16) + i % 4; }

#ifdef WS_X86
// The row's last, partial block (when in % 64 != 0): which lanes of the lookup's four output vectors hold weights
// before the row end (the lanes are in unpack_pos order).
struct TailMasks {
  int64_t count = 0;  // weights in the partial block (0: none)
  __mmask16 lanes[4] = {0, 0, 0, 0};
  explicit TailMasks(int64_t in) : count(in % kBlock) {
    for (int64_t i = 0; i < count; ++i) lanes[unpack_pos(i) / 16] |= static_cast<__mmask16>(1u << (unpack_pos(i) % 16));
  }
};

// xp: x rows in the unpacks' order, xblocks blocks of 64 per row (the last one zero padded when the row has a
// partial block).
template <int BITS, int M>
WS_AVX512 void gemv_rows_bytes(const PackedLinear& w, const float* xp, int64_t xblocks, const TailMasks& tail,
                               int64_t r0, int64_t r1, float* y) {
  const int64_t in = w.in_features, blocks = in / kBlock;
  const Unpack64<BITS> unpack64;  // 6 and 7 bits
  GroupTable gt;
  BytePlanes<BITS> planes(gt.get(w, r0));
  int64_t planes_group = gt.group;
  for (int64_t r = r0; r < r1; ++r) {
    const DecodeTable& dt = gt.get(w, r);
    if (gt.group != planes_group) {
      planes_group = gt.group;
      planes = BytePlanes<BITS>(dt);
    }
    const uint8_t* row = w.packed + r * w.row_bytes;
    __m512 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      _mm_prefetch(reinterpret_cast<const char*>(row + 2 * w.row_bytes + blk * 8 * BITS), _MM_HINT_T0);  // 2 rows on
      __m512 wv[4];
      if constexpr (BITS == 8) {
        planes.lookup(_mm512_loadu_si512(row + blk * kBlock), wv);
      } else {
        planes.lookup(unpack64(row, w.row_bytes, blk), wv);
      }
      for (int j = 0; j < 4; ++j)
        for (int m = 0; m < M; ++m)
          acc[m][j & 1] = _mm512_fmadd_ps(wv[j], _mm512_loadu_ps(xp + (m * xblocks + blk) * kBlock + 16 * j),
                                          acc[m][j & 1]);
    }
    if (tail.count > 0) {  // one more lookup with the lanes past the row end masked out (their index reads 0)
      __m512 wv[4];
      if constexpr (BITS == 8) {
        const __mmask64 bytes = (__mmask64(1) << tail.count) - 1;  // count < 64
        planes.lookup(_mm512_maskz_loadu_epi8(bytes, row + blocks * kBlock), wv);
      } else {
        planes.lookup(unpack64(row, w.row_bytes, blocks), wv);
      }
      for (int j = 0; j < 4; ++j)
        for (int m = 0; m < M; ++m)
          acc[m][j & 1] = _mm512_mask3_fmadd_ps(
              wv[j], _mm512_loadu_ps(xp + (m * xblocks + blocks) * kBlock + 16 * j), acc[m][j & 1], tail.lanes[j]);
    }
    for (int m = 0; m < M; ++m) y[m * w.out_features + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
  }
}
#endif

}  // namespace

bool gemv_avx512_bytes(const PackedLinear& w, const float* x, int64_t M, float* y) {
#ifdef WS_X86
  if (w.bits < 6 || M < 1 || M > 4 || simd_level() != Simd::Avx512 || w.in_features < kBlock) return false;
  const int64_t in = w.in_features;
  const TailMasks tail(in);
  // x in the unpacks' order, the partial last block zero padded (a scalar tail loop over up to 63 weights a row
  // cost more than the lookups on small layers: LeNet-300-100's 300-wide rows have 44)
  const int64_t xblocks = (in + kBlock - 1) / kBlock;
  std::vector<float> xp(M * xblocks * kBlock, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < in; ++i)
      xp[(m * xblocks + i / kBlock) * kBlock + unpack_pos(i % kBlock)] = x[m * in + i];
  auto rows = [&](auto bits_tag) {
    constexpr int BITS = decltype(bits_tag)::value;
    at::parallel_for(0, w.out_features, std::max<int64_t>(1, 65536 / in), [&](int64_t r0, int64_t r1) {
      switch (M) {
        case 1: return gemv_rows_bytes<BITS, 1>(w, xp.data(), xblocks, tail, r0, r1, y);
        case 2: return gemv_rows_bytes<BITS, 2>(w, xp.data(), xblocks, tail, r0, r1, y);
        case 3: return gemv_rows_bytes<BITS, 3>(w, xp.data(), xblocks, tail, r0, r1, y);
        default: return gemv_rows_bytes<BITS, 4>(w, xp.data(), xblocks, tail, r0, r1, y);
      }
    });
  };
  if (w.bits == 6) rows(std::integral_constant<int, 6>());
  if (w.bits == 7) rows(std::integral_constant<int, 7>());
  if (w.bits == 8) rows(std::integral_constant<int, 8>());
  return true;
#else
  (void)w, (void)x, (void)M, (void)y;
  return false;
#endif
}

}  // namespace weightshare::cpu
