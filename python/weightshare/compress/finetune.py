"""Codebook fine-tuning (Han et al.'s centroid fine-tuning): with the assignments fixed, train the codebook values
by the gradient of the loss through the shared weights (each entry's gradient is the sum over its weights)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from weightshare.compress.layers import Layer, batch_size
from weightshare.compress.quadratic import Fit
from weightshare.distributed import Group


def _average_over_ranks_(group: Group, codebooks: dict[str, torch.Tensor], samples: int) -> None:
    """Each codebook's gradient := the batch-size-weighted mean of the ranks' gradients (data-parallel step). A
    codebook no rank's forward pass reached keeps no gradient, so Adam skips it as it does in one process."""
    names = list(codebooks)
    grads = [codebooks[n].grad if codebooks[n].grad is not None else torch.zeros_like(codebooks[n]) for n in names]
    reached = torch.tensor([float(codebooks[n].grad is not None) for n in names])
    *sums, size, reached = group.sum([g * samples for g in grads] + [torch.tensor([float(samples)]), reached])
    for i, (n, total) in enumerate(zip(names, sums)):
        codebooks[n].grad = (total / size[0]).to(codebooks[n].dtype) if reached[i] > 0 else None


def check_batch_counts(group: Group, batches: Optional[list]) -> None:
    """Raise on every rank unless every rank has the same number of fine-tuning batches (None: no fine-tuning)."""
    if not group.distributed:
        return
    counts = [int(c[0]) for c in group.gather(torch.tensor([-1.0 if batches is None else float(len(batches))]))]
    if min(counts) != max(counts):
        raise ValueError(f"weightshare.compress: finetune_data must hold the same number of batches on every rank "
                         f"of the process group (data-parallel steps), got {counts} by rank (-1: none)")


def finetune_codebooks(model: nn.Module, layers: dict[str, Layer], fits: dict[str, Fit], batches: list, loss_fn,
                       epochs: int = 1, lr: float = 1e-4, group: Optional[Group] = None) -> dict[str, Fit]:
    """New fits whose codebooks were trained for `epochs` passes over `batches` (Adam, learning rate `lr`); the
    model itself is not modified (the shared weights are substituted functionally). BatchNorm stays in eval mode so
    the statistics the model was trained with keep holding. An entry that is exactly zero is the pinned pruning
    entry (compress(..., prune=True)) and stays zero, so pruned weights stay pruned. With a process group each
    step averages the ranks' gradients (every rank needs the same number of batches)."""
    group = group or Group()
    check_batch_counts(group, batches)
    codebooks = {n: f.codebook.detach().clone().float().requires_grad_() for n, f in fits.items()}
    free = {n: (c != 0).float() for n, c in codebooks.items()}
    for n, c in codebooks.items():
        c.register_hook(lambda grad, m=free[n]: grad * m)
    index = {n: f.idx.long() for n, f in fits.items()}
    opt = torch.optim.Adam(list(codebooks.values()), lr=lr)
    was_training = model.training
    model.eval()
    try:
        for _ in range(epochs):
            for x, y in batches:
                def local_step() -> None:
                    params = {layers[n].param: codebooks[n][0][index[n]].reshape(layers[n].weight.shape)
                              for n in fits}
                    loss = loss_fn(torch.func.functional_call(model, params, (x,)), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                group.together(local_step)
                if group.distributed:
                    _average_over_ranks_(group, codebooks, batch_size(y))
                opt.step()
    finally:
        model.train(was_training)
    return {n: dataclasses.replace(f, codebook=codebooks[n].detach().clone()) for n, f in fits.items()}
