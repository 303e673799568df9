"""ws.compress across processes (torch.distributed, gloo): the bundled LeNet-5 and LeNet-300-100 compressed by
the loss-aware search at zero validation-accuracy drop, in one process (1 and 2 threads) and in 2 ranks of one
thread each (torchrun), each rank with half the calibration batches and half the validation images (eval_fn sums
the ranks' correct counts). Checks that the ranks' result equals the one-process result (bits per layer, every
index, the saved file's bytes) and writes benchmarks/results/distributed_cpu.json.

    python benchmarks/bench_distributed.py

No codebook fine-tuning here: its data-parallel steps average the ranks' batches, so its result equals a single
process with merged batches, not the same batch list (tests/test_distributed.py checks that case).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, parse_cli, write_json  # noqa: E402

MODELS = ("lenet5", "lenet300100")
CALIB = 2000  # the demo's calibration images (batches of 500), its loss guard and zero accuracy drop


def compress_model(name: str, group=None) -> tuple[float, dict]:
    """(seconds, result) of the loss-aware search on `name`; with a process group each rank takes its shard."""
    import torch.distributed as dist

    import weightshare as ws
    from weightshare.cli import LOSS_GUARD, _load_baseline
    from weightshare.data import mnist_splits

    rank, world = (dist.get_rank(), dist.get_world_size()) if group is not None else (0, 1)
    splits = mnist_splits()
    xs, ys = splits.train.tensors
    calib = [(xs[i:i + 500], ys[i:i + 500]) for i in range(0, CALIB, 500)][rank::world]
    vx, vy = splits.val.tensors
    vx, vy = vx[rank::world], vy[rank::world]

    def val_accuracy(m) -> float:
        with torch.no_grad():
            right = sum(int((m(vx[i:i + 1000]).argmax(1) == vy[i:i + 1000]).sum()) for i in range(0, len(vy), 1000))
        counts = torch.tensor([float(right), float(len(vy))], dtype=torch.float64)
        if group is not None:
            dist.all_reduce(counts, group=group)
        return float(counts[0] / counts[1])

    net = _load_baseline(name)
    t0 = time.perf_counter()
    r = ws.compress(net, calib, F.cross_entropy, method="loss_aware", max_accuracy_drop=0.0,
                    max_loss_increase=LOSS_GUARD, eval_fn=val_accuracy, progress=False, process_group=group)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        file_bytes = ws.save(r.model, Path(tmp) / "m.ws")
    return seconds, {"ks": {n: f.k for n, f in r.fits.items()}, "file_bytes": file_bytes, "trials": len(r.steps),
                     "val_accuracy": r.metric, "loss": r.loss,
                     "indices_sha256": {n: hashlib.sha256(f.idx.contiguous().numpy().tobytes()).hexdigest()[:16]
                                        for n, f in r.fits.items()}}


def same_result(a: dict, b: dict) -> bool:
    """The same compressed model: bits, every index, the file's bytes, the search's path; the calibration loss
    equal to float32 rounding (a batch's loss comes out of oneDNN/MKL one ulp apart in another process: measured
    8.5e-9 relative)."""
    exact = ("ks", "file_bytes", "trials", "val_accuracy", "indices_sha256")
    return all(a[k] == b[k] for k in exact) and abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"])


def rank_main(out: str) -> None:
    """One rank of the torchrun (bench_distributed.py --rank OUT)."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        results = {}
        for name in MODELS:
            dist.barrier()
            results[name] = compress_model(name, dist.group.WORLD)
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
    # gloo's teardown at interpreter exit aborts now and then after a clean destroy (tests/distributed_worker.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def one_process(threads: int) -> dict:
    """Every model compressed in a fresh process with `threads` threads: {name: (seconds, result)}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        code = (f"import sys, json, torch; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
                f"torch.set_num_threads({threads}); import bench_distributed as b; "
                f"open({str(out)!r}, 'w').write(json.dumps({{n: b.compress_model(n) for n in b.MODELS}}))")
        subprocess.run([sys.executable, "-c", code], check=True)
        return json.loads(out.read_text())


def ranks(world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(world), __file__, "--rank", str(out)], check=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
        return json.loads(out.read_text())


def main() -> None:
    runs = {"1 process, 1 thread": one_process(1), "1 process, 2 threads": one_process(2),
            "2 ranks x 1 thread": ranks(2)}
    base = runs["1 process, 1 thread"]
    rows = []
    for name in MODELS:
        for label, r in runs.items():
            seconds, result = r[name]
            same = same_result(result, base[name][1])
            rows.append({"model": name, "run": label, "seconds": seconds, "speedup": base[name][0] / seconds,
                         "same_result": same, **result})
            print(f"{name:12s} {label:22s} {seconds:7.2f} s ({base[name][0] / seconds:.2f}x)  ks {result['ks']} "
                  f"file {result['file_bytes']} B  same as 1 process: {same}", flush=True)
    write_json("distributed_cpu.json", {"machine": machine(), "calibration_images": CALIB, "results": rows})
    # the ranks run one thread each, as the 1-thread process (2 threads may round float32 kernels differently)
    bad = [r for r in rows if r["run"].startswith("2 ranks") and not r["same_result"]]
    if bad:
        raise SystemExit(f"distributed results differ from the single process: {bad}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rank":
        rank_main(sys.argv[2])
    else:
        parse_cli(__doc__)
        main()
