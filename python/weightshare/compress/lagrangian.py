"""Size allocation across layers for method="loss_aware": three measured phases, each proposal judged on the
real calibration loss and held-out metric (the trust-region principle: the model proposes, measurement decides).

1. Uniform: every layer at 2**b entries (loss-aware fits, no size price), b from 8 down while feasible. This is
   where the baselines stop; the loss-aware fits are at least as good at equal size.
2. Per layer: from there, repeatedly propose the step down the K ladder (one layer, next smaller codebook) with
   the smallest predicted loss increase per byte saved; accept it if the measured outcome stays feasible, else
   freeze that layer (the model was wrong about it, or the budget is spent).
3. Size price: with the sizes fixed, a price mu per file bit makes the assignment entropy-constrained (rarely
   used entries cost more, so low-saliency weights drift to frequent entries and the pinned zero): mu rises
   geometrically while the result stays feasible.
Every proposal is logged (predicted vs measured loss change), and the smallest feasible model wins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from weightshare.compress.quadratic import Fit, fit_layer
from weightshare.compress.spread import fits_spread
from weightshare.distributed import Group

K_LADDER = (2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


@dataclass
class Trial:
    phase: str
    note: str
    bytes: float
    predicted: float
    measured: float
    metric: Optional[float]
    feasible: bool
    ks: dict


class LayerFits:
    """fit_layer per (layer, k, mu), cached across proposals. With a process group, prefetch spreads the fits a
    step will ask for over the ranks (get alone would compute them on every rank)."""

    def __init__(self, stats: dict, prune: bool, group: Optional[Group] = None):
        self.stats = stats
        self.prune = prune
        self.group = group or Group()
        self._cache: dict = {}

    def _fit(self, key: tuple) -> Fit:
        name, k, mu = key
        w, g, h = self.stats[name]
        return fit_layer(w, g, h, k, prune=self.prune, entropy_weight=mu)

    def prefetch(self, keys: list[tuple]) -> None:
        """Compute the missing (name, k, mu) fits of `keys`, spread over the group's ranks."""
        if not self.group.distributed:
            return
        missing = [key for key in dict.fromkeys(keys) if key not in self._cache]
        if missing:
            self._cache.update(fits_spread(self.group, missing, lambda key: self.stats[key[0]][0], self._fit))

    def get(self, name: str, k: int, mu: float = 0.0) -> Fit:
        key = (name, k, mu)
        if key not in self._cache:
            self._cache[key] = self._fit(key)
        return self._cache[key]


def price_scale(stats: dict) -> float:
    """A price at which moving a typical weight by one standard deviation costs about one bit."""
    vals = [float(h.clamp_min(0).mean()) * float(w.float().var()) for w, _, h in stats.values()]
    return max(max(vals), 1e-30)


def search(names: list[str], fits: LayerFits,
           evaluate: Callable[[dict[str, Fit]], tuple[float, Optional[float], bool, dict[str, Fit]]],
           log: Optional[Callable[[Trial], None]] = None, max_price_steps: int = 10):
    """Returns (smallest feasible fits or None, trials). evaluate(fits) -> (measured loss increase, metric, ok,
    the fits as judged: possibly with fine-tuned codebooks)."""
    trials: list[Trial] = []
    best: Optional[tuple[float, dict]] = None

    def judge(phase: str, note: str, chosen: dict[str, Fit]) -> Optional[dict[str, Fit]]:
        """The judged fits when feasible, else None."""
        nonlocal best
        measured, metric, ok, chosen = evaluate(chosen)
        size = sum(f.bytes for f in chosen.values())
        t = Trial(phase, note, size, sum(f.predicted for f in chosen.values()), measured, metric, ok,
                  {n: f.k for n, f in chosen.items()})
        trials.append(t)
        if log is not None:
            log(t)
        if ok and (best is None or size < best[0]):
            best = (size, dict(chosen))
        return dict(chosen) if ok else None

    # 1. uniform sizes
    current = None
    for b in range(8, 0, -1):
        fits.prefetch([(n, 1 << b, 0.0) for n in names])
        judged = judge("uniform", f"{b} bits", {n: fits.get(n, 1 << b) for n in names})
        if judged is None:
            break
        current = judged
    if current is None:
        return None, trials
    # 2. per-layer steps down the ladder, cheapest predicted loss per byte first
    frozen: set[str] = set()
    while True:
        fits.prefetch([(n, [k for k in K_LADDER if k < current[n].k][-1], 0.0) for n in names
                       if n not in frozen and current[n].k > K_LADDER[0]])
        proposals = []
        for n in names:
            if n in frozen:
                continue
            smaller = [k for k in K_LADDER if k < current[n].k]
            if not smaller:
                continue
            cand = fits.get(n, smaller[-1])
            saved = current[n].bytes - cand.bytes
            if saved > 0:
                proposals.append(((cand.predicted - current[n].predicted) / saved, n, cand))
        if not proposals:
            break
        _, n, cand = min(proposals, key=lambda p: p[0])
        trial = dict(current)
        trial[n] = cand
        judged = judge("layer", f"{n}: k {current[n].k} -> {cand.k}", trial)
        if judged is not None:
            current = judged
        else:
            frozen.add(n)
    # 3. a price per file bit, rising geometrically while feasible
    mu = price_scale(fits.stats) * 1e-7  # gentle start: the diagonal model underestimates these moves badly
    for _ in range(max_price_steps):
        fits.prefetch([(n, current[n].k, mu) for n in names])
        judged = judge("price", f"mu={mu:.2e}", {n: fits.get(n, current[n].k, mu) for n in names})
        if judged is None:
            break
        current = judged
        mu *= 4
    return best[1], trials
