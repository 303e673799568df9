"""Loss-aware codebook fitting for one layer under the second-order model of the loss change.

For a weight w with gradient g and curvature h > 0, moving it to a codebook value c changes the loss by
    g (c - w) + 1/2 h (c - w)^2  =  1/2 h (c - t)^2 - g^2 / (2h),     t = w - g / h,
so minimising the layer's model over codebook and assignment is weighted 1-D k-means of the Newton targets t with
weights h, whose exact optimum kmeans_optimal finds by dynamic programming. Damping (h + lambda) keeps the model
trustworthy where curvature is tiny or negative (the trust-region radius, in Levenberg-Marquardt form). With a
size price per entry (entropy-constrained quantisation) the assignment adds penalty_j = mu * (-log2 p_j) and
alternates with the Newton codebook update c_j = sum(h w - g) / sum h; pruning pins one entry at exactly zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from weightshare import ops
from weightshare.formats import bits_for, packed_row_bytes
from weightshare.kmeans import kmeans_optimal


@dataclass
class Fit:
    """A layer's codebook and assignment with the model's predicted loss change and its estimated size."""
    k: int
    codebook: Tensor       # float32 [1, k]
    idx: Tensor            # uint8, the weight's shape
    predicted: float       # g.dW + 1/2 h.dW^2 with the undamped statistics
    index_bits: float      # estimated bits of the index stream in the file: min(packed, entropy coded)
    entropy: float         # Shannon entropy of the indices, bits per weight

    @property
    def bits(self) -> int:
        return bits_for(self.k)

    @property
    def bytes(self) -> float:
        return self.index_bits / 8 + 4 * self.k

    def dequantized(self) -> Tensor:
        return self.codebook[0][self.idx.long()]


def predicted_change(w: Tensor, g: Tensor, h: Tensor, wq: Tensor) -> float:
    d = (wq.double() - w.double())
    return float((g.double() * d).sum() + 0.5 * (h.double() * d * d).sum())


def index_size_bits(idx: Tensor, k: int, rows: int) -> tuple[float, float]:
    """(estimated index bits in the file, entropy per weight): the smaller of the packed rows and an
    entropy-coded stream (Shannon bound plus a small table/state overhead per layer)."""
    n = idx.numel()
    counts = torch.bincount(idx.reshape(-1).long(), minlength=k).double()
    p = counts[counts > 0] / n
    entropy = float(-(p * torch.log2(p)).sum())
    packed = 8 * rows * packed_row_bytes(n // rows, bits_for(k))
    coded = n * entropy * 1.005 + 8 * (2 * k + 16 + 4 * math.ceil(n / 8192))
    return min(packed, coded), entropy


def damped_curvature(w: Tensor, g: Tensor, h: Tensor, k: int, damping: float) -> Tensor:
    """The curvature the fit trusts: h + lambda (lambda = damping * mean positive h), raised per weight where
    needed so that the Newton shift |g / h_eff| stays inside the trust radius
        delta = (0.005 / damping) * (4 std(w) / k),
    i.e. half a typical codebook spacing at the default damping 1e-2: the gradient may move a weight to a
    neighbouring entry, never across the codebook. At a trained minimum the gradient is mostly calibration noise
    and the diagonal model ignores how weights interact, so unbounded Newton targets predict gains the real loss
    does not see; the allocation loop raises damping (shrinks delta) whenever measurement and model disagree."""
    hpos = h.clamp_min(0)
    lam = damping * float(hpos.mean()) + 1e-20
    delta = (0.005 / damping) * 4 * float(w.std()) / max(k, 2) + 1e-12
    return torch.maximum(hpos + lam, g.abs() / delta)


def fit_layer(w: Tensor, g: Tensor, h: Tensor, k: int, damping: float = 1e-2, prune: bool = False,
              entropy_weight: float = 0.0, refine: int = 4, use_gradient: bool = False) -> Fit:
    """Codebook of k entries and assignment minimising the layer's quadratic model (plus an optional size price).

    damping: the trust-region control (damped_curvature): larger = smaller radius, codebooks closer to plain
    curvature-weighted k-means of the weights. entropy_weight: mu, the loss-units price of one bit of index stream
    per weight (0: plain model minimisation). prune: one entry pinned at exactly 0.
    use_gradient: let the gradient term steer the codebook and assignment. Off by default: on LeNet-300-100 at 4
    entries per layer it *raised* the measured calibration loss from +0.02 to +32 while the model predicted a
    gain (the summed per-weight moves along -g form one large step in a direction the diagonal curvature
    underestimates). The gradient still enters every predicted loss change."""
    w32 = w.detach().float().reshape(-1)
    g32 = g.detach().float().reshape(-1) if use_gradient else torch.zeros_like(w32)
    heff = damped_curvature(w32, g32, h.detach().float().reshape(-1), k, damping)
    t = w32 - g32 / heff
    if k == 1:
        c = torch.tensor([[float((heff * t).sum() / heff.sum())]]) if not prune else torch.zeros(1, 1)
        idx = torch.zeros_like(w32, dtype=torch.uint8)
    else:
        c = kmeans_optimal(t, k, importance=heff).codebook.float()  # [1, k], exact DP for the model
        idx = None
        pinned = None
        if prune:
            pinned = int(c[0].abs().argmin())
            c[0, pinned] = 0.0
        if prune or entropy_weight > 0:
            for _ in range(refine):
                penalty = None
                if entropy_weight > 0 and idx is not None:
                    counts = torch.bincount(idx.long(), minlength=k).double() + 0.5
                    penalty = (entropy_weight * -torch.log2(counts / counts.sum())).float()[None]
                idx = ops.loss_aware_assign(w32, g32, heff, c, penalty)
                sums, wts, _ = ops.kmeans_step(t, idx, k, heff)
                newc = torch.where(wts > 0, sums / wts.clamp_min(1e-300), c.double()).float()
                if pinned is not None:
                    newc[0, pinned] = 0.0
                c = newc
        penalty = None
        if entropy_weight > 0 and idx is not None:
            counts = torch.bincount(idx.long(), minlength=k).double() + 0.5
            penalty = (entropy_weight * -torch.log2(counts / counts.sum())).float()[None]
        idx = ops.loss_aware_assign(w32, g32, heff, c, penalty)
    idx = idx.reshape(w.shape)
    wq = c[0][idx.long()]
    bits, ent = index_size_bits(idx, k, w.shape[0])
    return Fit(k, c, idx, predicted_change(w, g, h, wq), bits, ent)
