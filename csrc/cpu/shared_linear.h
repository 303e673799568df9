#pragma once
// Internal interface between the CPU shared-linear files (forward float, forward int8, backward).
#include <ATen/core/Tensor.h>

#include <algorithm>

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

// Per-thread decode state: the table of the group last used.
struct GroupTable {
  DecodeTable table;
  int64_t group = -1;
  const DecodeTable& get(const PackedLinear& w, int64_t row) {
    const int64_t g = row / w.rows_per_group;
    if (g != group) {
      table.fill(w.codebook + g * w.K, static_cast<int>(w.K), w.bits);
      group = g;
    }
    return table;
  }
};

PackedLinear make_packed_linear(const at::Tensor& packed, const at::Tensor& codebook_f32, const PackedWeight& pw,
                                int64_t bits);

// y[M, out] (fp32) = x[M, in] (fp32) @ W^T, exact fp32 accumulation.
void linear_float(const PackedLinear& w, const float* x, int64_t M, float* y);

// y[M, out] (fp32) by the int8 definition in reference.shared_linear (before bias).
void linear_int8(const PackedLinear& w, const at::Tensor& x_f32, float* y);

// y[M, out] (fp32) = x[M, in] @ W^T by the blocked kernel (shared_linear_blocked.cpp), for batches; false (and
// nothing written) on a CPU without AVX2.
bool linear_float_blocked(const PackedLinear& w, const float* x, int64_t M, float* y);

// y[M, out] = x[M, in] @ W^T for M <= 4 on an AVX2 CPU (shared_linear_gemv_avx2.cpp); false (nothing written)
// without AVX2 or for other M.
bool gemv_avx2(const PackedLinear& w, const float* x, int64_t M, float* y);

// y[M, out] = x[M, in] @ W^T for M <= 4 and 6- to 8-bit indices on an AVX-512 CPU (shared_linear_gemv_bytes.cpp:
// the codebook as four byte planes); false (nothing written) otherwise.
bool gemv_avx512_bytes(const PackedLinear& w, const float* x, int64_t M, float* y);

// Rows [r0, r0 + rows) of W, columns [k0, k0 + kc) (k0 a multiple of 16), decoded fp32 into out[m * ld + k] for
// m < padded; rows past `rows` are zero. The blocked forward kernel's and the grad_x kernel's panels.
template <int BITS>
void decode_block(const PackedLinear& w, int64_t r0, int rows, int padded, int64_t k0, int64_t kc, Simd simd,
                  GroupTable& gt, float* out, int64_t ld) {
  for (int m = 0; m < padded; ++m) {
    float* dst = out + m * ld;
    if (m >= rows) {
      std::fill(dst, dst + kc, 0.0f);
      continue;
    }
    const int64_t r = r0 + m;
    const uint8_t* row = w.packed + r * w.row_bytes;
    const DecodeTable& dt = gt.get(w, r);
    int64_t done = 0;
#ifdef WS_X86
    if (simd == Simd::Avx512) done = decode_blocks_avx512<BITS>(row, dt, k0, kc, dst);
    if (simd == Simd::Avx2) done = decode_blocks_avx2<BITS>(row, w.row_bytes, dt, k0, kc, dst);
#endif
    decode_scalar<BITS>(row, k0 + done, kc - done, dt.v, dst + done);
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
