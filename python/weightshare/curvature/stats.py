"""The curvature statistics the compressor consumes: one gradient and one diagonal per compressible weight,
gathered in a single sweep over the calibration data.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from weightshare.curvature.diagonals import (DEFAULT_PROBES, FisherPass, GradientPass, HutchinsonPass,
                                             check_probes, run_passes)
from weightshare.curvature.functional import FunctionalLoss, LossFn
from weightshare.curvature.fused_fisher import FusedFisherPass, fused_modules
from weightshare.curvature.parameters import ParamsArg, resolve_parameters
from weightshare.curvature.products import DEFAULT_HVP_METHOD
from weightshare.distributed import as_group

STAT_KINDS = ("fisher", "hessian", "ggn_diag")


@dataclass
class CurvatureStats:
    """Gradient and curvature diagonal of the mean loss, per parameter name (dicts ordered alike).

    method: "fisher" (empirical Fisher diagonal), "hessian" (Hutchinson on H) or "ggn_diag" (Hutchinson on the
    Gauss-Newton matrix). variance: for the Hutchinson methods, the estimated variance of each diagonal entry;
    None for the Fisher, which is exact for its data."""
    gradient: dict[str, Tensor]
    diagonal: dict[str, Tensor]
    method: str
    num_samples: int
    variance: Optional[dict[str, Tensor]] = None
    probes: Optional[int] = None
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = list(self.diagonal)

    def predicted_loss_change(self, delta: Mapping[str, Tensor]) -> float:
        """Second-order model with the diagonal: dL ~ sum g.dW + 1/2 sum diag * dW^2, over the names in delta."""
        total = 0.0
        for name, d in delta.items():
            if name not in self.diagonal:
                raise ValueError(f"CurvatureStats.predicted_loss_change: delta names {name!r}, which has no "
                                 f"statistics (have {self.names})")
            d64 = d.detach().to(torch.float64)
            g = self.gradient[name].to(d64)
            h = self.diagonal[name].to(d64)
            total += float((g * d64).sum() + 0.5 * (h * d64 * d64).sum())
        return total


def gather_stats(model: nn.Module, loss_fn: LossFn, data: Iterable, kind: str = "fisher",
                 probes: int = DEFAULT_PROBES, params: ParamsArg = None, seed: int = 0,
                 hvp_method: str = DEFAULT_HVP_METHOD, process_group: Any = None) -> CurvatureStats:
    """Average gradient and a curvature diagonal of `loss_fn(model(x), y)` over `data`, in one pass over it.

    kind: "fisher" (fisher_diag), "hessian" (hessian_diag with `probes` probes per batch), "ggn_diag" (Hutchinson
    on ggn_vp). `params` defaults to compressible_parameters(model); `seed` fixes the Hutchinson probes. `data`
    is iterated once, so a generator works.

    process_group: a torch.distributed group whose every rank calls this with the same model and its own shard of
    the data (at least one batch each): every rank gets the statistics of all the shards together (the gradient
    and the Fisher diagonal equal one process's over the concatenated data up to float64 rounding; Hutchinson
    estimates draw independent probes on each rank, rank 0 the ones a single process draws)."""
    if kind not in STAT_KINDS:
        raise ValueError(f"weightshare.curvature.gather_stats: kind must be one of {STAT_KINDS}, got {kind!r}")
    group = as_group(process_group, "curvature.gather_stats")
    f = FunctionalLoss(model, loss_fn, resolve_parameters(model, params, "gather_stats"), "gather_stats")
    gradient_pass = GradientPass(f)
    if kind == "fisher":
        modules = fused_modules(model, f.params)  # the sq_grad_accum path when every layer allows it
        diagonal_pass = FusedFisherPass(f, modules) if modules is not None else FisherPass(f)
    else:
        curvature = "hessian" if kind == "hessian" else "ggn"
        rank_seed = seed + 1_000_003 * group.rank  # independent probes per rank
        diagonal_pass = HutchinsonPass(f, curvature, check_probes(probes, "gather_stats"), rank_seed, hvp_method)
    samples = group.together(lambda: run_passes(data, [gradient_pass, diagonal_pass], "gather_stats"))
    if group.distributed:
        gradient_pass.reduce_(group)
        diagonal_pass.reduce_(group)
        samples = int(group.sum([torch.tensor([float(samples)])])[0][0])
    if isinstance(diagonal_pass, (FisherPass, FusedFisherPass)):
        return CurvatureStats(gradient_pass.result(), diagonal_pass.result(), kind, samples)
    diagonal, variance = diagonal_pass.result()
    return CurvatureStats(gradient_pass.result(), diagonal, kind, samples, variance, probes)
