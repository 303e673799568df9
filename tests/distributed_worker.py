"""One rank of the distributed compression tests (tests/test_distributed.py runs it under torchrun, gloo on the
CPU): compresses the test's model with its shard of the calibration data and writes what it got to
OUT/rank<r>.safetensors (tensors) and OUT/rank<r>.json (numbers, or the exception a scenario expected).

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py OUT SCENARIO
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
import distributed_setup as setup  # noqa: E402

import weightshare as ws  # noqa: E402
from weightshare.curvature import gather_stats  # noqa: E402


def run(out: str, scenario: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    tensors: dict[str, torch.Tensor] = {}
    numbers: dict = {"world": world}
    model = setup.model()
    calib = setup.shard(setup.batches(8, seed=1), rank, world)
    if scenario == "stats":
        for kind in ("fisher", "hessian"):
            s = gather_stats(model, F.cross_entropy, calib, kind=kind, probes=2, seed=5, process_group=group)
            for name in s.names:
                tensors[f"{kind}/g/{name}"] = s.gradient[name]
                tensors[f"{kind}/h/{name}"] = s.diagonal[name]
                if s.variance is not None:
                    tensors[f"{kind}/v/{name}"] = s.variance[name]
            numbers[f"{kind}_samples"] = s.num_samples
    elif scenario == "compress":
        val = setup.batches(2, seed=3 + rank)  # a different held-out set per rank: rank 0's metric must decide
        runs = {
            "loss_aware": dict(method="loss_aware", max_loss_increase="2%"),
            "kmeans": dict(method="kmeans", max_accuracy_drop=0.02, eval_fn=lambda m: setup.accuracy(m, val)),
            "fixed_finetune": dict(method="loss_aware", bits={"fc1": 2, "fc2": 3, "conv": 3},
                                   finetune_data=setup.shard(setup.batches(4, seed=2), rank, world)),
        }
        for tag, kwargs in runs.items():
            r = ws.compress(model, calib, F.cross_entropy, progress=False, process_group=group, **kwargs)
            for name, fit in r.fits.items():
                tensors[f"{tag}/{name}/codebook"] = fit.codebook
                tensors[f"{tag}/{name}/idx"] = fit.idx
            numbers[tag] = {"loss": r.loss, "base_loss": r.base_loss, "metric": r.metric,
                            "base_metric": r.base_metric, "trials": len(r.steps),
                            "ks": {n: f.k for n, f in r.fits.items()}}
    elif scenario == "bits_order":  # the same bits on every rank, the dict built in another order on rank 1
        bits = {"conv": 3, "fc1": 2, "fc2": 4}
        if rank == 1:
            bits = dict(reversed(list(bits.items())))
        r = ws.compress(model, calib, F.cross_entropy, bits=bits, progress=False, process_group=group)
        for name, fit in r.fits.items():
            tensors[f"{name}/idx"] = fit.idx
            tensors[f"{name}/codebook"] = fit.codebook
        numbers["order"] = list(r.fits)
    elif scenario == "user_failures":  # user code failing on rank 1 only: every rank raises, then works again
        def failing_data():
            yield calib[0]
            raise OSError("the data reader broke")

        def eval_fn(m):
            return "not a number" if rank == 1 else setup.accuracy(m, calib)

        cases = {"data": dict(data=failing_data() if rank == 1 else calib, bits=2),
                 "eval_fn": dict(data=calib, max_accuracy_drop=0.5, eval_fn=eval_fn),
                 "loss_fn": dict(data=calib, bits=2, loss_fn=lambda out, y: (F.cross_entropy(out, y) if rank == 0
                                                                             else out.no_such_method()))}
        for tag, kwargs in cases.items():
            kwargs.setdefault("loss_fn", F.cross_entropy)
            try:
                ws.compress(model, kwargs.pop("data"), kwargs.pop("loss_fn"), progress=False, process_group=group,
                            **kwargs)
                numbers[tag] = None
            except Exception as e:  # noqa: BLE001 - what each rank raised is the result
                numbers[tag] = [type(e).__name__, str(e)]
        r = ws.compress(model, calib, F.cross_entropy, bits=2, progress=False, process_group=group)  # still works
        numbers["after"] = {n: f.k for n, f in r.fits.items()}
    elif scenario in ("unequal_finetune", "empty_shard"):
        finetune = setup.batches(3 if rank == 0 else 2, seed=2) if scenario == "unequal_finetune" else None
        data = [] if scenario == "empty_shard" and rank == 1 else calib
        try:
            ws.compress(model, data, F.cross_entropy, bits=2, finetune_data=finetune, progress=False,
                        process_group=group)
            numbers["error"] = None
        except Exception as e:  # noqa: BLE001 - what each rank raised is the result
            numbers["error"] = [type(e).__name__, str(e)]
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    if tensors:
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(numbers, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        run(sys.argv[1], sys.argv[2])
    finally:
        dist.destroy_process_group()
    # After a clean destroy_process_group, gloo's teardown at interpreter exit aborts now and then (SIGABRT,
    # "terminate called without an active exception": 3 runs in 12 here); the results are written, so leave
    # without it. A failing run() raised above and keeps its non-zero exit status.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
