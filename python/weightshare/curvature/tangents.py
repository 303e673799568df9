"""Forward-mode (R-operator) rules for the ATen ops a traced network runs: the tangent of each op's output from its
inputs' tangents and primal values.

Pearlmutter's R-operator pushes a direction v through the network alongside the forward pass: R{y} for every
intermediate y, ending with J v at the outputs. torch.func.jvp does this generically, but runs every op through
its functorch wrapper and its forward-AD formula (for a Linear: three matmuls and an add, materialising the
tangent of the transposed weight). Here each rule is written for what the curvature products need:

* inputs without a tangent are skipped (the first layer's input, frozen weights, masks, shapes): the rule for
  addmm(b, x, W^T) with no tangent on x is one matmul x V^T, not two;
* elementwise nonlinearities use ATen's own fused backward kernels, which are also their forward derivatives
  (their Jacobians are diagonal): relu -> threshold_backward, gelu -> gelu_backward, and so on; the softmax
  Jacobian is symmetric, so its vector-Jacobian kernel is its Jacobian-vector product too;
* max pooling gathers the tangent at the argmax indices the forward already computed.

Every rule is written with differentiable ops, so the same pass recorded by autograd gives the exact
Hessian-vector product by one more backward (products.py). An op without a rule falls back to torch.func.jvp
on that op alone: slower, never wrong.

A rule gets the op's args and kwargs (primal values, nodes already replaced by their values), the tangents of
the args (same structure; None where an arg has no tangent) and the op's primal output; it returns the output
tangent (a tuple for ops with tuple outputs), None meaning zero.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

aten = torch.ops.aten

Rule = Callable[[tuple, dict, tuple, Any], Any]
RULES: dict[Any, Rule] = {}


def _rule(*ops: Any) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn
    return register


def _sum(*terms: Optional[Tensor]) -> Optional[Tensor]:
    present = [t for t in terms if t is not None]
    if not present:
        return None
    total = present[0]
    for t in present[1:]:
        total = total + t
    return total


# ---- linear in their first argument: the same op applied to the tangent ----------------------------------------

def _same_op_on_first(op: Any) -> Rule:
    def rule(args, kwargs, targs, out):
        return op(targs[0], *args[1:], **kwargs)
    return rule


for _op in (aten.t.default, aten.transpose.int, aten.permute.default, aten.expand.default, aten.clone.default,
            aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.select.int,
            aten.slice.Tensor, aten.alias.default, aten.mean.dim, aten.mean.default, aten.sum.dim_IntList,
            aten.sum.default, aten.neg.default, aten.avg_pool2d.default, aten._adaptive_avg_pool2d.default,
            aten.constant_pad_nd.default, aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default,
            aten._to_copy.default, aten.mul.Scalar, aten.div.Scalar, aten.repeat.default, aten.index_select.default,
            aten.flip.default, aten.roll.default, aten.narrow.default, aten.unfold.default, aten.im2col.default,
            aten.pixel_shuffle.default, aten.upsample_nearest2d.default, aten.avg_pool1d.default):
    RULES[_op] = _same_op_on_first(_op)


@_rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _reshape(args, kwargs, targs, out):
    # reshape, not view: a tangent need not have the primal's strides (a matmul result is contiguous where the
    # primal may be a transposed view)
    return targs[0].reshape(out.shape)


# ---- (bi)linear ops ------------------------------------------------------------------------------------------------

def _broadcast(total: Optional[Tensor], out: Tensor) -> Optional[Tensor]:
    """A tangent summed from broadcasting operands, shaped like the output."""
    return None if total is None else total.expand(out.shape) if total.shape != out.shape else total


@_rule(aten.add.Tensor)
def _add(args, kwargs, targs, out):
    alpha = kwargs.get("alpha", 1)
    tb = targs[1] if len(targs) > 1 else None
    return _broadcast(_sum(targs[0], None if tb is None else tb * alpha if alpha != 1 else tb), out)


@_rule(aten.sub.Tensor)
def _sub(args, kwargs, targs, out):
    alpha = kwargs.get("alpha", 1)
    tb = targs[1] if len(targs) > 1 else None
    return _broadcast(_sum(targs[0], None if tb is None else -(tb * alpha)), out)


@_rule(aten.mul.Tensor)
def _mul(args, kwargs, targs, out):
    a, b = args[0], args[1]
    ta, tb = targs[0], targs[1]
    return _broadcast(_sum(None if ta is None else ta * b, None if tb is None else a * tb), out)


@_rule(aten.div.Tensor)
def _div(args, kwargs, targs, out):
    if kwargs.get("rounding_mode") is not None:  # floor/trunc division is piecewise constant
        return None
    b = args[1]
    ta, tb = targs[0], targs[1]
    total = _sum(ta, None if tb is None else -(out * tb))
    if total is None:
        return None
    return _broadcast(total / b, out)


def _product_rule(a: Tensor, b: Tensor, ta: Optional[Tensor], tb: Optional[Tensor]) -> Optional[Tensor]:
    """ta b + a tb, the second product accumulated into the first by the GEMM itself (addmm/baddbmm's beta = 1)
    where the shapes allow: one pass over the output instead of a separate add (measured ~5 % of the tangent
    pass of the transformer benchmark)."""
    if ta is None:
        return None if tb is None else torch.matmul(a, tb)
    first = torch.matmul(ta, b)
    if tb is None:
        return first
    if a.dim() == 2 and tb.dim() == 2:
        return torch.addmm(first, a, tb)
    if a.dim() == 3 and tb.dim() == 3 and first.shape[0] == a.shape[0] == tb.shape[0]:
        return torch.baddbmm(first, a, tb)
    return first + torch.matmul(a, tb)


@_rule(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _matmul(args, kwargs, targs, out):
    return _product_rule(args[0], args[1], targs[0], targs[1])


@_rule(aten.addmm.default, aten.baddbmm.default)
def _addmm(args, kwargs, targs, out):
    bias, a, b = args[0], args[1], args[2]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    tbias, ta, tb = targs[0], targs[1], targs[2]
    product = _product_rule(a, b, ta, tb)
    if product is not None and alpha != 1:
        product = product * alpha
    if tbias is not None:
        tbias = tbias * beta if beta != 1 else tbias
        return tbias.expand(out.shape) if product is None else product + tbias
    return product


@_rule(aten.convolution.default)
def _convolution(args, kwargs, targs, out):
    x, w, _, stride, padding, dilation, transposed, output_padding, groups = args
    tx, tw, tb = targs[0], targs[1], targs[2]
    through_x = None if tx is None else aten.convolution(tx, w, None, stride, padding, dilation, transposed,
                                                         output_padding, groups)
    through_w = None if tw is None else aten.convolution(x, tw, None, stride, padding, dilation, transposed,
                                                         output_padding, groups)
    through_b = None if tb is None else tb.view([1, -1] + [1] * (out.dim() - 2)).expand(out.shape)
    return _sum(through_x, through_w, through_b)


def _same_op_on_list(op: Any) -> Rule:
    """cat / stack: the same op over the tangents (zeros where an input has none)."""
    def rule(args, kwargs, targs, out):
        filled = [torch.zeros_like(x) if t is None else t for x, t in zip(args[0], targs[0])]
        return op(filled, *args[1:], **kwargs)
    return rule


RULES[aten.cat.default] = _same_op_on_list(aten.cat.default)
RULES[aten.stack.default] = _same_op_on_list(aten.stack.default)


@_rule(aten.where.self)
def _where(args, kwargs, targs, out):
    cond, a, b = args
    ta, tb = targs[1], targs[2]
    if ta is None and tb is None:
        return None
    return torch.where(cond, torch.zeros_like(out) if ta is None else ta, torch.zeros_like(out) if tb is None else tb)


@_rule(aten.embedding.default)
def _embedding(args, kwargs, targs, out):
    return None if targs[0] is None else aten.embedding(targs[0], *args[1:], **kwargs)


# ---- elementwise nonlinearities: their diagonal Jacobian applied by ATen's backward kernels -----------------------

@_rule(aten.relu.default)
def _relu(args, kwargs, targs, out):
    return aten.threshold_backward(targs[0], out, 0)


@_rule(aten.gelu.default)
def _gelu(args, kwargs, targs, out):
    return aten.gelu_backward(targs[0], args[0], approximate=kwargs.get("approximate", "none"))


@_rule(aten.silu.default)
def _silu(args, kwargs, targs, out):
    # not silu_backward: autograd has no derivative for it, and the Hessian product differentiates this
    s = torch.sigmoid(args[0])
    return targs[0] * (s * (1 + args[0] * (1 - s)))


@_rule(aten.tanh.default)
def _tanh(args, kwargs, targs, out):
    return aten.tanh_backward(targs[0], out)


@_rule(aten.sigmoid.default)
def _sigmoid(args, kwargs, targs, out):
    return aten.sigmoid_backward(targs[0], out)


@_rule(aten.leaky_relu.default)
def _leaky_relu(args, kwargs, targs, out):
    slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
    return aten.leaky_relu_backward(targs[0], args[0], slope, False)


@_rule(aten.hardtanh.default)
def _hardtanh(args, kwargs, targs, out):
    lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    return aten.hardtanh_backward(targs[0], args[0], lo, hi)


@_rule(aten._softmax.default)
def _softmax(args, kwargs, targs, out):
    # J = diag(s) - s s^T is symmetric: the vector-Jacobian kernel computes J t
    return aten._softmax_backward_data(targs[0], out, args[1], out.dtype)


@_rule(aten._log_softmax.default)
def _log_softmax(args, kwargs, targs, out):
    t = targs[0]
    return t - (t * out.exp()).sum(args[1], keepdim=True)


# ---- pooling, normalisation, dropout --------------------------------------------------------------------------------

@_rule(aten.max_pool2d_with_indices.default)
def _max_pool2d(args, kwargs, targs, out):
    pooled, indices = out
    t = targs[0]
    # indices address the flattened H*W plane of each (sample, channel)
    gathered = t.flatten(-2).gather(-1, indices.flatten(-2)).view(pooled.shape)
    return gathered, None


@_rule(aten.native_layer_norm.default)
def _layer_norm(args, kwargs, targs, out):
    x, normalized_shape, weight = args[0], args[1], args[2]
    y, mean, rstd = out
    tx, tw, tb = targs[0], targs[2], targs[3]
    dims = tuple(range(-len(normalized_shape), 0))
    terms = []
    if tx is not None and not torch.is_grad_enabled():
        # the Jacobian of xhat = (x - mean) * rstd w.r.t. x, rstd (I - 11^T/n - xhat xhat^T/n), is symmetric: ATen's
        # fused layer-norm backward kernel (without the weight) applies it (a quarter of the time of the formula)
        txhat = aten.native_layer_norm_backward(tx, x, normalized_shape, mean, rstd, None, None,
                                                [True, False, False])[0]
        terms.append(txhat if weight is None else txhat * weight)
        tx = None
    if tx is not None or tw is not None:
        if torch.is_grad_enabled():
            # native_layer_norm's mean and rstd outputs are not differentiable: recompute them so that a recorded
            # pass (the exact Hessian product) sees how they depend on x
            eps = args[4]
            mean = x.mean(dims, keepdim=True)
            rstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
        xhat = (x - mean) * rstd
        if tx is not None:
            centred = tx - tx.mean(dims, keepdim=True)
            txhat = rstd * (centred - xhat * (xhat * centred).mean(dims, keepdim=True))
            terms.append(txhat if weight is None else txhat * weight)
        if tw is not None:
            terms.append(xhat * tw)
    if tb is not None:
        terms.append(tb.expand(y.shape))
    return _sum(*terms), None, None


@_rule(aten._native_batch_norm_legit_no_training.default)
def _batch_norm_eval(args, kwargs, targs, out):
    x, weight, bias, running_mean, running_var, momentum, eps = args
    y = out[0]
    shape = [1, -1] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(running_var + eps)
    terms = []
    if targs[0] is not None:
        terms.append(targs[0] * (scale if weight is None else scale * weight).view(shape))
    if targs[1] is not None:
        terms.append((x - running_mean.view(shape)) * (scale * targs[1]).view(shape))
    if targs[2] is not None:
        terms.append(targs[2].view(shape).expand(y.shape))
    return _sum(*terms), None, None


@_rule(aten.native_dropout.default)
def _dropout(args, kwargs, targs, out):
    _, mask = out
    p = args[1]
    return targs[0] * mask * (1.0 / (1.0 - p) if p < 1 else 0.0), None


# ---- the fallback ------------------------------------------------------------------------------------------------

def fallback(op: Any, args: tuple, kwargs: dict, targs: tuple, out: Any) -> Any:
    """torch.func.jvp of `op` alone, w.r.t. the tensor args that carry a tangent."""
    slots = [(i, j) for i, t in enumerate(targs) for j in _tangent_slots(t)]
    primals = tuple(_at(args, s) for s in slots)
    tangents = tuple(_at(targs, s) for s in slots)

    def call(*values):
        rebuilt = [list(a) if isinstance(a, (list, tuple)) else a for a in args]
        for (i, j), value in zip(slots, values):
            if j is None:
                rebuilt[i] = value
            else:
                rebuilt[i][j] = value
        return op(*rebuilt, **kwargs)

    _, tangent_out = torch.func.jvp(call, primals, tangents)
    return tangent_out


def _tangent_slots(t: Any) -> list:
    if isinstance(t, Tensor):
        return [None]
    if isinstance(t, (list, tuple)):
        return [j for j, u in enumerate(t) if isinstance(u, Tensor)]
    return []


def _at(values: tuple, slot: tuple) -> Any:
    i, j = slot
    return values[i] if j is None else values[i][j]


# Ops whose output tangent is zero whatever their inputs' tangents: piecewise constant, index-valued, fresh values,
# or detached (forward-mode AD drops a detached tensor's tangent too).
ZERO_TANGENT_OPS = {aten.detach.default, aten.sign.default, aten.floor.default, aten.ceil.default,
                    aten.round.default, aten.argmax.default, aten.argmin.default, aten.eq.Tensor, aten.eq.Scalar,
                    aten.gt.Scalar, aten.gt.Tensor, aten.lt.Scalar, aten.lt.Tensor, aten.ge.Scalar,
                    aten.le.Scalar, aten.ne.Scalar, aten.zeros_like.default, aten.ones_like.default,
                    aten.empty_like.default, aten.full_like.default}
