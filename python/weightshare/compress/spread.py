"""Per-layer fits spread over the ranks of a process group (weightshare.distributed): each fit is computed by
one rank and sent to all, so every rank holds the same fits."""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Optional

import torch

from weightshare.compress.quadratic import Fit
from weightshare.distributed import Group, compute_spread


def send_fit(group: Group, fit: Optional[Fit], owner: int, shape: Sequence[int]) -> Fit:
    """The owner's fit on every rank (the others pass None): its numbers exactly (float64 carries the floats),
    its codebook and indices as tensors."""
    if not group.distributed:
        assert fit is not None
        return fit
    mine = group.rank == owner
    header = torch.tensor([fit.k, fit.predicted, fit.index_bits, fit.entropy] if mine else [0.0] * 4,
                          dtype=torch.float64)
    group.broadcast_(header, owner)
    k = int(header[0])
    codebook = fit.codebook.float().contiguous() if mine else torch.empty(1, k)
    idx = fit.idx.contiguous() if mine else torch.empty(tuple(shape), dtype=torch.uint8)
    group.broadcast_(codebook, owner)
    group.broadcast_(idx, owner)
    if mine:
        return fit
    return Fit(k, codebook, idx, float(header[1]), float(header[2]), float(header[3]))


def fits_spread(group: Group, keys: Sequence[Hashable], shape_of: Callable[[Hashable], Sequence[int]],
                compute: Callable[[Hashable], Fit]) -> dict[Hashable, Fit]:
    """compute(key) for every key, spread over the group's ranks by the size of each key's layer."""
    shapes = [tuple(shape_of(k)) for k in keys]
    costs = [float(torch.Size(s).numel()) for s in shapes]
    return compute_spread(group, keys, costs, compute,
                          lambda fit, owner, i: send_fit(group, fit, owner, shapes[i]))
