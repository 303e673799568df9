#pragma once
// The implicit-GEMM convolution of shared_conv2d on CUDA (shared_conv_implicit.cu). Declared for
// csrc/common/shared_conv.cpp, which the C++ compiler builds: ATen types only.
#include <ATen/core/Tensor.h>

#include <optional>

namespace weightshare::cuda {

// conv2d(x, W, bias) by the fused tensor-core GEMM where it takes the call, else an undefined tensor (the caller's
// decode + cuDNN path then runs). It takes: asked for (WS_CUDA_CONV=implicit: not yet run on a GPU, so no default
// call takes it), groups == 1, fp16/bf16 x [N, C, H, W] in channels-last memory, C % 8 == 0, x's data 16-byte
// aligned and fewer than 2**31 elements, 2, 3, 4 or 8 bits, one codebook per block of output channels (the
// layer's, or groups of a multiple of 256 channels at <= 4 bits, 128 at 8), a bias (if any) of a float dtype on
// x's device, an sm_80+ device. The inputs are checked by shared_conv2d before. y is channels-last, as cuDNN's is
// for channels-last x.
at::Tensor implicit_conv2d(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook, int64_t bits,
                           at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

}  // namespace weightshare::cuda
