"""HashedNets as published (Chen et al. 2015) on the bundled MNIST model: trained hashed buckets at several
compression factors, the test error against the bytes HashedNets stores.

    python benchmarks/bench_hashednets.py [--model lenet300100] [--factors 8 16 32 64] [--epochs 20]
        # writes benchmarks/results/hashednets_<model>.json; README table: benchmarks/report.py

Each factor: ws.compress.hashednets.hashednets (round(size / factor) buckets per layer, a sign hash, buckets
initialised by projecting the trained weights), then the same retraining our pruned networks get per pruning step
(train.RETRAIN_RECIPES: epochs, distillation from the dense model) except the learning rate: 0.01, because at
the recipe's 0.05-0.1 the buckets (each summing the gradients of ~factor weights) diverged within 3 epochs
(measured). The ratio is the dense model's fp32 bytes over what HashedNets stores: 4 bytes per bucket, 8 per layer
for its hash seed, fp32 biases; file_bytes is what ws.save writes for the trained network (its "hashed" layers:
the bucket values and the seed, no index per weight; header and checksum included), which ws.load restores
bit-exactly.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write_json  # noqa: E402

LR = 0.01


def run(model_name: str, factors, epochs: int, seed: int = 0) -> dict:
    from weightshare.cli import _load_baseline
    from weightshare.compress.hashednets import hashednets, hashednets_size
    from weightshare.data import mnist_splits
    from weightshare.train import RETRAIN_RECIPES, evaluate, train
    import weightshare as ws

    splits = mnist_splits()
    dense = _load_baseline(model_name)
    fp32 = sum(4 * t.numel() for t in dense.state_dict().values() if t.is_floating_point())
    recipe = RETRAIN_RECIPES[model_name]
    out = {"model": model_name, "epochs": epochs, "lr": LR, "distill": recipe.get("distill", 0.0),
           "temperature": recipe.get("temperature", 2.0), "seed": seed, "fp32_bytes": fp32,
           "baseline_val_error": evaluate(dense, splits.val)[1], "baseline_test_error": evaluate(dense, splits.test)[1],
           "rows": []}
    for factor in factors:
        t0 = time.time()
        net = hashednets(dense, factor, seed=seed)
        projected = evaluate(net, splits.val)[1]
        train(net, splits.train, epochs=epochs, lr=LR, batch_size=128, weight_decay=0.0, seed=seed + 1,
              progress=False, teacher=dense, distill=out["distill"], temperature=out["temperature"])
        stored = hashednets_size(net)
        file_bytes = ws.size_report(net).file_bytes  # what ws.save writes for it (bucket values, seeds, header)
        row = {"factor": factor, "stored_bytes": stored, "compression_ratio": fp32 / stored,
               "file_bytes": file_bytes, "file_ratio": fp32 / file_bytes,
               "projected_val_error": projected, "val_error": evaluate(net, splits.val)[1],
               "test_error": evaluate(net, splits.test)[1], "seconds": time.time() - t0}
        out["rows"].append(row)
        print(f"{model_name} HashedNets 1/{factor}: {row['compression_ratio']:.1f}x, val {100 * row['val_error']:.2f}% "
              f"test {100 * row['test_error']:.2f}% ({row['seconds']:.0f} s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet300100", choices=["lenet300100", "lenet5"])
    ap.add_argument("--factors", type=float, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--epochs", type=int, default=None, help="default: the model's RETRAIN_RECIPES epochs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from weightshare.train import RETRAIN_RECIPES
    epochs = args.epochs or int(RETRAIN_RECIPES[args.model]["epochs"])
    result = {"machine": machine(), **run(args.model, args.factors, epochs, args.seed)}
    print(write_json(f"hashednets_{args.model}.json", result))


if __name__ == "__main__":
    main()
