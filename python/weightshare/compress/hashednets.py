"""HashedNets as published (Chen et al. 2015, "Compressing Neural Networks with the Hashing Trick"): the baseline
that the `hashed` method of ws.compress cannot be.

Each layer's weight is a *virtual* matrix V[i] = xi(i) * w[h(i)]: a hash h of the position i picks one of K real
bucket values w (K = the layer's size / the compression factor, thousands of buckets, not a <= 256-entry
codebook), a second hash xi gives each position a sign (so inner products stay unbiased), and the K values are
*trained* through the hash. Only the K values and the hash seed are stored: no index per weight. ws.compress's
`hashed` method fits buckets to a trained network after the fact, with at most 256 of them per layer, and loses the
accuracy at every size; this module trains them, which is what the paper compares against.

    net = hashednets(model, compression=16)      # a copy; its Linear/Conv weights are parametrised by buckets
    train(net, ..., teacher=model, distill=0.7)  # weightshare.train.train: the buckets are the trainable weights
    hashednets_size(net)                         # bytes HashedNets stores: buckets + biases etc. (fp32) + seeds

The buckets start as the projection of the trained weights (each bucket the mean of xi * w over its positions; the
paper trains from scratch): at factor 8 and beyond that projection is at chance level (90 % error, measured), so
it is a starting point, not a head start. The benchmark (benchmarks/bench_hashednets.py) gives the buckets the
same retraining (epochs, distillation) as our pruned networks.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from weightshare.compress.baselines import position_hash
from weightshare.compress.layers import compressible_layers


class HashedWeight(nn.Module):
    """The parametrisation weight = xi * values[h]: `values` ([buckets]) is what the layer stores and trains."""

    def __init__(self, shape: torch.Size, buckets: int, seed: int) -> None:
        super().__init__()
        n = math.prod(shape)
        if not 1 <= buckets <= n:
            raise ValueError(f"weightshare.compress.hashednets: buckets must be in [1, {n}] for a weight of shape "
                             f"{tuple(shape)}, got {buckets}")
        self.shape, self.buckets, self.seed = tuple(shape), int(buckets), int(seed)
        self.register_buffer("index", position_hash(n, 2 * seed) % buckets, persistent=False)
        sign = (position_hash(n, 2 * seed + 1) >> 7) & 1  # an independent hash: the sign of each position
        self.register_buffer("sign", 1.0 - 2.0 * sign.float(), persistent=False)
        count = torch.bincount(self.index, minlength=buckets).float()
        self.register_buffer("count", count, persistent=False)

    def forward(self, values: Tensor) -> Tensor:
        # index_select, not values[index]: its backward is an index_add, 3.5x faster on the CPU than indexing's
        # deterministic accumulate (which sorts); measured on LeNet-300-100's fc1
        return (torch.index_select(values, 0, self.index) * self.sign.to(values.dtype)).reshape(self.shape)

    def right_inverse(self, weight: Tensor) -> Tensor:
        """The bucket values closest to `weight` in least squares: each bucket the mean of xi * w over its
        positions (an empty bucket - possible when buckets approach the weight count - gets 0)."""
        if weight.is_meta:  # a skeleton's weight (ws.load into a meta-device model): the file holds the values
            return weight.new_empty(self.buckets)
        flat = weight.detach().reshape(-1).float() * self.sign
        sums = torch.zeros(self.buckets, dtype=flat.dtype, device=flat.device).index_add_(0, self.index, flat)
        return (sums / self.count.clamp_min(1)).to(weight.dtype)


def hashednets(model: nn.Module, compression: float, seed: int = 0) -> nn.Module:
    """A copy of `model` whose Linear/Conv1d/Conv2d weights are HashedNets virtual matrices with
    round(size / compression) buckets each (at least 1), initialised by projecting the trained weights; biases and
    every other parameter stay dense. Each layer gets its own hash (seed + layer number)."""
    if not compression >= 1:
        raise ValueError(f"weightshare.compress.hashednets: compression must be >= 1, got {compression}")
    out = copy.deepcopy(model)
    for number, layer in enumerate(compressible_layers(out)):
        buckets = max(1, round(layer.module.weight.numel() / compression))
        parametrize.register_parametrization(layer.module, "weight",
                                             HashedWeight(layer.module.weight.shape, buckets, seed + number),
                                             unsafe=True)
    return out


def hashed_parametrizations(model: nn.Module) -> list[HashedWeight]:
    return [p for m in model.modules() if parametrize.is_parametrized(m, "weight")
            for p in m.parametrizations.weight if isinstance(p, HashedWeight)]


def hashednets_size(model: nn.Module) -> int:
    """Bytes HashedNets stores for `model` (a hashednets() copy): 4 per bucket value, 8 per layer for its hash
    seed, and 4 per element of every other parameter and buffer of the state dict (biases, norms), as fp32."""
    hashed = hashed_parametrizations(model)
    if not hashed:
        raise ValueError("weightshare.compress.hashednets: the model has no HashedNets layer (use hashednets())")
    total = sum(4 * h.buckets + 8 for h in hashed)
    for name, t in model.state_dict().items():
        if "parametrizations" not in name and t.is_floating_point():
            total += 4 * t.numel()
    return total
