"""Typed, documented wrappers of torch.ops.weightshare.*, their fake (meta) kernels, and the reference fallback.

Every op runs on CPU and CUDA with one schema (csrc/ops.cpp). Inputs must be contiguous; bad input raises
TypeError (dtype), ValueError (shape, range, bad values) or RuntimeError (device mismatch) naming the argument.
Without the native library, the same calls run the pure-PyTorch reference (weightshare.reference).
"""
from __future__ import annotations

import math

from typing import Optional

import torch
from torch import Tensor

from weightshare import reference
from weightshare._native import NATIVE, has_kernel
from weightshare.formats import packed_row_bytes

__all__ = ["pack", "unpack", "assign", "kmeans_step", "loss_aware_assign", "kmeans1d_optimal", "dequantize",
           "shared_linear", "shared_conv2d", "sq_grad_accum", "context_encode", "context_decode"]


def _native(op: str, *tensors: Tensor) -> bool:
    t = tensors[0]
    return has_kernel(op, "cpu" if t.is_cpu else t.device.type)  # is_cpu: no device object per call


def _no_autograd_needed(*tensors: Optional[Tensor]) -> bool:
    """Whether a call of a differentiable op may go straight to its device kernel: no input asks for a gradient and
    no compiler or functorch transform is watching. Then the op's autograd kernel (torch.library's, in Python) would
    only redispatch, and skipping it saves about 5 us per call (measured on a 1x1 conv: 15.4 -> 10.2 us), which at
    batch 1 is 5-7 % of a depthwise layer."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active())


def pack(idx: Tensor, bits: int) -> Tensor:
    """Bit-pack uint8 indices [..., n] (each < 2**bits, bits 1..8) into uint8 [..., packed_row_bytes(n, bits)].

    Layout: weightshare.formats. Raises ValueError if an index does not fit in `bits`."""
    if _native("pack", idx):
        return torch.ops.weightshare.pack(idx, bits)
    return reference.pack(idx, bits)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of pack: uint8 [..., packed_row_bytes(n, bits)] -> uint8 indices [..., n], bit-exact."""
    if _native("unpack", packed):
        return torch.ops.weightshare.unpack(packed, bits, n)
    return reference.unpack(packed, bits, n)


def _as_2d(codebook: Tensor) -> Tensor:
    return codebook.unsqueeze(0) if codebook.dim() == 1 else codebook


def assign(w: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook entry for every weight (uint8, shaped like w).

    w: float32/float16/bfloat16 [R, ...]. codebook: [K] or [G, K] (any of the three float dtypes), K <= 256;
    G divides R and group g serves rows g*R/G .. (g+1)*R/G - 1 (G = 1: one codebook per layer, G = R: per row).
    Distances are compared in fp32 against midpoints between sorted entries; a weight exactly on a midpoint goes
    to the entry with the lower index, and duplicate entries resolve to their lowest index (exact rule:
    csrc/include/weightshare/search_table.h). +-Inf weights go to the largest/smallest entry. NaN weights and
    non-finite codebooks raise ValueError.

    Per-weight importance does not change the nearest entry (argmin_j h*(w-c_j)^2 = argmin_j (w-c_j)^2 for h > 0);
    it enters through kmeans_step (weighted centroids) and loss_aware_assign (curvature plus entry penalties)."""
    codebook = _as_2d(codebook)
    if _native("assign", w):
        return torch.ops.weightshare.assign(w, codebook)
    return reference.assign(w, codebook)


def kmeans_step(w: Tensor, idx: Tensor, k: int, importance: Optional[Tensor] = None, groups: int = 1):
    """Lloyd statistics of an assignment, per group g and entry j (float64 [G, k] each):

        sums[g, j] = sum h*w,   weights[g, j] = sum h,   sqsums[g, j] = sum h*w^2   over weights with idx == j

    with h = importance (or 1). The weighted centroid is sums / weights, and the weighted distortion of any
    codebook c under this assignment is sum_j (sqsums - 2*c*sums + c^2*weights). The CPU kernel is bit-identical
    for any thread count; the CUDA kernel uses float64 atomics (last-bit differences between runs)."""
    if _native("kmeans_step", w):
        return torch.ops.weightshare.kmeans_step(w, idx, k, importance, groups)
    return reference.kmeans_step(w, idx, k, importance, groups)


def loss_aware_assign(w: Tensor, grad: Optional[Tensor], hdiag: Tensor, codebook: Tensor,
                      penalty: Optional[Tensor] = None) -> Tensor:
    """Per weight, the entry minimising the second-order model of the loss change of moving w to it:

        grad*(c_j - w) + 0.5*hdiag*(c_j - w)^2 + penalty[g, j]

    evaluated in fp32 as ((0.5*hdiag*d + grad)*d) + penalty with d = c_j - w; ties go to the lowest index.
    grad None means 0; hdiag may be negative (then the far entries win, as the model says). penalty: [K] or
    [G, K], a per-entry cost (e.g. a size/entropy price); +inf forbids an entry. Non-finite w, grad or hdiag raise
    ValueError."""
    codebook = _as_2d(codebook)
    if penalty is not None:
        penalty = _as_2d(penalty).expand_as(codebook).contiguous()
    if _native("loss_aware_assign", w):
        return torch.ops.weightshare.loss_aware_assign(w, grad, hdiag, codebook, penalty)
    return reference.loss_aware_assign(w, grad, hdiag, codebook, penalty)


def kmeans1d_optimal(values: Tensor, weights: Tensor, k: int):
    """Exact weighted 1-D k-means over sorted distinct float64 values with float64 weights >= 0.

    Returns (centroids float64 [min(k, n)] ascending, optimal weighted squared error). Runs on the CPU
    (a sequential dynamic programme, O(k n log n)); CUDA inputs are moved there and the results moved back."""
    device = values.device
    values, weights = values.cpu(), weights.cpu()
    if _native("kmeans1d_optimal", values):
        c, cost = torch.ops.weightshare.kmeans1d_optimal(values, weights, k)
    else:
        c, cost = reference.kmeans1d_optimal(values, weights, k)
    return c.to(device), cost.to(device)


def dequantize(packed: Tensor, codebook: Tensor, bits: int, shape) -> Tensor:
    """Dense weight of `shape` (codebook's dtype) from packed indices [shape[0], packed_row_bytes(n, bits)],
    n = prod(shape[1:]), through codebook [G, K] (G divides shape[0], K <= 2**bits). Indices must be < K; an index
    >= K (only possible when K < 2**bits) reads NaN, so corrupt data shows instead of passing silently."""
    codebook = _as_2d(codebook)
    shape = [int(s) for s in shape]
    if _native("dequantize", packed):
        return torch.ops.weightshare.dequantize(packed, codebook, bits, shape)
    return reference.dequantize(packed, codebook, bits, shape)


def shared_linear(x: Tensor, packed: Tensor, codebook: Tensor, bits: int, out_features: int, in_features: int,
                  bias: Optional[Tensor] = None, activation: str = "float") -> Tensor:
    """y = x @ W^T + bias, W [out_features, in_features] read directly from its packed form (never materialised).

    x: [..., in_features] float32/float16/bfloat16; y has x's dtype. packed: [out_features,
    packed_row_bytes(in_features, bits)]; codebook: [K] or [G, K] (G divides out_features: 1 = per layer, or
    per output row), K <= 2**bits. activation="float": exact, fp32 accumulation. activation="int8": the fast CPU
    inference path: x quantized per row to symmetric int8, the codebook per group to int8 values (a 7-bit affine
    grid for K <= 16 entries, its step and phase chosen for a layer-wide codebook to minimise the residuals'
    spread under the layer's index frequencies; symmetric int8 above: reference.quantize_int8_codebook), exact
    integer dot products, plus a per-group zero point that cancels the codebook's rounding residuals against
    one-signed inputs such as ReLU outputs (reference.shared_linear and reference.int8_zero_points define it to the
    bit). Differentiable in x, codebook and bias (float formula; the int8 path's gradient is the float path's:
    straight-through)."""
    codebook = _as_2d(codebook)
    if _native("shared_linear", x):  # autograd in C++: no Python layer to skip
        return torch.ops.weightshare.shared_linear.default(x, packed, codebook, bits, out_features, in_features,
                                                           bias, activation)
    return _SharedLinearReference.apply(x, packed, codebook, bits, out_features, in_features, bias, activation)


def _pair(v):
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def shared_conv2d(x: Tensor, packed: Tensor, codebook: Tensor, bits: int, weight_shape, bias: Optional[Tensor] = None,
                  stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """F.conv2d with a shared weight of `weight_shape` [out, in/groups, kh, kw] given as packed indices
    [out, packed_row_bytes(in/groups*kh*kw, bits)] and codebook [K] or [G, K] (G divides out).

    Same semantics as F.conv2d (groups, depthwise, dilation, any padding/stride, channels-last input). The weight is
    decoded in cache-sized panels of output channels and convolved by the dense kernels (oneDNN/cuDNN): decoding
    costs O(weights), the conv O(weights x pixels). Differentiable in x, codebook and bias."""
    codebook = _as_2d(codebook)
    args = (x, packed, codebook, bits, [int(s) for s in weight_shape], bias, _pair(stride), _pair(padding),
            _pair(dilation), int(groups))
    if _native("shared_conv2d", x):
        if _no_autograd_needed(x, codebook, bias):
            with torch._C._AutoDispatchBelowAutograd():
                return torch.ops.weightshare.shared_conv2d(*args)
        return torch.ops.weightshare.shared_conv2d(*args)
    w = reference.dequantize(packed, codebook, bits, args[4])  # reference path: autograd through the indexing
    return torch.nn.functional.conv2d(x, w.to(x.dtype), bias, args[6], args[7], args[8], args[9])


def sq_grad_accum(x: Tensor, grad_out: Tensor) -> Tensor:
    """Sum over samples of the squared per-sample weight gradients of a Linear layer (its Fisher diagonal times
    N), float32 [O, I], never holding per-sample gradients for more than a bounded chunk of samples.

    x: the layer inputs [N, I] or [N, T, I]; grad_out: the per-sample loss gradients w.r.t. its outputs [N, O] or
    [N, T, O] (for a mean-reduced batch loss, multiply its output gradients by N first)."""
    if _native("sq_grad_accum", x):
        return torch.ops.weightshare.sq_grad_accum(x, grad_out)
    return reference.sq_grad_accum(x, grad_out)


def codebook_gradient(grad_weight: Tensor, packed: Tensor, bits: int, k: int, groups: int) -> Tensor:
    """Per codebook entry, the sum of dL/dW over the weights that use it ([G, k] float32): the gradient of a
    shared weight's codebook (Han et al.'s centroid fine-tuning), via kmeans_step's per-entry sums."""
    rows = grad_weight.shape[0]
    idx = unpack(packed, bits, grad_weight.numel() // rows)
    if k < (1 << bits):  # indices >= k credit nothing (they read NaN forward): mask them out of the sums
        keep = idx < k
        grad_weight = grad_weight.reshape(rows, -1) * keep
        idx = torch.where(keep, idx, torch.zeros_like(idx))
    sums, _, _ = kmeans_step(grad_weight.reshape(rows, -1).float().contiguous(), idx, k, None, groups)
    return sums.float()


class _SharedLinearReference(torch.autograd.Function):
    """Autograd for the reference path (no native library)."""

    @staticmethod
    def forward(ctx, x, packed, codebook, bits, out_features, in_features, bias, activation):
        ctx.save_for_backward(x, packed, codebook)
        ctx.meta = (bits, out_features, in_features, bias is not None)
        return reference.shared_linear(x, packed, codebook, bits, out_features, in_features, bias, activation)

    @staticmethod
    def backward(ctx, grad):
        x, packed, codebook = ctx.saved_tensors
        bits, out_f, in_f, has_bias = ctx.meta
        gx, gc = reference.shared_linear_backward(grad, x, packed, codebook, bits, out_f, in_f,
                                                  ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        gb = grad.reshape(-1, out_f).sum(0) if has_bias and ctx.needs_input_grad[6] else None
        return (gx if ctx.needs_input_grad[0] else None, None, gc.to(codebook.dtype) if ctx.needs_input_grad[2]
                else None, None, None, None, gb, None)


def context_encode(indices: Tensor, k: int) -> Tensor:
    """Losslessly code an index matrix [rows, cols] (uint8 on the CPU, each < k; rows = output units, cols =
    fan-in) into a uint8 stream with context-adaptive binary arithmetic coding: each weight's "is it the most
    frequent symbol?" flag is predicted from its left and upper neighbours and from how dense its row and column
    have been so far, then the other symbols are coded bit by bit with adaptive models (csrc/cpu/context_coder.cpp).
    Pruned layers, where dead columns and rows cluster the zeros, cost ~10-20 % fewer bytes than static rANS."""
    if _native("context_encode", indices):
        return torch.ops.weightshare.context_encode(indices, k)
    return reference.context_encode(indices, k)


def context_decode(stream: Tensor, rows: int, cols: int, k: int) -> Tensor:
    """Inverse of context_encode: uint8 indices [rows, cols]. A corrupt, truncated or padded stream raises
    ValueError (every decoded symbol is checked against k and the stream must be consumed exactly)."""
    if _native("context_decode", stream):
        return torch.ops.weightshare.context_decode(stream, rows, cols, k)
    return reference.context_decode(stream, rows, cols, k)


# ----------------------------------------------------------------------------------------------- fake kernels
if NATIVE:

    def _check(cond: bool, msg: str, exc=ValueError):
        if not cond:
            raise exc(f"weightshare: {msg}")

    def _rows(w: Tensor) -> int:
        return w.shape[0] if w.dim() >= 2 else 1

    @torch.library.register_fake("weightshare::pack")
    def _pack_fake(idx, bits):
        _check(1 <= bits <= 8, f"bits must be in 1..8, got {bits}")
        _check(idx.dtype == torch.uint8, f"idx must be uint8, got {idx.dtype}", TypeError)
        _check(idx.dim() >= 1, "idx must have at least one dimension")
        return idx.new_empty((*idx.shape[:-1], packed_row_bytes(idx.shape[-1], bits)))

    @torch.library.register_fake("weightshare::unpack")
    def _unpack_fake(packed, bits, n):
        _check(1 <= bits <= 8, f"bits must be in 1..8, got {bits}")
        _check(packed.dtype == torch.uint8, f"packed must be uint8, got {packed.dtype}", TypeError)
        _check(packed.dim() >= 1 and packed.shape[-1] == packed_row_bytes(n, bits),
               f"packed rows of {n} indices at {bits} bits must hold {packed_row_bytes(n, bits)} bytes")
        return packed.new_empty((*packed.shape[:-1], n))

    def _check_codebook(w, codebook):
        _check(w.dtype in reference._FLOATS, f"w must be float32, float16 or bfloat16, got {w.dtype}", TypeError)
        _check(codebook.dim() == 2 and 1 <= codebook.shape[1] <= 256, "codebook must be [G, K] with K in 1..256")
        _check(_rows(w) % codebook.shape[0] == 0, "codebook groups must divide the rows of w")

    @torch.library.register_fake("weightshare::assign")
    def _assign_fake(w, codebook):
        _check_codebook(w, codebook)
        return torch.empty_like(w, dtype=torch.uint8)

    @torch.library.register_fake("weightshare::kmeans_step")
    def _kmeans_step_fake(w, idx, k, importance=None, groups=1):
        _check(idx.shape == w.shape, "idx must have the shape of w")
        _check(1 <= k <= 256, f"k must be in 1..256, got {k}")
        _check(groups >= 1 and _rows(w) % groups == 0, "groups must divide the rows of w")
        return tuple(w.new_empty((groups, k), dtype=torch.float64) for _ in range(3))

    @torch.library.register_fake("weightshare::loss_aware_assign")
    def _loss_aware_assign_fake(w, grad, hdiag, codebook, penalty=None):
        _check_codebook(w, codebook)
        _check(hdiag.shape == w.shape and (grad is None or grad.shape == w.shape),
               "grad and hdiag must have the shape of w")
        _check(penalty is None or penalty.shape == codebook.shape, "penalty must have the shape of codebook")
        return torch.empty_like(w, dtype=torch.uint8)

    @torch.library.register_fake("weightshare::kmeans1d_optimal")
    def _kmeans1d_optimal_fake(values, weights, k):
        _check(values.dim() == 1 and values.shape == weights.shape, "values and weights must be 1-D, equal length")
        m = min(k, values.shape[0])
        return values.new_empty((m,)), values.new_empty(())

    @torch.library.register_fake("weightshare::context_encode")
    def _context_encode_fake(indices, k):
        _check(indices.dtype == torch.uint8, f"indices must be uint8, got {indices.dtype}", TypeError)
        _check(indices.dim() == 2 and 1 <= k <= 256, "indices must be 2-D [rows, cols] and k in 1..256")
        # the stream's length depends on the data: an unbacked size
        return indices.new_empty((torch.library.get_ctx().new_dynamic_size(),))

    @torch.library.register_fake("weightshare::context_decode")
    def _context_decode_fake(stream, rows, cols, k):
        _check(stream.dtype == torch.uint8, f"stream must be uint8, got {stream.dtype}", TypeError)
        _check(stream.dim() == 1 and rows >= 0 and cols >= 0 and 1 <= k <= 256,
               "stream must be 1-D, rows and cols >= 0, k in 1..256")
        return stream.new_empty((rows, cols))

    @torch.library.register_fake("weightshare::dequantize")
    def _dequantize_fake(packed, codebook, bits, shape):
        _check(1 <= bits <= 8, f"bits must be in 1..8, got {bits}")
        _check(codebook.dim() == 2 and codebook.shape[1] <= (1 << bits), "codebook must be [G, K], K <= 2**bits")
        n = 1
        for d in shape[1:]:
            n *= d
        _check(packed.shape == (shape[0], packed_row_bytes(n, bits)), "packed does not match shape")
        return packed.new_empty(shape, dtype=codebook.dtype)

    def _check_linear(x, packed, codebook, bits, out_features, in_features):
        _check(x.dtype in reference._FLOATS, f"x must be float32, float16 or bfloat16, got {x.dtype}", TypeError)
        _check(x.shape[-1] == in_features, f"x must be [..., in_features={in_features}]")
        _check(packed.shape == (out_features, packed_row_bytes(in_features, bits)),
               f"packed must be [{out_features}, {packed_row_bytes(in_features, bits)}]")
        _check(codebook.dim() == 2 and codebook.shape[1] <= (1 << bits) and out_features % codebook.shape[0] == 0,
               "codebook must be [G, K] with G dividing out_features and K <= 2**bits")

    @torch.library.register_fake("weightshare::shared_linear")
    def _shared_linear_fake(x, packed, codebook, bits, out_features, in_features, bias=None, activation="float"):
        _check_linear(x, packed, codebook, bits, out_features, in_features)
        _check(activation in ("float", "int8"), f"activation must be 'float' or 'int8', got {activation!r}")
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("weightshare::shared_linear_backward")
    def _shared_linear_backward_fake(grad_out, x, packed, codebook, bits, out_features, in_features, need_x_grad,
                                     need_codebook_grad):
        _check_linear(x, packed, codebook, bits, out_features, in_features)
        gx = x.new_empty(x.shape) if need_x_grad else x.new_empty(0)
        gc = codebook.new_empty(codebook.shape, dtype=torch.float32) if need_codebook_grad else \
            codebook.new_empty(0, dtype=torch.float32)
        return gx, gc

    # shared_linear's autograd is C++ (csrc/shared_linear_autograd.cpp): the Python layer cost ~4 us per call.

    # The backward op is itself differentiable (double backward through a shared layer: Hessian-vector products of
    # a compressed model, gradient penalties). With W decoded from (packed, codebook):
    #   gx = grad_out @ W is linear in grad_out and in the codebook;
    #   gc[g, j] = sum over the weights of entry j in group g of (grad_out^T x) is bilinear in grad_out and x.
    # Every derivative is again one of the two ops, with the upstream gradient of gc standing in as a codebook.
    def _shared_linear_backward_setup(ctx, inputs, output):
        grad_out, x, packed, codebook, bits, out_features, in_features, need_x, need_c = inputs
        ctx.save_for_backward(grad_out, x, packed, codebook)
        ctx.meta = (bits, out_features, in_features, need_x, need_c)

    def _shared_linear_double_backward(ctx, ggx, ggc):
        grad_out, x, packed, codebook = ctx.saved_tensors
        bits, out_f, in_f, need_x, need_c = ctx.meta
        W = torch.ops.weightshare
        g_grad_out = g_x = g_codebook = None

        def add(total, term):
            return term if total is None else total + term
        if need_x and ggx is not None and ggx.numel():
            if ctx.needs_input_grad[0]:
                g_grad_out = add(g_grad_out, W.shared_linear(ggx.contiguous(), packed, codebook, bits, out_f, in_f))
            if ctx.needs_input_grad[3]:
                _, gc = W.shared_linear_backward(grad_out, ggx.contiguous(), packed, codebook, bits, out_f, in_f,
                                                 False, True)
                g_codebook = add(g_codebook, gc.to(codebook.dtype))
        if need_c and ggc is not None and ggc.numel():
            as_codebook = ggc.to(torch.float32).contiguous()
            if ctx.needs_input_grad[0]:
                g_grad_out = add(g_grad_out, W.shared_linear(x, packed, as_codebook, bits, out_f, in_f))
            if ctx.needs_input_grad[1]:
                gx, _ = W.shared_linear_backward(grad_out, x, packed, as_codebook, bits, out_f, in_f, True, False)
                g_x = add(g_x, gx)
        if g_grad_out is not None:
            g_grad_out = g_grad_out.to(grad_out.dtype)
        if g_x is not None:
            g_x = g_x.to(x.dtype)
        return g_grad_out, g_x, None, g_codebook, None, None, None, None, None

    torch.library.register_autograd("weightshare::shared_linear_backward", _shared_linear_double_backward,
                                    setup_context=_shared_linear_backward_setup)

    @torch.library.register_fake("weightshare::shared_conv2d")
    def _shared_conv2d_fake(x, packed, codebook, bits, weight_shape, bias=None, stride=(1, 1), padding=(0, 0),
                            dilation=(1, 1), groups=1):
        _check(x.dtype in reference._FLOATS, f"x must be float32, float16 or bfloat16, got {x.dtype}", TypeError)
        _check(len(weight_shape) == 4 and x.dim() in (3, 4), "x must be [N, C, H, W] and weight_shape 4-D")
        w = x.new_empty(weight_shape)
        return torch.nn.functional.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride, padding,
                                          dilation, groups)

    def _shared_conv2d_setup(ctx, inputs, output):
        x, packed, codebook, bits, weight_shape, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, packed, codebook)
        ctx.meta = (bits, list(weight_shape), bias is not None, list(stride), list(padding), list(dilation), groups)

    def _shared_conv2d_backward(ctx, grad):
        x, packed, codebook = ctx.saved_tensors
        bits, wshape, has_bias, stride, padding, dilation, groups = ctx.meta
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], has_bias and ctx.needs_input_grad[5]]
        if torch.is_grad_enabled():
            # create_graph=True (double backward): the same backward in differentiable torch ops; the weight is
            # gathered from the codebook and the codebook gradient is an index_add, so autograd sees through both
            return _shared_conv2d_backward_differentiable(grad, x, packed, codebook, bits, wshape, stride, padding,
                                                          dilation, groups, need)
        w = dequantize(packed, codebook, bits, wshape).to(x.dtype)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, w, [wshape[0]] if has_bias else None, stride, padding, dilation, False, [0, 0], groups, need)
        gc = codebook_gradient(gw, packed, bits, codebook.shape[1], codebook.shape[0]).to(codebook.dtype) \
            if need[1] else None
        return gx if need[0] else None, None, gc, None, None, gb if need[2] else None, None, None, None, None

    def _shared_conv2d_backward_differentiable(grad, x, packed, codebook, bits, wshape, stride, padding, dilation,
                                               groups, need):
        rows, cols = wshape[0], math.prod(wshape[1:])
        g, k = codebook.shape
        idx = unpack(packed, bits, cols).long()
        keep = idx < k  # indices >= k read NaN forward and credit nothing backward (as codebook_gradient)
        slot = (torch.arange(rows, device=idx.device) // (rows // g))[:, None] * k + torch.where(keep, idx, 0)
        w = (codebook.reshape(-1)[slot] * keep).reshape(wshape).to(x.dtype)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, w, [wshape[0]] if need[2] else None, stride, padding, dilation, False, [0, 0], groups, need)
        gc = None
        if need[1]:
            credited = (gw.reshape(rows, cols).float() * keep).reshape(-1)
            gc = torch.zeros(g * k, dtype=torch.float32, device=gw.device).index_add(0, slot.reshape(-1), credited)
            gc = gc.reshape(g, k).to(codebook.dtype)
        return gx if need[0] else None, None, gc, None, None, gb if need[2] else None, None, None, None, None

    torch.library.register_autograd("weightshare::shared_conv2d", _shared_conv2d_backward,
                                    setup_context=_shared_conv2d_setup)

    @torch.library.register_fake("weightshare::sq_grad_accum")
    def _sq_grad_accum_fake(x, grad_out):
        _check(x.dim() in (2, 3) and grad_out.dim() == x.dim(), "x and grad_out must be [N, F] or [N, T, F]")
        return x.new_empty((grad_out.shape[-1], x.shape[-1]), dtype=torch.float32)
