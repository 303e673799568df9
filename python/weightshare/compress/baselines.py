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


def position_hash(n: int, seed: int) -> Tensor:
    """A seeded pseudo-random 32-bit value for each position 0..n-1 (xxhash-style integer mixing of (seed,
    position)), as int64: HashedNets' hash functions are this modulo the bucket count (and its parity for signs)."""
    x = torch.arange(n, dtype=torch.int64) * 0x9E3779B1 + seed * 0x85EBCA77
    x = x & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x ^= x >> 12
    x = (x * 0x297A2D39) & 0xFFFFFFFF
    x ^= x >> 15
    return x


def hashed_indices(shape, k: int, seed: int) -> Tensor:
    """HashedNets' bucket of each weight: a seeded pseudo-random function of its position, uniform over k <= 256
    buckets (uint8, the shared layers' index type)."""
    n = 1
    for s in shape:
        n *= s
    return (position_hash(n, seed) % k).to(torch.uint8).reshape(shape)


def _fit_from(w: Tensor, g: Tensor, h: Tensor, codebook: Tensor, idx: Tensor, stored_indices: bool = True) -> Fit:
    k = codebook.shape[1]
    wq = codebook[0][idx.long()]
    bits, ent = index_size_bits(idx, k, w.shape[0])
    return Fit(k, codebook.float(), idx, predicted_change(w, g, h, wq), bits if stored_indices else 64.0, ent)


def _codebook_and_indices(method: str, w: Tensor, h: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """codebook [1, k] and flat indices of the 1-D weights `w` (curvature `h`) by a data-fitted baseline."""
    if method == "kmeans":
        r = kmeans(w, k, init="linear")
        return r.codebook, r.idx
    if method == "hessian_kmeans":
        r = kmeans(w, k, importance=h.clamp_min(0) + 1e-12, init="linear")
        return r.codebook, r.idx
    lo, hi = float(w.min()), float(w.max())  # uniform
    cb = torch.linspace(lo, hi, k)[None] if k > 1 else torch.tensor([[0.5 * (lo + hi)]])
    return cb, ops.assign(w, cb)


def fit_baseline(method: str, w: Tensor, g: Tensor, h: Tensor, k: int, seed: int = 0, prune: bool = False) -> Fit:
    """The layer's fit by `method` with k entries (w, g, h: weight, gradient and curvature diagonal).

    prune: entry 0 is exactly zero and holds exactly the weights that are zero (a pruned network's holes); the
    other k - 1 entries are fitted to the remaining weights alone, as Deep Compression quantises only the
    surviving weights. (HashedNets' buckets come from the hash, not the weights: `prune` does not apply.)
    """
    w32 = w.detach().float()
    if method == "loss_aware":
        return fit_layer(w, g, h, k, prune=prune)
    if method in ("kmeans", "hessian_kmeans", "uniform"):
        flat, hflat = w32.reshape(-1).contiguous(), h.detach().float().reshape(-1)
        if not prune:
            cb, idx = _codebook_and_indices(method, flat, hflat, k)
            return _fit_from(w, g, h, cb, idx.reshape(w.shape))
        if k < 2:
            raise ValueError(f"weightshare.compress: prune=True needs k >= 2 (a zero entry and one more), got {k}")
        kept = flat != 0
        idx = torch.zeros(flat.shape, dtype=torch.long)
        cb = torch.zeros(1, k)
        if bool(kept.any()):
            sub_k = min(k - 1, int(kept.sum()))
            sub_cb, sub_idx = _codebook_and_indices(method, flat[kept].contiguous(), hflat[kept], sub_k)
            cb[0, 1:1 + sub_k] = sub_cb[0].float()
            cb[0, 1 + sub_k:] = sub_cb[0, -1].float()  # fewer weights than entries: repeat the last (never used)
            idx[kept] = sub_idx.long() + 1
        return _fit_from(w, g, h, cb, idx.to(torch.uint8).reshape(w.shape))
    if method == "hashed":
        idx = hashed_indices(w.shape, k, seed)
        sums, cnt, _ = ops.kmeans_step(w32.reshape(-1).contiguous(), idx.reshape(-1), k)
        cb = torch.where(cnt > 0, sums / cnt.clamp_min(1), torch.zeros_like(sums)).float()
        return _fit_from(w, g, h, cb, idx, stored_indices=False)
    raise ValueError(f"weightshare.compress: method must be one of {METHODS}, got {method!r}")
