"""Curvature-vector products: the exact Hessian product H v and the Gauss-Newton product G v = J^T H_out J v.

Both take v as a dict shaped like the parameters and return one; neither builds a matrix. The operator classes
prepare one batch once and then multiply many vectors, which is what the Hutchinson estimator
(weightshare.curvature.diagonals) needs; hvp and ggn_vp are the one-vector conveniences.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from weightshare.curvature.functional import FunctionalLoss, LossFn
from weightshare.curvature.output_hessian import output_hessian_product
from weightshare.curvature.parameters import ParamsArg, check_batch, check_direction, resolve_parameters

HVP_METHODS = ("double_backward", "forward_over_reverse", "reverse_over_forward")
DEFAULT_HVP_METHOD = "reverse_over_forward"


def check_hvp_method(method: Any, caller: str) -> str:
    if method not in HVP_METHODS:
        raise ValueError(f"weightshare.curvature.{caller}: method must be one of {HVP_METHODS}, got {method!r}")
    return method


class HessianOperator:
    """v -> H v for the loss of one batch; the gradient graph is built once and reused for every v."""

    def __init__(self, f: FunctionalLoss, x: Tensor, y: Any, method: str = DEFAULT_HVP_METHOD) -> None:
        self.f, self.x, self.y, self.method = f, x, y, method
        self._names = list(f.params)
        self._traced = f.traced(x) if method == "reverse_over_forward" else None
        if method == "reverse_over_forward" and self._traced is not None:
            # H v = d/dtheta <grad_out L, J v>: the R-forward recorded by autograd, then one backward
            self._leaves = f.leaves()
            with torch.enable_grad():
                self._env = self._traced.primal(f.traced_values(self._leaves), x)
                out = self._traced.result(self._env)
                loss = f.loss_of_outputs(out, y)
                self._grad_out = torch.autograd.grad(loss, out, create_graph=True)[0] if out.requires_grad else None
        elif method == "reverse_over_forward":  # an untraceable model: the next best generic method
            self.method = method = "double_backward"
        if method == "double_backward":
            self._leaves = f.leaves()
            with torch.enable_grad():  # a caller's torch.no_grad() must not turn the product into an error
                loss = f.loss(self._leaves, x, y)
                grads = torch.autograd.grad(loss, [self._leaves[n] for n in self._names], create_graph=True,
                                            allow_unused=True)
            # A gradient without a graph is constant in the parameters: its rows of H are zero.
            self._differentiable = [(n, g) for n, g in zip(self._names, grads) if g is not None and g.requires_grad]

    def __call__(self, v: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.method == "reverse_over_forward":
            return self._reverse_over_forward(v)
        if self.method == "forward_over_reverse":
            if isinstance(self.y, Tensor) and self.y.is_floating_point():
                # Workaround for pytorch/pytorch#123996 (open in torch 2.14): a captured float target gets an
                # immutable ZeroTensor tangent that F.mse_loss's forward-AD formula divides in place. Passing
                # the target as an input with a materialised zero tangent avoids it, for any loss.
                grad_fn = torch.func.grad(lambda p, y: self.f.loss(p, self.x, y))
                _, hv = torch.func.jvp(grad_fn, (self.f.primals(), self.y), (dict(v), torch.zeros_like(self.y)))
            else:
                grad_fn = torch.func.grad(lambda p: self.f.loss(p, self.x, self.y))
                _, hv = torch.func.jvp(grad_fn, (self.f.primals(),), (dict(v),))
            return {n: t.detach() for n, t in hv.items()}
        if not self._differentiable:
            return self.f.zeros_for_unused({})
        with torch.enable_grad():
            hv = torch.autograd.grad([g for _, g in self._differentiable],
                                     [self._leaves[n] for n in self._names],
                                     grad_outputs=[v[n] for n, _ in self._differentiable],
                                     retain_graph=True, allow_unused=True)
        return self.f.zeros_for_unused(dict(zip(self._names, hv)))

    def _reverse_over_forward(self, v: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self._grad_out is None:
            return self.f.zeros_for_unused({})
        with torch.enable_grad():
            jv = self._traced.tangent(self._env, self.f.traced_directions(v))
            if jv is None or not (jv.requires_grad or self._grad_out.requires_grad):
                return self.f.zeros_for_unused({})
            directional = (self._grad_out * jv).sum()
            hv = torch.autograd.grad(directional, [self._leaves[n] for n in self._names], retain_graph=True,
                                     allow_unused=True)
        return self.f.zeros_for_unused(dict(zip(self._names, hv)))


class GaussNewtonOperator:
    """v -> J^T H_out J v for one batch; the forward (and its autograd graph for J^T) is run once and reused for
    every v.

    Where the model traces (traced.py), J v comes from the R-forward over the traced ops, which reuses the
    primal intermediates of that one forward: per v, one tangent pass and one backward. Otherwise torch.func.jvp
    reruns the forward with the tangent for each v."""

    def __init__(self, f: FunctionalLoss, x: Tensor, y: Any) -> None:
        self.f, self.x, self.y = f, x, y
        self._names = list(f.params)
        self._leaves = f.leaves()
        self._traced = f.traced(x)
        with torch.enable_grad():
            if self._traced is not None:
                self._env = self._traced.primal(f.traced_values(self._leaves), x)
                out = self._traced.result(self._env)
            else:
                out = f.outputs(self._leaves, x)
        self._out: Optional[Tensor] = out
        # The loss must be a scalar, also when its output Hessian has a closed form that never calls it.
        f.loss_of_outputs(out.detach(), y)
        if not out.requires_grad:  # outputs independent of the parameters
            self._out = None

    def _jv(self, v: Mapping[str, Tensor]) -> Tensor:
        if self._traced is not None:
            with torch.no_grad():
                jv = self._traced.tangent(self._env, self.f.traced_directions(v))
            return torch.zeros_like(self._out) if jv is None else jv
        # J v by forward mode without recording a graph (measured: 5-10% faster on LeNet-5 and an MLP than
        # carrying the tangent through the recorded forward with fwAD dual tensors).
        with torch.no_grad():
            _, jv = torch.func.jvp(lambda p: self.f.outputs(p, self.x), (self.f.primals(),), (dict(v),))
        return jv

    def __call__(self, v: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self._out is None:
            return self.f.zeros_for_unused({})
        hjv = output_hessian_product(self.f.loss_fn, self._out.detach(), self.y, self._jv(v))
        with torch.enable_grad():
            gv = torch.autograd.grad(self._out, [self._leaves[n] for n in self._names], grad_outputs=hjv,
                                     retain_graph=True, allow_unused=True)
        return self.f.zeros_for_unused(dict(zip(self._names, gv)))


def hvp(model: nn.Module, loss_fn: LossFn, batch: Any, v: Mapping[str, Tensor], params: ParamsArg = None,
        method: str = DEFAULT_HVP_METHOD) -> dict[str, Tensor]:
    """Exact Hessian-vector product H v of `loss_fn(model(x), y)` for `batch = (x, y)`.

    The Hessian is taken w.r.t. `params` (default: compressible_parameters(model)); `v` is a dict with the same
    names and shapes. Returns a dict of detached tensors shaped like the parameters (zeros for a parameter the
    loss does not depend on). The model is left untouched and may be in eval mode.

    method:
      "reverse_over_forward" (default): Pearlmutter's R-forward over the traced ATen ops (traced.py,
          tangents.py), recorded by autograd, then one backward of <grad_out L, J v>, which is v.H. Models that
          cannot be traced (data-dependent Python control flow, in-place buffer updates) use double_backward.
      "double_backward": torch.autograd.grad with create_graph=True, then a backward through the graph of the
          gradient.
      "forward_over_reverse": torch.func.jvp of torch.func.grad over torch.func.functional_call.
    Why reverse_over_forward is the default, measured on this project's 2-core VM (AMD EPYC, AVX-512), torch
    2.14.1, 2 threads, batch 128, cross-entropy, medians of interleaved calls, as multiples of one gradient
    (benchmarks/bench_curvature.py, docs/kernels-cpu.md "Curvature"): LeNet-5 1.72x (double_backward 2.53x,
    forward_over_reverse 2.31x); the 2-layer transformer 2.64x (2.69x, 3.88x); the MLP 784-300-100-10 1.1x
    (1.4-1.6x; its gradient call carries fixed overhead of the same size as the products). It never lost to
    the others on a single product. Its floor: for a Linear layer it runs one forward, two tangent and five
    backward matrix products against the gradient's three, so on matmul-bound models (the transformer) it stays
    near 8/3 of a gradient. With many probes on one
    batch (hessian_diag), double_backward reuses its gradient graph: 8 probes on the transformer took 17.2
    gradients with it against 19.4 with reverse_over_forward; on LeNet-5 reverse_over_forward still wins, 13.2
    against 16.8.
    """
    check_hvp_method(method, "hvp")
    targets = resolve_parameters(model, params, "hvp")
    direction = check_direction(v, targets, "hvp")
    x, y = check_batch(batch, "hvp")
    return HessianOperator(FunctionalLoss(model, loss_fn, targets, "hvp"), x, y, method)(direction)


def ggn_vp(model: nn.Module, loss_fn: LossFn, batch: Any, v: Mapping[str, Tensor],
           params: ParamsArg = None) -> dict[str, Tensor]:
    """Generalized Gauss-Newton product G v = J^T H_out J v of `loss_fn(model(x), y)` for `batch = (x, y)`.

    J is the Jacobian of the network outputs w.r.t. `params` (default: compressible_parameters(model)) and
    H_out the Hessian of the loss w.r.t. the outputs. G is positive semi-definite whenever the loss is convex in
    the outputs (cross-entropy on logits, MSE), unlike H, which makes it the safer quadratic model.

    Cost: one forward (recording the graph for J^T), the R-forward over the traced ops for J v (traced.py; a
    model that cannot be traced reruns its forward under torch.func.jvp instead), H_out (J v), one backward.
    Measured: 1.30x a gradient on LeNet-5, 1.56x on the transformer (benchmarks/bench_curvature.py; the
    transformer's Linear layers bound it near 5/3: one forward, two tangent, two backward matrix products against
    the gradient's three). H_out (J v) has a closed form for nn.CrossEntropyLoss / F.cross_entropy
    (diag(p) - p p^T per sample) and nn.MSELoss / F.mse_loss (2/M I); any other loss is differentiated twice by
    autograd w.r.t. the outputs.
    """
    targets = resolve_parameters(model, params, "ggn_vp")
    direction = check_direction(v, targets, "ggn_vp")
    x, y = check_batch(batch, "ggn_vp")
    return GaussNewtonOperator(FunctionalLoss(model, loss_fn, targets, "ggn_vp"), x, y)(direction)
