// CPU gradients of shared_linear (float formula): grad_x = grad_out @ W and grad_codebook[g, j] = sum of
// (grad_out^T @ x)[r, i] over the weights (r, i) of group g whose index is j. W is decoded panel by panel
// (shared_linear.cpp's decode_panel), never whole.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <array>
#include <vector>

#include "shared_linear.h"
#include "weightshare/dispatch.h"
#include "weightshare/packing.h"

namespace weightshare {
namespace {

// dL/dcodebook from panel rows [r0, r1) and their dL/dW (gw, [r1 - r0, in]): per-entry sums in double, credited
// to each row's group (an index >= K has no entry to credit). Rows go in fixed chunks, each summed into its own
// partial buffer on any thread and the partials added in chunk order, so the result does not depend on the thread
// count. Was a serial loop with a run-time width: 300x784 at batch 64 took 538 us for the codebook gradient against
// 210 us for the dense dL/dW GEMM; now 318-332 us (four interleaved sets of sums, against consecutive weights of one
// entry waiting on each other's stores, measured slower: 369 us).
template <int BITS>
void add_codebook_grad(const cpu::PackedLinear& w, const float* gw, int64_t r0, int64_t r1, double* gc) {
  constexpr int64_t kChunk = 16;
  const int64_t in = w.in_features, rpg = w.rows_per_group, K = w.K;
  const int64_t chunks = (r1 - r0 + kChunk - 1) / kChunk;
  std::vector<std::vector<double>> parts(chunks);  // chunk c: [its groups][K]
  const auto span = [&](int64_t c) {
    const int64_t a = r0 + c * kChunk, b = std::min(r1, a + kChunk);
    return std::array<int64_t, 4>{a, b, a / rpg, (b - 1) / rpg};
  };
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const auto [a, b, g0, g1] = span(c);
      std::vector<double>& part = parts[c];
      part.assign(static_cast<size_t>((g1 - g0 + 1) * K), 0.0);
      for (int64_t r = a; r < b; ++r) {
        const uint8_t* row = w.packed + r * w.row_bytes;
        double* dst = part.data() + (r / rpg - g0) * K;
        const float* src = gw + (r - r0) * in;
        for (int64_t i = 0; i < in; ++i) {
          const uint32_t j = unpack_one(row, i, BITS);
          if (j < static_cast<uint32_t>(K)) dst[j] += src[i];
        }
      }
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    const auto [a, b, g0, g1] = span(c);
    for (int64_t g = g0; g <= g1; ++g)
      for (int64_t j = 0; j < K; ++j) gc[g * K + j] += parts[c][(g - g0) * K + j];
  }
}

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
  const int64_t P = cpu::panel_rows(w);
  at::Tensor panel = at::empty({P, in_features}, at::kFloat);
  at::Tensor gx = need_x_grad ? at::zeros({x2.size(0), in_features}, at::kFloat) : at::Tensor();
  std::vector<double> gc(need_codebook_grad ? pw.groups * pw.K : 0, 0.0);
  for (int64_t r0 = 0; r0 < out_features; r0 += P) {
    const int64_t r1 = std::min(out_features, r0 + P);
    const at::Tensor g_panel = g2.slice(1, r0, r1);
    if (need_x_grad) {
      cpu::decode_panel(w, r0, r1, panel.data_ptr<float>());
      gx.addmm_(g_panel, panel.slice(0, 0, r1 - r0));
    }
    if (need_codebook_grad) {
      const at::Tensor gw = at::mm(g_panel.t(), x2).contiguous();  // dL/dW for the panel rows
      WS_DISPATCH_BITS(w.bits, BITS, [&] { add_codebook_grad<BITS>(w, gw.data_ptr<float>(), r0, r1, gc.data()); });
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
