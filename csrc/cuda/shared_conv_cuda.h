#pragma once
// shared_conv2d's own CUDA kernels: the implicit GEMM on tensor cores (shared_conv_implicit.cu) and the depthwise
// kernel (shared_conv_depthwise.cu). Declared for csrc/common/shared_conv.cpp, which the C++ compiler builds: ATen
// types only. Each returns y where it takes the call, else an undefined tensor (the caller's decode + cuDNN path
// then runs). The inputs are checked by shared_conv2d before. Neither has run on a GPU yet, so neither takes a call
// unless asked: WS_CUDA_CONV=implicit, =depthwise, or =all for both (conv_kernel_asked).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string_view>

namespace weightshare::cuda {

// Whether a call may take our kernel `name` ("implicit" or "depthwise"): WS_CUDA_CONV (read per call) = that name
// or "all" asks for it, "none" (or another kernel's name) refuses it; unset, the default below decides. Both are
// off by default until a GPU run has measured them (bench_shared_conv.py --cuda times each against cuDNN): then
// this is the line to change (with the takes tests' assertions on unasked calls, tests/test_shared_conv_cuda.py).
constexpr bool kImplicitConvDefault = false, kDepthwiseConvDefault = false;
inline bool conv_kernel_asked(std::string_view name) {
  const char* sw = std::getenv("WS_CUDA_CONV");
  if (sw == nullptr) return name == "implicit" ? kImplicitConvDefault : kDepthwiseConvDefault;
  return name == sw || std::string_view(sw) == "all";
}

// Helpers of both .cu files. stride / padding / dilation as conv2d takes them (one value for both axes, or two,
// each in [lo, 2**20]) -> (h, w); false where conv2d's own checks must answer.
inline bool conv_pair(at::IntArrayRef v, int64_t lo, int32_t& h, int32_t& w) {
  if (v.size() != 1 && v.size() != 2) return false;
  const int64_t a = v[0], b = v.size() == 2 ? v[1] : v[0];
  if (a < lo || b < lo || a > (1 << 20) || b > (1 << 20)) return false;
  h = static_cast<int32_t>(a);
  w = static_cast<int32_t>(b);
  return true;
}
// The output extent of one axis (0 where the kernel's reach exceeds the padded input).
inline int64_t conv_out_extent(int64_t in, int32_t pad, int32_t dil, int64_t taps, int32_t stride) {
  const int64_t reach = int64_t(dil) * (taps - 1) + 1;
  return in + 2 * pad < reach ? 0 : (in + 2 * pad - reach) / stride + 1;
}
inline bool float_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// What both kernels read from conv2d's arguments for 4-d x [N, C, H, W] and weight_shape [O, C / groups, R, S].
struct ConvShape {
  int32_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t Ho, Wo;
};
// False (the caller declines) where conv2d's own checks must answer: bad stride / padding / dilation, no output, a
// bias of another dtype or device.
inline bool conv_shape(const at::Tensor& x, at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, ConvShape& s) {
  if (bias.has_value() && (!float_dtype(bias->scalar_type()) || bias->device() != x.device())) return false;
  if (!conv_pair(stride, 1, s.stride_h, s.stride_w) || !conv_pair(padding, 0, s.pad_h, s.pad_w) ||
      !conv_pair(dilation, 1, s.dil_h, s.dil_w)) {
    return false;
  }
  // the kernels' int32 positions (oh stride - pad + r dil) stay below 2**31
  if (x.size(2) + 2 * s.pad_h + s.stride_h > INT32_MAX || x.size(3) + 2 * s.pad_w + s.stride_w > INT32_MAX) {
    return false;
  }
  s.Ho = conv_out_extent(x.size(2), s.pad_h, s.dil_h, weight_shape[2], s.stride_h);
  s.Wo = conv_out_extent(x.size(3), s.pad_w, s.dil_w, weight_shape[3], s.stride_w);
  return s.Ho >= 1 && s.Wo >= 1;
}

// conv2d(x, W, bias) by the fused tensor-core GEMM. Takes: asked for, groups == 1, fp16/bf16 x [N, C, H, W] in
// channels-last memory, C % 8 == 0, x's data 16-byte aligned and fewer than 2**31 elements, 2, 3, 4 or 8 bits, one
// codebook per block of output channels (the layer's, or groups of a multiple of 256 channels at <= 4 bits, 128 at
// 8), a bias (if any) of a float dtype on x's device, an sm_80+ device. y is channels-last, as cuDNN's is for
// channels-last x.
at::Tensor implicit_conv2d(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook, int64_t bits,
                           at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// A depthwise conv2d(x, W, bias) (groups == input channels, one input channel per group; any channel multiplier)
// decoding each channel's taps in the kernel. Takes: asked for, float / fp16 / bf16 x [N, C, H, W], contiguous
// (NCHW) or channels-last, fewer than 2**31 elements in x and y, at most 256 taps, a bias (if any) of a float dtype
// on x's device. y has x's memory format, as cuDNN's.
at::Tensor depthwise_conv2d(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook, int64_t bits,
                            at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

}  // namespace weightshare::cuda
