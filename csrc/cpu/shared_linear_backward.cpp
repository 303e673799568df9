// CPU gradients of shared_linear (float formula): grad_x = grad_out @ W (shared_linear_grad_x.cpp) and
// grad_codebook[g, j] = sum of (grad_out^T @ x)[r, i] over the weights (r, i) of group g whose index is j
// (codebook_grad.cpp); W is never decoded whole. Without SIMD: W decoded panel by panel for ATen's GEMMs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "shared_linear.h"

namespace weightshare {
namespace {

std::tuple<at::Tensor, at::Tensor> shared_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& packed, const at::Tensor& codebook,
                                                              int64_t bits, int64_t out_features, int64_t in_features,
                                                              bool need_x_grad, bool need_codebook_grad) {
  const PackedWeight pw =
      check_shared_linear_backward(grad_out, x, packed, codebook, bits, out_features, in_features);
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  const cpu::PackedLinear w = cpu::make_packed_linear(packed, cb, pw, bits);
  const at::Tensor g2 = grad_out.reshape({-1, out_features}).to(at::kFloat).contiguous();
  const at::Tensor x2 = x.reshape({-1, in_features}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  // grad_x from W's tiles decoded next to the registers (false on the scalar path: decoded panels + ATen below)
  at::Tensor gx;
  bool gx_done = !need_x_grad;
  if (need_x_grad && out_features > 0) {
    gx = at::empty({M, in_features}, at::kFloat);
    gx_done = cpu::grad_x_fused(w, g2.data_ptr<float>(), M, gx.data_ptr<float>());
  }
  if (!gx_done) gx = at::zeros({M, in_features}, at::kFloat);
  std::vector<double> gc(need_codebook_grad ? pw.groups * pw.K : 0, 0.0);
  const bool gc_done = !need_codebook_grad ||
                       cpu::codebook_grad_fused(w, g2.data_ptr<float>(), x2.data_ptr<float>(), M, gc.data());
  if (!gx_done || !gc_done) {
    const int64_t P = cpu::panel_rows(w);
    at::Tensor panel = gx_done ? at::Tensor() : at::empty({P, in_features}, at::kFloat);
    for (int64_t r0 = 0; r0 < out_features; r0 += P) {
      const int64_t r1 = std::min(out_features, r0 + P);
      const at::Tensor g_panel = g2.slice(1, r0, r1);
      if (!gx_done) {
        cpu::decode_panel(w, r0, r1, panel.data_ptr<float>());
        gx.addmm_(g_panel, panel.slice(0, 0, r1 - r0));
      }
      if (!gc_done) {
        const at::Tensor gw = at::mm(g_panel.t(), x2).contiguous();  // dL/dW for the panel rows
        cpu::add_codebook_grad(w, gw.data_ptr<float>(), r0, r1, gc.data());
      }
    }
  }
  at::Tensor grad_x = need_x_grad ? gx.to(x.scalar_type()).reshape(x.sizes()) : x.new_empty({0});
  at::Tensor grad_c = need_codebook_grad
                          ? at::from_blob(gc.data(), {pw.groups, pw.K}, at::kDouble).to(at::kFloat)
                          : codebook.new_empty({0}, codebook.options().dtype(at::kFloat));
  return {grad_x, grad_c};
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, CPU, m) { m.impl("shared_linear_backward", &shared_linear_backward_cpu); }

}  // namespace weightshare
