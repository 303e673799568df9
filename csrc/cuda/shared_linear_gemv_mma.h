#pragma once
// The tensor-core GEMV of shared_linear for 16-bit activations and few rows of x (shared_linear_gemv_mma.cu).
#include <ATen/core/Tensor.h>

#include "weightshare/cuda_linear.h"

namespace weightshare::cuda {

// Whether the mma GEMV takes a forward call: fp16/bf16 x, at most kGemvMmaMaxM rows of x, a GPU with mma.sync for
// 16-bit inputs (sm_80+), and the switch WS_CUDA_GEMV=mma (read per call; off by default until the kernel has
// been measured and tested on a GPU, see README).
constexpr int64_t kGemvMmaMaxM = 64;
bool gemv_mma_takes(at::ScalarType x_dtype, int64_t M, int device);

// y = x W^T through the packed weight `w` (prepared with Tables::None: the kernel stages its 16-bit tables straight
// from w.codebook), x [M, x_ld] of T, finished by `out` (bias, dtype, split-K workspace).
void launch_gemv_mma(const PackedRows& w, const at::Tensor& x, int64_t x_ld, int bits, Epilogue out, int sms);

}  // namespace weightshare::cuda
