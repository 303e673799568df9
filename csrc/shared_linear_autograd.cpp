// Autograd of shared_linear, in C++ (one kernel for every device, registered under the Autograd key).
//
// Why not torch.library.register_autograd like the other ops: its Python layer ran on every call, and a tiny layer
// at batch 1 is mostly fixed cost. Measured on 100x300 (one thread, the op called raw): 9.1 us through the Python
// autograd layer, 4.7 us below it; the ws.ops wrapper skipped the layer when no gradient was needed, at ~1 us of
// Python checks and a guard per call. Here a call that needs no gradient goes straight to the device kernel (no
// measurable cost), and training calls lose the Python layer too.
//
// Gradients (W decoded from packed + codebook; never materialised): gx = grad @ W, gc[g, j] = the sum of
// (grad^T x) over the weights of entry j in group g (both by the shared_linear_backward op, whose own autograd,
// in ops.py, gives the double backward), gbias = grad summed over rows. The int8 path's gradient is the float
// path's (straight-through), as documented on the op.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace weightshare {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor forward_below_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
                                  int64_t bits, int64_t out_features, int64_t in_features,
                                  const std::optional<at::Tensor>& bias, c10::string_view activation) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("weightshare::shared_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                               int64_t, int64_t, const std::optional<at::Tensor>&, c10::string_view)>();
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(x, packed, codebook, bits, out_features, in_features, bias, activation);
}

std::tuple<at::Tensor, at::Tensor> backward_op(const at::Tensor& grad_out, const at::Tensor& x,
                                               const at::Tensor& packed, const at::Tensor& codebook, int64_t bits,
                                               int64_t out_features, int64_t in_features, bool need_x, bool need_c) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("weightshare::shared_linear_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, const at::Tensor&, int64_t,
                                                                       int64_t, int64_t, bool, bool)>();
  // through the dispatcher's autograd layer: with create_graph the backward op records its own graph
  return op.call(grad_out, x, packed, codebook, bits, out_features, in_features, need_x, need_c);
}

struct SharedLinearFunction : public torch::autograd::Function<SharedLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& codebook, int64_t bits, int64_t out_features, int64_t in_features,
                            const std::optional<at::Tensor>& bias, c10::string_view activation) {
    ctx->save_for_backward({x, packed, codebook});
    ctx->saved_data["meta"] = c10::List<int64_t>({bits, out_features, in_features, bias.has_value() ? 1 : 0});
    return forward_below_autograd(x, packed, codebook, bits, out_features, in_features, bias, activation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &packed = saved[1], &codebook = saved[2];
    const c10::List<int64_t> meta = ctx->saved_data["meta"].toIntList();
    const int64_t bits = meta[0], out_f = meta[1], in_f = meta[2];
    const bool has_bias = meta[3] != 0;
    const bool need_x = ctx->needs_input_grad(0), need_c = ctx->needs_input_grad(2);
    const at::Tensor& grad = grads[0];
    at::Tensor gx, gc, gbias;
    if (need_x || need_c) {
      auto [bx, bc] = backward_op(grad.contiguous(), x, packed, codebook, bits, out_f, in_f, need_x, need_c);
      if (need_x) gx = bx;
      if (need_c) gc = bc.to(codebook.scalar_type());
    }
    // needs_input_grad counts graph inputs (tensors, and the bias when given): the bias is input 3
    if (has_bias && ctx->needs_input_grad(3)) gbias = grad.reshape({-1, out_f}).sum(0);
    // one entry per forward argument: x, packed, codebook, bits, out_features, in_features, bias, activation
    return {gx, at::Tensor(), gc, at::Tensor(), at::Tensor(), at::Tensor(), gbias, at::Tensor()};
  }
};

at::Tensor shared_linear_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& codebook,
                                  int64_t bits, int64_t out_features, int64_t in_features,
                                  const std::optional<at::Tensor>& bias, c10::string_view activation) {
  // No gradient wanted: straight below autograd. Function::apply would build a graph node and its saved state
  // anyway (1.3 us of a 6.4 us call at 100x300).
  const bool bias_grad = bias.has_value() && bias->requires_grad();
  const bool wants_grad = at::GradMode::is_enabled() && (x.requires_grad() || codebook.requires_grad() || bias_grad);
  if (!wants_grad) {
    return forward_below_autograd(x, packed, codebook, bits, out_features, in_features, bias, activation);
  }
  return SharedLinearFunction::apply(x, packed, codebook, bits, out_features, in_features, bias, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(weightshare, Autograd, m) { m.impl("shared_linear", &shared_linear_autograd); }

}  // namespace weightshare
