#pragma once
// Internal interface of the int8 shared_linear path (definition: reference.shared_linear, activation="int8"):
// the quantized operands and the AVX-512 byte lookup shared by the row kernel (shared_linear_int8.cpp, small
// batches) and the blocked kernel (shared_linear_int8_blocked.cpp, larger ones).
//
// x is quantized per row to symmetric int8, the codebook per group to int8 values (a 7-bit affine grid for K <= 16
// entries, symmetric int8 above: reference.quantize_int8_codebook), and the dot products are exact integer sums; a
// per-group zero point's term, scale_x * zero * sum(x_q), is added after the kernels (add_int8_zero_terms): it
// cancels the codebook's rounding residuals, which one-signed x would add up coherently. vpdpbusd multiplies
// unsigned by signed bytes, so the weight bytes carry +128 and the excess 128 * sum(x_q) is subtracted per x row at
// the end (the AVX2 row kernel's vpmaddubsw, whose pairs saturate in int16, takes the affine grid's q + offset in
// [0, 127] instead). For bits 1, 2, 4, 8 a 64-byte load holds 8/bits indices per byte; extracting "the s-th index of
// every byte" needs one shift and one AND, and x is stored permuted to match that order (a dot product does not care
// about order). Other bit widths decode 64 indices at a time in order.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "avx512_bytes.h"
#include "shared_linear.h"
#include "weightshare/cpu_decode.h"

namespace weightshare::cpu {

constexpr bool byte_aligned(int bits) { return bits == 1 || bits == 2 || bits == 4 || bits == 8; }

#ifdef WS_X86
// acc += the 4-byte dot products of u (unsigned bytes) and s (signed bytes) per int32 lane, in place. GCC 12
// compiles the intrinsic's value form (acc = _mm512_dpbusd_epi32(acc, u, s)) in many-accumulator tiles with a
// register copy around most vpdpbusd and accumulators spilled to the stack (the blocked kernel's profile at 128 x
// 768 -> 3072 had more vmovdqa than vpdpbusd); the asm ties the accumulator to its register. Intel VM, same-run
// A/B, blocked kernel, 128 rows of x: 768 -> 2304 0.82 -> 0.60 ms, 768 -> 768 0.31 -> 0.235 ms, 768 -> 3072
// 1.10 -> 0.82 ms. Not in the row kernels (shared_linear_int8.cpp): there it made 2-8 rows 15-30 % slower (the
// opaque asm constrains their scheduling more than the copies cost).
WS_AVX512 inline void dpbusd_into(__m512i& acc, __m512i u, __m512i s) {
#if defined(__GNUC__) && !defined(__clang__)
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
#else
  acc = _mm512_dpbusd_epi32(acc, u, s);
#endif
}
#endif

// Elements covered by one 64-byte step of the byte-aligned kernels (64 elements otherwise).
constexpr int64_t step_elems(int bits) { return byte_aligned(bits) ? 512 / bits : 64; }

// The quantized operands live in the calling thread's reused buffers (grown, never shrunk; decode_scratch.h): a
// codebook per output row of 8 bits is 2 MiB of tables, and fresh vectors of that size were mapped, zero-filled and
// unmapped on every call (4096x64 layer, batch 1: 1.2 ms a call, most of it page faults). Valid until this thread's
// next quantize_x / quantize_codebook; the kernels' worker threads only read them while the caller waits.
struct QuantizedX {
  int8_t* q = nullptr;      // [M, stride], zero padded; permuted for byte-aligned bits; 64-byte aligned rows
  float* scale = nullptr;   // [M]
  int64_t* sum = nullptr;   // [M] sum of q
  int64_t stride = 0;       // a multiple of step_elems(bits) (so of 64: every row starts 64-byte aligned)
};

QuantizedX quantize_x(const at::Tensor& x, int bits);

// Per group: int8 codebook (entries >= K are 0), the same + 128 as unsigned bytes (vpdpbusd's unsigned operand),
// and its scale, as the reference computes them. Tables are as long as their readers need (a layer with a codebook
// per output row has thousands of groups, quantized on every call): q max(16, 2**bits) entries (AVX2 reads 16), the
// biased table 64 (a byte permute's reach), 128 or 256 entries, built only for the AVX-512 kernels that read it.
struct QuantizedCodebook {
  int8_t* q = nullptr;        // [G, q_stride]
  uint8_t* biased = nullptr;  // [G, biased_stride], entry e = q[e mod 2**bits] + 128
  float* scale = nullptr;     // [G]
  float* zero = nullptr;      // [G] zero point: the rounding residuals' weighted mean (reference.int8_zero_points)
  // [G] for K <= kInt8AffineMaxK (else null): the affine grid's offset o in [0, 127], with q + o in [0, 127] for
  // every entry (o for those past K): the unsigned 7-bit table the AVX2 row kernel multiplies in one vpmaddubsw
  int32_t* offset = nullptr;
  int64_t q_stride = 0, biased_stride = 0;
  const int8_t* table(int64_t group) const { return q + group * q_stride; }
  // what makes the group's entries unsigned: the affine grid's offset, else 128 (q + 128 in [1, 255])
  int32_t table_offset(int64_t group) const { return offset != nullptr ? offset[group] : 128; }
  const uint8_t* biased_table(int64_t group) const { return biased + group * biased_stride; }
};

// Served from the calling thread's cache of recent layers where the codebook and the sampled packed bytes are
// unchanged (shared_linear_int8_quantize.cpp); valid, like quantize_x's buffers, until this thread's next call.
QuantizedCodebook quantize_codebook(const PackedLinear& w);

// y[m, r] = (y[m, r] + (scale_x[m] * zero[group]) * float(sum of x_q[m])) + bias[r]: the zero points' term, then
// the bias (if not null), added to the kernels' float(acc) * (scale_x * scale_w) as the reference adds them.
void add_int8_zero_terms(const PackedLinear& w, const QuantizedX& xq, const QuantizedCodebook& cq, int64_t M,
                         const float* bias, float* y);

// Per output row, its group's value of `per_group` (cq.scale, cq.zero), zero past the last row up to `padded` rows
// (the blocked kernels scale whole blocks of rows and store the valid ones).
inline std::vector<float> per_output_row(const PackedLinear& w, const float* per_group, int64_t padded) {
  std::vector<float> v(static_cast<size_t>(padded), 0.0f);
  for (int64_t o = 0; o < w.out_features; ++o) v[o] = per_group[o / w.rows_per_group];
  return v;
}

// The int8 path's output, exactly as the reference computes it: float(exact integer sum) * (scale_x * scale_w).
inline float int8_output(int64_t acc, const QuantizedX& xq, const QuantizedCodebook& cq, int64_t m, int64_t group) {
  return static_cast<float>(acc) * (xq.scale[m] * cq.scale[group]);
}

// y[M, out] by the whole int8 definition (the zero points' term and the bias, if not null, included: in the
// kernel's epilogue, in add_int8_zero_terms' order) by the blocked VNNI kernel; false (nothing written) where it
// does not apply (no AVX-512 VNNI, or K so long an int32 accumulator could overflow).
bool linear_int8_blocked(const PackedLinear& w, const QuantizedX& xq, const QuantizedCodebook& cq, int64_t M,
                         const float* bias, float* y);

// The same by the AVX2 blocked kernel (int16 products, shared_linear_int8_blocked_avx2.cpp); false where it does not
// apply (not the AVX2 path, 1-bit indices, or K above 65536).
bool linear_int8_blocked_avx2(const PackedLinear& w, const QuantizedX& xq, const QuantizedCodebook& cq, int64_t M,
                              float* y);

#ifdef WS_X86
// 64 weight bytes (+128) from 64 indices in [0, 2**BITS), the table in registers.
template <int BITS>
struct ByteLookup {
  static constexpr int kRegs = BITS <= 6 ? 1 : BITS == 7 ? 2 : 4;
  __m512i t[4];
  ByteLookup() = default;
  WS_AVX512 explicit ByteLookup(const uint8_t* biased_table) {
    for (int r = 0; r < kRegs; ++r) t[r] = _mm512_loadu_si512(biased_table + 64 * r);
  }
  WS_AVX512 inline __m512i operator()(__m512i idx) const {
    if constexpr (BITS <= 6) {
      return _mm512_permutexvar_epi8(idx, t[0]);
    } else if constexpr (BITS == 7) {
      return _mm512_permutex2var_epi8(t[0], idx, t[1]);
    } else {
      const __m512i lo = _mm512_permutex2var_epi8(t[0], idx, t[1]);
      const __m512i hi = _mm512_permutex2var_epi8(t[2], idx, t[3]);
      return _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hi);  // index bit 7 picks the upper half
    }
  }
};

// The 64 packed bytes of step `st` of a row (zero past the row end), and "the s-th index of every byte".
struct ByteSteps {
  int64_t row_bytes;
  WS_AVX512 inline __m512i load(const uint8_t* row, int64_t st) const {
    const int64_t off = st * 64;
    if (off + 64 <= row_bytes) return _mm512_loadu_si512(row + off);  // a masked byte load is slower
    const int64_t n = std::min<int64_t>(64, row_bytes - off);
    const __mmask64 k = n >= 64 ? ~__mmask64(0) : ((__mmask64(1) << n) - 1);
    return _mm512_maskz_loadu_epi8(k, row + off);
  }
  // The index sits in the low BITS of each byte; the bits above it are junk, which ByteLookup ignores: its byte
  // permute reads 6 index bits, and the biased table repeats with period 2**BITS (saves an AND per 64 weights).
  template <int BITS>
  WS_AVX512 static inline __m512i extract(__m512i bytes, int s) {
    static_assert(BITS == 1 || BITS == 2 || BITS == 4 || BITS == 8, "byte-aligned widths only");
    if constexpr (BITS == 8) return bytes;
    // a 16-bit shift drags bits of the upper byte into the lower one, but only above its low BITS
    return s == 0 ? bytes : _mm512_srli_epi16(bytes, s * BITS);
  }
};

#endif

}  // namespace weightshare::cpu
