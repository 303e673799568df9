"""Pruning with retraining: the stage before weight sharing that the large compression ratios need.

Weight sharing alone cannot take a trained LeNet much below ~3 bits per weight without losing accuracy; Deep
Compression, soft weight-sharing and every result near 40-200x first drive most weights to exactly zero and let the
network retrain around the holes. `prune_retrain` does that iteratively: at each step it scores every weight,
keeps the best `density` fraction over all compressible layers together (so the sensitive layers keep more), holds
the pruned ones at zero while it retrains, and measures the accuracy on held-out data. It returns the sparsest
network that met the constraint.

How each step retrains decides how far it gets (train.RETRAIN_RECIPES): reaching the step's density gradually
(`ramp`, Zhu & Gupta 2017's cubic schedule over the first part of the step) while distilling from the dense model
(`distill`) kept LeNet-300-100 at the dense validation error with 10 % of its weights and LeNet-5 with 7.5 %,
where cutting at once and retraining 1-3 epochs on cross-entropy lost 0.2-0.4 % below 50 % density (measured).

Scores:
  "magnitude"  |w| / std(layer) (Han et al. 2015's per-layer threshold "quality x std", applied globally): the
               default, because it measured better here. On LeNet-300-100 (benchmarks/bench_prune_curve.py) it
               kept the validation error at 30 % density where "obd" had already lost 0.18 %, and gave lower test
               error at every density from 50 % to 2.3 %.
  "obd"        the loss model's own estimate of what removing a weight costs (Optimal Brain Damage, LeCun et al.
               1990): 1/2 h w^2 with h the empirical Fisher diagonal, recomputed on the calibration batches at every
               step because retraining moves it. The Fisher of these near-zero-loss networks underestimates real loss
               changes (see compress/quadratic.py), which is the likely reason it ranks weights worse.
The zero weights are then what a pinned zero codebook entry (`compress(..., prune=True)`) holds, and the index
stream's entropy coding (ws.save) stores them at well under one bit each.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from weightshare.compress.layers import compressible_layers

SALIENCIES = ("obd", "magnitude")


@dataclass
class PruneStep:
    density: float                 # target fraction of compressible weights kept
    metric: float                  # eval_fn after retraining
    feasible: bool
    layer_density: dict            # layer name -> kept fraction
    seconds: float


@dataclass
class PruneResult:
    model: nn.Module               # the pruned, retrained model (pruned weights exactly zero)
    masks: dict                    # layer name -> bool tensor, True = kept
    base_metric: float             # eval_fn of the model given
    metric: float                  # eval_fn of the returned model
    steps: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def density(self) -> float:
        kept = sum(int(m.sum()) for m in self.masks.values())
        return kept / max(1, sum(m.numel() for m in self.masks.values()))


def weight_scores(model: nn.Module, saliency: str, calib_batches: Optional[list], loss_fn, seed: int = 0
                  ) -> dict[str, Tensor]:
    """Per-weight scores (larger = keep) of every compressible layer, keyed by layer name."""
    if saliency not in SALIENCIES:
        raise ValueError(f"weightshare.compress.prune: saliency must be one of {SALIENCIES}, got {saliency!r}")
    layers = compressible_layers(model)
    if saliency == "magnitude":
        return {l.name: l.weight.abs() / (l.weight.std() + 1e-12) for l in layers}
    if not calib_batches:
        raise ValueError("weightshare.compress.prune: saliency='obd' needs calibration batches")
    from weightshare.curvature import gather_stats
    stats = gather_stats(model, loss_fn, calib_batches, kind="fisher", seed=seed)
    return {l.name: 0.5 * stats.diagonal[l.param].reshape(l.weight.shape).clamp_min(0) * l.weight.square()
            for l in layers}


def _layer_floor(min_layer_density: Union[float, dict], name: str) -> float:
    if isinstance(min_layer_density, dict):
        return float(min_layer_density.get(name, min_layer_density.get("*", 0.0)))
    return float(min_layer_density)


def global_masks(scores: dict[str, Tensor], previous: dict[str, Tensor], density: float,
                 min_layer_density: Union[float, dict]) -> dict[str, Tensor]:
    """Keep the `density` fraction of all weights with the highest scores, never reviving a pruned weight, and at
    least `min_layer_density` of each layer (its best-scored weights), so no layer is cut off entirely. A dict
    gives each layer its own floor (key "*" for the rest): the small layers whose weights cost almost nothing to
    store but carry the features (LeNet-5's conv1 has 500 of its 431,080 weights) can be kept denser."""
    flat = torch.cat([torch.where(previous[n].reshape(-1), s.reshape(-1).double(), -1.0) for n, s in scores.items()])
    keep = max(1, int(round(density * flat.numel())))
    threshold = torch.topk(flat, keep, sorted=True).values[-1] if keep < flat.numel() else -math.inf
    masks = {}
    for n, s in scores.items():
        s = torch.where(previous[n], s.double(), -1.0)
        m = (s >= threshold) & previous[n]
        floor = min(int(previous[n].sum()), math.ceil(_layer_floor(min_layer_density, n) * s.numel()))
        if int(m.sum()) < floor:
            top = torch.topk(s.reshape(-1), floor).indices
            m = torch.zeros(s.numel(), dtype=torch.bool)
            m[top] = True
            m = m.reshape(s.shape)
        masks[n] = m
    return masks


def _apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> Callable[[], None]:
    """Zero the pruned weights now and return the post-step hook that keeps them at zero during training."""
    modules = dict(model.named_modules())
    pairs = [(modules[n].weight, m.to(modules[n].weight.dtype)) for n, m in masks.items()]

    @torch.no_grad()
    def hold() -> None:
        for w, m in pairs:
            w.mul_(m)
    hold()
    return hold


class _GradualMasks:
    """The post-step hook of a ramped pruning step: moves the masks from density `start` to `end` along Zhu & Gupta
    (2017)'s cubic schedule, d(t) = end + (start - end) (1 - t / ramp)^3, re-scoring the weights every `every`
    optimiser steps until step `ramp`, and holds the pruned weights at zero after every step. Pruning a little at
    a time lets the network move its remaining weights before the next cut instead of absorbing the whole cut
    at once (with the step's learning rate still high)."""

    def __init__(self, model: nn.Module, masks: dict[str, Tensor], start: float, end: float, ramp: int, every: int,
                 score: Callable[[], dict[str, Tensor]], min_layer_density: Union[float, dict]):
        self.model, self.masks, self.start, self.end = model, masks, start, end
        self.ramp, self.every, self.score = max(1, ramp), max(1, every), score
        self.min_layer_density = min_layer_density
        self.t = 0
        self.hold = _apply_masks(model, masks)

    def __call__(self) -> None:
        self.t += 1
        if self.t <= self.ramp and (self.t % self.every == 0 or self.t == self.ramp):
            density = self.end + (self.start - self.end) * (1 - self.t / self.ramp) ** 3
            self.masks = global_masks(self.score(), self.masks, density, self.min_layer_density)
            self.hold = _apply_masks(self.model, self.masks)
        self.hold()


def prune_retrain(model: nn.Module, train_set, loss_fn, eval_fn: Callable[[nn.Module], float], *,
                  calib_batches: Optional[list] = None, max_accuracy_drop: float = 0.0,
                  baseline_metric: Optional[float] = None, saliency: str = "magnitude", start_density: float = 0.5,
                  factor: float = 0.7, min_density: float = 0.005, min_layer_density: Union[float, dict] = 0.01,
                  epochs: int = 2, lr: float = 0.01, batch_size: int = 128, weight_decay: float = 1e-4,
                  patience: int = 3, max_steps: Optional[int] = None, ramp: float = 0.0,
                  rescore_every: Optional[int] = None, distill: float = 0.0, temperature: float = 2.0, seed: int = 0,
                  progress: bool = True,
                  log: Optional[Callable[[str], None]] = None,
                  on_step: Optional[Callable[[PruneStep, nn.Module], None]] = None) -> PruneResult:
    """Iteratively prune `model` (a copy; the argument is not modified) and retrain it on `train_set`.

    Densities start_density, start_density*factor, ... down to min_density; after each the pruned network is
    retrained for `epochs` epochs (SGD with Nesterov momentum, cosine learning rate from `lr`) with its pruned
    weights held at zero, and judged feasible when eval_fn (held-out accuracy, higher is better) is at least
    baseline_metric - max_accuracy_drop (baseline_metric defaults to eval_fn(model)). Each step continues from the
    previous one, feasible or not (on a 5,000-image validation set one image is 0.02 %, so a single step's verdict
    is noisy and the next step's retraining often recovers); the search ends after `patience` infeasible steps in a
    row (or after `max_steps` steps) and returns the sparsest feasible network it saw (the given model if none).
    on_step(step, model), when given, sees every step's retrained network (to evaluate a whole curve in one run, or
    to keep candidates; copy it, do not modify it).
    ramp: the fraction of each step's optimiser steps over which its density is reached gradually (cubic schedule,
    _GradualMasks); 0 cuts to the step's density at once before retraining. rescore_every: optimiser steps between
    re-scorings during a ramp (default an eighth of an epoch; OBD scores cost a Fisher pass each). It matters: on
    LeNet-300-100 (20-epoch steps) re-scoring every 268 steps instead of every 53 left the 10 % network 0.28 %
    short of the dense validation error instead of level with it (one run each, 2026-11-29).
    distill, temperature: retrain towards the given (dense) model's soft outputs (train(teacher=...)); 0 = plain
    cross-entropy.
    """
    if not 0 < factor < 1 or not 0 < start_density <= 1 or not 0 < min_density <= start_density:
        raise ValueError(f"weightshare.compress.prune: need 0 < factor < 1 and 0 < min_density <= start_density "
                         f"<= 1, got factor={factor}, start_density={start_density}, min_density={min_density}")
    if not 0 <= ramp <= 1:
        raise ValueError(f"weightshare.compress.prune: ramp must be in [0, 1], got {ramp}")
    if rescore_every is not None and rescore_every < 1:
        raise ValueError(f"weightshare.compress.prune: rescore_every must be >= 1, got {rescore_every}")
    if epochs < 1 or patience < 1 or (max_steps is not None and max_steps < 1):
        raise ValueError(f"weightshare.compress.prune: epochs, patience and max_steps must be >= 1, got {epochs}, "
                         f"{patience}, {max_steps}")
    from weightshare.train import train
    t0 = time.time()
    work = copy.deepcopy(model).eval()
    teacher = copy.deepcopy(model).eval() if distill > 0 else None
    batches_per_epoch = math.ceil(len(train_set) / batch_size)

    def score() -> dict[str, Tensor]:
        return weight_scores(work, saliency, calib_batches, loss_fn, seed)
    base = float(eval_fn(work)) if baseline_metric is None else float(baseline_metric)
    masks = {l.name: torch.ones_like(l.weight, dtype=torch.bool) for l in compressible_layers(work)}
    best_state, best_masks, best_metric = copy.deepcopy(work.state_dict()), masks, float(eval_fn(work))
    steps: list[PruneStep] = []
    density, previous, misses = start_density, 1.0, 0
    say = log or (lambda msg: None)
    while density >= min_density * (1 - 1e-9) and misses < patience and len(steps) < (max_steps or math.inf):
        t1 = time.time()
        if ramp > 0:
            hold = _GradualMasks(work, masks, previous, density, int(ramp * epochs * batches_per_epoch),
                                 rescore_every or batches_per_epoch // 8, score, min_layer_density)
        else:
            masks = global_masks(score(), masks, density, min_layer_density)
            hold = _apply_masks(work, masks)
        train(work, train_set, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
              seed=seed + len(steps) + 1, progress=progress, post_step=hold, teacher=teacher, distill=distill,
              temperature=temperature)
        if ramp > 0:
            masks = hold.masks
        metric = float(eval_fn(work))
        ok = base - metric <= max_accuracy_drop + 1e-12
        steps.append(PruneStep(density, metric, ok, {n: float(m.float().mean()) for n, m in masks.items()},
                               time.time() - t1))
        say(f"  [prune {saliency}] density {density:.4f}: metric {metric:.5f} (baseline {base:.5f}) -> "
            f"{'feasible' if ok else 'infeasible'} ({time.time() - t1:.0f} s)")
        if on_step is not None:
            on_step(steps[-1], work)
        if ok:
            best_state, best_masks, best_metric = copy.deepcopy(work.state_dict()), masks, metric
        misses = 0 if ok else misses + 1
        previous, density = density, density * factor
    work.load_state_dict(best_state)
    return PruneResult(work.eval(), best_masks, base, best_metric, steps, time.time() - t0)
