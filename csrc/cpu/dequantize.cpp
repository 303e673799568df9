// CPU dequantize: packed indices + codebook -> dense weight (the reference path and an autograd helper). The
// decoding is the shared-linear panel decoder (SIMD where the CPU has it).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "shared_linear.h"
#include "weightshare/checks.h"

namespace weightshare {
namespace {

at::Tensor dequantize_cpu(const at::Tensor& packed, const at::Tensor& codebook, int64_t bits, at::IntArrayRef shape) {
  const PackedWeight pw = check_dequantize(packed, codebook, bits, shape);
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({pw.rows, pw.cols}, codebook.options().dtype(at::kFloat));
  const cpu::PackedLinear w = cpu::make_packed_linear(packed, cb, pw, bits);
  cpu::decode_panel(w, 0, pw.rows, out.data_ptr<float>());
  return out.to(codebook.scalar_type()).reshape(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, CPU, m) { m.impl("dequantize", &dequantize_cpu); }

}  // namespace weightshare
