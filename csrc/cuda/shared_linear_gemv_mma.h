#pragma once
// The tensor-core GEMV of shared_linear for 16-bit activations and few rows of x (shared_linear_gemv_mma.cu).
#include <ATen/core/Tensor.h>

#include "weightshare/cuda_linear.h"

namespace weightshare::cuda {

// Whether the mma GEMV takes a forward call: fp16/bf16 x, a GPU with mma.sync for 16-bit inputs (sm_80+), and by
// default 2 to 16 rows of x. The H200 run of 2026-11-30 (benchmarks/results/gpu/2026-11-30-H200, fp16, 8192x8192
// and 28672x8192 at 4 and 2 bits): at 1 row the SIMT GEMV took 0.61-0.83x its time, at 4 rows 1.6-2.2x; at 16 rows
// it ran in 0.38-0.64x the time of the decoded panels + cuBLAS, at 64 rows in 1.4-2.2x (its time grows with each
// 16-row tile; the panels' barely moves). WS_CUDA_GEMV (read per call): "mma" takes it for 1 to 64 rows, "off" never.
constexpr int64_t kGemvMmaFirstM = 2;
constexpr int64_t kGemvMmaLastM = 16;
constexpr int64_t kGemvMmaMaxM = 64;
bool gemv_mma_takes(at::ScalarType x_dtype, int64_t M, int device);

// y = x W^T through the packed weight `w` (prepared with Tables::None: the kernel stages its 16-bit tables straight
// from w.codebook), x [M, x_ld] of T, finished by `out` (bias, dtype, split-K workspace).
void launch_gemv_mma(const PackedRows& w, const at::Tensor& x, int64_t x_ld, int bits, Epilogue out, int sms);

}  // namespace weightshare::cuda
