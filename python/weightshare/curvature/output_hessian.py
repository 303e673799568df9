"""Products with the Hessian of the loss with respect to the network outputs, H_out u.

The Gauss-Newton matrix J^T H_out J needs H_out u once per product. For the two losses used to train the
networks we compress the product has a closed form that costs a softmax and two reductions, much less than
differentiating the loss twice:
  cross-entropy on logits z, per sample:  H_out = diag(p) - p p^T, p = softmax(z)   (label smoothing does not
                                          change it; 'mean' divides by the number of counted targets)
  mean squared error:                     H_out = 2/M I, M = number of output elements ('sum': 2 I)
Any other loss (including these losses wrapped in a lambda) is differentiated twice by autograd.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightshare.curvature.functional import LossFn


def output_hessian_product(loss_fn: LossFn, output: Tensor, target: Any, u: Tensor) -> Tensor:
    """H_out u, with H_out the Hessian of `loss_fn(output, target)` w.r.t. `output` (shaped like `output`)."""
    closed = _cross_entropy_product(loss_fn, output, target, u)
    if closed is None:
        closed = _mse_product(loss_fn, output, target, u)
    if closed is not None:
        return closed
    return _autograd_product(loss_fn, output, target, u)


def _cross_entropy_product(loss_fn: LossFn, output: Tensor, target: Any, u: Tensor) -> Optional[Tensor]:
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        weight, reduction, ignore_index = loss_fn.weight, loss_fn.reduction, loss_fn.ignore_index
    elif loss_fn is F.cross_entropy:
        weight, reduction, ignore_index = None, "mean", -100
    else:
        return None
    # Class weights rescale each sample's Hessian and the mean's denominator, and probability targets need not
    # sum to one: both are rare enough to leave to autograd.
    if (weight is not None or reduction not in ("mean", "sum") or not isinstance(target, Tensor)
            or target.is_floating_point() or output.dim() == 0):
        return None
    class_dim = 0 if output.dim() == 1 else 1
    p = torch.softmax(output.detach(), dim=class_dim)
    pu = p * u
    hu = pu - p * pu.sum(dim=class_dim, keepdim=True)
    counted = (target != ignore_index).unsqueeze(class_dim)
    hu = hu * counted
    if reduction == "mean":
        hu = hu / counted.sum().clamp_min(1)
    return hu


def _mse_product(loss_fn: LossFn, output: Tensor, target: Any, u: Tensor) -> Optional[Tensor]:
    if isinstance(loss_fn, nn.MSELoss):
        reduction = loss_fn.reduction
    elif loss_fn is F.mse_loss:
        reduction = "mean"
    else:
        return None
    # A broadcasting target changes the element count of the mean: leave that case to autograd.
    if not isinstance(target, Tensor) or target.shape != output.shape or reduction not in ("mean", "sum"):
        return None
    return u * (2.0 / output.numel() if reduction == "mean" else 2.0)


def _autograd_product(loss_fn: LossFn, output: Tensor, target: Any, u: Tensor) -> Tensor:
    with torch.enable_grad():
        out = output.detach().requires_grad_(True)
        loss = loss_fn(out, target)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("weightshare.curvature.ggn_vp: loss_fn must return a scalar tensor")
        (grad,) = torch.autograd.grad(loss, out, create_graph=True)
        if not grad.requires_grad:  # the loss is linear in the outputs
            return torch.zeros_like(output)
        # The Hessian is symmetric, so the vector-Jacobian product of the gradient is H u.
        (hu,) = torch.autograd.grad(grad, out, grad_outputs=u, allow_unused=True)
    return torch.zeros_like(output) if hu is None else hu
