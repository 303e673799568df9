#pragma once
// The fused tensor-core GEMM of shared_linear for 16-bit activations and many rows of x
// (shared_linear_gemm_mma.cu): packed indices decoded into mma.sync A fragments, x staged by cp.async, no decoded
// weight in memory.
#include <ATen/core/Tensor.h>

#include "weightshare/cuda_linear.h"

namespace weightshare::cuda {

// Whether the fused GEMM takes a forward call: asked for (WS_CUDA_LINEAR=fused; by default none yet, as it has not
// been run on a GPU: kFusedDefaultFirstM, fused_ask in fused_gemm_staging.h), fp16/bf16 x whose data is 16-byte
// aligned, in_features a multiple of 128 (whole 128-index units: rows of every width then start 16-byte aligned),
// the packed rows 16-byte aligned, an sm_80+ device with room for its shared memory. One codebook per block of output rows (the layer's, or groups
// of a multiple of 256 rows at <= 4 bits, 128 at 5-8) takes replicated tables; other groupings (a codebook per
// row) per-row tables, at 2, 3, 4 and 8 bits.
bool gemm_mma_takes(const at::Tensor& x, const at::Tensor& packed, int64_t bits, int64_t M, int64_t out_features,
                    int64_t in_features, int64_t rows_per_group);

// y = x W^T through the packed weight `w` (prepared with Tables::None: the kernel stages its tables straight from
// w.codebook), x [M, in_features] contiguous of T, finished by `out` (bias, dtype, split-K workspace).
void launch_gemm_mma(const PackedRows& w, const at::Tensor& x, int bits, Epilogue out, int sms);

}  // namespace weightshare::cuda
