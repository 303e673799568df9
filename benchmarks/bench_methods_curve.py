"""Every compression method at fixed bit widths on the bundled MNIST models, over several seeds: test error against
the saved file's compression ratio, mean and spread (the error-vs-ratio curve per method; no pruning, no search).

    python benchmarks/bench_methods_curve.py [--models lenet300100 lenet5] [--seeds 0 1 2] [--bits 2 3 4 5]
        # writes benchmarks/results/methods_curve.json and methods_curve.png; README table: benchmarks/report.py

A seed picks disjoint training-set windows for the 2,000 calibration images (the curvature statistics) and the
10,000 codebook fine-tuning images (one pass, Adam 1e-4, assignments fixed; Han et al.), and seeds the fits
(HashedNets' hash). Every file is saved with ws.save and measured after ws.load.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import error_point, machine, plot_error_vs_ratio, write_json  # noqa: E402

# "hashed" is left out: with at most 256 buckets per layer (the 8-bit index format) it is not HashedNets (which
# shares ~n/8 buckets per layer and stores only the hash seed) and it sits at chance-level error (90 % at 2-4 bits,
# measured), which says nothing about the published method
METHODS = ("loss_aware", "kmeans", "hessian_kmeans", "uniform")
WINDOW = 12_000  # training images per seed: 2,000 calibration + 10,000 fine-tuning


def run(models, seeds, bits_list, methods=METHODS, tune_samples: int = 10_000) -> dict:
    import weightshare as ws
    from weightshare.cli import _load_baseline
    from weightshare.compress import compress
    from weightshare.data import mnist_splits
    from weightshare.train import evaluate

    splits = mnist_splits()
    xs, ys = splits.train.tensors
    tmp = Path(tempfile.mkdtemp(prefix="ws-methods-curve-"))
    out = {"machine": machine(), "seeds": list(seeds), "bits": list(bits_list), "baseline_test_error": {},
           "rows": []}
    for name in models:
        dense = _load_baseline(name)
        out["baseline_test_error"][name] = evaluate(dense, splits.test)[1]
        for seed in seeds:
            start = (seed * WINDOW) % (len(xs) - WINDOW)
            calib = [(xs[i:i + 500], ys[i:i + 500]) for i in range(start, start + 2000, 500)]
            tune = [(xs[i:i + 100], ys[i:i + 100]) for i in range(start + 2000, start + 2000 + tune_samples, 100)]
            for method in methods:
                for bits in bits_list:
                    t0 = time.time()
                    r = compress(dense, calib, F.cross_entropy, method=method, bits=bits, progress=False,
                                 finetune_data=tune or None, seed=seed)
                    path = tmp / f"{name}-{method}-{bits}-{seed}.ws"
                    ws.save(r.model, path)
                    loaded = ws.load(path)
                    row = {"model": name, "method": method, "bits": bits, "seed": seed,
                           "test_error": evaluate(loaded, splits.test)[1],
                           "compression_ratio": ws.size_report(loaded).ratio, "file_bytes": path.stat().st_size,
                           "seconds": time.time() - t0}
                    out["rows"].append(row)
                    print(f"{name:12s} seed {seed} {method:15s} {bits} bits: {row['compression_ratio']:6.1f}x "
                          f"test {100 * row['test_error']:.2f}%", flush=True)
    return out


def plot(result: dict, path: Path) -> Path:
    """One panel per model: test error against ratio per method, the mean over seeds, bars = min..max."""
    panels = []
    for name, baseline in result["baseline_test_error"].items():
        curves = {}
        for method in METHODS:
            rows = [[r for r in result["rows"] if (r["model"], r["method"], r["bits"]) == (name, method, b)]
                    for b in result["bits"]]
            curves[method] = [error_point(rs) for rs in rows if rs]
        panels.append((f"{name}: fixed bits {result['bits']}, seeds {result['seeds']}", baseline, curves))
    return plot_error_vs_ratio(panels, path, log_error=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lenet300100", "lenet5"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5])
    args = ap.parse_args()
    path = write_json("methods_curve.json", run(args.models, args.seeds, args.bits))
    print(path, plot(json.loads(path.read_text()), path.with_suffix(".png")))


if __name__ == "__main__":
    main()
