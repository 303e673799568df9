// CPU shared_linear, int8 path for batches on AVX2 (no VNNI): a blocked integer GEMM whose weight operand is
// decoded from the packed indices into an L1 panel, the AVX2 counterpart of shared_linear_int8_blocked.cpp.
//
// Why not the row kernels for batches: they dot each decoded weight row with up to 4 x rows, paying |x| and
// sign(w, x) per product pair (vpmaddubsw multiplies unsigned by signed bytes) and a horizontal sum per output;
// at batch 64 on a 4096x4096 4-bit layer they ran at half the speed of torch's int8 Linear on AVX2 (FBGEMM).
//
// Products: vpmaddwd on int16 operands (w and x sign-extended), 16 exact multiply-adds per instruction, the same
// rate as vpmaddubsw + vpmaddwd on bytes, without the byte form's saturation (a +128-biased weight pair can reach
// 2 x 255 x 127 > 32767) or its per-pair sign fix-up. |w|, |x| <= 127, so an int32 lane holds the sum of up to
// 2**31 / 127**2 > 65536 products: exact for K <= 65536 (longer rows take the row kernels).
//
// Bytes (2-4 bits, a codebook of K <= 16 entries: QuantizedCodebook::offset): the table's q + offset is unsigned
// 7-bit, so vpmaddubsw multiplies it straight against the x bytes (pairs within 2 x 127 x 127: exact) and vpmaddwd
// by ones widens: 3 uops per 32 multiply-adds against 4, no int16 copy of x, half the panel transposes; offset x
// sum(x) comes off in the epilogue. The panel then holds 4-byte words (j, r) = w[r][4j .. 4j + 3]. With AVX-VNNI
// every width takes this form, vpdpbusd doing all three steps on any unsigned byte (q + 128 above 16 entries: K
// products of 255 x 127 stay below 2**31 for K <= 65536).
//
// Layout: output rows are the vector dimension. The panel holds kNR = 16 output rows x kKc k as int32 words
// [kKc / 2][16], word (j, r) = the int16 pair (w[r][2j], w[r][2j + 1]); the micro-kernel keeps MB x rows x 2
// vectors of 8 output rows in registers and per k pair loads the 2 panel vectors and broadcasts each x row's int16
// pair. So y's rows come out as contiguous stores (no transpose), and a batch that is not a multiple of MB costs
// only a smaller tile. K goes in chunks of kKc (panel 16 KiB in L1, the chunk of x in L2), the int32 sums parked
// between chunks; each thread owns a range of 16-row blocks. The epilogue is the row kernels' expression lane by
// lane, so every path gives the same bits.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "decode_scratch.h"
#include "int8_decode_avx2.h"
#include "shared_linear_int8.h"
#include "simd_transpose.h"
#include "weightshare/dispatch.h"

namespace weightshare::cpu {
namespace {

constexpr int kNV = 2;         // vectors of 8 output rows per block
constexpr int kNR = 8 * kNV;   // output rows per block
constexpr int kMB = 6;         // x rows per tile: 6 x 2 accumulators + 2 panel vectors + broadcast + product = 16
constexpr int64_t kKc = 512;   // k per panel chunk: a multiple of every step_elems (at most 512)
constexpr int64_t kMc = 256;   // x rows per pass: the int16 copy of x and the parked sums stay bounded

#ifdef WS_X86
inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Panel of rows [r0, r0 + rows) of W, positions [k0, k0 + kc) of the x layout, as int16 pairs [kc / 2][16]; rows
// past the weight are zero (computed, never stored).
template <int BITS, bool U>
WS_AVX2 void decode_panel(const PackedLinear& w, const QuantizedCodebook& cq, Avx2Int8Decoder<BITS>& decoder,
                          int64_t r0, int rows, int64_t k0, int64_t kc, int8_t* bytes, uint8_t* tail,
                          int32_t* panel) {
  const int64_t first = k0 * BITS / 8, nbytes = kc * BITS / 8;
  for (int m = 0; m < kNR; ++m) {
    int8_t* dst = bytes + m * kKc;
    if (m >= rows) {
      std::memset(dst, 0, static_cast<size_t>(kc));
      continue;
    }
    const int64_t r = r0 + m;
    if (m == 0 || r % w.rows_per_group == 0) {
      const int64_t g = r / w.rows_per_group;
      if constexpr (U) {
        decoder.set_table_offset(cq.table(g), cq.table_offset(g));
      } else {
        decoder.set_table(cq.table(g));
      }
    }
    const uint8_t* src = w.packed + r * w.row_bytes + first;
    // the row's last chunk: its bytes past the row end (and the decode's over-read) must read as zero
    if (first + nbytes + Avx2Int8Decoder<BITS>::kOverread > w.row_bytes) {
      const int64_t have = std::max<int64_t>(0, w.row_bytes - first);
      std::memcpy(tail, src, static_cast<size_t>(have));
      std::memset(tail + have, 0, static_cast<size_t>(nbytes + Avx2Int8Decoder<BITS>::kOverread - have));
      src = tail;
    }
    decoder.decode(src, kc, dst);
  }
  if constexpr (U) {  // 8 rows x 8 k quads at a time: transpose the 8 x 8 words of 32 bytes per row
    for (int g = 0; g < kNR / 8; ++g)
      for (int64_t t = 0; t < kc / 32; ++t) {
        __m256 v[8];
        for (int l = 0; l < 8; ++l)
          v[l] = _mm256_load_ps(reinterpret_cast<const float*>(bytes + (8 * g + l) * kKc + 32 * t));
        transpose8x8(v);
        for (int j = 0; j < 8; ++j) _mm256_store_ps(reinterpret_cast<float*>(panel + (8 * t + j) * kNR + 8 * g), v[j]);
      }
    return;
  }
  // 8 rows x 8 k pairs at a time: sign-extend each row's 16 bytes to 8 int16 pairs, transpose the 8 x 8 words
  for (int g = 0; g < kNR / 8; ++g)
    for (int64_t t = 0; t < kc / 16; ++t) {
      __m256 v[8];
      for (int l = 0; l < 8; ++l)
        v[l] = _mm256_castsi256_ps(_mm256_cvtepi8_epi16(
            _mm_load_si128(reinterpret_cast<const __m128i*>(bytes + (8 * g + l) * kKc + 16 * t))));
      transpose8x8(v);
      for (int j = 0; j < 8; ++j) _mm256_store_ps(reinterpret_cast<float*>(panel + (8 * t + j) * kNR + 8 * g), v[j]);
    }
}

// Where a tile goes after the last K chunk: y = float(sum) * (xscale * wscale), into y's rows.
struct Epilogue {
  float* y;              // y at the tile's first x row and the block's first output row
  int64_t ldy;           // output features
  const float* xscale;   // per x row of the tile
  const float* wscale;   // per output row of the block (16, padded)
  int rows;              // valid output rows in the block
  const int32_t* offset = nullptr;  // bytes tiles: per output row of the block (16, padded), the table's offset
  const int32_t* xsum = nullptr;    // bytes tiles: per x row of the tile, sum(x_q)
};

// The register tile (int8_tile_avx2.inc), as plain AVX2 and with AVX-VNNI.
namespace avx2_plain {
#define WS_INT8_TILE_TARGET WS_AVX2
#define WS_INT8_TILE_VNNI 0
#include "int8_tile_avx2.inc"
#undef WS_INT8_TILE_TARGET
#undef WS_INT8_TILE_VNNI
}  // namespace avx2_plain
namespace avx2_vnni {
#define WS_INT8_TILE_TARGET WS_AVX2_VNNI
#define WS_INT8_TILE_VNNI 1
#include "int8_tile_avx2.inc"
#undef WS_INT8_TILE_TARGET
#undef WS_INT8_TILE_VNNI
}  // namespace avx2_vnni

using TileFn = void (*)(const int32_t*, const void*, int64_t, int64_t, int32_t*, const Epilogue&);

// V: the AVX-VNNI copy (bytes form only)
template <int MB, bool kFirst, bool kFinal, bool U, bool V>
constexpr TileFn tile_fn() {
  if constexpr (V) {
    static_assert(U, "AVX-VNNI multiplies bytes");
    return avx2_vnni::tile<MB, kFirst, kFinal, U>;
  } else {
    return avx2_plain::tile<MB, kFirst, kFinal, U>;
  }
}

template <bool kFirst, bool kFinal, bool U, bool V>
constexpr TileFn kTiles[kMB] = {tile_fn<1, kFirst, kFinal, U, V>(), tile_fn<2, kFirst, kFinal, U, V>(),
                                tile_fn<3, kFirst, kFinal, U, V>(), tile_fn<4, kFirst, kFinal, U, V>(),
                                tile_fn<5, kFirst, kFinal, U, V>(), tile_fn<6, kFirst, kFinal, U, V>()};

template <bool U, bool V>
TileFn pick(int64_t mb, bool first, bool final) {
  if (first) return (final ? kTiles<true, true, U, V> : kTiles<true, false, U, V>)[mb - 1];
  return (final ? kTiles<false, true, U, V> : kTiles<false, false, U, V>)[mb - 1];
}

// x rows [0, rows) of the pass (xq rows from m0) sign-extended to int16, in the layout's k order (the panel's).
WS_AVX2 void widen_x(const QuantizedX& xq, int64_t m0, int64_t r0, int64_t r1, int16_t* x16) {
  const int64_t K = xq.stride;  // a multiple of 64; rows 64-byte aligned
  for (int64_t m = r0; m < r1; ++m) {
    const int8_t* src = xq.q + (m0 + m) * K;
    int16_t* dst = x16 + m * K;
    for (int64_t k = 0; k < K; k += 16)
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + k),
                         _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(src + k))));
  }
}

// Blocks [b0, b1) of 16 output rows for the pass's Mc x rows (x: int16, or U bytes; xscale), into y at the pass's
// first row.
template <int BITS, bool U>
WS_AVX2 void run_blocks(const PackedLinear& w, const QuantizedCodebook& cq, const void* x, int64_t K, int64_t Mc,
                        const float* xscale, const int32_t* xsum, const float* wscale, const int32_t* offset,
                        int64_t b0, int64_t b1, float* y, bool vnni) {
  thread_local std::vector<int8_t> bytes_buf;
  thread_local std::vector<uint8_t> tail_buf;
  thread_local std::vector<int32_t> panel_buf, parked_buf;
  int8_t* bytes = aligned64(grown(bytes_buf, static_cast<size_t>(kNR * kKc + 64)));
  uint8_t* tail = grown(tail_buf, static_cast<size_t>(kKc + 64));
  int32_t* panel = aligned64(grown(panel_buf, static_cast<size_t>(kKc / 2 * kNR + 16)));
  int32_t* parked = aligned64(grown(parked_buf, static_cast<size_t>(kMc * kNR + 16)));
  const int64_t O = w.out_features;
  Avx2Int8Decoder<BITS> decoder;
  for (int64_t b = b0; b < b1; ++b) {
    const int rows = static_cast<int>(std::min<int64_t>(kNR, O - b * kNR));
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      const int64_t kc = std::min(kKc, K - k0);
      decode_panel<BITS, U>(w, cq, decoder, b * kNR, rows, k0, kc, bytes, tail, panel);
      for (int64_t q = 0; q < Mc; q += kMB) {
        const int64_t mb = std::min<int64_t>(kMB, Mc - q);
        Epilogue ep{y + q * O + b * kNR, O, xscale + q, wscale + b * kNR, rows};
        const void* xt;
        if constexpr (U) {
          ep.offset = offset + b * kNR;
          ep.xsum = xsum + q;
          xt = static_cast<const int8_t*>(x) + q * K + k0;
        } else {
          xt = static_cast<const int16_t*>(x) + q * K + k0;
        }
        const TileFn fn = U && vnni ? pick<U, U>(mb, k0 == 0, k0 + kc == K) : pick<U, false>(mb, k0 == 0, k0 + kc == K);
        fn(panel, xt, K, U ? kc / 4 : kc / 2, parked + q * kNR, ep);
      }
    }
  }
}
#endif

}  // namespace

bool linear_int8_blocked_avx2(const PackedLinear& w, const QuantizedX& xq, const QuantizedCodebook& cq, int64_t M,
                              float* y) {
#ifdef WS_X86
  if (simd_level() != Simd::Avx2) return false;
  // 1 bit: the row kernel (shared_linear_int8.cpp) needs no lookup there and takes every batch: 0.94-0.99x of torch's
  // AVX2 int8 Linear over batches 5-64 where this kernel ran 0.52-0.87x (4096x4096, AVX2 emulated)
  if (w.bits == 1) return false;
  const int64_t K = xq.stride, O = w.out_features;  // K: a multiple of step_elems(bits), so of kKc's divisors
  if (K > 65536) return false;  // int32 sums of K products of 127 x 127 (see above)
  // the bytes form where the table is unsigned 7-bit (2-4 bits: one 16-entry pshufb), or at every width with
  // AVX-VNNI (vpdpbusd sums unsigned bytes of any size exactly: q + 128 above 16 entries)
  const bool vnni = avx_vnni();
  const bool bytes = vnni || (cq.offset != nullptr && w.bits <= 4);
  thread_local std::vector<int16_t> x_buf;
  int16_t* x16 = bytes ? nullptr : aligned64(grown(x_buf, static_cast<size_t>(kMc * K + 32)));
  const int64_t blocks = (O + kNR - 1) / kNR;
  const std::vector<float> wscale = per_output_row(w, cq.scale, blocks * kNR);
  std::vector<int32_t> offset(bytes ? blocks * kNR : 0, 0);
  for (int64_t o = 0; o < (bytes ? O : 0); ++o) offset[o] = cq.table_offset(o / w.rows_per_group);
  std::vector<float> xscale(kMc);
  std::vector<int32_t> xsum(kMc);
  for (int64_t m0 = 0; m0 < M; m0 += kMc) {
    const int64_t Mc = std::min(kMc, M - m0);
    for (int64_t m = 0; m < Mc; ++m) {
      xscale[m] = xq.scale[m0 + m];
      xsum[m] = static_cast<int32_t>(xq.sum[m0 + m]);  // |sum| <= 127 K <= 2**23
    }
    if (!bytes) at::parallel_for(0, Mc, 1, [&](int64_t a, int64_t b) { widen_x(xq, m0, a, b, x16); });
    WS_DISPATCH_BITS(w.bits, BITS, [&] {
      if constexpr (BITS > 1) {
        at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
          if (bytes) {
            run_blocks<BITS, true>(w, cq, xq.q + m0 * K, K, Mc, xscale.data(), xsum.data(), wscale.data(),
                                   offset.data(), b0, b1, y + m0 * O, vnni);
            return;
          }
          run_blocks<BITS, false>(w, cq, x16, K, Mc, xscale.data(), xsum.data(), wscale.data(), offset.data(), b0,
                                  b1, y + m0 * O, false);
        });
      }
    });
  }
  return true;
#else
  (void)w, (void)xq, (void)cq, (void)M, (void)y;
  return false;
#endif
}

}  // namespace weightshare::cpu
