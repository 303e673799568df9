#pragma once
// Direct (indirect-GEMM) convolution on the CPU: the shared_conv2d fast path for dense (groups == 1), unit-stride
// convolutions of NCHW fp32 input, 1x1 and 3x3 alike.
#include <ATen/core/Tensor.h>

namespace weightshare::cpu {

// y = conv2d(x, w, bias, stride, padding, dilation, groups) for x fp32 NCHW contiguous ([N, C, H, W] or [C, H, W]),
// w fp32 [OC, C, KH, KW] contiguous, groups 1, stride 1, any padding and dilation, on a CPU with AVX2 or AVX-512.
// Returns an undefined tensor when the case is not one it handles or not one it is faster at (the caller then
// takes the general path); the environment variable WS_CPU_CONV=direct drops the "faster at" test, =dense makes
// it decline every case.
at::Tensor direct_conv2d_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             int64_t groups);

}  // namespace weightshare::cpu
