#include "decode_scratch.h"

#include <ATen/ATen.h>

#include "shared_linear.h"

namespace weightshare::cpu {

namespace {
thread_local at::Tensor scratch;
}

float* scratch_floats(int64_t n) {
  if (!scratch.defined() || scratch.numel() < n) scratch = at::empty({n}, at::kFloat);
  return scratch.data_ptr<float>();
}

at::Tensor decode_rows_to_scratch(const at::Tensor& packed, const at::Tensor& codebook, const PackedWeight& pw,
                                  int64_t bits, int64_t r0, int64_t r1, at::IntArrayRef shape) {
  const int64_t n = (r1 - r0) * pw.cols;
  scratch_floats(n);
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  const PackedLinear w = make_packed_linear(packed, cb, pw, bits);
  decode_panel(w, r0, r1, scratch.data_ptr<float>());
  return scratch.narrow(0, 0, n).view(shape);
}

}  // namespace weightshare::cpu
