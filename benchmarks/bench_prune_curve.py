"""Pruning + retraining + weight sharing on MNIST: test error against the file's compression ratio, ours against the
Deep Compression pipeline, in one run.

    python benchmarks/bench_prune_curve.py [--model lenet300100] [--seeds 0 1 2]
        # writes benchmarks/results/prune_curve_<model>.json and .png (test error vs ratio, mean and spread over
        # the seeds); README table: python benchmarks/report.py

Two pipelines, each a chain of pruning steps (density 0.5, x0.6 per step, down to about 2 %; `epochs` of retraining
with the pruned weights held at zero after every step; ws.compress.prune_retrain), and after every step the pruned
network is quantised with a pinned zero entry at 3 and 4 bits, its codebooks fine-tuned (Han et al.), saved with
ws.save and measured from the reloaded file:
  ours:             loss-aware saliency (OBD, 1/2 h w^2, Fisher diagonal) + method="loss_aware"
  deep_compression: magnitude saliency (|w| / std, Han et al.'s threshold) + method="kmeans" (linear init)
plus the cross pairing (magnitude + loss_aware) that separates what each stage contributes. The accuracy
constraint is judged on the 5,000 held-out validation images against the dense model; test error is only reported.
A seed sets the retraining data order and the fits' seeds (the dense checkpoint is the same for all).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import error_point, machine, plot_error_vs_ratio, write_json  # noqa: E402

from weightshare.train import RETRAIN_RECIPES as RETRAIN  # noqa: E402
PIPELINES = {"ours": ("obd", ["loss_aware"]), "deep_compression": ("magnitude", ["kmeans", "loss_aware"])}
BITS = (3, 4)


def run(model_name: str, seed: int, min_density: float, cross: bool = True, progress: bool = False,
        retrain: Optional[dict] = None, pipelines=tuple(PIPELINES)) -> dict:
    """The curve of one model and seed; `retrain` overrides the model's RETRAIN_RECIPES (the tests use 1 epoch),
    `pipelines` picks some of PIPELINES."""
    import weightshare as ws
    from weightshare.cli import _load_baseline
    from weightshare.compress import compress
    from weightshare.compress.prune import prune_retrain
    from weightshare.data import mnist_splits
    from weightshare.train import evaluate

    splits = mnist_splits()
    dense = _load_baseline(model_name)
    xs, ys = splits.train.tensors
    calib = [(xs[i:i + 500], ys[i:i + 500]) for i in range(0, 5000, 500)]
    tune = [(xs[i:i + 100], ys[i:i + 100]) for i in range(5000, 15000, 100)]

    def val_acc(m):
        return 1.0 - evaluate(m, splits.val)[1]

    base_val, base_test = val_acc(dense), evaluate(dense, splits.test)[1]
    out = {"baseline_val_error": 1 - base_val, "baseline_test_error": base_test, "rows": [], "prune_steps": {}}
    tmp = Path(tempfile.mkdtemp(prefix="ws-prune-curve-"))
    for pipeline, (saliency, methods) in ((p, PIPELINES[p]) for p in pipelines):
        methods = methods if cross else methods[:1]
        t0 = time.time()

        def quantise(step, model, saliency=saliency, methods=methods, pipeline=pipeline):
            density = sum(int((p != 0).sum()) for n, p in model.named_parameters() if n.endswith("weight")
                          and p.dim() > 1) / sum(p.numel() for n, p in model.named_parameters()
                                                 if n.endswith("weight") and p.dim() > 1)
            for method in methods:
                for bits in BITS:
                    r = compress(model, calib, F.cross_entropy, method=method, bits=bits, prune=True,
                                 progress=False, finetune_data=tune, seed=seed)
                    path = tmp / f"{pipeline}-{method}-{bits}-{step.density:.4f}.ws"
                    ws.save(r.model, path)
                    loaded = ws.load(path)
                    row = {"seed": seed, "pipeline": pipeline, "saliency": saliency, "method": method, "bits": bits,
                           "target_density": step.density, "density": density,
                           "pruned_val_error": 1 - step.metric,
                           "val_error": evaluate(loaded, splits.val)[1], "test_error": evaluate(loaded, splits.test)[1],
                           "compression_ratio": ws.size_report(loaded).ratio, "file_bytes": path.stat().st_size}
                    row["zero_val_drop"] = 1 - row["val_error"] >= base_val - 1e-12
                    out["rows"].append(row)
                    print(f"{pipeline:16s} {saliency:9s} {method:10s} {bits} bits density {density:.4f}: "
                          f"{row['compression_ratio']:6.1f}x test {100 * row['test_error']:.2f}% "
                          f"val {100 * row['val_error']:.2f}% (pruned only: {100 * row['pruned_val_error']:.2f}%)",
                          flush=True)

        res = prune_retrain(dense, splits.train, F.cross_entropy, val_acc, calib_batches=calib, saliency=saliency,
                            start_density=0.5, factor=0.6, min_density=min_density, patience=100, seed=seed,
                            baseline_metric=base_val, progress=progress, on_step=quantise,
                            **(retrain or RETRAIN[model_name]))
        out["prune_steps"][pipeline] = [{"seed": seed, "density": s.density, "val_error": 1 - s.metric,
                                         "layer_density": s.layer_density, "seconds": s.seconds} for s in res.steps]
        out[f"{pipeline}_seconds"] = time.time() - t0
    return out


def plot(result: dict, path: Path) -> Path:
    """Test error against compression ratio per pipeline/quantiser/bits: the mean over seeds, bars = min..max."""
    curves = {}
    for key in sorted({(r["pipeline"], r["saliency"], r["method"], r["bits"]) for r in result["rows"]}):
        label = f"{key[1]} pruning + {key[2]}, {key[3]} bits"
        curves[label] = []
        for d in sorted({r["target_density"] for r in result["rows"]}, reverse=True):
            rs = [r for r in result["rows"] if (r["pipeline"], r["saliency"], r["method"], r["bits"]) == key
                  and r["target_density"] == d]
            if rs:
                curves[label].append(error_point(rs))
    title = f"{result['model']}: pruning + retraining + weight sharing, seeds {result['seeds']}"
    return plot_error_vs_ratio([(title, result["baseline_test_error"], curves)], path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet300100", choices=sorted(RETRAIN))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--min-density", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-cross", dest="cross", action="store_false",
                    help="skip the cross pairing (magnitude pruning + loss_aware): a third less time")
    ap.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES),
                    help="ours (OBD pruning, slow: a Fisher pass at every re-scoring) and/or deep_compression")
    ap.add_argument("--tag", default="", help="results file suffix: results/prune_curve_<model><tag>.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": machine(), "model": args.model, "seeds": args.seeds, "retrain": RETRAIN[args.model],
              "rows": [], "prune_steps": {}}
    for seed in args.seeds:
        r = run(args.model, seed, args.min_density, args.cross, pipelines=args.pipelines)
        result.update(baseline_val_error=r["baseline_val_error"], baseline_test_error=r["baseline_test_error"])
        result["rows"] += r["rows"]
        for k, v in r["prune_steps"].items():
            result["prune_steps"].setdefault(k, []).extend(v)
        for k, v in r.items():
            if k.endswith("_seconds"):
                result[f"{k}_seed{seed}"] = v
    path = write_json(f"prune_curve_{args.model}{args.tag}.json", result)
    print(path, plot(result, path.with_suffix(".png")))


if __name__ == "__main__":
    main()
