"""The compressible layers of a model and how candidate weights are swapped in to measure the real loss."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import torch
from torch import Tensor, nn

from weightshare.distributed import Group

COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class Layer:
    """One compressible layer: its module, qualified names, and a copy of its original weight."""
    name: str           # module name, as in model.named_modules()
    param: str          # "<name>.weight", the key of the curvature statistics
    module: nn.Module
    kind: str           # "linear" | "conv1d" | "conv2d"
    weight: Tensor      # the original weight (detached copy, original shape)


def compressible_layers(model: nn.Module) -> list[Layer]:
    """Linear, Conv1d and Conv2d layers (subclasses included, e.g. BinaryLinear), in module order."""
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, COMPRESSIBLE) and isinstance(getattr(m, "weight", None), torch.Tensor):
            kind = "linear" if isinstance(m, nn.Linear) else "conv1d" if isinstance(m, nn.Conv1d) else "conv2d"
            layers.append(Layer(name, f"{name}.weight" if name else "weight", m, kind, m.weight.detach().clone()))
    if not layers:
        raise ValueError("weightshare.compress: the model has no Linear/Conv1d/Conv2d layer to compress")
    return layers


@contextlib.contextmanager
def weights_swapped(layers: Mapping[str, Layer], weights: Mapping[str, Tensor]) -> Iterator[None]:
    """Temporarily give the named layers other weights (same shape), restoring the originals afterwards."""
    saved = {}
    try:
        for name, w in weights.items():
            p = layers[name].module.weight
            saved[name] = p.detach().clone()
            with torch.no_grad():
                p.copy_(w.reshape(p.shape).to(p.dtype))
        yield
    finally:
        for name, w in saved.items():
            with torch.no_grad():
                layers[name].module.weight.copy_(w)


def density(model: nn.Module) -> float:
    """Fraction of the compressible layers' weights that are not exactly zero (a pruned network's density)."""
    layers = compressible_layers(model)
    return sum(int((l.weight != 0).sum()) for l in layers) / sum(l.weight.numel() for l in layers)


@torch.no_grad()
def round_biases_to_half_(modules) -> None:
    """Round the float32 biases of these modules to float16 values, in place (ws.save then stores them at 2 bytes
    each, losslessly)."""
    for module in modules:
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor) and bias.dtype == torch.float32:
            bias.copy_(bias.half().float())


def batch_size(y) -> int:
    """The samples in a batch's targets (1 for a target without a length, e.g. a scalar)."""
    return len(y) if hasattr(y, "__len__") else 1


def mean_loss(model: nn.Module, loss_fn, batches: list, group: Optional[Group] = None) -> float:
    """Mean of loss_fn over the batches (weighted by batch size), in eval mode without gradients; with a process
    group, over every rank's batches."""
    group = group or Group()

    def local() -> tuple[float, int]:
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in batches:
                n = batch_size(y)
                total += float(loss_fn(model(x), y)) * n
                count += n
        model.train(was_training)
        return total, count

    total, count = group.together(local)
    if group.distributed:
        total, count = (float(v) for v in group.sum([torch.tensor([total, float(count)])])[0])
    return total / max(count, 1)
