#pragma once
// The wgmma form of the fused GEMM of shared_linear (shared_linear_gemm_wgmma.cu): sm_90a, 16-bit x, 1-8 bits.
#include <ATen/core/Tensor.h>

#include "weightshare/cuda_linear.h"

namespace weightshare::cuda {

// Whether it takes a forward call: asked for (WS_CUDA_LINEAR=wgmma; by default none yet: kFusedDefaultFirstM), a build
// with sm_90a code (WS_SM90A: TORCH_CUDA_ARCH_LIST="9.0a"), a compute capability 9.0 device, and the fused
// kernels' shape rules (fused_shape_ok) with one codebook per block (256 output rows at <= 4 bits, 128 at 5-8).
bool gemm_wgmma_takes(const at::Tensor& x, const at::Tensor& packed, int64_t bits, int64_t M, int64_t out_features,
                      int64_t in_features, int64_t rows_per_group);

// y = x W^T as launch_gemm_mma does it (w prepared with Tables::None, x [M, in_features] contiguous of T).
void launch_gemm_wgmma(const PackedRows& w, const at::Tensor& x, int bits, Epilogue out, int sms);

}  // namespace weightshare::cuda
