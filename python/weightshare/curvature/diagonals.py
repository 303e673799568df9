"""Average gradient and curvature diagonals over a data set: Hutchinson estimates of diag(H) and diag(G), and
the empirical Fisher diagonal.

Each statistic is a "pass": an object fed one batch at a time, so that gather_stats (weightshare.curvature.stats)
can compute several of them in a single sweep over data that may be iterable only once.

Scaling convention, shared by all of them: statistics of the *mean* loss over the data. Batches are weighted by
their size, so with a mean-reduced loss (the PyTorch default) gradient() is the gradient of the loss averaged
over every sample, the Hessian/GGN diagonals are those of that average loss, and the Fisher diagonal
(mean over samples of squared per-sample gradients) is on the same scale.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Optional, Protocol

import torch
from torch import Tensor, nn

from weightshare.curvature.accumulators import WeightedMean, WeightedMeanWithVariance
from weightshare.curvature.functional import FunctionalLoss, LossFn
from weightshare.curvature.parameters import ParamsArg, iterate_batches, resolve_parameters
from weightshare.curvature.products import (DEFAULT_HVP_METHOD, GaussNewtonOperator, HessianOperator,
                                            check_hvp_method)

if TYPE_CHECKING:
    from weightshare.distributed import Group

DEFAULT_PROBES = 16
# Per-sample gradients are materialised a chunk of samples at a time: at most this many bytes of them.
FISHER_CHUNK_BYTES = 64 * 2**20


class BatchPass(Protocol):
    def add_batch(self, x: Tensor, y: Any) -> None: ...

    def reduce_(self, group: "Group") -> None:
        """Combine with the same pass on the other ranks of the group (their data counted once each)."""


class GradientPass:
    """Average of batch gradients, each weighted by its batch size."""

    def __init__(self, f: FunctionalLoss) -> None:
        self.f = f
        self._mean = WeightedMean()

    def add_batch(self, x: Tensor, y: Any) -> None:
        leaves = self.f.leaves()
        names = list(leaves)
        with torch.enable_grad():
            loss = self.f.loss(leaves, x, y)
            grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        self._mean.add(self.f.zeros_for_unused(dict(zip(names, grads))), weight=float(x.shape[0]))

    def reduce_(self, group: "Group") -> None:
        self._mean.reduce_(group, self.f.params)

    def result(self) -> dict[str, Tensor]:
        return self._mean.mean(self.f.params)


class HutchinsonPass:
    """diag(A) ~ E[z * A z] with Rademacher z (entries +-1), A the Hessian or Gauss-Newton matrix of each batch.

    Every (batch, probe) pair is one sample, weighted by the batch size; the variance of the mean is estimated
    from the spread of those samples. Probes are drawn on the CPU from one generator seeded with `seed`, in a
    fixed order (batch, probe, parameter), so the result is reproducible and the same on every device."""

    def __init__(self, f: FunctionalLoss, curvature: str, probes: int, seed: int,
                 method: str = DEFAULT_HVP_METHOD) -> None:
        self.f, self.curvature, self.probes, self.method = f, curvature, probes, method
        self._generator = torch.Generator().manual_seed(seed)
        self._mean = WeightedMeanWithVariance()

    def _rademacher(self, p: Tensor) -> Tensor:
        z = torch.randint(0, 2, p.shape, generator=self._generator, dtype=torch.int8) * 2 - 1
        return z.to(device=p.device, dtype=p.dtype)

    def add_batch(self, x: Tensor, y: Any) -> None:
        if self.curvature == "hessian":
            operator = HessianOperator(self.f, x, y, self.method)
        else:
            operator = GaussNewtonOperator(self.f, x, y)
        for _ in range(self.probes):
            z = {n: self._rademacher(p) for n, p in self.f.params.items()}
            az = operator(z)
            self._mean.add({n: z[n] * az[n] for n in z}, weight=float(x.shape[0]))

    def reduce_(self, group: "Group") -> None:
        self._mean.reduce_(group, self.f.params)

    def result(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return self._mean.mean(self.f.params), self._mean.variance_of_mean(self.f.params)


class FisherPass:
    """Mean over samples of squared per-sample gradients (the empirical Fisher diagonal).

    The per-sample loss is `loss_fn(model(x[i:i+1]), y[i:i+1])`: the same loss function with its reduction
    applied to a batch of one sample. Per-sample gradients come from torch.func.vmap(torch.func.grad(...)) over
    functional_call, `chunk_size` samples at a time so memory stays bounded. It serves any model; gather_stats
    takes the fused path (fused_fisher.py: ws.ops.sq_grad_accum, no per-sample gradients) whenever every layer
    allows it, which on LeNet-5 is about 5x faster and agrees to 1e-7."""

    def __init__(self, f: FunctionalLoss, chunk_size: Optional[int] = None) -> None:
        self.f = f
        gradient_bytes = sum(p.numel() * p.element_size() for p in f.params.values())
        # Budget twice the per-sample gradients: vmap's batched intermediates come on top of them. Measured on
        # LeNet-5 (1.7 MB of weights), the resulting ~19-sample chunks were as fast as any other size.
        self.chunk_size = chunk_size or max(1, FISHER_CHUNK_BYTES // (2 * gradient_bytes))
        self._mean = WeightedMean()

        def sample_loss(params: dict[str, Tensor], x_i: Tensor, y_i: Any) -> Tensor:
            # vmap strips the batch dimension; the model and the loss expect one, so put back a batch of one.
            return f.loss(params, x_i.unsqueeze(0), y_i.unsqueeze(0))

        # randomness="different": a model left in train mode may use dropout, each sample with its own mask.
        self._per_sample_grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0),
                                                 randomness="different")

    def add_batch(self, x: Tensor, y: Any) -> None:
        n = x.shape[0]
        if not isinstance(y, Tensor):
            raise TypeError(f"weightshare.curvature.{self.f.caller}: per-sample gradients need y to be a tensor, "
                            f"got {type(y).__name__}")
        if y.dim() == 0 or y.shape[0] != n:
            raise ValueError(f"weightshare.curvature.{self.f.caller}: per-sample gradients need y with the batch "
                             f"size {n} as leading dimension, got shape {tuple(y.shape)}")
        primals = self.f.primals()
        sums: dict[str, Tensor] = {}
        for start in range(0, n, self.chunk_size):
            x_chunk = x[start:start + self.chunk_size]
            grads = self._per_sample_grads(primals, x_chunk, y[start:start + self.chunk_size])
            for name, g in grads.items():
                # Square in place and sum the chunk in the gradients' dtype: casting the whole chunk to float64
                # first cost 8x more (memory traffic). Only the running total across chunks is float64.
                term = g.square_().sum(0).to(torch.float64)
                sums[name] = sums[name] + term if name in sums else term
        self._mean.add_sum(sums, weight=float(n))

    def reduce_(self, group: "Group") -> None:
        self._mean.reduce_(group, self.f.params)

    def result(self) -> dict[str, Tensor]:
        return self._mean.mean(self.f.params)


def run_passes(data: Iterable, passes: list[BatchPass], caller: str) -> int:
    """Feed every batch of `data` to every pass, once; returns the number of samples seen."""
    samples = 0
    for x, y in iterate_batches(data, caller):
        for statistic in passes:
            statistic.add_batch(x, y)
        samples += x.shape[0]
    return samples


def check_probes(probes: Any, caller: str) -> int:
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"weightshare.curvature.{caller}: probes must be a positive int, got {probes!r}")
    return probes


def gradient(model: nn.Module, loss_fn: LossFn, data: Iterable, params: ParamsArg = None) -> dict[str, Tensor]:
    """Average gradient of `loss_fn(model(x), y)` over the batches of `data`, each weighted by its size.

    `data` is an iterable of (x, y) batches (or a single (x, y) pair); `params` defaults to
    compressible_parameters(model). With a mean-reduced loss this is the gradient of the loss averaged over all
    samples."""
    f = FunctionalLoss(model, loss_fn, resolve_parameters(model, params, "gradient"), "gradient")
    statistic = GradientPass(f)
    run_passes(data, [statistic], "gradient")
    return statistic.result()


def hessian_diag(model: nn.Module, loss_fn: LossFn, data: Iterable, probes: int = DEFAULT_PROBES,
                 params: ParamsArg = None, seed: int = 0,
                 method: str = DEFAULT_HVP_METHOD) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Hutchinson estimate of the Hessian diagonal, diag(H) ~ mean of z * (H z) over Rademacher probes z.

    `probes` Hessian-vector products per batch of `data` (each batch prepared once, see HessianOperator), batches
    weighted by their size. Returns (diag, variance): variance is the per-entry estimated variance of the mean
    (sample variance / number of samples, +inf with a single sample), so sqrt(variance) is the standard error
    of diag. Deterministic for a given seed. `method` chooses the Hessian-vector product (see hvp)."""
    check_hvp_method(method, "hessian_diag")
    f = FunctionalLoss(model, loss_fn, resolve_parameters(model, params, "hessian_diag"), "hessian_diag")
    statistic = HutchinsonPass(f, "hessian", check_probes(probes, "hessian_diag"), seed, method)
    run_passes(data, [statistic], "hessian_diag")
    return statistic.result()


def ggn_diag(model: nn.Module, loss_fn: LossFn, data: Iterable, probes: int = DEFAULT_PROBES,
             params: ParamsArg = None, seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Hutchinson estimate of the generalized Gauss-Newton diagonal (see ggn_vp); returns (diag, variance) as
    hessian_diag does. Non-negative in expectation for losses convex in the outputs."""
    f = FunctionalLoss(model, loss_fn, resolve_parameters(model, params, "ggn_diag"), "ggn_diag")
    statistic = HutchinsonPass(f, "ggn", check_probes(probes, "ggn_diag"), seed)
    run_passes(data, [statistic], "ggn_diag")
    return statistic.result()


def fisher_diag(model: nn.Module, loss_fn: LossFn, data: Iterable, params: ParamsArg = None,
                chunk_size: Optional[int] = None) -> dict[str, Tensor]:
    """Empirical Fisher diagonal: F = 1/N sum_i (d l_i / dW)^2 over the N samples of `data`.

    l_i is the per-sample loss `loss_fn(model(x[i:i+1]), y[i:i+1])`, i.e. `loss_fn` with its reduction applied
    to a batch of one sample. So F is the mean (not the sum) of squared per-sample gradients of the per-sample
    loss, on the scale of the Hessian of the mean loss: for cross-entropy it equals the GGN diagonal of the
    mean loss in expectation when the labels are drawn from the model's own predictions. With one loss term per
    sample (classification), reduction='sum' gives the same F as 'mean' although its batch Hessian is N times
    larger: F always compares with the Hessian of the mean loss.

    `y` must be a tensor with the batch as leading dimension. `chunk_size` samples' gradients are materialised
    at once (default: as many as fit in 64 MiB). The model's mode is respected: use eval mode for deterministic
    statistics (in train mode, dropout draws a mask per sample)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"weightshare.curvature.fisher_diag: chunk_size must be a positive int or None, "
                         f"got {chunk_size!r}")
    f = FunctionalLoss(model, loss_fn, resolve_parameters(model, params, "fisher_diag"), "fisher_diag")
    statistic = FisherPass(f, chunk_size)
    run_passes(data, [statistic], "fisher_diag")
    return statistic.result()
