#pragma once
// Internal interface between the CPU shared-linear files (forward float, forward int8, backward).
#include <ATen/core/Tensor.h>

#include <algorithm>

#include "avx512_bytes.h"
#include "weightshare/checks.h"
#include "weightshare/cpu_decode.h"

namespace weightshare::cpu {

// A packed weight with its codebook as fp32 [G, K], ready for the kernels.
struct PackedLinear {
  const uint8_t* packed;
  const float* codebook;  // [groups, K] fp32 contiguous
  int64_t out_features, in_features, row_bytes, groups, K, rows_per_group;
  int bits;
};

// The codebook group of rows visited one after another from some first row, tracked rather than divided for: a
// 64-bit idiv per row (10-20 cycles) showed in the profiles of short rows. advance(r) for r = r0, r0 + 1, ...
// returns true where row r starts a new group (the first row included); `group` is then row r's.
struct RowGroups {
  int64_t rows_per_group, group = -1, end;  // `group`'s rows end before `end`
  RowGroups(const PackedLinear& w, int64_t r0) : rows_per_group(w.rows_per_group), end(r0) {}
  bool advance(int64_t r) {
    if (r < end) return false;
    group = r / rows_per_group;
    end = (group + 1) * rows_per_group;
    return true;
  }
};

// Per-thread decode state: the table of the group last used (`group`, whose rows are [first, end)). A row inside
// that range skips the division: a 64-bit idiv per row (10-20 cycles) showed in the profiles of short rows.
struct GroupTable {
  DecodeTable table;
  int64_t group = -1, first = 0, end = 0;
  const DecodeTable& get(const PackedLinear& w, int64_t row) {
    if (row < first || row >= end) {
      group = row / w.rows_per_group;
      first = group * w.rows_per_group;
      end = first + w.rows_per_group;
      table.fill(w.codebook + group * w.K, static_cast<int>(w.K), w.bits);
    }
    return table;
  }
};

PackedLinear make_packed_linear(const at::Tensor& packed, const at::Tensor& codebook_f32, const PackedWeight& pw,
                                int64_t bits);

// y[M, out] (fp32) = x[M, in] (fp32) @ W^T (+ bias, fp32 [out], if not null), exact fp32 accumulation.
void linear_float(const PackedLinear& w, const float* x, int64_t M, const float* bias, float* y);

// y[M, out] (fp32) by the int8 definition in reference.shared_linear, bias (fp32 [out], or null) included.
void linear_int8(const PackedLinear& w, const at::Tensor& x_f32, const float* bias, float* y);

// y[M, out] (fp32) = x[M, in] @ W^T by the blocked kernel (shared_linear_blocked.cpp), for batches; false (and
// nothing written) on a CPU without AVX2.
bool linear_float_blocked(const PackedLinear& w, const float* x, int64_t M, const float* bias, float* y);

// The blocked kernel's core, for callers that lay out their own operands (the conv's im2col, blocked_conv.cpp):
// y^T [out][Mp] = W [out][in] x x^T [in][Mp], x^T's columns past the real ones zero, Mp a multiple of
// blocked_lanes() and at most kBlockedMaxLanes (the x^T chunk a panel meets, 256 k x 256 floats, stays in L2).
// False (nothing written) on a CPU without AVX2.
constexpr int64_t kBlockedMaxLanes = 256;
int64_t blocked_lanes();  // floats per vector of the blocked kernel: 16 (AVX-512), 8 (AVX2), 0 (none)
bool blocked_product(const PackedLinear& w, const float* xt, int64_t Mp, float* yt);

// y[M, out] = x[M, in] @ W^T for M <= 4 on an AVX2 CPU (shared_linear_gemv_avx2.cpp); false (nothing written)
// without AVX2 or for other M.
bool gemv_avx2(const PackedLinear& w, const float* x, int64_t M, float* y);

// y[M, out] = x[M, in] @ W^T for M <= 4 and 6- to 8-bit indices on an AVX-512 CPU (shared_linear_gemv_bytes.cpp:
// the codebook as four byte planes); false (nothing written) otherwise.
bool gemv_avx512_bytes(const PackedLinear& w, const float* x, int64_t M, float* y);

#ifdef WS_X86
// Rows [r0, r0 + rows) of a 6- to 8-bit W, blocks [b0, b0 + n) of 64 columns, decoded by the byte planes
// (avx512_bytes.h) into out[m * ld + ...]. The planes are rebuilt when the codebook group changes.
template <int BITS>
WS_AVX512 void decode_rows_planes_avx512(const PackedLinear& w, int64_t r0, int64_t rows, int64_t b0, int64_t n,
                                         GroupTable& gt, float* out, int64_t ld) {
  const Unpack64<BITS> unpack;
  BytePlanes<BITS> planes(gt.get(w, r0));
  int64_t group = gt.group;
  for (int64_t m = 0; m < rows; ++m) {
    const int64_t r = r0 + m;
    gt.get(w, r);
    if (gt.group != group) {
      group = gt.group;
      planes = BytePlanes<BITS>(gt.table);
    }
    decode_blocks_planes<BITS>(unpack, planes, w.packed + r * w.row_bytes, w.row_bytes, b0, n, out + m * ld);
  }
}
#endif

// Whether the byte planes (decode_rows_planes_avx512) pay for themselves on `rows` rows of `blocks` 64-column
// blocks each: building them (once per codebook group met) costs a few blocks' decode (taken: at least four blocks
// per build), and at 6 bits the compare chain of decode_blocks_avx512 is nearly as short as the planes (one round
// of compares). Measured on forward + grad_x at batch 16-64 (300x784, 1024x1024): 8 bits 484 -> 427 us and 760 ->
// 524 us with one codebook, but per-row codebooks on 64-column grad_x tiles 6 bits 431 -> 463 us, 577 -> 661 us.
template <int BITS>
inline bool planes_pay(const PackedLinear& w, int64_t rows, int64_t blocks) {
  if (BITS < 7 || rows <= 0 || blocks <= 0) return false;
  const int64_t builds = std::min(rows, (rows - 1) / w.rows_per_group + 2);  // groups met (at most one per row)
  return rows * blocks >= 4 * builds;
}

// Rows [r0, r0 + rows) of W, columns [k0, k0 + kc) (k0 a multiple of 16), decoded fp32 into out[m * ld + k] for
// m < padded; rows past `rows` are zero. The blocked forward kernel's and the grad_x kernel's panels.
// On AVX-512, 7- and 8-bit rows go 64 columns at a time through the byte planes where k0 allows (a multiple of 64)
// and planes_pay: the 16-wide compare chain of decode_blocks_avx512 takes one permute and up to seven
// compare/permute/blend rounds per 16 weights.
template <int BITS>
void decode_block(const PackedLinear& w, int64_t r0, int rows, int padded, int64_t k0, int64_t kc, Simd simd,
                  GroupTable& gt, float* out, int64_t ld) {
  int64_t planes_cols = 0;  // columns [k0, k0 + planes_cols) of every row done by the byte planes
#ifdef WS_X86
  if constexpr (BITS >= 7) {
    if (simd == Simd::Avx512 && k0 % 64 == 0 && planes_pay<BITS>(w, rows, kc / 64)) {
      planes_cols = kc / 64 * 64;
      decode_rows_planes_avx512<BITS>(w, r0, rows, k0 / 64, kc / 64, gt, out, ld);
    }
  }
#endif
  for (int m = 0; m < padded; ++m) {
    float* dst = out + m * ld;
    if (m >= rows) {
      std::fill(dst, dst + kc, 0.0f);
      continue;
    }
    if (planes_cols == kc) continue;
    const int64_t r = r0 + m;
    const uint8_t* row = w.packed + r * w.row_bytes;
    const DecodeTable& dt = gt.get(w, r);
    const int64_t k1 = k0 + planes_cols, kc1 = kc - planes_cols;
    int64_t done = 0;
#ifdef WS_X86
    if (simd == Simd::Avx512) done = decode_blocks_avx512<BITS>(row, dt, k1, kc1, dst + planes_cols);
    if (simd == Simd::Avx2) done = decode_row_blocks_avx2<BITS>(row, w.row_bytes, dt, k1, kc1, dst + planes_cols);
#endif
    decode_scalar<BITS>(row, k1 + done, kc1 - done, dt.v, dst + planes_cols + done);
  }
}

// Decodes rows [r0, r1) of W into dst [r1 - r0, in] fp32 (panel of the batched and backward paths).
void decode_panel(const PackedLinear& w, int64_t r0, int64_t r1, float* dst);

// Rows of W decoded per panel: about 8 MiB of fp32, a multiple of 16 rows (measured at batch 64/256: 2 MiB
// panels ran at 0.71-0.84x of dense F.linear, 8 MiB panels at 0.85-0.95x: MKL wants wide panels).
int64_t panel_rows(const PackedLinear& w);

// grad_x [M, in] = g [M, out] @ W (shared_linear_grad_x.cpp; every element written); false (nothing written) on
// the scalar path.
bool grad_x_fused(const PackedLinear& w, const float* g, int64_t M, float* gx);

// dL/dcodebook (codebook_grad.cpp), summed in double into gc [groups, K] (zeroed by the caller). Fused: from g
// [M, out] and x [M, in] (fp32 contiguous), dL/dW computed tile by tile and never stored whole; false (nothing
// added) on the scalar path. add_codebook_grad: from given dL/dW rows [r0, r1) (gw, [r1 - r0, in]).
bool codebook_grad_fused(const PackedLinear& w, const float* g, const float* x, int64_t M, double* gc);
void add_codebook_grad(const PackedLinear& w, const float* gw, int64_t r0, int64_t r1, double* gc);

}  // namespace weightshare::cpu
