"""Per-layer fits spread over the ranks of a process group (weightshare.distributed): each fit is computed by
one rank and sent to all, so every rank holds the same fits."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Optional

import torch
from torch import Tensor

from weightshare.compress.quadratic import Fit
from weightshare.distributed import Group, compute_spread


def send_fit(group: Group, fit: Optional[Fit], owner: int, like: Tensor) -> Fit:
    """The owner's fit on every rank (the others pass None), on the device of `like` (the layer's weight, whose
    shape the indices have): its numbers exactly (float64 carries the floats), its codebook and indices as
    tensors."""
    if not group.distributed:
        assert fit is not None
        return fit
    mine = group.rank == owner
    header = torch.tensor([fit.k, fit.predicted, fit.index_bits, fit.entropy] if mine else [0.0] * 4,
                          dtype=torch.float64)
    group.broadcast_(header, owner)
    k = int(header[0])
    if mine:  # the owner's own fit, on the device the others receive it on
        codebook = fit.codebook.float().to(like.device).contiguous()
        idx = fit.idx.to(like.device).contiguous()
    else:
        codebook = torch.empty(1, k, device=like.device)
        idx = torch.empty(like.shape, dtype=torch.uint8, device=like.device)
    group.broadcast_(codebook, owner)
    group.broadcast_(idx, owner)
    if mine:
        return dataclasses.replace(fit, codebook=codebook, idx=idx)
    return Fit(k, codebook, idx, float(header[1]), float(header[2]), float(header[3]))


def fits_spread(group: Group, keys: Sequence[Hashable], like_of: Callable[[Hashable], Tensor],
                compute: Callable[[Hashable], Fit]) -> dict[Hashable, Fit]:
    """compute(key) for every key, spread over the group's ranks by the size of each key's layer (like_of(key):
    its weight). Every rank must pass the same keys in the same order."""
    likes = [like_of(k) for k in keys]
    costs = [float(t.numel()) for t in likes]
    return compute_spread(group, keys, costs, compute, lambda fit, owner, i: send_fit(group, fit, owner, likes[i]))
