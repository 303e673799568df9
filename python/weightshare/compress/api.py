"""ws.compress: compress a trained model's Linear/Conv layers by weight sharing under a loss or accuracy constraint."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from weightshare.compress.baselines import METHODS, fit_baseline
from weightshare.compress.finetune import check_batch_counts, finetune_codebooks
from weightshare.compress.layers import (batch_size, compressible_layers, mean_loss, round_biases_to_half_,
                                         weights_swapped)
from weightshare.compress.lagrangian import LayerFits, Trial, search
from weightshare.compress.quadratic import Fit
from weightshare.compress.spread import fits_spread
from weightshare.distributed import as_group


@dataclass
class LayerReport:
    name: str
    kind: str
    shape: tuple
    k: int
    bits: int
    entropy: float          # bits per weight of the index stream
    bytes: float            # estimated: index stream (packed or entropy coded, the smaller) + fp32 codebook
    predicted: float        # the model's predicted loss change of this layer alone


@dataclass
class CompressResult:
    model: nn.Module                    # the compressed model (shared-weight layers where available)
    method: str
    fits: dict                          # layer name -> Fit (codebook, indices)
    layers: list[LayerReport]
    base_loss: float                    # calibration loss before and after
    loss: float
    predicted_increase: float
    base_metric: Optional[float] = None  # eval_fn before and after (e.g. validation accuracy)
    metric: Optional[float] = None
    steps: list = field(default_factory=list)  # the search's trials (lagrangian.Trial), logged
    budget: Optional[float] = None
    seconds: float = 0.0

    @property
    def report(self) -> "CompressResult":
        return self

    @property
    def weight_bytes_fp32(self) -> int:
        return sum(4 * math.prod(r.shape) for r in self.layers)

    @property
    def compressed_weight_bytes(self) -> float:
        return sum(r.bytes for r in self.layers)

    @property
    def weight_compression_ratio(self) -> float:
        """fp32 bytes of the compressed layers' weights over their estimated compressed bytes (biases and other
        parameters are counted by ws.size_report on the saved file)."""
        return self.weight_bytes_fp32 / self.compressed_weight_bytes

    def __str__(self) -> str:
        lines = [f"method={self.method}  loss {self.base_loss:.5f} -> {self.loss:.5f} "
                 f"(measured +{self.loss - self.base_loss:.5f}, predicted +{self.predicted_increase:.5f})"]
        if self.metric is not None:
            lines.append(f"eval metric {self.base_metric:.5f} -> {self.metric:.5f}")
        lines.append(f"{'layer':24s} {'shape':>18s} {'k':>4s} {'bits':>4s} {'H(idx)':>7s} {'bytes':>10s} "
                     f"{'pred dL':>10s}")
        for r in self.layers:
            lines.append(f"{r.name:24s} {str(tuple(r.shape)):>18s} {r.k:4d} {r.bits:4d} {r.entropy:7.3f} "
                         f"{r.bytes:10.0f} {r.predicted:10.2e}")
        lines.append(f"weights: {self.weight_bytes_fp32} fp32 bytes -> {self.compressed_weight_bytes:.0f} "
                     f"({self.weight_compression_ratio:.1f}x)")
        return "\n".join(lines)


def _progress_writer(progress: bool) -> Optional[Callable[[str], None]]:
    """Where the search logs its steps: tqdm.write (it keeps progress bars intact) or print, None when quiet."""
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return print
    return tqdm.write


def _parse_budget(max_loss_increase, base_loss: float) -> Optional[float]:
    if max_loss_increase is None:
        return None
    if isinstance(max_loss_increase, str):
        s = max_loss_increase.strip()
        if not s.endswith("%"):
            raise ValueError(f"weightshare.compress: max_loss_increase must be a number (absolute) or a string "
                             f"like '2%' (relative), got {max_loss_increase!r}")
        return float(s[:-1]) / 100 * abs(base_loss)
    v = float(max_loss_increase)
    if not v >= 0:
        raise ValueError(f"weightshare.compress: max_loss_increase must be >= 0, got {v}")
    return v


def _with_half_biases(model: nn.Module) -> nn.Module:
    """A copy of the model whose compressible layers' float32 biases are rounded to float16 values."""
    out = copy.deepcopy(model)
    round_biases_to_half_(l.module for l in compressible_layers(out))
    return out


def _apply(model: nn.Module, fits: dict[str, Fit], shared: bool) -> nn.Module:
    """A copy of the model whose layers carry the fits: shared-weight layers (ws.replace_layers) when available,
    else dense dequantised weights."""
    out = copy.deepcopy(model)
    if shared:
        try:
            from weightshare.replace import replace_layers
        except ImportError:
            shared = False
    if shared:
        replace_layers(out, {n: (f.codebook, f.idx) for n, f in fits.items()})
        return out
    mods = dict(out.named_modules())
    with torch.no_grad():
        for n, f in fits.items():
            mods[n].weight.copy_(f.dequantized().reshape(mods[n].weight.shape))
    return out


def compress(model: nn.Module, data, loss_fn: Callable, method: str = "loss_aware",
             bits: Union[int, dict, None] = None, max_loss_increase=None, max_accuracy_drop: Optional[float] = None,
             eval_fn: Optional[Callable[[nn.Module], float]] = None, prune: bool = False, progress: bool = True,
             curvature: str = "fisher", finetune_data=None, finetune_epochs: int = 1, finetune_lr: float = 1e-4,
             shared_layers: bool = True, seed: int = 0, baseline_metric: Optional[float] = None,
             half_bias: bool = True, process_group: Any = None) -> CompressResult:
    """Compress `model`'s Linear/Conv1d/Conv2d layers by learned weight sharing.

    data: calibration batches [(x, y), ...] (iterated several times): the loss model's statistics (gradient and
    curvature diagonal, `curvature` = "fisher" | "hessian" | "ggn_diag") and the measured loss come from it.
    method: "loss_aware" (ours) or a baseline: "kmeans", "hessian_kmeans", "uniform", "hashed".
    bits: an int (every layer 2**bits entries) or {layer: bits}: fixed sizes, no search. Otherwise sizes are
    searched under the constraint: loss_aware runs three measured phases (uniform sizes, per-layer steps by
    predicted loss per byte, then a size price for entropy-constrained assignment; lagrangian.py); the
    baselines use the smallest uniform bit width that meets the constraint (their own zero-loss point).
    prune: pin one codebook entry at exactly zero (off by default: at fixed sizes on the MNIST nets it raised the
    measured loss, e.g. LeNet-5 2 bits +0.0198 vs +0.0150 without). loss_aware may move any weight there; for
    kmeans / hessian_kmeans / uniform it holds exactly the weights that are already zero (a pruned network) and
    the other k - 1 entries fit the rest, as in Deep Compression.
    finetune_data: training batches for codebook fine-tuning (Han et al.; assignments fixed). Given, a candidate
    that fails the constraint is fine-tuned for `finetune_epochs` and judged again (every method alike); with
    fixed `bits` the fits are always fine-tuned. (Retraining the whole network through its shared weights is
    compress.qat.quantize_retrain, a separate stage.)
    Constraints: max_loss_increase (absolute number, or "2%" relative to the calibration loss), and/or
    max_accuracy_drop with eval_fn(model) -> accuracy on held-out data (0 = no drop at all). Neither given: "1%".
    baseline_metric: the accuracy max_accuracy_drop is measured from (default eval_fn(model)); give the original
    dense model's when `model` was already pruned (prune.prune_retrain), so the drop is counted end to end.
    half_bias: round the compressed layers' float32 biases to float16, which ws.save then stores at half the bytes
    (a LeNet-5's 580 biases are 2.3 kB, a quarter of a 200x file). The base loss and metric are the given model's,
    so the rounding is part of what the constraint checks.
    process_group: a torch.distributed group (e.g. torch.distributed.group.WORLD, gloo or NCCL) whose every rank
    calls compress with the same model and arguments and its own shard of `data` (and of `finetune_data`), at
    least one batch each. The statistics and every measured loss are over all the shards together, the per-layer
    fits are spread over the ranks by layer size, eval_fn runs on every rank and rank 0's value decides, so every
    rank takes the same steps and returns the same result: the single-process result on the concatenated data
    (up to float64 rounding in the statistics; curvature="hessian" / "ggn_diag" draw their probes per rank).
    Fine-tuning steps average the ranks' batch gradients (data-parallel: one process's result when its batches
    are the ranks' batches merged step by step), which needs the same number of fine-tuning batches on every rank.
    A failure in any rank's data, loss_fn, eval_fn or fitting raises on every rank (the others a RuntimeError
    naming it), so no rank is left waiting in a collective.
    """
    if method not in METHODS:
        raise ValueError(f"weightshare.compress: method must be one of {METHODS}, got {method!r}")
    if max_accuracy_drop is not None and eval_fn is None:
        raise ValueError("weightshare.compress: max_accuracy_drop needs eval_fn(model) -> accuracy")
    t0 = time.time()
    group = as_group(process_group, "compress")
    where = f" on rank {group.rank}" if group.distributed else ""

    def read_data() -> list:
        """The calibration batches (every step that runs user code on one rank runs inside group.together, so a
        failure there stops every rank instead of leaving the others in a collective)."""
        out = list(data)
        if not out:
            raise ValueError(f"weightshare.compress: data is empty{where}")
        return out

    def read_finetune_data() -> Optional[list]:
        if finetune_data is None:
            return None
        out = list(finetune_data)
        empty = [i for i, (_, y) in enumerate(out) if batch_size(y) == 0]
        if empty:
            raise ValueError(f"weightshare.compress: finetune_data batches {empty} are empty{where}")
        return out

    def metric_now() -> Optional[float]:
        """eval_fn(model) as a float (or None), converted on the rank that computed it."""
        value = eval_fn(model)
        return None if value is None else float(value)

    batches = group.together(read_data)
    writer = group.together(lambda: _progress_writer(progress))
    model = model.eval()
    base_loss = mean_loss(model, loss_fn, batches, group)
    base_metric = (group.rank0(group.together(metric_now))
                   if eval_fn is not None and baseline_metric is None else baseline_metric)
    if half_bias:
        model = _with_half_biases(model)
    layers = compressible_layers(model)
    by_name = {l.name: l for l in layers}
    from weightshare.curvature import gather_stats
    stats = gather_stats(model, loss_fn, batches, kind=curvature, seed=seed, process_group=group)
    lstats = {l.name: (l.weight, stats.gradient[l.param], stats.diagonal[l.param]) for l in layers}

    def log(msg: str) -> None:
        if writer is not None and group.rank == 0:  # the ranks take the same steps: one log
            try:
                writer(msg)
            except OSError:  # a closed or broken stream must not stop this rank alone (the others would wait)
                pass

    def measure(fits: dict[str, Fit]) -> float:
        with weights_swapped(by_name, {n: f.dequantized() for n, f in fits.items()}):
            return mean_loss(model, loss_fn, batches, group)

    def metric_of(fits: dict[str, Fit]) -> Optional[float]:
        if eval_fn is None:
            return None
        with weights_swapped(by_name, {n: f.dequantized() for n, f in fits.items()}):
            return group.rank0(group.together(metric_now))

    def feasible(fits: dict[str, Fit], loss: float) -> tuple[bool, Optional[float]]:
        ok = budget is None or loss - base_loss <= budget + 1e-12
        metric = metric_of(fits) if max_accuracy_drop is not None else None
        if metric is not None:
            ok = ok and base_metric - metric <= max_accuracy_drop + 1e-12
        return ok, metric

    finetune_batches = group.together(read_finetune_data)
    check_batch_counts(group, finetune_batches)

    def fine_tuned(fits: dict[str, Fit]) -> dict[str, Fit]:
        return finetune_codebooks(model, by_name, fits, finetune_batches, loss_fn, finetune_epochs, finetune_lr,
                                  group)

    def baseline_fits(per: dict[str, int]) -> dict[str, Fit]:
        """The method's fit of each layer at 2**bits entries (spread over the ranks of a process group), in the
        model's layer order (every rank the same order, whatever order the dict was built in)."""
        unknown = sorted(set(per) - set(by_name))
        if unknown:
            raise ValueError(f"weightshare.compress: bits names {unknown}, which are not compressible layers of the "
                             f"model (have {list(by_name)})")
        return fits_spread(group, [l.name for l in layers if l.name in per], lambda n: by_name[n].weight,
                           lambda n: fit_baseline(method, *lstats[n], 1 << int(per[n]), seed, prune))

    def tuned(fits: dict[str, Fit]) -> tuple[dict[str, Fit], float, bool, Optional[float]]:
        """(fits, loss, ok, metric), fine-tuning the codebooks first when the fits fail and data was given."""
        loss = measure(fits)
        ok, metric = feasible(fits, loss)
        if not ok and finetune_batches:
            fits = fine_tuned(fits)
            loss = measure(fits)
            ok, metric = feasible(fits, loss)
        return fits, loss, ok, metric

    budget = _parse_budget(max_loss_increase, base_loss)
    if bits is None and budget is None and max_accuracy_drop is None:
        budget = _parse_budget("1%", base_loss)
    trials: list = []

    if bits is not None:  # fixed sizes: every method fits each layer once
        per = bits if isinstance(bits, dict) else {l.name: int(bits) for l in layers}
        fits = baseline_fits(per)
        if finetune_batches:  # no constraint to meet: fine-tune whenever data was given
            fits = fine_tuned(fits)
        loss = measure(fits)
        chosen_budget = None
    elif method == "loss_aware":
        fitter = LayerFits(lstats, prune, group)
        names = [l.name for l in layers]

        def evaluate(fits: dict[str, Fit]):
            fits, loss, ok, metric = tuned(fits)
            return loss - base_loss, metric, ok, fits

        def log_trial(t: Trial) -> None:
            log(f"  [{t.phase}] {t.note}: {t.bytes:.0f} bytes, loss +{t.measured:.5f} (predicted "
                f"{t.predicted:+.5f}), metric {t.metric} -> {'accept' if t.feasible else 'reject'}")

        fits, trials = search(names, fitter, evaluate, log=log_trial)
        if fits is None:  # nothing feasible: the gentlest codebooks available (256 entries, no size price)
            fitter.prefetch([(n, 256, 0.0) for n in names])
            fits = {n: fitter.get(n, 256) for n in names}
        loss = measure(fits)
        chosen_budget = budget
    else:  # a baseline's own operating point: the smallest uniform bit width meeting the constraint
        fits, loss, chosen_budget = None, None, budget
        for b in range(8, 0, -1):
            trial = baseline_fits({l.name: b for l in layers})
            trial, trial_loss, ok, metric = tuned(trial)
            log(f"{method} {b} bits: loss +{trial_loss - base_loss:.4f} metric {metric} -> "
                f"{'feasible' if ok else 'infeasible'}")
            if not ok and fits is not None:
                break
            fits, loss = trial, trial_loss
            if not ok:
                break
    reports = [LayerReport(n, by_name[n].kind, tuple(by_name[n].weight.shape), f.k, f.bits, f.entropy, f.bytes,
                           f.predicted) for n, f in fits.items()]
    out = _apply(model, fits, shared_layers)
    metric = metric_of(fits)
    return CompressResult(out, method, fits, reports, base_loss, loss, sum(f.predicted for f in fits.values()),
                          base_metric, metric, trials, chosen_budget, time.time() - t0)
