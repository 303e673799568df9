"""1-D (scalar) k-means for weight sharing: Lloyd iterations on the assign/kmeans_step kernels, and the exact
optimum by dynamic programming (kmeans1d_optimal) over distinct values or a fine histogram.

Both accept per-weight importance h >= 0 (e.g. a Fisher or Hessian diagonal: Choi et al.'s Hessian-weighted
k-means) and per-group codebooks (groups = 1: one codebook per layer; groups = rows: one per output row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from weightshare import ops


@dataclass
class KMeansResult:
    codebook: Tensor    # float32 [G, k], ascending per group
    idx: Tensor         # uint8, shaped like w: the nearest-entry assignment under `codebook`
    distortion: Tensor  # float64 [G]: sum h * (w - codebook[idx])^2
    iterations: int     # assignment passes over the weights


def _validate(w: Tensor, k: int, importance: Optional[Tensor], groups: int) -> None:
    if not isinstance(w, Tensor) or w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"weightshare.kmeans: w must be a float32/float16/bfloat16 tensor, got "
                        f"{getattr(w, 'dtype', type(w))}")
    if w.numel() == 0:
        raise ValueError("weightshare.kmeans: w is empty")
    if not 1 <= k <= 256:
        raise ValueError(f"weightshare.kmeans: k must be in 1..256, got {k}")
    rows = w.shape[0] if w.dim() >= 2 else 1
    if groups < 1 or rows % groups:
        raise ValueError(f"weightshare.kmeans: groups={groups} must divide the {rows} rows of w")
    if importance is not None:
        if importance.shape != w.shape:
            raise ValueError(f"weightshare.kmeans: importance must have the shape of w {tuple(w.shape)}, "
                             f"got {tuple(importance.shape)}")
        if not torch.isfinite(importance).all() or (importance < 0).any():
            raise ValueError("weightshare.kmeans: importance must be finite and >= 0")
    if not torch.isfinite(w).all():
        raise ValueError("weightshare.kmeans: w contains NaN or Inf")


def _weighted_histogram(x: Tensor, h: Optional[Tensor], bins: int):
    """Per group (rows of x [G, S]): bin weights, bin weighted sums and the bin range, float64."""
    G = x.shape[0]
    lo = x.amin(1, keepdim=True)
    hi = x.amax(1, keepdim=True)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    b = ((x - lo) / span * bins).long().clamp_(0, bins - 1) + torch.arange(G, device=x.device)[:, None] * bins
    hw = torch.ones_like(x, dtype=torch.float64) if h is None else h.double()
    weight = torch.bincount(b.reshape(-1), weights=hw.reshape(-1), minlength=G * bins).reshape(G, bins)
    wsum = torch.bincount(b.reshape(-1), weights=(hw * x.double()).reshape(-1), minlength=G * bins).reshape(G, bins)
    return weight, wsum, lo, span


def init_codebook(w: Tensor, k: int, init: str = "linear", importance: Optional[Tensor] = None, groups: int = 1,
                  seed: int = 0) -> Tensor:
    """Initial codebook [G, k] float32.

    linear: evenly spaced over [min, max] (Deep Compression's choice: keeps the rare large weights).
    quantile: at the (j + 1/2)/k weighted quantiles (from a 4096-bin histogram: one pass, no sort).
    kmeans++: D^2 sampling (weighted by importance) on a 65536-weight sample."""
    x = w.detach().reshape(groups, -1).float()
    h = None if importance is None else importance.detach().reshape(groups, -1)
    if init == "linear":
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        return lo + (hi - lo) * torch.linspace(0, 1, k, device=w.device)[None, :]
    if init == "quantile":
        bins = 4096
        weight, _, lo, span = _weighted_histogram(x, h, bins)
        cdf = weight.cumsum(1)
        total = cdf[:, -1:].clamp_min(1e-300)
        targets = (torch.arange(k, device=w.device, dtype=torch.float64) + 0.5)[None, :] / k * total
        pos = torch.searchsorted(cdf, targets).clamp_(max=bins - 1)
        return (lo + (pos.float() + 0.5) / bins * span).float()
    if init == "kmeans++":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        out = torch.empty(groups, k, device=w.device)
        for g in range(groups):
            n = x.shape[1]
            sample = torch.randint(n, (min(n, 65536),), generator=gen).to(w.device)
            xs = x[g, sample]
            hs = torch.ones_like(xs) if h is None else h[g, sample].float()
            first = torch.multinomial(hs.cpu() + 1e-12, 1, generator=gen).item()
            cent = [xs[first]]
            d2 = (xs - cent[0]) ** 2
            for _ in range(1, k):
                p = (hs * d2).cpu().double()
                j = torch.multinomial(p / p.sum(), 1, generator=gen).item() if p.sum() > 0 else 0
                cent.append(xs[j])
                d2 = torch.minimum(d2, (xs - xs[j]) ** 2)
            out[g] = torch.stack(cent).sort().values
        return out
    raise ValueError(f"weightshare.kmeans: init must be 'linear', 'quantile' or 'kmeans++', got {init!r}")


def _distortion(codebook: Tensor, stats) -> Tensor:
    sums, weights, sqsums = stats
    c = codebook.double()
    return (sqsums - 2 * c * sums + c * c * weights).sum(1).clamp_min(0)


def _lloyd(w: Tensor, c: Tensor, k: int, imp: Optional[Tensor], groups: int, max_iter: int, tol: float):
    """Lloyd passes from codebook c; returns (codebook, idx, distortion, passes), idx being nearest under codebook."""
    prev, prev_idx = None, None
    it = 0
    while True:
        it += 1
        idx = ops.assign(w, c)
        stats = ops.kmeans_step(w, idx, k, imp, groups)
        dist = _distortion(c, stats)
        total = float(dist.sum())
        fixed_point = prev_idx is not None and torch.equal(idx, prev_idx)  # the update cannot change anything
        if fixed_point or (prev is not None and prev - total <= tol * max(prev, 1e-300)) or it >= max_iter:
            return c, idx, dist, it
        prev, prev_idx = total, idx
        sums, weights, _ = stats
        c = torch.where(weights > 0, sums / weights.clamp_min(1e-300), c.double()).float()


def _coarse_lloyd(w: Tensor, c: Tensor, k: int, imp: Optional[Tensor], groups: int, bins: int) -> Tensor:
    """Lloyd to convergence on a fine weighted histogram (each bin a point at its weighted mean, weighing its total
    importance): nearly the full-data fixed point at a tiny fraction of the cost, so the full passes that
    follow only polish."""
    x = w.reshape(groups, -1).float()
    h = None if imp is None else imp.reshape(groups, -1)
    weight, wsum, lo, span = _weighted_histogram(x, h, bins)
    centres = lo.double() + (torch.arange(bins, device=w.device, dtype=torch.float64) + 0.5) / bins * span.double()
    means = torch.where(weight > 0, wsum / weight.clamp_min(1e-300), centres).float().contiguous()
    c, _, _, _ = _lloyd(means, c, k, weight.float().contiguous(), groups, max_iter=200, tol=1e-9)
    return c


def kmeans(w: Tensor, k: int, importance: Optional[Tensor] = None, init: str = "linear", groups: int = 1,
           max_iter: int = 30, tol: float = 1e-5, seed: int = 0, codebook: Optional[Tensor] = None,
           coarse_bins: int = 16384) -> KMeansResult:
    """Weighted Lloyd k-means of the scalar weights w into k shared values per group.

    After the initial codebook (`init`, or the given `codebook`), Lloyd first runs to convergence on a
    `coarse_bins`-bin weighted histogram of each group (skipped for small groups or coarse_bins=0), then polishes
    with full passes over the weights: `ops.assign` (nearest entry) then `ops.kmeans_step` (weighted sums) per
    pass, until the distortion improves by less than `tol` (relative) or after `max_iter` passes. An empty
    cluster keeps its value. The result's codebook is sorted ascending and idx is the nearest assignment."""
    _validate(w, k, importance, groups)
    w = w.detach().contiguous()
    imp = None if importance is None else importance.detach().to(w.dtype).contiguous()
    c = (init_codebook(w, k, init, imp, groups, seed) if codebook is None else
         codebook.detach().reshape(groups, k).float().clone())
    if coarse_bins and w.numel() // groups > 8 * coarse_bins:
        c = _coarse_lloyd(w, c, k, imp, groups, coarse_bins)
    c, idx, dist, it = _lloyd(w, c, k, imp, groups, max_iter, tol)
    order = torch.argsort(c, dim=1)  # ascending codebook: remap the indices through the permutation
    inverse = torch.argsort(order, dim=1).to(torch.uint8)
    c = torch.gather(c, 1, order)
    idx = torch.gather(inverse, 1, idx.reshape(groups, -1).long()).reshape(w.shape)
    return KMeansResult(c, idx, dist, it)


def kmeans_optimal(w: Tensor, k: int, importance: Optional[Tensor] = None, groups: int = 1,
                   bins: Optional[int] = None, max_exact: int = 1 << 22, refine: int = 2) -> KMeansResult:
    """The optimal weighted 1-D k-means codebook, by dynamic programming (ops.kmeans1d_optimal, O(k n log n)).

    Exact over the distinct values when a group has at most `max_exact` of them (and bins is None); otherwise over
    a `bins`-bin histogram (default 16384; each bin stands at its weighted mean), followed by `refine` Lloyd
    iterations on the full data, which can only lower the distortion. Returns the nearest-entry assignment."""
    _validate(w, k, importance, groups)
    w = w.detach().contiguous()
    imp = None if importance is None else importance.detach().to(w.dtype).contiguous()
    x = w.reshape(groups, -1)
    h = None if imp is None else imp.reshape(groups, -1)
    cents = torch.empty(groups, k, dtype=torch.float32, device=w.device)
    binned = False
    for g in range(groups):
        xg = x[g].double()
        vals = None
        if bins is None and xg.numel() <= max_exact:  # else: more distinct values than max_exact is possible
            vals, inv = torch.unique(xg, sorted=True, return_inverse=True)
            if vals.numel() <= max_exact:
                hw = torch.ones_like(xg) if h is None else h[g].double()
                wts = torch.zeros_like(vals).index_add_(0, inv, hw)
            else:
                vals = None
        if vals is None:
            binned = True
            weight, wsum, _, _ = _weighted_histogram(xg.float()[None], None if h is None else h[g][None],
                                                     bins or 16384)
            keep = weight[0] > 0
            vals, wts = (wsum[0][keep] / weight[0][keep]), weight[0][keep]
            # bin means are sorted (bins are ordered) but may coincide in degenerate data: merge equal ones
            vals, inv = torch.unique(vals, sorted=True, return_inverse=True)
            wts = torch.zeros_like(vals).index_add_(0, inv, wts)
        c, _ = ops.kmeans1d_optimal(vals.cpu(), wts.cpu(), k)
        if c.numel() < k:  # fewer distinct values than k: repeat the last (unused) entry
            c = torch.cat([c, c[-1:].expand(k - c.numel())])
        cents[g] = c.float().to(w.device)
    if binned and refine > 0:
        return kmeans(w, k, imp, groups=groups, max_iter=refine + 1, tol=0.0, codebook=cents, coarse_bins=0)
    return kmeans(w, k, imp, groups=groups, max_iter=1, codebook=cents, coarse_bins=0)
