"""Masked bias storage ("bias_encoding": "masked" in io_format.py's layer spec): a bit per bias entry saying whether it
is stored, and the stored values in order. Units that compress.dead_units zeroed, or pruned-away output rows, then
cost one bit instead of 2-4 bytes.

Mask layout: uint8 [ceil(n / 8)]; bit i % 8 of byte i // 8 (least significant bit first) is set when bias[i] is
anything but +0.0 (so -0.0 and NaN are kept and the round trip is bit-exact); the unused high bits of the last
byte are zero. The reader checks all of it (`unmask`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = ["stored_mask", "unpack_mask", "unmask"]


def stored_mask(bias: Tensor) -> tuple[Tensor, Tensor]:
    """(which entries are stored, as a bool [n]: all but +0.0; the packed mask, uint8 [ceil(n / 8)])."""
    flat = bias.detach().reshape(-1).cpu()
    keep = ~((flat == 0) & ~torch.signbit(flat))
    padded = torch.zeros(8 * math.ceil(flat.numel() / 8), dtype=torch.uint8)
    padded[:flat.numel()] = keep.to(torch.uint8)
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8)
    return keep, (padded.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(mask: Tensor) -> Tensor:
    """Bool [8 * mask.numel()]: bit i % 8 of byte i // 8, least significant first (the inverse of stored_mask)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((mask.reshape(-1, 1) >> shifts) & 1).reshape(-1).bool()


def unmask(name: str, mask: Tensor, values: Tensor, want: Tensor, fail: Callable[[str], Exception]) -> Tensor:
    """The full bias of a layer stored with "bias_encoding": "masked", after checking the mask and the values."""
    what = f"layer {name!r}"
    n = want.numel()
    if want.dim() != 1:
        raise fail(f"{what}: a masked bias must be 1-D in the model, it is {list(want.shape)}")
    if mask.dtype != torch.uint8 or tuple(mask.shape) != (math.ceil(n / 8),):
        raise fail(f"{what}: the bias mask must be uint8 [{math.ceil(n / 8)}] for {n} biases, got {mask.dtype} "
                   f"{list(mask.shape)}")
    if values.dim() != 1:
        raise fail(f"{what}: a masked bias stores its values 1-D, got shape {list(values.shape)}")
    bits = unpack_mask(mask)
    if bits[n:].any():
        raise fail(f"{what}: the bias mask has nonzero padding bits beyond its {n} entries")
    keep = bits[:n]
    if int(keep.sum()) != values.numel():
        raise fail(f"{what}: the bias mask marks {int(keep.sum())} stored values but the file holds "
                   f"{values.numel()}")
    if values.is_floating_point() and bool(((values == 0) & ~torch.signbit(values)).any()):
        raise fail(f"{what}: a masked bias stores a +0.0 (the mask must leave those out)")
    full = torch.zeros(n, dtype=values.dtype)
    full[keep] = values
    return full
