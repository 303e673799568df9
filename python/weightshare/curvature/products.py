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

HVP_METHODS = ("double_backward", "forward_over_reverse")
DEFAULT_HVP_METHOD = "double_backward"


def check_hvp_method(method: Any, caller: str) -> str:
    if method not in HVP_METHODS:
        raise ValueError(f"weightshare.curvature.{caller}: method must be one of {HVP_METHODS}, got {method!r}")
    return method


class HessianOperator:
    """v -> H v for the loss of one batch; the gradient graph is built once and reused for every v."""

    def __init__(self, f: FunctionalLoss, x: Tensor, y: Any, method: str = DEFAULT_HVP_METHOD) -> None:
        self.f, self.x, self.y, self.method = f, x, y, method
        self._names = list(f.params)
        if method == "double_backward":
            self._leaves = f.leaves()
            with torch.enable_grad():  # a caller's torch.no_grad() must not turn the product into an error
                loss = f.loss(self._leaves, x, y)
                grads = torch.autograd.grad(loss, [self._leaves[n] for n in self._names], create_graph=True,
                                            allow_unused=True)
            # A gradient without a graph is constant in the parameters: its rows of H are zero.
            self._differentiable = [(n, g) for n, g in zip(self._names, grads) if g is not None and g.requires_grad]

    def __call__(self, v: Mapping[str, Tensor]) -> dict[str, Tensor]:
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


class GaussNewtonOperator:
    """v -> J^T H_out J v for one batch; the forward graph for J^T is built once and reused for every v."""

    def __init__(self, f: FunctionalLoss, x: Tensor, y: Any) -> None:
        self.f, self.x, self.y = f, x, y
        self._names = list(f.params)
        self._leaves = f.leaves()
        with torch.enable_grad():
            self._out: Optional[Tensor] = f.outputs(self._leaves, x)
        # The loss must be a scalar, also when its output Hessian has a closed form that never calls it.
        f.loss_of_outputs(self._out.detach(), y)
        if not self._out.requires_grad:  # outputs independent of the parameters
            self._out = None

    def __call__(self, v: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self._out is None:
            return self.f.zeros_for_unused({})
        # J v by forward mode without recording a graph (measured: 5-10% faster on LeNet-5 and an MLP than
        # carrying the tangent through the recorded forward with fwAD dual tensors), then J^T by a backward.
        with torch.no_grad():
            out, jv = torch.func.jvp(lambda p: self.f.outputs(p, self.x), (self.f.primals(),), (dict(v),))
        hjv = output_hessian_product(self.f.loss_fn, out, self.y, jv)
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
      "double_backward" (default): torch.autograd.grad with create_graph=True, then a backward through the
          graph of the gradient.
      "forward_over_reverse": torch.func.jvp of torch.func.grad over torch.func.functional_call.
    Why double_backward is the default, measured on this project's 2-core VM ("Intel(R) Xeon(R) Processor",
    AVX-512), torch 2.14.1, one thread, batch 128, cross-entropy, minimum of 40-60 interleaved calls (the machine
    was shared with other jobs):
      LeNet-5 (conv20-pool-conv50-pool-fc500-fc10):  double_backward 106-122 ms, forward_over_reverse 98-116 ms
                                                     (3-20% faster across runs), gradient alone 39-42 ms;
      MLP 784-300-100-10:                            double_backward 2.8-3.4 ms, forward_over_reverse 5.7-6.8 ms
                                                     (2x slower: torch.func's per-op overhead dominates small
                                                     layers), gradient alone 1.2-2.7 ms;
      2-layer transformer of benchmarks/bench_curvature.py: double_backward 46 ms, forward_over_reverse 70 ms.
    So double_backward: at most a fifth slower on LeNet-5, up to twice as fast on the others, and it needs no
    forward-mode formula for any op.
    For Hutchinson, double_backward also reuses one batch's gradient graph across all probes: hessian_diag with
    8 probes on one LeNet-5 batch took 629 ms with it and 919 ms with forward_over_reverse.
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

    Cost: a forward-mode pass for J v, H_out (J v), then a forward and backward pass for J^T. H_out (J v) has
    a closed form for nn.CrossEntropyLoss / F.cross_entropy (diag(p) - p p^T per sample) and nn.MSELoss /
    F.mse_loss (2/M I); any other loss is differentiated twice by autograd w.r.t. the outputs.
    """
    targets = resolve_parameters(model, params, "ggn_vp")
    direction = check_direction(v, targets, "ggn_vp")
    x, y = check_batch(batch, "ggn_vp")
    return GaussNewtonOperator(FunctionalLoss(model, loss_fn, targets, "ggn_vp"), x, y)(direction)
