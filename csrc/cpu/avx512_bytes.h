#pragma once
// AVX-512 (VBMI) byte-granular index decoding shared by the int8 kernels, the 6-8-bit float GEMV and the 7-8-bit
// panel decode: 64 indices unpacked to bytes (Unpack64) and an fp32 codebook looked up as four byte planes
// (BytePlanes), in the unpacks' lane order or, by a 4x4 transpose of 128-bit blocks, in natural order.
#include <algorithm>
#include <cstdint>

#include "weightshare/cpu_decode.h"

namespace weightshare::cpu {

#ifdef WS_X86
// Indices [64 st, 64 st + 64) of a row in order, one per byte, for bit widths that are not byte aligned (3, 5, 6,
// 7): eight indices fill BITS whole bytes, so one byte permute gives each output qword the BITS bytes of its eight
// indices, and vpmultishiftqb pulls index b of a qword from bit b x BITS. The bits above BITS in each byte are the
// next index's (junk): the lookups ignore them (their tables repeat with period 2**BITS). (The former form, four
// 16-index unpacks of a permute, variable shift, mask and narrowing each, made 3- and 5-bit int8 slower than float.)
template <int BITS>
struct Unpack64 {
  __m512i gather, shifts;
  WS_AVX512 Unpack64() {
    alignas(64) uint8_t g[64], sh[64];
    for (int q = 0; q < 8; ++q)
      for (int b = 0; b < 8; ++b) {
        g[8 * q + b] = static_cast<uint8_t>(q * BITS + b);  // <= 7 x 7 + 7 = 56
        sh[8 * q + b] = static_cast<uint8_t>(b * BITS);
      }
    gather = _mm512_load_si512(g);
    shifts = _mm512_load_si512(sh);
  }
  // Step st of a row of row_bytes bytes (8 x BITS bytes per step; bytes past the row end read as zero).
  WS_AVX512 inline __m512i operator()(const uint8_t* row, int64_t row_bytes, int64_t st) const {
    const int64_t off = st * 8 * BITS;
    const int64_t n = row_bytes - off;
    const __m512i bytes = n >= 64 ? _mm512_loadu_si512(row + off)
                                  : _mm512_maskz_loadu_epi8((__mmask64(1) << std::max<int64_t>(n, 0)) - 1, row + off);
    return _mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(gather, bytes));
  }
};

// A 6- to 8-bit fp32 codebook as four byte planes: each byte of the entries is its own 128- or 256-byte table
// (two or four registers). Per 64 indices (one load at 8 bits, an Unpack64 below) two vpermi2b and a blend by index
// bit 7 give one plane at 8 bits, one vpermi2b at 6-7 (index bits 0-6; the 6-bit table repeated), and two rounds of
// unpacks give 64 floats. Exact: the floats are the table's bits. (The compare chain it replaced took one permute
// and seven compare/permute/blend rounds per 16 weights at 8 bits.)
template <int BITS>
struct BytePlanes {
  static_assert(BITS >= 6 && BITS <= 8, "128- or 256-entry tables");
  static constexpr int kRegs = BITS == 8 ? 4 : 2;  // 64-entry registers per plane: 256 or 128 entries
  __m512i p[4][4];  // p[b][q]: byte b of entries 64q .. 64q + 63 (entry e = table[e mod 2**BITS])
  // Plane b of register q takes byte b of each of the 64 entries (four 16-float loads): two byte permutes, each
  // over 32 entries (128 bytes), and a blend of their halves; 12 uops per register where a convert and a shift per
  // entry group, and inserts, took 48 (a codebook per output row builds the planes for every row).
  WS_AVX512 explicit BytePlanes(const DecodeTable& t) {
    alignas(64) static constexpr uint8_t kEvery4th[64] = {
        0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80, 84, 88, 92, 96, 100, 104,
        108, 112, 116, 120, 124, 0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80, 84,
        88, 92, 96, 100, 104, 108, 112, 116, 120, 124};  // byte 0 of entry k % 32 of a pair of registers
    const __m512i every4th = _mm512_load_si512(kEvery4th);
    for (int q = 0; q < kRegs; ++q) {
      const float* e = t.v + ((64 * q) & ((1 << BITS) - 1));  // entry e = table[e mod 2**BITS]
      const __m512i z0 = _mm512_load_si512(e), z1 = _mm512_load_si512(e + 16);
      const __m512i z2 = _mm512_load_si512(e + 32), z3 = _mm512_load_si512(e + 48);
      for (int b = 0; b < 4; ++b) {
        const __m512i idx = _mm512_add_epi8(every4th, _mm512_set1_epi8(static_cast<char>(b)));
        p[b][q] = _mm512_mask_blend_epi8(0xffffffff00000000ull, _mm512_permutex2var_epi8(z0, idx, z1),
                                         _mm512_permutex2var_epi8(z2, idx, z3));
      }
    }
  }
  // 64 weights from 64 byte indices, in the unpacks' order: w[j] lane l = weight 16 (l / 4) + 4 j + l % 4.
  WS_AVX512 inline void lookup(__m512i idx, __m512 (&w)[4]) const {
    __m512i b[4];
    if constexpr (BITS == 8) {
      const __mmask64 upper = _mm512_movepi8_mask(idx);  // index bit 7: entries 128-255
      for (int k = 0; k < 4; ++k)
        b[k] = _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(p[k][0], idx, p[k][1]),
                                      _mm512_permutex2var_epi8(p[k][2], idx, p[k][3]));
    } else {  // vpermi2b reads index bits 0-6
      for (int k = 0; k < 4; ++k) b[k] = _mm512_permutex2var_epi8(p[k][0], idx, p[k][1]);
    }
    const __m512i lo01 = _mm512_unpacklo_epi8(b[0], b[1]), hi01 = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(b[2], b[3]), hi23 = _mm512_unpackhi_epi8(b[2], b[3]);
    w[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23));
    w[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23));
    w[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23));
    w[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23));
  }
  // The same 64 weights in natural order: v[L] = weights 16 L .. 16 L + 15. In the unpacks' order 128-bit block L
  // of w[j] holds weights 16 L + 4 j .. + 3, so natural order is a 4x4 transpose of 128-bit blocks (8 shuffles).
  WS_AVX512 inline void lookup_natural(__m512i idx, __m512 (&v)[4]) const {
    __m512 w[4];
    lookup(idx, w);
    const __m512 a = _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(1, 0, 1, 0));  // w0.0 w0.1 w1.0 w1.1
    const __m512 b = _mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(1, 0, 1, 0));  // w2.0 w2.1 w3.0 w3.1
    const __m512 c = _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 2, 3, 2));  // w0.2 w0.3 w1.2 w1.3
    const __m512 d = _mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(3, 2, 3, 2));  // w2.2 w2.3 w3.2 w3.3
    v[0] = _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0));  // w0.0 w1.0 w2.0 w3.0
    v[1] = _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1));  // w0.1 w1.1 w2.1 w3.1
    v[2] = _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(2, 0, 2, 0));
    v[3] = _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 1, 3, 1));
  }
};

// Blocks [b0, b0 + n) of 64 columns of a 6- to 8-bit row decoded in natural order into out (n x 64 floats; the
// blocks lie inside the row's in_features).
template <int BITS>
WS_AVX512 inline void decode_blocks_planes(const Unpack64<BITS>& unpack, const BytePlanes<BITS>& planes,
                                           const uint8_t* row, int64_t row_bytes, int64_t b0, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const __m512i idx = BITS == 8 ? _mm512_loadu_si512(row + 64 * (b0 + i)) : unpack(row, row_bytes, b0 + i);
    __m512 v[4];
    planes.lookup_natural(idx, v);
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + 64 * i + 16 * j, v[j]);
  }
}
#endif

}  // namespace weightshare::cpu
