"""Slow, obviously-correct PyTorch versions of every op. Tests compare the kernels against these, and ws.ops
falls back to them when the native library is missing. They follow the exact definitions in the op docs
(including fp32 rounding order), so kernel and reference agree bit for bit where the docs say so."""
from __future__ import annotations

import torch
from torch import Tensor

from weightshare.formats import packed_row_bytes
# the index coder's reference (its own model and arithmetic coder), re-exported with the other ops' references
from weightshare.reference_context import _ctx_encode_mode, context_decode, context_encode  # noqa: F401

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------- packing
def pack(idx: Tensor, bits: int) -> Tensor:
    n = idx.shape[-1]
    if int(idx.max()) >= (1 << bits):
        raise ValueError(f"weightshare: idx holds a value >= 2**bits = {1 << bits}")
    v = idx.to(torch.int64)
    stream = ((v[..., None] >> torch.arange(bits, device=idx.device)) & 1).reshape(*idx.shape[:-1], n * bits)
    total = packed_row_bytes(n, bits) * 8
    stream = torch.nn.functional.pad(stream, (0, total - n * bits))
    weights = 1 << torch.arange(8, device=idx.device)
    return (stream.reshape(*idx.shape[:-1], total // 8, 8) * weights).sum(-1).to(torch.uint8)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    if packed.shape[-1] != packed_row_bytes(n, bits):
        raise ValueError(f"weightshare: packed rows of {n} indices at {bits} bits must hold "
                         f"{packed_row_bytes(n, bits)} bytes, got {packed.shape[-1]}")
    stream = (packed.to(torch.int64)[..., None] >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(*packed.shape[:-1], -1)[..., : n * bits].reshape(*packed.shape[:-1], n, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(-1).to(torch.uint8)


# ----------------------------------------------------------------------------------------------- assignment
def _float_below(x: Tensor) -> Tensor:
    """The largest float32 strictly below each finite x (mirror of float_below in search_table.h)."""
    b = x.view(torch.int32)
    below = torch.where(x > 0, b - 1, b + 1)
    below = torch.where(x == 0, torch.full_like(b, -2147483647), below)  # 0x80000001: -smallest denormal
    return below.view(torch.float32)


def search_table(c: Tensor) -> tuple[Tensor, Tensor]:
    """(thresholds, order) of one group's fp32 codebook, exactly as build_search_table in search_table.h."""
    if not torch.isfinite(c).all():
        raise ValueError("weightshare: codebook contains NaN or Inf; codebook entries must be finite")
    vals, perm = torch.sort(c, stable=True)
    keep = torch.ones_like(vals, dtype=torch.bool)
    keep[1:] = vals[1:] != vals[:-1]
    vals, order = vals[keep], perm[keep]  # stable sort: the first of equal values has the lowest index
    a, b = vals[:-1], vals[1:]
    t = 0.5 * a + 0.5 * b
    t = torch.where(order[1:] < order[:-1], _float_below(t), t)
    t = torch.minimum(torch.maximum(t, a), _float_below(b))
    return t, order


def _groups(w: Tensor, G: int) -> Tensor:
    rows = w.shape[0] if w.dim() >= 2 else 1
    if rows % G:
        raise ValueError(f"weightshare: {G} groups must divide the {rows} rows of w")
    return w.reshape(G, -1)


def assign(w: Tensor, codebook: Tensor) -> Tensor:
    x = _groups(w.float(), codebook.shape[0])
    if torch.isnan(x).any():
        raise ValueError("weightshare: w contains NaN; NaN weights have no nearest codebook entry")
    out = torch.empty(x.shape, dtype=torch.uint8, device=w.device)
    for g in range(x.shape[0]):
        t, order = search_table(codebook[g].float())
        for s in range(0, x.shape[1], 1 << 16):  # bounded memory
            xs = x[g, s : s + (1 << 16)]
            pos = (t[None, :] < xs[:, None]).sum(1)
            out[g, s : s + (1 << 16)] = order[pos].to(torch.uint8)
    return out.reshape(w.shape)


def kmeans_step(w: Tensor, idx: Tensor, k: int, importance: Tensor | None = None, groups: int = 1):
    x = _groups(w.double(), groups)
    ix = _groups(idx, groups).long()
    if int(ix.max()) >= k:
        raise ValueError(f"weightshare: idx holds a value >= k = {k}")
    h = torch.ones_like(x) if importance is None else _groups(importance.double(), groups)
    flat = ix + torch.arange(groups, device=w.device)[:, None] * k
    out = []
    for v in (h * x, h, h * x * x):
        out.append(torch.zeros(groups * k, dtype=torch.float64, device=w.device)
                   .index_add_(0, flat.reshape(-1), v.reshape(-1)).reshape(groups, k))
    return tuple(out)


def loss_aware_assign(w: Tensor, grad: Tensor | None, hdiag: Tensor, codebook: Tensor,
                      penalty: Tensor | None = None) -> Tensor:
    G, K = codebook.shape
    x = _groups(w.float(), G)
    g = torch.zeros_like(x) if grad is None else _groups(grad.float(), G)
    hh = 0.5 * _groups(hdiag.float(), G)
    c = codebook.float()
    p = torch.zeros_like(c) if penalty is None else penalty.float()
    if not (torch.isfinite(x).all() and torch.isfinite(g).all() and torch.isfinite(hh).all()):
        raise ValueError("weightshare: w, grad or hdiag contains NaN or Inf")
    out = torch.empty(x.shape, dtype=torch.uint8, device=w.device)
    for s in range(0, x.shape[1], 1 << 14):
        sl = slice(s, s + (1 << 14))
        d = c[:, None, :] - x[:, sl, None]  # same fp32 rounding order as the kernels: ((hh*d + g)*d) + p
        obj = (hh[:, sl, None] * d + g[:, sl, None]) * d + p[:, None, :]
        out[:, sl] = obj.argmin(-1).to(torch.uint8)  # argmin returns the first minimum: ties -> lowest index
    return out.reshape(w.shape)


# ----------------------------------------------------------------------------------------------- 1-D k-means
def kmeans1d_optimal(values: Tensor, weights: Tensor, k: int):
    """O(k n^2) dynamic programme: the definition the O(k n log n) kernel must match (small n only)."""
    x = values.double().tolist()
    wt = weights.double().tolist()
    n = len(x)
    m = min(k, n)
    W = [0.0] * (n + 1)
    S = [0.0] * (n + 1)
    Q = [0.0] * (n + 1)
    for i in range(n):
        W[i + 1] = W[i] + wt[i]
        S[i + 1] = S[i] + wt[i] * x[i]
        Q[i + 1] = Q[i] + wt[i] * x[i] * x[i]

    def cost(i, j):
        ws = W[j + 1] - W[i]
        if ws <= 0:
            return 0.0
        s = S[j + 1] - S[i]
        return max(0.0, Q[j + 1] - Q[i] - s * s / ws)

    inf = float("inf")
    D = [[inf] * n for _ in range(m)]
    A = [[0] * n for _ in range(m)]
    for j in range(n):
        D[0][j] = cost(0, j)
    for layer in range(1, m):
        for j in range(layer, n):
            for i in range(layer, j + 1):
                v = D[layer - 1][i - 1] + cost(i, j)
                if v < D[layer][j]:
                    D[layer][j], A[layer][j] = v, i
    cents = [0.0] * m
    end = n - 1
    for layer in range(m - 1, -1, -1):
        start = 0 if layer == 0 else A[layer][end]
        ws = W[end + 1] - W[start]
        cents[layer] = (S[end + 1] - S[start]) / ws if ws > 0 else x[(start + end) // 2]
        end = start - 1
    return torch.tensor(cents, dtype=torch.float64), torch.tensor(D[m - 1][n - 1], dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- shared weights
def dequantize(packed: Tensor, codebook: Tensor, bits: int, shape) -> Tensor:
    """Dense weight of `shape` from packed indices; indices >= K read NaN (documented in ops.dequantize)."""
    rows = shape[0]
    n = 1
    for s in shape[1:]:
        n *= s
    idx = unpack(packed, bits, n).long()  # [rows, n]
    G, K = codebook.shape
    table = torch.full((G, 1 << bits), float("nan"), dtype=torch.float32, device=codebook.device)
    table[:, :K] = codebook.float()
    groups = torch.arange(rows, device=packed.device) // (rows // G)
    return table[groups[:, None], idx].to(codebook.dtype).reshape(shape)


def quantize_int8_symmetric(t: Tensor, dim: int = -1):
    """Per-slice symmetric int8: scale = max|t| / 127 (1 where the slice is all zero, NaN where it holds NaN or
    Inf: those outputs are NaN), q = round(t / scale)."""
    t = t.float()
    scale = t.abs().amax(dim, keepdim=True) / 127
    finite = torch.isfinite(t).all(dim, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    q = torch.nan_to_num(torch.round(t / scale), nan=0.0).clamp_(-127, 127)  # NaN rows: q is irrelevant
    return q, scale


# Codebooks of at most this many entries are quantized to 7-bit affine tables (quantize_int8_codebook).
INT8_AFFINE_MAX_K = 16


# The affine grid's search (quantize_int8_codebook): 32 phases a step, on each of 8 candidate steps.
INT8_PHASES = 32
INT8_STEPS = 8


def quantize_int8_codebook(codebook: Tensor, weights: Tensor | None = None):
    """The int8 path's codebook, per group (row of codebook [G, K]): integer values q [G, K] and scale [G, 1],
    with codebook ~ scale * q + (a per-group constant, which the zero point carries). Returns (q, scale, offset),
    offset [G, 1] (integer-valued fp32).

    K > 16: symmetric int8 (quantize_int8_symmetric), offset 128.
    K <= 16: a 7-bit affine grid with a searched step and phase. Over [lo, hi] = [min(c, 0), max(c, 0)], candidate
    steps s_t = hi / (126 - t) - lo / (126 - t) for t < 8 (fp32; 1 for an all-zero group; NaN where it holds NaN or
    Inf: then q 0, offset 0). On step s each entry's position on a sub-grid of 1/32 step is a = rint(32 * (c / s)), and
    the grid points sit at s * (q + p / 32) for a phase p in [-16, 16): q = floor((a - p + 16) / 32), the sub-grid
    residual d = a - p - 32 q in [-16, 16). With `weights` (the index frequencies as integers, int8_zero_weights; W
    their sum) each step's phase is the first minimum of the residuals' weighted variance
    F = W * sum w d^2 - (sum w d)^2 (exact in int64) over p = 0, 1, ..., 15, -16, ..., -1, and the step is the first
    minimum over t = 0..7 of fp64(fp64(s_t * s_t) * F) (the variance in absolute units, times 1024 W^2); without
    weights t = 0, p = 0. offset = min(-min(q, 0), 127), q clamped to [-offset, 127 - offset] (a no-op: a span of at
    most 126 steps keeps q within 127 values).

    Why: q + offset is an unsigned 7-bit table, which an AVX2 CPU without VNNI multiplies with signed int8 x in one
    vpmaddubsw (pairs stay within int16) where the symmetric table needs a sign transfer per 32 weights and row of x
    (session 14, 4096x4096 4 bits: batch 1 ~10 %, 2-4 rows ~20 % faster). That grid's step is about twice the
    symmetric one's on a codebook of both signs. The zero point (int8_zero_points) adds the residuals' weighted mean
    back, so the grid need not hold 0: only the residuals' spread around that mean is error, and a 16-entry
    codebook's residuals are a few values, not uniform noise: the step and phase that bunch them (weighted by use)
    bring the 4-bit error on zero-mean x from 0.74x to 0.60x torch's int8 Linear (median of 8 layers), 3 bits from
    0.60x to 0.54x, the worst 2-4-bit cell from 1.08x to 0.90x (benchmarks/bench_int8_accuracy.py). On the MNIST
    demo's models (benchmarks/bench_int8_models.py) the logits error moved from 0.51-0.93x to 0.38-0.54x torch's on
    five of the six with such codebooks, but from 0.87x to 1.26x on LeNet-300-100 qat+prune: its first layer reads
    raw pixels, whose fixed structure the index frequencies do not see. Only a layer-wide
    codebook (G = 1) is searched (shared_linear passes no weights otherwise): the 256 candidates cost ~0.3 us a
    codebook with AVX2, more than a call's work per group of rows for codebooks per row or per few rows."""
    c = codebook.float()
    G, K = c.shape
    if K > INT8_AFFINE_MAX_K:
        q, scale = quantize_int8_symmetric(c, dim=1)
        return q, scale, torch.full_like(scale, 128)
    lo = c.amin(1, keepdim=True).clamp(max=0.0)
    hi = c.amax(1, keepdim=True).clamp(min=0.0)
    finite = torch.isfinite(c).all(1, keepdim=True)
    cf = torch.where(finite, c, torch.zeros_like(c))
    half = INT8_PHASES // 2

    def step(t):  # not (hi - lo) / (126 - t): that overflows where |c| > 1.7e38
        s = hi / (126 - t) - lo / (126 - t)
        return torch.where(s > 0, s, torch.ones_like(s))

    def positions(s):  # |a| <= 126 * 32 + 1
        return torch.round(cf / s * INT8_PHASES).long()

    scale, phase = step(0), torch.zeros(G, 1, dtype=torch.long, device=c.device)
    if weights is not None:
        w = weights[:K].long().to(c.device)[None, :]
        W = int(w.sum())
        order = torch.tensor(list(range(half)) + list(range(-half, 0)), device=c.device)
        best_obj = torch.full((G, 1), float("inf"), dtype=torch.float64, device=c.device)
        for t in range(INT8_STEPS):
            s, objective = step(t), []
            a = positions(s)
            for p in order.tolist():
                u = a - p + half
                d = u - INT8_PHASES * torch.div(u, INT8_PHASES, rounding_mode="floor") - half
                s1, s2 = (w * d).sum(1), (w * d * d).sum(1)
                objective.append(W * s2 - s1 * s1)
            F, j = torch.stack(objective, 1).min(1, keepdim=True)  # the first minimum
            obj = (s.double() * s.double()) * F.double()
            better = obj < best_obj  # strict: the first minimum over t
            best_obj = torch.where(better, obj, best_obj)
            scale = torch.where(better, s, scale)
            phase = torch.where(better, order[j], phase)
    q = torch.div(positions(scale) - phase + half, INT8_PHASES, rounding_mode="floor")
    offset = (-q.amin(1, keepdim=True).clamp(max=0)).clamp(max=127)
    q = torch.minimum(torch.maximum(q, -offset), 127 - offset)
    q = torch.where(finite, q, torch.zeros_like(q))
    offset = torch.where(finite, offset, torch.zeros_like(offset))
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return q.float(), scale, offset.float()


# Indices counted for the int8 zero points: whole rows spread evenly over the layer, about this many in all.
INT8_SAMPLE_TARGET = 8192
INT8_SAMPLE_MAX_COLS = 1 << 20  # of each sampled row: bounds the sampling work on very long rows


def int8_sample_rows(out_features: int, in_features: int) -> tuple[list[int], int]:
    """The rows (and the columns [0, cols) of each) whose indices weigh the int8 zero points."""
    cols = min(in_features, INT8_SAMPLE_MAX_COLS)
    n = min(out_features, max(1, -(-INT8_SAMPLE_TARGET // cols)))
    return [i * out_features // n for i in range(n)], cols


def int8_zero_weights(counts: Tensor, K: int) -> Tensor:
    """Index frequencies as integer weights summing to about 2**14: w_k = round(2**14 * count_k / total) (half up),
    k < K (indices >= K are corrupt data: not counted). All zero when nothing is counted."""
    counts = counts[:K].long()
    total = int(counts.sum())
    if total == 0:
        return torch.zeros(K, dtype=torch.long, device=counts.device)
    return (counts * (2 << 14) + total) // (2 * total)


def int8_index_weights(packed: Tensor, bits: int, K: int, out_features: int, in_features: int) -> Tensor:
    """The layer's index frequencies over int8_sample_rows, as int8_zero_weights ([K] int64): what weighs the int8
    codebook's grid search (quantize_int8_codebook) and its zero points (int8_zero_points)."""
    rows, cols = int8_sample_rows(out_features, in_features)
    idx = unpack(packed[rows], bits, in_features)[:, :cols].long().flatten()
    return int8_zero_weights(torch.bincount(idx, minlength=1 << bits), K)


def int8_zero_points(packed: Tensor, codebook: Tensor, cq: Tensor, scale: Tensor, bits: int, out_features: int,
                     in_features: int) -> Tensor:
    """Per group, the frequency-weighted mean of the codebook's int8 rounding residuals c - scale * q (fp32 [G]).

    Why: every weight with index k carries the same residual, so against one-signed activations (after ReLU or GELU,
    mean mu) the residuals add up coherently, mu * sum_k n_k * residual_k, where torch's per-weight rounding errors
    add up like noise; on 4096-wide layers with k-means codebooks that made the int8 error up to 1.5-4.2x torch's
    int8 Linear. Adding z * sum(x) (z the residuals' mean weighted by how often each index occurs) cancels that sum;
    what is left is zero-mean across rows. The frequencies are index counts over a fixed sample of rows
    (int8_sample_rows), as integer weights (int8_zero_weights). So that every implementation gets the same bits in
    any order, the sum is an integer: residual r_k = fp32(c_k - q_k * scale) (one rounding: an fma), on the grid
    g_k = rint(r_k * 2**(15 - e)) (scale in [2**(e-1), 2**e); |r_k| is at most half a step plus the grid's phase, half
    a step, and the sub-grid's rounding, 1/64 step, so |g_k| < 1.02 * 2**15), S = sum_k w_k * g_k (|S| < 2**30),
    z = fp32(S * 2**(e - 29)). A non-finite scale (the codebook holds NaN or Inf; the output is NaN anyway): NaN."""
    G, K = codebook.shape
    w = int8_index_weights(packed, bits, K, out_features, in_features).to(codebook.device)
    s = scale.reshape(G, 1).double()
    finite = torch.isfinite(s)
    s_ok = torch.where(finite, s, torch.ones_like(s))
    r = (codebook.float().double() - cq.double() * s_ok).float()  # [G, K]: the exact value, rounded once
    e = torch.frexp(s_ok)[1].long()  # s in [2**(e-1), 2**e)
    g = torch.round(r.double() * torch.pow(2.0, (15 - e).double())).long()  # a power of two: exact scaling
    S = (g * w[None, :]).sum(1, keepdim=True)
    z = (S.double() * torch.pow(2.0, (e - 29).double())).float()
    return torch.where(finite, z, torch.full_like(z, float("nan"))).reshape(G)


def shared_linear(x: Tensor, packed: Tensor, codebook: Tensor, bits: int, out_features: int, in_features: int,
                  bias: Tensor | None = None, activation: str = "float") -> Tensor:
    """The definition the kernels follow. float: fp32 x @ W^T (+ bias), W the codebook's values (on CUDA, 16-bit x
    through the panel and tensor-core paths rounds W to x's dtype first, as a dense fp16/bf16 layer holds its
    weights; the fp32-table GEMV of few rows does not). int8: activations per row quantized to
    symmetric int8, the codebook per group to integers (quantize_int8_codebook: a 7-bit affine grid for K <= 16,
    its step and phase searched for a layer-wide codebook; symmetric int8 above), exact integer dot products, then
    in fp32 y = (acc * (scale_x * scale_w) + (scale_x * z) * sum(x_q)) + bias, z the group's int8 zero point
    (int8_zero_points)."""
    x2 = x.reshape(-1, in_features)
    if activation == "float":
        w = dequantize(packed, codebook, bits, (out_features, in_features)).float()
        y = x2.float() @ w.T
        if bias is not None:
            y = y + bias.float()
    elif activation == "int8":
        G, K = codebook.shape
        # the grid's step and phase are searched for a layer-wide codebook (quantize_int8_codebook says why)
        weights = int8_index_weights(packed, bits, K, out_features, in_features) if G == 1 else None
        cq, sw, _ = quantize_int8_codebook(codebook, weights)  # [G, K], [G, 1]
        table = torch.zeros(G, 1 << bits)
        table[:, :K] = cq
        idx = unpack(packed, bits, in_features).long()
        groups = torch.arange(out_features) // (out_features // G)
        wq = table[groups[:, None], idx].long()  # [out, in]
        xq, sx = quantize_int8_symmetric(x2, dim=1)  # [M, in], [M, 1]
        acc = (xq.long() @ wq.T).float()
        z = int8_zero_points(packed, codebook, cq, sw, bits, out_features, in_features)  # [G]
        y = acc * (sx * sw[groups, 0][None, :])
        y = y + (sx * z[groups][None, :]) * xq.long().sum(1, keepdim=True).float()
        if bias is not None:
            y = y + bias.float()
    else:
        raise ValueError(f"weightshare: activation must be 'float' or 'int8', got {activation!r}")
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def shared_linear_backward(grad_out: Tensor, x: Tensor, packed: Tensor, codebook: Tensor, bits: int,
                           out_features: int, in_features: int, need_x_grad: bool, need_codebook_grad: bool):
    g2 = grad_out.reshape(-1, out_features).float()
    x2 = x.reshape(-1, in_features).float()
    w = dequantize(packed, codebook, bits, (out_features, in_features)).float()
    gx = (g2 @ w).to(x.dtype).reshape(x.shape) if need_x_grad else x.new_empty(0)
    if need_codebook_grad:
        G, K = codebook.shape
        gw = g2.T @ x2  # [out, in]
        idx = unpack(packed, bits, in_features).long()
        groups = torch.arange(out_features, device=x.device) // (out_features // G)
        valid = (idx < K).reshape(-1)  # an index >= K has no entry to credit
        flat = (groups[:, None] * K + idx).reshape(-1)[valid]
        gc = torch.zeros(G * K, dtype=torch.float32, device=x.device).index_add_(0, flat, gw.reshape(-1)[valid])
        gc = gc.reshape(G, K)
    else:
        gc = codebook.new_empty(0, dtype=torch.float32)
    return gx, gc


# ----------------------------------------------------------------------------------------------- curvature
def sq_grad_accum(x: Tensor, grad_out: Tensor) -> Tensor:
    """sum_n (per-sample weight gradient)^2 with the per-sample gradients written out (float64 inside)."""
    x3 = x.double() if x.dim() == 3 else x.double()[:, None]
    g3 = grad_out.double() if grad_out.dim() == 3 else grad_out.double()[:, None]
    per_sample = torch.einsum("nto,nti->noi", g3, x3)
    return per_sample.square().sum(0).float()
