"""Streaming, weighted means of per-parameter tensors over batches and probes, in float64.

float64 because the statistics average thousands of small, noisy terms (squared gradients, z * Hz) whose
float32 running sums lose the digits the compressor's loss predictions need.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from weightshare.distributed import Group


class WeightedMean:
    """sum_i w_i x_i / sum_i w_i over added dicts of tensors."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self.total_weight = 0.0

    def add(self, sample: Mapping[str, Tensor], weight: float = 1.0) -> None:
        for name, t in sample.items():
            term = t.detach().to(torch.float64) * weight
            self._sums[name] = self._sums[name] + term if name in self._sums else term
        self.total_weight += weight

    def add_sum(self, summed: Mapping[str, Tensor], weight: float) -> None:
        """Add a sum of samples (already float64) together with their total weight."""
        for name, t in summed.items():
            self._sums[name] = self._sums[name] + t if name in self._sums else t.clone()
        self.total_weight += weight

    def mean(self, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The mean, in the dtype of the matching tensor of `like` (the parameters)."""
        return {n: (self._sums[n] / self.total_weight).to(like[n].dtype) for n in like}

    def reduce_(self, group: "Group", like: Mapping[str, Tensor]) -> None:
        """Replace the sums and weight by their totals over the group's ranks (each rank's data seen once)."""
        local = [self._sums.get(n, torch.zeros(like[n].shape, dtype=torch.float64, device=like[n].device))
                 for n in like]
        *sums, weight = group.sum(local + [torch.tensor([self.total_weight], dtype=torch.float64)])
        self._sums = dict(zip(like, sums))
        self.total_weight = float(weight[0])


class WeightedMeanWithVariance:
    """Weighted mean of samples x_i with weights w_i, and the variance of that mean as an estimate.

    Uses West's (1979) incremental update, stable in one pass: mean and S = sum_i w_i (x_i - mean)^2.
    The variance of the weighted mean, treating the samples as independent draws of one distribution, is
    sigma^2 * sum w_i^2 / W^2 with sigma^2 estimated by S / W * n / (n - 1); for equal weights this is the
    familiar sample variance / n. With a single sample it is unknown and reported as +inf.
    """

    def __init__(self) -> None:
        self._mean: dict[str, Tensor] = {}
        self._spread: dict[str, Tensor] = {}
        self.count = 0
        self.total_weight = 0.0
        self.total_squared_weight = 0.0

    def add(self, sample: Mapping[str, Tensor], weight: float = 1.0) -> None:
        if weight <= 0:
            return
        self.count += 1
        self.total_weight += weight
        self.total_squared_weight += weight * weight
        share = weight / self.total_weight
        for name, t in sample.items():
            x = t.detach().to(torch.float64)
            if name not in self._mean:
                self._mean[name] = x.clone()
                self._spread[name] = torch.zeros_like(x)
                continue
            delta = x - self._mean[name]
            self._mean[name] += share * delta
            self._spread[name] += weight * delta * (x - self._mean[name])

    def mean(self, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: self._mean[n].to(like[n].dtype) for n in like}

    def merge_(self, other: "WeightedMeanWithVariance") -> None:
        """Add another accumulator's samples (Chan, Golub and LeVeque's pairwise update of mean and spread): the
        result equals one accumulator fed both sample sets, up to rounding."""
        if other.total_weight <= 0:
            return
        if self.total_weight <= 0:
            self._mean = {n: t.clone() for n, t in other._mean.items()}
            self._spread = {n: t.clone() for n, t in other._spread.items()}
        else:
            wa, wb = self.total_weight, other.total_weight
            for name, mb in other._mean.items():
                delta = mb - self._mean[name]
                self._spread[name] += other._spread[name] + delta * delta * (wa * wb / (wa + wb))
                self._mean[name] += delta * (wb / (wa + wb))
        self.count += other.count
        self.total_weight += other.total_weight
        self.total_squared_weight += other.total_squared_weight

    def flat_state(self, like: Mapping[str, Tensor]) -> Tensor:
        """count, total weight, total squared weight, then the means and the spreads of `like`'s names (zeros for
        a name not yet seen), as one float64 vector: what a rank sends to the others."""
        zeros = {n: torch.zeros(t.shape, dtype=torch.float64, device=t.device) for n, t in like.items()}
        parts = [self._mean.get(n, zeros[n]).reshape(-1) for n in like]
        parts += [self._spread.get(n, zeros[n]).reshape(-1) for n in like]
        scalars = torch.tensor([self.count, self.total_weight, self.total_squared_weight], dtype=torch.float64)
        return torch.cat([scalars.to(parts[0].device)] + parts)

    @classmethod
    def from_flat_state(cls, state: Tensor, like: Mapping[str, Tensor]) -> "WeightedMeanWithVariance":
        """The accumulator flat_state(like) describes."""
        acc = cls()
        acc.count, acc.total_weight, acc.total_squared_weight = int(state[0]), float(state[1]), float(state[2])
        at = 3
        for field in (acc._mean, acc._spread):
            for n, t in like.items():
                field[n] = state[at:at + t.numel()].reshape(t.shape).clone()
                at += t.numel()
        return acc

    def reduce_(self, group: "Group", like: Mapping[str, Tensor]) -> None:
        """Merge the accumulators of the group's ranks, in rank order (the same result on every rank)."""
        merged = WeightedMeanWithVariance()
        for state in group.gather(self.flat_state(like)):
            merged.merge_(WeightedMeanWithVariance.from_flat_state(state, like))
        self._mean, self._spread = merged._mean, merged._spread
        self.count, self.total_weight = merged.count, merged.total_weight
        self.total_squared_weight = merged.total_squared_weight

    def variance_of_mean(self, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.count < 2:
            return {n: torch.full_like(like[n], float("inf")) for n in like}
        scale = (self.count / (self.count - 1) / self.total_weight
                 * self.total_squared_weight / self.total_weight ** 2)
        return {n: (self._spread[n].clamp_min(0) * scale).to(like[n].dtype) for n in like}
