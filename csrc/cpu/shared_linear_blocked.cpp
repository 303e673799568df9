// CPU shared_linear, float path for batches: a blocked GEMM whose weight operand is decoded from the packed indices
// straight into an L1-sized panel, next to the registers that use it.
//
// Why not decode + ATen's GEMM (the previous batched path): that wrote every decoded weight to memory (8 MiB
// panels, 4 bytes per weight where the index costs half a byte), the GEMM then read and packed it again, and the
// result went through one more copy; at batch 64 it ran at 0.69-1.19x of dense F.linear over four runs. Here each
// weight is decoded once into a [MR x 256] panel in L1 and used for every batch row from registers.
//
// Layout: y^T [out][Mp] = W [out][K] x x^T [K][Mp] (Mp = batch rounded up to the vector width, zero padded), so
// the batch is the vector dimension and a panel row is a row of W. The micro-kernel keeps MR output features x
// NR vectors of batch rows in registers (8 x 48 with AVX-512, 4 x 24 with AVX2); per k, NR vector loads of x^T,
// MR broadcasts of the panel, MR x NR FMAs. K goes in chunks of 256 (the panel, 8 KiB, stays in L1; the chunk of
// x^T, 256 x Mp floats, in L2), accumulating in y^T between chunks; each thread owns a range of output features.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "decode_scratch.h"
#include "shared_linear.h"
#include "simd_transpose.h"
#include "weightshare/dispatch.h"

namespace weightshare::cpu {
namespace {

constexpr int64_t kKc = 256;     // k per panel (the panel row stride; a compile-time displacement in the kernel)
// panels decoded together (64 KiB with AVX2, 128 with AVX-512: in L2), so that the next group's indices can be
// prefetched while this group's tiles run, and each tile of x^T meets all of them from L1 (no gain measured from
// that alone)
constexpr int64_t kPanels = 16;

#ifdef WS_X86
// y^T block [MR][NR x 16] (+)= panel [MR][kc] x x^T rows b + k * ldb. First chunk: the block starts at zero.
template <int NR, bool kAccumulate>
WS_AVX512 void block_avx512(const float* a, const float* b, int64_t ldb, int64_t kc, float* c, int64_t ldc,
                            int rows) {
  constexpr int MR = 8;
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 3
    for (int n = 0; n < NR; ++n)
      acc[m][n] = kAccumulate && m < rows ? _mm512_loadu_ps(c + m * ldc + 16 * n) : _mm512_setzero_ps();
  // k unrolled by 4 (loop overhead and scheduling across steps): same-run A/B, Intel VM, 3-4 rounds: AVX2
  // 64x4096x4096 12.6-13.0 -> 11.7-12.2 ms, 256 rows 45.7-47.1 -> 41.8-44.1; AVX-512 49x4608x512 1.18-1.34 ->
  // 1.10-1.24 ms, 64x4096x4096 7.8-8.5 -> 7.4-8.2 (others within noise)
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = b + k * ldb;
    __m512 bv[NR];
#pragma GCC unroll 3
    for (int n = 0; n < NR; ++n) bv[n] = _mm512_loadu_ps(bk + 16 * n);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 w = _mm512_set1_ps(a[m * kKc + k]);
#pragma GCC unroll 3
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_fmadd_ps(w, bv[n], acc[m][n]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    if (m >= rows) break;
#pragma GCC unroll 3
    for (int n = 0; n < NR; ++n) _mm512_storeu_ps(c + m * ldc + 16 * n, acc[m][n]);
  }
}

template <int NR, bool kAccumulate>
WS_AVX2 void block_avx2(const float* a, const float* b, int64_t ldb, int64_t kc, float* c, int64_t ldc, int rows) {
  constexpr int MR = 4;
  __m256 acc[MR][NR];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 3
    for (int n = 0; n < NR; ++n)
      acc[m][n] = kAccumulate && m < rows ? _mm256_loadu_ps(c + m * ldc + 8 * n) : _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = b + k * ldb;
    __m256 bv[NR];
#pragma GCC unroll 3
    for (int n = 0; n < NR; ++n) bv[n] = _mm256_loadu_ps(bk + 8 * n);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m256 w = _mm256_broadcast_ss(a + m * kKc + k);
#pragma GCC unroll 3
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_fmadd_ps(w, bv[n], acc[m][n]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    if (m >= rows) break;
#pragma GCC unroll 3
    for (int n = 0; n < NR; ++n) _mm256_storeu_ps(c + m * ldc + 8 * n, acc[m][n]);
  }
}

// Rows [r0, r1) of the packed indices, columns [k0, k0 + kc) (nothing past the rows' end), into the caches.
inline void prefetch_indices(const PackedLinear& w, int64_t r0, int64_t r1, int64_t k0, int64_t kc, int bits) {
  const int64_t begin = k0 * bits / 8, end = std::min(w.row_bytes, (k0 + kc) * bits / 8 + 1);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = begin; b < end; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w.packed + r * w.row_bytes + b), _MM_HINT_T0);
}

using BlockFn = void (*)(const float*, const float*, int64_t, int64_t, float*, int64_t, int);

// The kernel for a tile of nr vectors (1..3), first chunk or accumulating.
BlockFn pick(Simd simd, int64_t nr, bool accumulate) {
  if (simd == Simd::Avx512) {
    static constexpr BlockFn fresh[3] = {block_avx512<1, false>, block_avx512<2, false>, block_avx512<3, false>};
    static constexpr BlockFn acc[3] = {block_avx512<1, true>, block_avx512<2, true>, block_avx512<3, true>};
    return (accumulate ? acc : fresh)[nr - 1];
  }
  static constexpr BlockFn fresh[3] = {block_avx2<1, false>, block_avx2<2, false>, block_avx2<3, false>};
  static constexpr BlockFn acc[3] = {block_avx2<1, true>, block_avx2<2, true>, block_avx2<3, true>};
  return (accumulate ? acc : fresh)[nr - 1];
}
#endif

}  // namespace

int64_t blocked_lanes() {
#ifdef WS_X86
  const Simd simd = simd_level();
  return simd == Simd::Avx512 ? 16 : simd == Simd::Scalar ? 0 : 8;
#else
  return 0;
#endif
}

bool blocked_product(const PackedLinear& w, const float* xt, int64_t Mp, float* yt) {
#ifdef WS_X86
  const Simd simd = simd_level();
  if (simd == Simd::Scalar) return false;
  const int MR = simd == Simd::Avx512 ? 8 : 4;
  const int64_t V = simd == Simd::Avx512 ? 16 : 8;
  WS_CHECK(Mp > 0 && Mp % V == 0 && Mp <= kBlockedMaxLanes, "weightshare: blocked_product needs 0 < Mp <= ",
              kBlockedMaxLanes, " in whole vectors of ", V, ", got ", Mp);
  const int64_t K = w.in_features, O = w.out_features;
  const int64_t blocks = (O + MR - 1) / MR;
  WS_DISPATCH_BITS(w.bits, BITS, [&] {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      thread_local std::vector<float> panel_buf;
      float* panels = grown(panel_buf, static_cast<size_t>(kPanels * MR * kKc));
      GroupTable gt;
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const int64_t kc = std::min(kKc, K - k0);
        for (int64_t g0 = b0; g0 < b1; g0 += kPanels) {
          const int64_t g1 = std::min(b1, g0 + kPanels);
          for (int64_t b = g0; b < g1; ++b)
            decode_block<BITS>(w, b * MR, static_cast<int>(std::min<int64_t>(MR, O - b * MR)), MR, k0, kc, simd, gt,
                               panels + (b - g0) * MR * kKc, kKc);
          // the next group's indices (this chunk's, or the next chunk's first group), fetched while this group's
          // tiles run: the decode reads kc * BITS / 8 bytes of each row, rows a row stride apart, which the
          // hardware prefetchers did not follow (the decode took a third of the profile at batch 16). Intel VM,
          // 4096x4096 4 bits, same-run A/B: AVX2 batch 16 5.6-6.2 -> 4.4 ms, 64 16.8-18.2 -> 15.9, 256 within
          // noise (58 ms); AVX-512 batch 16 3.7 -> 3.4 ms. bench_shared_linear's runs before / after (with the
          // register-table decode), AVX2 against dense: batch 64 0.88x -> 1.03-1.08x, 256 0.74x -> 0.90-0.92x
          const bool last = g1 == b1;
          const int64_t n0 = last ? b0 : g1, n1 = std::min(b1, n0 + kPanels);
          prefetch_indices(w, n0 * MR, std::min(O, n1 * MR), last ? k0 + kKc : k0, kc, BITS);
          for (int64_t q = 0; q < Mp;) {
            // tiles of 3 vectors, but 4 left go as 2 + 2: a 1-vector tile issues a broadcast per FMA
            const int64_t left = (Mp - q) / V, nr = left == 4 ? 2 : std::min<int64_t>(3, left);
            const BlockFn kernel = pick(simd, nr, k0 > 0);
            for (int64_t b = g0; b < g1; ++b)
              kernel(panels + (b - g0) * MR * kKc, xt + k0 * Mp + q, Mp, kc, yt + b * MR * Mp + q, Mp,
                     static_cast<int>(std::min<int64_t>(MR, O - b * MR)));
            q += nr * V;
          }
        }
      }
    });
  });
  return true;
#else
  return false;
#endif
}

bool linear_float_blocked(const PackedLinear& w, const float* x, int64_t M, const float* bias, float* y) {
#ifdef WS_X86
  const int64_t V = blocked_lanes();
  if (V == 0) return false;
  const int64_t K = w.in_features, O = w.out_features;
  // its work buffers are reused per thread, not freed: beyond 64 MiB of them (a layer wider than ~64K features)
  // the decode + ATen path, which needs none, takes the call
  if ((K + O) * kBlockedMaxLanes > (int64_t(1) << 24)) return false;
  // the batch in passes of kBlockedMaxLanes rows: the x^T and y^T buffers stay bounded (K x 256 and O x 256
  // floats) for any batch, and each weight is decoded once per pass
  thread_local std::vector<float> xt_buf, yt_buf;
  float* xt = grown(xt_buf, static_cast<size_t>(K * kBlockedMaxLanes));
  float* yt = grown(yt_buf, static_cast<size_t>(O * kBlockedMaxLanes));
  for (int64_t m0 = 0; m0 < M; m0 += kBlockedMaxLanes) {
    const int64_t Mc = std::min(kBlockedMaxLanes, M - m0), Mp = (Mc + V - 1) / V * V;
    const float* xm = x + m0 * K;
    // x^T [K][Mp], zero padded, in 64-column strips (each strip's reads of x stay in cache)
    at::parallel_for(0, (K + 63) / 64, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t k0 = s * 64, k1 = std::min(K, k0 + 64);
        transpose_f32(xm + k0, K, xt + k0 * Mp, Mp, Mc, k1 - k0);
        for (int64_t k = k0; k < k1; ++k) std::fill(xt + k * Mp + Mc, xt + (k + 1) * Mp, 0.0f);
      }
    });
    blocked_product(w, xt, Mp, yt);
    // y[m0 : m0 + Mc] = (y^T)^T (+ bias, added to each strip while it is in cache: a pass over y saved), in 64-row
    // strips of y^T
    float* ym = y + m0 * O;
    at::parallel_for(0, (O + 63) / 64, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t o0 = s * 64, o1 = std::min(O, o0 + 64);
        transpose_f32(yt + o0 * Mp, Mp, ym + o0, O, o1 - o0, Mc);
        if (bias != nullptr) {
          for (int64_t m = 0; m < Mc; ++m)
            for (int64_t o = o0; o < o1; ++o) ym[m * O + o] += bias[o];
        }
      }
    });
  }
  return true;
#else
  return false;
#endif
}

}  // namespace weightshare::cpu
