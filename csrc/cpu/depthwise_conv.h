#pragma once
// Direct depthwise convolution on the CPU (the shared_conv2d fast path for groups == in_channels).
#include <ATen/core/Tensor.h>

namespace weightshare::cpu {

// y = conv2d(x, w, bias, stride, padding, dilation, groups) for a depthwise layout (w: [C * mult, 1, kh, kw],
// groups = C), x fp32 NCHW contiguous, or channels-last 4-D with multiplier 1 (then y is channels-last too, as
// F.conv2d's is). Returns an undefined tensor when the case is not one it handles
// (the caller then takes the general path), or when WS_CPU_CONV=dense (cpu_features.h).
at::Tensor depthwise_conv2d_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups);

}  // namespace weightshare::cpu
