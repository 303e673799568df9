// CPU dequantize: packed indices + codebook -> dense weight (the reference path and an autograd helper).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "weightshare/checks.h"
#include "weightshare/cpu_decode.h"
#include "weightshare/dispatch.h"

namespace weightshare {
namespace {

at::Tensor dequantize_cpu(const at::Tensor& packed, const at::Tensor& codebook, int64_t bits, at::IntArrayRef shape) {
  const PackedWeight pw = check_dequantize(packed, codebook, bits, shape);
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({pw.rows, pw.cols}, codebook.options().dtype(at::kFloat));
  const uint8_t* src = packed.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  const int64_t rows_per_group = pw.rows / pw.groups;
  WS_DISPATCH_BITS(bits, BITS, [&] {
    at::parallel_for(0, pw.rows, std::max<int64_t>(1, 32768 / pw.cols), [&](int64_t b, int64_t e) {
      DecodeTable table;
      int64_t table_group = -1;
      for (int64_t r = b; r < e; ++r) {
        const int64_t g = r / rows_per_group;
        if (g != table_group) {
          table.fill(cb.data_ptr<float>() + g * pw.K, static_cast<int>(pw.K), BITS);
          table_group = g;
        }
        decode_scalar<BITS>(src + r * pw.row_bytes, 0, pw.cols, table.v, dst + r * pw.cols);
      }
    });
  });
  return out.to(codebook.scalar_type()).reshape(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, CPU, m) { m.impl("dequantize", &dequantize_cpu); }

}  // namespace weightshare
