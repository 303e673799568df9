"""Trained weight sharing on the pruned networks: test error against compression ratio of the saved file.

For each pruned network (the committed ones in checkpoints/pruned, plus any given with --extra) and each bit
configuration, retrain with shared weights (compress.qat.quantize_retrain, train.QAT_RECIPES, distilled from the
dense model), save the exact shared form (ws.save: context-coded indices, float16 biases, deflated header) and
measure validation and test error from the file (units nothing reads zeroed first: exact, see
compress/dead_units.py). A configuration is uniform ("3") or per layer ("fc1=2,*=3":
the big fully connected layer at 2 bits, every other at 3).

    python benchmarks/bench_qat.py --model lenet5 --configs 2 3 4 "conv1=4,fc1=2,*=3"
      -> benchmarks/results/qat_lenet5.json (and .png)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
import weightshare as ws  # noqa: E402
from weightshare.cli import zero_dead_units_checked  # noqa: E402
from weightshare.compress.layers import compressible_layers, density as weight_density  # noqa: E402
from weightshare.compress.qat import parse_bit_config, quantize_retrain, to_shared  # noqa: E402
from weightshare.data import mnist_splits  # noqa: E402
from weightshare.train import QAT_RECIPES, evaluate, load_checkpoint  # noqa: E402
from _common import machine, plot_error_vs_ratio, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=["lenet300100", "lenet5"])
    ap.add_argument("--configs", nargs="+", default=["3", "4"])
    ap.add_argument("--extra", nargs="*", default=[], help="more pruned checkpoints to include")
    ap.add_argument("--out-dir", default="out/bench_qat")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0],
                    help="retraining seeds (data order and refits); each cell is run once per seed")
    ap.add_argument("--tag", default="", help="suffix of the results file: qat_<model><tag>.json")
    args = ap.parse_args()

    splits = mnist_splits()
    dense = load_checkpoint(REPO / "checkpoints" / f"{args.model}.safetensors", expected_model=args.model)
    base_val, base_test = evaluate(dense, splits.val)[1], evaluate(dense, splits.test)[1]
    files = sorted((REPO / "checkpoints" / "pruned").glob(f"{args.model}-d*.safetensors")) + \
        [Path(f) for f in args.extra]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for f in files:
        net = load_checkpoint(f, expected_model=args.model)
        names = [l.name for l in compressible_layers(net)]
        density = weight_density(net)
        pruned_val, pruned_test = evaluate(net, splits.val)[1], evaluate(net, splits.test)[1]
        for text, seed in [(t, s) for t in args.configs for s in args.seeds]:
            bits = parse_bit_config(text, names)
            t0 = time.time()
            r = quantize_retrain(net, splits.train, bits, teacher=dense, seed=seed, **QAT_RECIPES[args.model])
            path = out_dir / f"{args.model}-d{density:.4f}-{text.replace(',', '_').replace('*', 'rest')}-s{seed}.ws"
            shared = to_shared(r.model)
            dead_units = zero_dead_units_checked(shared, splits)  # exact; smaller file (cli.py says how)
            file_bytes = ws.save(shared, path)
            loaded = ws.load(path)
            report = ws.size_report(loaded)
            row = {"source": str(f.relative_to(REPO)) if f.is_relative_to(REPO) else str(f), "density": density,
                   "pruned_val_error": pruned_val, "pruned_test_error": pruned_test, "config": text, "bits": bits,
                   "seed": seed,
                   "val_error": evaluate(loaded, splits.val)[1], "test_error": evaluate(loaded, splits.test)[1],
                   "compression_ratio": report.ratio, "file_bytes": file_bytes, "seconds": time.time() - t0,
                   "layers": [{"name": l.name, "k": l.k, "index_bytes": l.index_bytes, "encoding": l.encoding,
                               "codebook_bytes": l.codebook_bytes, "bias_bytes": l.bias_bytes}
                              for l in report.layers],
                   "overhead_bytes": report.overhead_bytes, "dead_units": dead_units}
            rows.append(row)
            print(f"density {density:.4f} bits {text:>16s} seed {seed}: val {100 * row['val_error']:.2f}% (dense "
                  f"{100 * base_val:.2f}%), test {100 * row['test_error']:.2f}% (dense {100 * base_test:.2f}%), "
                  f"{row['compression_ratio']:.1f}x ({file_bytes} B), {row['seconds']:.0f} s", flush=True)
    zero_test = [r for r in rows if r["test_error"] <= base_test + 1e-12]
    zero_val = [r for r in rows if r["val_error"] <= base_val + 1e-12]
    best = {"zero_test_increase": max(zero_test, key=lambda r: r["compression_ratio"], default=None),
            "zero_val_increase": max(zero_val, key=lambda r: r["compression_ratio"], default=None)}
    for key, row in best.items():
        print(f"best at {key}: " + (f"{row['compression_ratio']:.1f}x (density {row['density']:.4f}, bits "
                                    f"{row['config']}, test {100 * row['test_error']:.2f}%)" if row else "none"))
    result = {"machine": machine(), "model": args.model, "recipe": QAT_RECIPES[args.model],
              "baseline_val_error": base_val, "baseline_test_error": base_test, "rows": rows, "best": best}
    print(write_json(f"qat_{args.model}{args.tag}.json", result))
    curves = {f"density {d:.4f}": sorted((r["compression_ratio"], 100 * r["test_error"], 0.0, 0.0)
                                         for r in rows if r["density"] == d)
              for d in sorted({r["density"] for r in rows})}
    panel = (f"{args.model}: pruned + trained sharing (file bytes)", base_test, curves)
    plot_error_vs_ratio([panel], REPO / "benchmarks" / "results" / f"qat_{args.model}{args.tag}.png")


if __name__ == "__main__":
    main()
