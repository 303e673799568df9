"""Quantisation-aware retraining: retrain a (pruned) network through its weight sharing, so that sharing costs no
accuracy.

Fitting codebooks to a trained network after the fact (ws.compress) moves every weight to its nearest shared
value at once; on a pruned LeNet that already sits at the dense model's held-out error, 4-bit k-means then lost
0.04-0.08 % validation accuracy and the zero-loss searches fell back to 6-8 bits (measured, 2026-11-29). Deep
Compression answers with centroid fine-tuning (assignments fixed: 16 numbers per layer to train); here the
network itself keeps training with its weights shared, so assignments can move too:

* each compressible layer's weight becomes a parametrisation: forward uses the nearest of the layer's k shared
  values (k - 1 learned values plus the exact zero holding the pruned weights, when the layer is pruned), the
  backward pass goes straight through to the latent real weights (the straight-through estimator);
* every `refit_every` optimiser steps the shared values are refitted to the latent weights (weighted Lloyd from
  the current values, ws.kmeans);
* at the end every weight is snapped to its shared value: the returned network has at most k distinct values per
  layer, so `to_shared` turns it into shared layers exactly (no further quantisation error) for ws.save.

Training is weightshare.train.train (SGD, cosine schedule, optional distillation from a teacher: the dense model).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from weightshare.compress.layers import compressible_layers, round_biases_to_half_


class SharedValues(nn.Module):
    """The parametrisation weight = mask * values[nearest(latent)], with a straight-through gradient to the latent
    weights at the kept positions."""

    def __init__(self, latent: Tensor, entries: int, seed: int = 0) -> None:
        super().__init__()
        from weightshare.kmeans import kmeans
        mask = latent != 0
        self.pruned = bool((~mask).any())
        if not self.pruned:
            mask = torch.ones_like(mask)
        alive = latent[mask].detach().contiguous()
        self.entries = int(min(entries, alive.numel()))
        if self.entries < 1:
            raise ValueError("weightshare.compress.qat: a layer has no weights left to share")
        self.register_buffer("mask", mask.to(latent.dtype))
        self.register_buffer("values", kmeans(alive, self.entries, seed=seed).codebook.reshape(-1).contiguous())

    def quantize(self, latent: Tensor) -> Tensor:
        from weightshare import ops
        idx = ops.assign(latent.detach().contiguous(), self.values.reshape(1, -1))
        return self.values[idx.long()] * self.mask

    def forward(self, latent: Tensor) -> Tensor:
        kept = latent * self.mask
        return kept + (self.quantize(latent) - kept).detach()

    @torch.no_grad()
    def refit(self, latent: Tensor, seed: int = 0) -> None:
        from weightshare.kmeans import kmeans
        alive = latent[self.mask.bool()].detach().contiguous()
        self.values.copy_(kmeans(alive, self.entries, codebook=self.values.reshape(1, -1), max_iter=5,
                                 seed=seed).codebook.reshape(-1))


@dataclass
class QuantizeResult:
    model: nn.Module          # snapped: at most k distinct values per layer (0 included when pruned)
    bits: dict                # layer name -> index bits the layer needs
    seconds: float


def parse_bit_config(text: str, layer_names: list[str]) -> dict[str, int]:
    """Index bits per layer from a short text: "3" -> every layer 3 bits; "fc1=2,*=3" -> fc1 2 bits, every other
    layer 3 (a layer neither named nor covered by "*" is an error)."""
    text = str(text).strip()
    try:
        if "=" not in text:
            return {n: int(text) for n in layer_names}
        given = {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise ValueError(f"weightshare: bit config {text!r} must be 'B' or 'layer=B,...,*=B'") from None
    unknown = set(given) - set(layer_names) - {"*"}
    if unknown:
        raise ValueError(f"weightshare: unknown layers {sorted(unknown)} in bit config {text!r} "
                         f"(layers: {layer_names})")
    missing = [n for n in layer_names if n not in given and "*" not in given]
    if missing:
        raise ValueError(f"weightshare: bit config {text!r} gives no bits for {missing} (add '*=B')")
    return {n: given.get(n, given.get("*")) for n in layer_names}


def _entries(bits: int, pruned: bool) -> int:
    return (1 << bits) - (1 if pruned else 0)


def quantize_retrain(model: nn.Module, train_set, bits: int | dict, *, epochs: int = 3, lr: float = 0.01,
                     batch_size: int = 128, weight_decay: float = 0.0, teacher: Optional[nn.Module] = None,
                     distill: float = 0.0, temperature: float = 2.0, refit_every: Optional[int] = None,
                     seed: int = 0, half_values: bool = True, progress: bool = False) -> QuantizeResult:
    """Retrain a copy of `model` with each compressible layer's weights shared among 2**bits values (bits: an int,
    or {layer: bits}); a layer with exact zeros (pruned) keeps them at zero with one entry of its codebook.
    refit_every: optimiser steps between refits of the shared values (default: twice an epoch). Returns the
    snapped network; `to_shared(result.model)` gives its shared-layer form. half_values: round the final shared
    values to float16-representable ones before the snap (a value moves by at most 2**-11 of itself), so the saved
    codebooks take 2 bytes per entry; training itself is unchanged (rounding at every refit instead made no
    measurable difference to the errors, measured on LeNet-5, three seeds, and changes every trajectory)."""
    import time

    from weightshare.train import train
    t0 = time.time()
    work = copy.deepcopy(model).eval()
    layers = compressible_layers(work)
    per = bits if isinstance(bits, dict) else {l.name: int(bits) for l in layers}
    for name, b in per.items():
        if not 1 <= int(b) <= 8:
            raise ValueError(f"weightshare.compress.qat: bits must be in 1..8, got {b} for layer {name!r}")
    parametrisations = []
    for layer in layers:
        if layer.name not in per:
            continue
        pruned = bool((layer.weight == 0).any())
        p = SharedValues(layer.module.weight.detach(), _entries(per[layer.name], pruned), seed)
        parametrize.register_parametrization(layer.module, "weight", p)
        parametrisations.append((layer.module, p))
    every = refit_every or max(1, math.ceil(len(train_set) / batch_size) // 2)
    step = [0]

    def refit() -> None:
        step[0] += 1
        if step[0] % every == 0:
            for module, p in parametrisations:
                p.refit(module.parametrizations.weight.original, seed)
    train(work, train_set, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, seed=seed,
          progress=progress, post_step=refit, teacher=teacher, distill=distill, temperature=temperature)
    with torch.no_grad():
        for module, p in parametrisations:
            latent = module.parametrizations.weight.original
            p.refit(latent, seed)
            if half_values:
                p.values.copy_(p.values.half().to(p.values.dtype))
            snapped = p.quantize(latent)  # exactly the shared values (the forward's STE sum may differ in the last bit)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module.weight.copy_(snapped)
    return QuantizeResult(work.eval(), {n: int(b) for n, b in per.items()}, time.time() - t0)


def to_shared(model: nn.Module, max_entries: int = 256, half_bias: bool = True) -> nn.Module:
    """The shared-layer form of a network whose compressible layers hold few distinct values (quantize_retrain's
    output): each layer's codebook is its distinct values, exactly, so the weights do not change. Layers with more
    than `max_entries` distinct values are left dense. half_bias: round the shared layers' float32 biases to
    float16 values (as ws.compress does; ws.save then stores them at 2 bytes each): judge the returned model, not
    the argument. Returns a copy."""
    from weightshare.replace import replace_layers
    out = copy.deepcopy(model)
    assignments, shared = {}, []
    for layer in compressible_layers(out):
        values, idx = torch.unique(layer.weight, sorted=True, return_inverse=True)
        if values.numel() <= max_entries:
            assignments[layer.name] = (values, idx.to(torch.uint8))
            shared.append(layer.module)
    if half_bias:
        round_biases_to_half_(shared)
    replace_layers(out, assignments)
    return out
