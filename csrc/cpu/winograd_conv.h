#pragma once
// Winograd F(2x2, 3x3) convolution on the CPU: the shared_conv2d fast path for dense 3x3 unit-stride layers of NCHW
// fp32 input on AVX-512 CPUs.
#include <ATen/core/Tensor.h>

namespace weightshare::cpu {

// y = conv2d(x, w, bias, stride, padding, dilation, groups) for x fp32 NCHW contiguous ([N, C, H, W] or [C, H, W]),
// w fp32 [OC, C, 3, 3] contiguous, groups 1, stride 1, dilation 1, any padding. Returns an undefined tensor when
// the case is not one it handles, when the CPU lacks AVX-512, or when WS_CPU_CONV (cpu_features.h) says otherwise.
at::Tensor winograd3x3_conv2d_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups);

}  // namespace weightshare::cpu
