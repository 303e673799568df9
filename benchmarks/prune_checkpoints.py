"""Long pruning runs that write the pruned checkpoints the demo starts from (checkpoints/pruned/<model>-d*.safetensors).

The demo's 10-minute budget allows 3-4 short pruning steps, which stop at 5-10 % density; the 70x / 200x targets
need about 1-4 % with no loss in accuracy, i.e. many steps with long retraining. This script runs them once
(tens of minutes on the 2-core VM), evaluates every step on the validation and test sets, saves every step's
network under --work-dir, and copies the --keep sparsest ones whose validation error is within --slack of the
dense model's to --out-dir (with the recipe, errors and layer densities in their metadata; earlier files of the
model there are removed), which the demo then loads instead of pruning. The run is deterministic for a given thread count (`--threads 1`, the default, as the dense
checkpoints were trained), so the committed checkpoint is reproducible by the command in checkpoints/README.md.

Usage:
  python benchmarks/prune_checkpoints.py --model lenet5 --epochs 8 --start 0.2 --factor 0.6 --steps 8 \
      --floor conv1=0.3 fc2=0.08
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _floors(items: list[str]) -> dict[str, float]:
    floors = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            floors[name] = float(value)
        except ValueError:
            raise SystemExit(f"prune_checkpoints: --floor takes layer=fraction, got {item!r}")
    return floors


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=["lenet300100", "lenet5"])
    ap.add_argument("--epochs", type=int, required=True, help="retraining epochs per pruning step")
    ap.add_argument("--lr", type=float, default=None, help="default: the model's RETRAIN_RECIPES")
    ap.add_argument("--start", type=float, required=True, help="density of the first step")
    ap.add_argument("--factor", type=float, required=True, help="density ratio between steps")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--floor", nargs="*", default=[], help="per-layer minimum densities, layer=fraction ('*' = rest)")
    ap.add_argument("--slack", type=float, default=0.002,
                    help="copied checkpoints' validation error may exceed the dense one's by this much (the demo's "
                         "--prune-slack: the compressed file must still meet zero drop)")
    ap.add_argument("--keep", type=int, default=2, help="copy this many of the sparsest checkpoints within the slack")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", default="out/pruned")
    ap.add_argument("--out-dir", default=str(REPO / "checkpoints" / "pruned"))
    ap.add_argument("--results", default=None, help="default benchmarks/results/pruned_<model>.json")
    args = ap.parse_args(argv)

    from weightshare.compress import prune_retrain
    from weightshare.data import mnist_splits
    from weightshare.train import RETRAIN_RECIPES, evaluate, load_checkpoint, save_checkpoint

    torch.set_num_threads(args.threads)
    splits = mnist_splits()
    dense = load_checkpoint(REPO / "checkpoints" / f"{args.model}.safetensors", expected_model=args.model)
    base_val, base_test = evaluate(dense, splits.val)[1], evaluate(dense, splits.test)[1]
    recipe = dict(RETRAIN_RECIPES[args.model])
    recipe["epochs"] = args.epochs
    if args.lr is not None:
        recipe["lr"] = args.lr
    floors = _floors(args.floor) or 0.01
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/prune_checkpoints.py " + " ".join(argv if argv is not None else sys.argv[1:])
    steps = []

    def on_step(step, model):
        val, test = evaluate(model, splits.val)[1], evaluate(model, splits.test)[1]
        path = work / f"{args.model}-d{step.density:.5f}.safetensors"
        meta = {"pruned_density": f"{step.density:.6f}", "val_error": f"{val:.4f}", "test_error": f"{test:.4f}",
                "layer_density": json.dumps(step.layer_density), "recipe": json.dumps(recipe),
                "layer_floors": json.dumps(floors), "seed": args.seed, "threads": args.threads,
                "dense_val_error": f"{base_val:.4f}", "dense_test_error": f"{base_test:.4f}",
                "command": command, "torch": torch.__version__}
        save_checkpoint(model, path, meta, name=args.model)
        steps.append({"density": step.density, "val_error": val, "test_error": test,
                      "layer_density": step.layer_density, "seconds": step.seconds, "file": str(path)})
        print(f"density {step.density:.4f}: val {100 * val:.2f}% (dense {100 * base_val:.2f}%), test "
              f"{100 * test:.2f}% (dense {100 * base_test:.2f}%), layers "
              f"{ {k: round(v, 4) for k, v in step.layer_density.items()} }, {step.seconds:.0f} s", flush=True)

    def val_accuracy(m):
        return 1.0 - evaluate(m, splits.val)[1]

    t0 = time.time()
    prune_retrain(dense, splits.train, F.cross_entropy, val_accuracy, max_accuracy_drop=1.0,
                  baseline_metric=1 - base_val, start_density=args.start, factor=args.factor,
                  min_density=args.start * args.factor ** (args.steps - 1) * 0.999, max_steps=args.steps,
                  min_layer_density=floors, seed=args.seed, progress=False, on_step=on_step, **recipe)
    ok = [s for s in steps if s["val_error"] <= base_val + args.slack + 1e-12]
    chosen = sorted(ok, key=lambda s: s["density"])[:args.keep]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{args.model}-d*.safetensors"):
        old.unlink()
    for step in chosen:
        target = out_dir / Path(step["file"]).name
        shutil.copyfile(step["file"], target.with_suffix(".tmp"))
        target.with_suffix(".tmp").replace(target)
        step["copied_to"] = str(target.relative_to(REPO)) if target.is_relative_to(REPO) else str(target)
    results = Path(args.results or REPO / "benchmarks" / "results" / f"pruned_{args.model}.json")
    results.write_text(json.dumps({
        "machine": machine(), "command": command, "model": args.model, "recipe": recipe,
        "layer_floors": floors, "dense_val_error": base_val, "dense_test_error": base_test, "slack": args.slack,
        "steps": steps, "chosen": chosen, "seconds": time.time() - t0,
    }, indent=2) + "\n")
    print(f"kept {[round(s['density'], 5) for s in chosen]} in {out_dir}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
