// sq_grad_accum for every device, composed from ATen matrix products (MKL/oneDNN on CPU, cuBLAS on CUDA).
//
// Without a sequence dimension, a sample's weight gradient is the outer product g_n x_n^T, whose square is
// g_n^2 (x_n^2)^T: the sum over samples is ONE matrix product of the squared inputs, (G^2)^T X^2, with no
// per-sample gradient anywhere. With a sequence dimension the gradient g_n^T x_n sums over t before squaring,
// so it does not factor: samples go through a batched product in chunks whose gradients fit a fixed budget
// (kChunkBytes), each chunk squared and accumulated at once, so memory stays bounded for any N.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "weightshare/checks.h"

namespace weightshare {
namespace {

constexpr int64_t kChunkBytes = int64_t(64) << 20;

at::Tensor sq_grad_accum(const at::Tensor& x, const at::Tensor& grad_out) {
  WS_CHECK_TYPE(x.is_floating_point() && grad_out.is_floating_point(),
                   "weightshare: x and grad_out must be floating point, got ", x.scalar_type(), " and ",
                   grad_out.scalar_type());
  WS_CHECK(x.device() == grad_out.device(), "weightshare: grad_out is on ", grad_out.device(), " but x is on ",
              x.device(), "; all inputs must be on the same device");
  WS_CHECK_VALUE((x.dim() == 2 || x.dim() == 3) && grad_out.dim() == x.dim(),
                    "weightshare: x and grad_out must both be [N, features] or [N, T, features], got ",
                    shape_str(x.sizes()), " and ", shape_str(grad_out.sizes()));
  WS_CHECK_VALUE(x.size(0) == grad_out.size(0) && (x.dim() == 2 || x.size(1) == grad_out.size(1)),
                    "weightshare: x ", shape_str(x.sizes()), " and grad_out ", shape_str(grad_out.sizes()),
                    " must agree on the sample (and sequence) dimensions");
  WS_CHECK_VALUE(x.numel() > 0 && grad_out.numel() > 0, "weightshare: x and grad_out must be non-empty");
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor gf = grad_out.to(at::kFloat);
  if (x.dim() == 2) return at::mm(gf.square().t(), xf.square());
  const int64_t N = x.size(0), O = grad_out.size(2), I = x.size(2);
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / (O * I * 4));
  at::Tensor out = at::zeros({O, I}, xf.options());
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t n1 = std::min(N, n0 + chunk);
    const at::Tensor per_sample = at::bmm(gf.slice(0, n0, n1).transpose(1, 2), xf.slice(0, n0, n1));  // [c, O, I]
    out.add_(per_sample.square_().sum(0));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, CPU, m) { m.impl("sq_grad_accum", &sq_grad_accum); }
TORCH_LIBRARY_IMPL(weightshare, CUDA, m) { m.impl("sq_grad_accum", &sq_grad_accum); }

}  // namespace weightshare
