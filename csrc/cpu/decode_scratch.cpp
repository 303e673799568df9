#include "decode_scratch.h"

#include <ATen/ATen.h>

#include "shared_linear.h"

namespace weightshare::cpu {

at::Tensor decode_rows_to_scratch(const at::Tensor& packed, const at::Tensor& codebook, const PackedWeight& pw,
                                  int64_t bits, int64_t r0, int64_t r1, at::IntArrayRef shape) {
  thread_local at::Tensor scratch;
  const int64_t n = (r1 - r0) * pw.cols;
  if (!scratch.defined() || scratch.numel() < n) scratch = at::empty({n}, at::kFloat);
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  const PackedLinear w = make_packed_linear(packed, cb, pw, bits);
  decode_panel(w, r0, r1, scratch.data_ptr<float>());
  return scratch.narrow(0, 0, n).view(shape);
}

}  // namespace weightshare::cpu
