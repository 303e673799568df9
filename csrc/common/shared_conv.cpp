// shared_conv2d for every device, composed from the device's own dequantize kernel and ATen's convolution
// (oneDNN on CPU, cuDNN on CUDA), unless one of our direct kernels takes the call (CPU: below; CUDA:
// shared_conv_cuda.h, opt-in until measured).
//
// Why decode-then-convolve is the fast path for convolutions: a conv weight is small (64x64x3x3 fp32 = 147 KB) and
// each weight is reused at every output pixel, so decoding it is O(weights) next to the conv's O(weights x pixels)
// and the dense conv kernels stay in charge of the hard part (implicit GEMM, Winograd, depthwise). The weight is
// decoded in panels of output channels (aligned to the conv groups, about 2 MiB each), so a large layer is never
// materialised whole: each panel is convolved with its slice of input channels and written to its output slice.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <numeric>

#include "../cpu/blocked_conv.h"
#include "../cpu/decode_scratch.h"
#include "../cpu/depthwise_conv.h"
#include "../cpu/direct_conv.h"
#include "../cpu/winograd_conv.h"
#include "weightshare/checks.h"
#ifdef WS_WITH_CUDA
#include "../cuda/shared_conv_cuda.h"
#endif

namespace weightshare {
namespace {

// weightshare::dequantize through the dispatcher: the device's own kernel (CPU or CUDA).
at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& codebook, int64_t bits, at::IntArrayRef shape) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("weightshare::dequantize", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, at::IntArrayRef)>();
  return op.call(packed, codebook, bits, shape);
}

at::Tensor shared_conv2d(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook, int64_t bits,
                         at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  WS_CHECK_VALUE(weight_shape.size() == 4, "weightshare: weight_shape must be [out, in/groups, kh, kw], got ",
                    shape_str(weight_shape));
  WS_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   "weightshare: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  WS_CHECK_VALUE(x.dim() == 4 || x.dim() == 3, "weightshare: x must be [N, C, H, W] or [C, H, W], got ",
                    shape_str(x.sizes()));
  WS_CHECK(packed.device() == x.device(), "weightshare: packed is on ", packed.device(), " but x is on ",
              x.device(), "; all inputs must be on the same device");
  const int64_t out = weight_shape[0], cin_g = weight_shape[1];
  WS_CHECK_VALUE(groups >= 1 && out % groups == 0, "weightshare: groups=", groups,
                    " must divide the output channels ", out);
  WS_CHECK_VALUE(x.size(-3) == cin_g * groups, "weightshare: x has ", x.size(-3), " channels but weight_shape ",
                    shape_str(weight_shape), " with groups=", groups, " expects ", cin_g * groups);
  const PackedWeight pw = check_dequantize(packed, codebook, bits, weight_shape);
  if (bias.has_value()) {
    WS_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, "weightshare: bias must be [", out, "], got ",
                      shape_str(bias->sizes()));
  }
  const int64_t out_per_group = out / groups;
  const int64_t row_floats = pw.cols;
  // panel: whole conv groups, about 2**19 weights, and whole codebook groups (so the panel's codebook is a slice)
  const int64_t rows_per_cb = pw.rows / pw.groups;
  const int64_t unit = std::lcm(out_per_group, rows_per_cb);
  const int64_t panel = std::min(out, std::max<int64_t>(1, (int64_t(1) << 19) / (row_floats * unit)) * unit);
  // the panel rows [o0, o1) decoded: into a reused buffer on the CPU (decode_scratch.h says why), by the device's
  // dequantize kernel elsewhere
  auto decode = [&](int64_t o0, int64_t o1, at::IntArrayRef shape) {
    if (x.is_cpu()) return cpu::decode_rows_to_scratch(packed, codebook, pw, bits, o0, o1, shape);
    return dequantize(packed.slice(0, o0, o1), codebook.slice(0, o0 / rows_per_cb, o1 / rows_per_cb), bits, shape);
  };
  // one panel's conv: on the CPU our kernels where they apply (depthwise; Winograd for 3x3, else the direct kernel
  // for dense unit-stride NCHW; their files say why), else ATen's (oneDNN / cuDNN)
  auto conv = [&](const at::Tensor& xs, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t g) {
    if (x.is_cpu() && cin_g == 1) {
      at::Tensor y = cpu::depthwise_conv2d_f32(xs, w, b, stride, padding, dilation, g);
      if (y.defined()) return y;
    }
    if (x.is_cpu() && g == 1) {
      at::Tensor y = cpu::winograd3x3_conv2d_f32(xs, w, b, stride, padding, dilation, g);
      if (!y.defined()) y = cpu::direct_conv2d_f32(xs, w, b, stride, padding, dilation, g);
      if (y.defined()) return y;
    }
    return at::conv2d(xs, w.to(x.scalar_type()), b.has_value() ? b->to(x.scalar_type()) : at::Tensor(), stride,
                      padding, dilation, g);
  };
#ifdef WS_WITH_CUDA
  if (x.is_cuda()) {  // our kernels (the implicit GEMM, depthwise) where asked and their rules allow
    at::Tensor y = cuda::implicit_conv2d(x, packed, codebook, bits, weight_shape, bias, stride, padding, dilation,
                                         groups);
    if (!y.defined()) {
      y = cuda::depthwise_conv2d(x, packed, codebook, bits, weight_shape, bias, stride, padding, dilation, groups);
    }
    if (y.defined()) return y;
  }
#endif
  if (x.is_cpu()) {  // images of few pixels: the blocked GEMM, decoding inside (blocked_conv.cpp says why)
    at::Tensor y = cpu::blocked_conv2d_f32(x, packed, codebook, pw, bits, weight_shape, bias, stride, padding,
                                           dilation, groups);
    if (y.defined()) return y;
  }
  if (panel >= out) return conv(x, decode(0, out, weight_shape), bias, groups);  // the common case: one panel
  std::vector<at::Tensor> parts;
  for (int64_t o0 = 0; o0 < out; o0 += panel) {
    const int64_t o1 = std::min(out, o0 + panel);
    const int64_t g0 = o0 / out_per_group, g1 = o1 / out_per_group;
    std::vector<int64_t> shape(weight_shape.begin(), weight_shape.end());
    shape[0] = o1 - o0;
    const std::optional<at::Tensor> b =
        bias.has_value() ? std::optional<at::Tensor>(bias->slice(0, o0, o1)) : std::nullopt;
    parts.push_back(conv(x.slice(-3, g0 * cin_g, g1 * cin_g), decode(o0, o1, shape), b, g1 - g0));
  }
  return at::cat(parts, -3);
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, CPU, m) { m.impl("shared_conv2d", &shared_conv2d); }
TORCH_LIBRARY_IMPL(weightshare, CUDA, m) { m.impl("shared_conv2d", &shared_conv2d); }

}  // namespace weightshare
