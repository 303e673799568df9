// Ops of the emulator library beyond the project's own (whose CUDA implementations build.py registers under
// weightshare_emu for CPU tensors): the CUDA conv kernels called directly, since shared_conv2d reaches them only
// for CUDA tensors (csrc/common/shared_conv.cpp).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "shared_conv_cuda.h"

namespace {

// kernel: "implicit" or "depthwise"; raises where the kernel declines the call (its rules, or WS_CUDA_CONV).
at::Tensor conv_kernel(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook, int64_t bits,
                       at::IntArrayRef weight_shape, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, c10::string_view kernel) {
  at::Tensor y;
  if (kernel == "implicit") {
    y = weightshare::cuda::implicit_conv2d(x, packed, codebook, bits, weight_shape, bias, stride, padding, dilation,
                                           groups);
  } else if (kernel == "depthwise") {
    y = weightshare::cuda::depthwise_conv2d(x, packed, codebook, bits, weight_shape, bias, stride, padding, dilation,
                                            groups);
  } else {
    TORCH_CHECK_VALUE(false, "cuda_emu: kernel must be 'implicit' or 'depthwise'");
  }
  TORCH_CHECK(y.defined(), "cuda_emu: the ", std::string(kernel), " conv kernel declined the call");
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(weightshare_emu, m) {
  m.def("conv_kernel(Tensor x, Tensor packed, Tensor codebook, int bits, int[] weight_shape, Tensor? bias, "
        "int[] stride, int[] padding, int[] dilation, int groups, str kernel) -> Tensor");
}
TORCH_LIBRARY_IMPL(weightshare_emu, CPU, m) { m.impl("conv_kernel", &conv_kernel); }
