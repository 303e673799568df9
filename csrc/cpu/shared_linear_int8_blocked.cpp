// CPU shared_linear, int8 path for batches (AVX-512 VNNI): a blocked integer GEMM whose weight operand is decoded
// from the packed indices into an L1 panel of bytes, as shared_linear_blocked.cpp does for floats.
//
// Why not the row kernel (shared_linear_int8.cpp) for batches: it dots each decoded 64-weight vector with up to 8 x
// rows, one 64-byte x load per vpdpbusd and one horizontal sum per output; at batch 64 it ran at 0.55x of torch's
// int8 dynamic Linear (FBGEMM) on a 4096x4096 layer.
//
// Layout: y^T [out][Mp] = W [out][K] x x^T [K][Mp] (Mp = the batch rounded up to 16), batch rows as the vector
// dimension. vpdpbusd sums 4 byte products per int32 lane, so x^T holds the quantized x as [K/4][Mp] int32 words
// (4 consecutive k of one batch row per lane) and the panel holds weights + 128 as bytes [MR][kKc], both in the k
// order of the quantized-x layout (shared_linear_int8.h). The micro-kernel keeps MR = 8 output rows x NR vectors of
// 16 batch rows in registers; per 4 k: NR loads of x^T, 8 broadcasts of 4 panel bytes, 8 x NR vpdpbusd. K goes in
// chunks of kKc (the panel, 8 KiB, stays in L1; the chunk of x^T in L2), accumulating in y^T between chunks; each
// thread owns a range of output rows. The epilogue removes the +128 bias (128 x sum of the x row) and scales, as the
// row kernels do, then adds the zero points' term and the layer's bias as add_int8_zero_terms does: every path
// gives the same bits.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "decode_scratch.h"
#include "shared_linear_int8.h"
#include "simd_transpose.h"
#include "weightshare/dispatch.h"

// GCC 12 reports its own _mm512_undefined_ps()/_pd() (the pass-through of unmasked cvtepi32_ps and extract
// intrinsics) as "used uninitialized" once they are inlined into the epilogue; a false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace weightshare::cpu {
namespace {

constexpr int kMR = 8;
constexpr int64_t kKc = 1024;  // k per panel row: a multiple of every step_elems (at most 512)
constexpr int64_t kMc = 256;   // batch rows per pass: x^T and y^T buffers stay bounded for any batch

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

#ifdef WS_X86
// Panel rows [r0, r0 + rows) of W, k in [k0, k0 + kc) of the x layout, as weight + 128 bytes; rows past the weight
// hold 128 (weight 0; the kernel computes but never stores them).
template <int BITS>
WS_AVX512 void decode_panel_u8(const PackedLinear& w, const QuantizedCodebook& cq,
                               const Unpack64<BITS>& unpack64, int64_t r0, int rows, int64_t k0, int64_t kc,
                               uint8_t* panel) {
  constexpr int64_t S = step_elems(BITS);
  const ByteSteps steps{w.row_bytes};
  for (int m = 0; m < kMR; ++m) {
    uint8_t* dst = panel + m * kKc;
    if (m >= rows) {
      std::memset(dst, 128, static_cast<size_t>(kc));
      continue;
    }
    const int64_t r = r0 + m;
    const ByteLookup<BITS> lookup(cq.biased_table(r / w.rows_per_group));
    const uint8_t* row = w.packed + r * w.row_bytes;
    // the same chunk of the next panel's row, while the micro-kernel runs on this one: the rows are read in
    // pieces at a stride, which the hardware prefetcher missed (the profile had 83 % of the decode on this load)
    if (r + kMR < w.out_features) {
      const int64_t begin = k0 * BITS / 8, end = std::min(w.row_bytes, (k0 + kc) * BITS / 8);
      for (int64_t off = begin; off < end; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(row + kMR * w.row_bytes + off), _MM_HINT_T0);
    }
    for (int64_t st = k0 / S; st < (k0 + kc) / S; ++st) {
      uint8_t* out = dst + st * S - k0;
      if constexpr (byte_aligned(BITS)) {
        const __m512i bytes = steps.load(row, st);
#pragma GCC unroll 8
        for (int s = 0; s < 8 / BITS; ++s)
          _mm512_storeu_si512(out + 64 * s, lookup(ByteSteps::extract<BITS>(bytes, s)));
      } else {
        _mm512_storeu_si512(out, lookup(unpack64(row, w.row_bytes, st)));
      }
    }
  }
}

// Where a tile goes after the last K chunk: straight into y, the whole int8 definition, rather than into y^T.
struct Epilogue {
  float* y;               // y at the tile's first batch row and the block's first output row
  int64_t ldy;            // output features
  const float* xscale;    // per batch lane of the tile: x's scale
  const int32_t* xbias;   // per batch lane of the tile: 128 x sum(x_q), the weights' +128 times x
  const float* xsum;      // per batch lane of the tile: float(sum(x_q)), the zero points' factor
  const float* wscale;    // per output row of the block: the codebook's scale
  const float* wzero;     // per output row of the block: the codebook's zero point
  const float* bias;      // per output row of the block (padded), or null
  int lanes;              // valid batch lanes in the tile
};

// Rows r[0..8) of 8 values transposed: y row l (l < lanes) gets r[0][l] .. r[7][l], the columns in `cols`.
WS_AVX512 inline void transpose8_store(__m256 (&r)[8], float* y, int64_t ldy, int lanes, __mmask8 cols) {
  transpose8x8(r);
  for (int l = 0; l < 8 && l < lanes; ++l) _mm256_mask_storeu_ps(y + l * ldy, cols, r[l]);
}

// The block [kMR][NR x 16] (+)= panel [kMR][4 kc4] x x^T words b + k4 * ldb; first chunk: from zero. kFinal:
// y = (float(acc - xbias) * (xscale * wscale) + (xscale * wzero) * xsum) + bias, the row kernels' expression and
// then add_int8_zero_terms', lane by lane (the same bits), scattered to y's batch rows; otherwise the int32 block
// goes to c (y^T). Folding the zero points' term and the bias in here saves two passes over y and their thread
// fork-joins: same-run A/B, 128 rows, 768 -> 2304 0.61 -> 0.54 ms, 768 -> 3072 0.84 -> 0.76 ms.
template <int NR, bool kAccumulate, bool kFinal>
WS_AVX512 void block_vnni(const uint8_t* a, const int32_t* b, int64_t ldb, int64_t kc4, int32_t* c, int64_t ldc,
                          int rows, const Epilogue& ep) {
  __m512i acc[kMR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < kMR; ++m)
#pragma GCC unroll 3
    for (int n = 0; n < NR; ++n)
      acc[m][n] = kAccumulate && m < rows ? _mm512_loadu_si512(c + m * ldc + 16 * n) : _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < kc4; ++k4) {
    const int32_t* bk = b + k4 * ldb;
    __m512i bv[NR];
#pragma GCC unroll 3
    for (int n = 0; n < NR; ++n) bv[n] = _mm512_loadu_si512(bk + 16 * n);
#pragma GCC unroll 8
    for (int m = 0; m < kMR; ++m) {
      const __m512i wv = _mm512_set1_epi32(load_i32(a + m * kKc + 4 * k4));
#pragma GCC unroll 3
      for (int n = 0; n < NR; ++n) dpbusd_into(acc[m][n], wv, bv[n]);
    }
  }
  if constexpr (kFinal) {
    // acc - xbias is the exact dot product and fits int32 (|.| <= 127 x 127 x K), so int32 arithmetic is exact
    const __mmask8 cols = static_cast<__mmask8>((1u << rows) - 1u);
#pragma GCC unroll 3
    for (int n = 0; n < NR; ++n) {
      const __m512 xs = _mm512_loadu_ps(ep.xscale + 16 * n);
      const __m512i xb = _mm512_loadu_si512(ep.xbias + 16 * n);
      const __m512 xsum = _mm512_loadu_ps(ep.xsum + 16 * n);
      __m256 lo[kMR], hi[kMR];
#pragma GCC unroll 8
      for (int m = 0; m < kMR; ++m) {
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][n], xb)),
                                 _mm512_mul_ps(xs, _mm512_set1_ps(ep.wscale[m])));
        v = _mm512_add_ps(v, _mm512_mul_ps(_mm512_mul_ps(xs, _mm512_set1_ps(ep.wzero[m])), xsum));
        if (ep.bias != nullptr) v = _mm512_add_ps(v, _mm512_set1_ps(ep.bias[m]));
        lo[m] = _mm512_castps512_ps256(v);
        hi[m] = _mm512_extractf32x8_ps(v, 1);
      }
      // [8 output rows][16 batch rows] -> 16 batch rows of 8 consecutive outputs each (a scatter was 3x slower)
      transpose8_store(lo, ep.y + 16 * n * ep.ldy, ep.ldy, ep.lanes - 16 * n, cols);
      transpose8_store(hi, ep.y + (16 * n + 8) * ep.ldy, ep.ldy, ep.lanes - 16 * n - 8, cols);
    }
  } else {
#pragma GCC unroll 8
    for (int m = 0; m < kMR; ++m) {
      if (m >= rows) break;
#pragma GCC unroll 3
      for (int n = 0; n < NR; ++n) _mm512_storeu_si512(c + m * ldc + 16 * n, acc[m][n]);
    }
  }
}

using BlockFn = void (*)(const uint8_t*, const int32_t*, int64_t, int64_t, int32_t*, int64_t, int, const Epilogue&);

// The kernel for a tile of nr vectors (1..3): first chunk or accumulating, last chunk or not.
template <bool kAccumulate, bool kFinal>
constexpr BlockFn kBlocks[3] = {block_vnni<1, kAccumulate, kFinal>, block_vnni<2, kAccumulate, kFinal>,
                                block_vnni<3, kAccumulate, kFinal>};

BlockFn pick(int64_t nr, bool accumulate, bool final) {
  if (final) return (accumulate ? kBlocks<true, true> : kBlocks<false, true>)[nr - 1];
  return (accumulate ? kBlocks<true, false> : kBlocks<false, false>)[nr - 1];
}
#endif

}  // namespace

bool linear_int8_blocked(const PackedLinear& w, const QuantizedX& xq, const QuantizedCodebook& cq, int64_t M,
                         const float* bias, float* y) {
#ifdef WS_X86
  if (simd_level() != Simd::Avx512) return false;
  const int64_t K = xq.stride, O = w.out_features;
  // an int32 lane sums up to K products (w + 128) x, each at most 255 x 127 in magnitude
  if (K > 65536) return false;
  // the reused per-thread buffers stay below 64 MiB (K x 256 bytes of x^T, O x 256 int32 of y^T)
  if ((K + 4 * O) * kMc > (int64_t(1) << 26)) return false;
  thread_local std::vector<int32_t> xt_buf, yt_buf;
  int32_t* xt = aligned64(grown(xt_buf, static_cast<size_t>(K / 4 * kMc + 16)));
  // y^T holds the int32 sums between K chunks; a layer of one chunk writes y straight from the registers
  int32_t* yt = K > kKc ? grown(yt_buf, static_cast<size_t>(O * kMc)) : nullptr;
  const int64_t blocks = (O + kMR - 1) / kMR;
  const std::vector<float> wscale = per_output_row(w, cq.scale, blocks * kMR);
  const std::vector<float> wzero = per_output_row(w, cq.zero, blocks * kMR);
  std::vector<float> bias_padded;  // the epilogue reads a whole block's 8 entries
  if (bias != nullptr) {
    bias_padded.assign(static_cast<size_t>(blocks * kMR), 0.0f);
    std::copy(bias, bias + O, bias_padded.begin());
  }
  std::vector<float> xscale(kMc), xsum(kMc);
  std::vector<int32_t> xbias(kMc);
  for (int64_t m0 = 0; m0 < M; m0 += kMc) {
    const int64_t Mc = std::min(kMc, M - m0), Mp = (Mc + 15) / 16 * 16;
    for (int64_t m = 0; m < Mp; ++m) {
      xscale[m] = m < Mc ? xq.scale[m0 + m] : 0.0f;
      xsum[m] = m < Mc ? static_cast<float>(xq.sum[m0 + m]) : 0.0f;
      xbias[m] = m < Mc ? static_cast<int32_t>(128 * xq.sum[m0 + m]) : 0;  // |.| <= 128 x 127 x K < 2**31
    }
    // x^T [K/4][Mp] words, zero padded, in strips of 16 words (64 bytes of each x row)
    at::parallel_for(0, (K / 4 + 15) / 16, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t j0 = s * 16, j1 = std::min(K / 4, j0 + 16);
        for (int64_t m = 0; m < Mp; ++m) {
          if (m >= Mc) {
            for (int64_t j = j0; j < j1; ++j) xt[j * Mp + m] = 0;
            continue;
          }
          const int8_t* xm = xq.q + (m0 + m) * K;
          for (int64_t j = j0; j < j1; ++j) xt[j * Mp + m] = load_i32(xm + 4 * j);
        }
      }
    });
    WS_DISPATCH_BITS(w.bits, BITS, [&] {
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        thread_local std::vector<uint8_t> panel_buf;
        uint8_t* panel = grown(panel_buf, static_cast<size_t>(kMR * kKc));
        const Unpack64<BITS> unpack64;  // bit widths that are not byte aligned
        for (int64_t k0 = 0; k0 < K; k0 += kKc) {
          const int64_t kc = std::min(kKc, K - k0);
          const bool final = k0 + kc == K;
          for (int64_t b = b0; b < b1; ++b) {
            const int rows = static_cast<int>(std::min<int64_t>(kMR, O - b * kMR));
            decode_panel_u8<BITS>(w, cq, unpack64, b * kMR, rows, k0, kc, panel);
            for (int64_t q = 0; q < Mp;) {
              // tiles of 3 vectors, but 4 left go as 2 + 2 (a 1-vector tile issues a broadcast per vpdpbusd)
              const int64_t left = (Mp - q) / 16, nr = left == 4 ? 2 : std::min<int64_t>(3, left);
              const Epilogue ep{y + (m0 + q) * O + b * kMR,
                                O,
                                xscale.data() + q,
                                xbias.data() + q,
                                xsum.data() + q,
                                wscale.data() + b * kMR,
                                wzero.data() + b * kMR,
                                bias != nullptr ? bias_padded.data() + b * kMR : nullptr,
                                int(Mc - q)};
              int32_t* c = yt ? yt + b * kMR * Mp + q : nullptr;
              pick(nr, k0 > 0, final)(panel, xt + k0 / 4 * Mp + q, Mp, kc / 4, c, Mp, rows, ep);
              q += nr * 16;
            }
          }
        }
      });
    });
  }
  return true;
#else
  (void)w, (void)xq, (void)cq, (void)M, (void)bias, (void)y;
  return false;
#endif
}

}  // namespace weightshare::cpu
