"""Size allocation across layers by one price: the Lagrangian form of "greedy on loss change per byte saved".

For a price mu (loss units per bit of file), every layer independently picks the codebook size k and the
entropy-constrained assignment that minimise  predicted dL_l + mu * bits_l  (quadratic.fit_layer with
entropy_weight = mu: rarely used entries cost more bits, so cheap-to-move weights drift to the frequent entries
and to the pinned zero, which is how pruning emerges). A larger mu gives a smaller file and a larger loss change.
The search over mu is a trust-region-like loop on *measured* outcomes: each trial is evaluated on the
calibration loss (and held-out metric); feasible trials raise mu (bigger steps), infeasible ones lower it
(bisection on log mu), and the smallest feasible model wins. Each trial is logged with predicted and measured
loss change, so the model's reliability is visible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from weightshare.compress.quadratic import Fit, fit_layer

K_LADDER = (2, 3, 4, 6, 8, 12, 16, 24, 32)


@dataclass
class Trial:
    mu: float
    bytes: float
    predicted: float
    measured: float
    metric: Optional[float]
    feasible: bool
    ks: dict


class LayerFits:
    """fit_layer per (layer, k, mu), cached across trials."""

    def __init__(self, stats: dict, prune: bool):
        self.stats = stats
        self.prune = prune
        self._cache: dict = {}

    def get(self, name: str, k: int, mu: float) -> Fit:
        key = (name, k, mu)
        if key not in self._cache:
            w, g, h = self.stats[name]
            self._cache[key] = fit_layer(w, g, h, k, prune=self.prune, entropy_weight=mu)
        return self._cache[key]

    def choose(self, names: list[str], mu: float, ladder=K_LADDER) -> dict[str, Fit]:
        out = {}
        for n in names:
            best = None
            for k in ladder:
                f = self.get(n, k, mu)
                cost = f.predicted + mu * 8 * f.bytes
                if best is None or cost < best[0]:
                    best = (cost, f)
            out[n] = best[1]
        return out


def price_scale(stats: dict) -> float:
    """A mu at which moving a typical weight by one standard deviation costs about one bit: the search brackets
    mu around it."""
    vals = []
    for w, _, h in stats.values():
        vals.append(float(h.clamp_min(0).mean()) * float(w.float().var()))
    return max(max(vals), 1e-30)


def search(names: list[str], fits: LayerFits, evaluate: Callable[[dict[str, Fit]], tuple[float, Optional[float], bool]],
           steps: int = 10, ladder=K_LADDER, log: Optional[Callable[[Trial], None]] = None):
    """Bisection on log mu for the smallest feasible model. evaluate(fits) -> (measured loss increase, metric,
    feasible). Returns (best fits or None, trials)."""
    scale = price_scale(fits.stats)
    lo, hi = math.log(scale * 1e-6), math.log(scale * 1e2)
    trials: list[Trial] = []
    best = None
    for i in range(steps):
        mu = math.exp(lo if i == 0 else hi if i == 1 else 0.5 * (lo + hi))
        chosen = fits.choose(names, mu, ladder)
        measured, metric, ok = evaluate(chosen)
        size = sum(f.bytes for f in chosen.values())
        t = Trial(mu, size, sum(f.predicted for f in chosen.values()), measured, metric, ok,
                  {n: f.k for n, f in chosen.items()})
        trials.append(t)
        if log is not None:
            log(t)
        if ok and (best is None or size < best[0]):
            best = (size, chosen)
        if i == 0:
            if not ok:
                break  # even the gentlest price fails the constraint
            continue
        if i == 1:
            if ok:
                break  # the harshest price is fine: nothing to search
            continue
        if ok:
            lo = math.log(mu)
        else:
            hi = math.log(mu)
    return (best[1] if best else None), trials
