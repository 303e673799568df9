"""Codebook fine-tuning (Han et al.'s centroid fine-tuning): with the assignments fixed, train the codebook values
by the gradient of the loss through the shared weights (each entry's gradient is the sum over its weights)."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from weightshare.compress.layers import Layer
from weightshare.compress.quadratic import Fit


def finetune_codebooks(model: nn.Module, layers: dict[str, Layer], fits: dict[str, Fit], batches: list, loss_fn,
                       epochs: int = 1, lr: float = 1e-4) -> dict[str, Fit]:
    """New fits whose codebooks were trained for `epochs` passes over `batches` (Adam, learning rate `lr`); the
    model itself is not modified (the shared weights are substituted functionally). BatchNorm stays in eval mode so
    the statistics the model was trained with keep holding. An entry that is exactly zero is the pinned pruning
    entry (compress(..., prune=True)) and stays zero, so pruned weights stay pruned."""
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
                params = {layers[n].param: codebooks[n][0][index[n]].reshape(layers[n].weight.shape)
                          for n in fits}
                loss = loss_fn(torch.func.functional_call(model, params, (x,)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        model.train(was_training)
    return {n: dataclasses.replace(f, codebook=codebooks[n].detach().clone()) for n, f in fits.items()}
