"""Per-layer codebook fits of the baseline methods, on the same footing as the loss-aware fit (quadratic.Fit):

* "kmeans"          Deep Compression (Han et al. 2015): k-means of the weights, linear initialisation.
* "hessian_kmeans"  Choi et al. 2017: k-means weighted by the curvature diagonal.
* "uniform"         round to the nearest of k evenly spaced values between the layer's min and max.
* "hashed"          HashedNets (Chen et al. 2015): a fixed random hash of each weight's position picks its
                    bucket; the bucket value is the mean of its weights (then trained by fine-tuning). The index
                    stream is not stored, only the hash seed: the size counts the codebook alone.
All report the second-order model's predicted loss change with the same statistics, for comparison.
"""
from __future__ import annotations

import torch
from torch import Tensor

from weightshare import ops
from weightshare.compress.quadratic import Fit, fit_layer, index_size_bits, predicted_change
from weightshare.kmeans import kmeans

METHODS = ("loss_aware", "kmeans", "hessian_kmeans", "uniform", "hashed")


def hashed_indices(shape, k: int, seed: int) -> Tensor:
    """HashedNets' bucket of each weight: a seeded pseudo-random function of its position (xxhash-style integer
    mixing of (seed, position)), uniform over k buckets."""
    n = 1
    for s in shape:
        n *= s
    x = torch.arange(n, dtype=torch.int64) * 0x9E3779B1 + seed * 0x85EBCA77
    x = x & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x ^= x >> 12
    x = (x * 0x297A2D39) & 0xFFFFFFFF
    x ^= x >> 15
    return (x % k).to(torch.uint8).reshape(shape)


def _fit_from(w: Tensor, g: Tensor, h: Tensor, codebook: Tensor, idx: Tensor, stored_indices: bool = True) -> Fit:
    k = codebook.shape[1]
    wq = codebook[0][idx.long()]
    bits, ent = index_size_bits(idx, k, w.shape[0])
    return Fit(k, codebook.float(), idx, predicted_change(w, g, h, wq), bits if stored_indices else 64.0, ent)


def fit_baseline(method: str, w: Tensor, g: Tensor, h: Tensor, k: int, seed: int = 0, prune: bool = False) -> Fit:
    """The layer's fit by `method` with k entries (w, g, h: weight, gradient and curvature diagonal)."""
    w32 = w.detach().float()
    if method == "loss_aware":
        return fit_layer(w, g, h, k, prune=prune)
    if method == "kmeans":
        r = kmeans(w32.reshape(-1), k, init="linear")
        return _fit_from(w, g, h, r.codebook, r.idx.reshape(w.shape))
    if method == "hessian_kmeans":
        imp = h.detach().float().clamp_min(0) + 1e-12
        r = kmeans(w32.reshape(-1), k, importance=imp.reshape(-1), init="linear")
        return _fit_from(w, g, h, r.codebook, r.idx.reshape(w.shape))
    if method == "uniform":
        lo, hi = float(w32.min()), float(w32.max())
        cb = torch.linspace(lo, hi, k)[None] if k > 1 else torch.tensor([[0.5 * (lo + hi)]])
        return _fit_from(w, g, h, cb, ops.assign(w32.reshape(-1), cb).reshape(w.shape))
    if method == "hashed":
        idx = hashed_indices(w.shape, k, seed)
        sums, cnt, _ = ops.kmeans_step(w32.reshape(-1).contiguous(), idx.reshape(-1), k)
        cb = torch.where(cnt > 0, sums / cnt.clamp_min(1), torch.zeros_like(sums)).float()
        return _fit_from(w, g, h, cb, idx, stored_indices=False)
    raise ValueError(f"weightshare.compress: method must be one of {METHODS}, got {method!r}")
