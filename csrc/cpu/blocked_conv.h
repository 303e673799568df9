#pragma once
// Convolution of small images as the blocked shared-weight GEMM (shared_linear_blocked.cpp) over im2col rows.
#include <ATen/core/Tensor.h>

#include <optional>

#include "weightshare/checks.h"

namespace weightshare::cpu {

// y = conv2d(x, W, bias, stride, padding, dilation) for the packed W [OC, C, KH, KW] (groups 1), decoded panel by
// panel inside the GEMM and never whole; x fp32 NCHW contiguous ([N, C, H, W] or [C, H, W]). Returns an
// undefined tensor where it does not apply or is not the faster path (WS_CPU_CONV=blocked takes it wherever it
// applies, =dense never); the caller then takes the others.
at::Tensor blocked_conv2d_f32(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
                              const PackedWeight& pw, int64_t bits, at::IntArrayRef weight_shape,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

}  // namespace weightshare::cpu
