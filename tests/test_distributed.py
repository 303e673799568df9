"""Compression across processes (weightshare.distributed): two ranks under torchrun (gloo, CPU), each with half
of the calibration batches, must get what one process gets on all of them, and agree with each other exactly;
a failure on one rank must stop every rank with an error instead of a hang."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import weightshare as ws
from weightshare.curvature import gather_stats, hessian_diag
from weightshare.curvature.accumulators import WeightedMeanWithVariance
from weightshare.distributed import Group

sys.path.insert(0, str(Path(__file__).parent))
import distributed_setup as setup  # noqa: E402

WORKER = Path(__file__).parent / "distributed_worker.py"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")


def ranks(tmp_path: Path, scenario: str, world: int = 2) -> list[tuple[dict, dict]]:
    """(numbers, tensors) of every rank of one torchrun of the worker."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(world), str(WORKER), str(tmp_path), scenario], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = []
    for r in range(world):
        numbers = json.loads((tmp_path / f"rank{r}.json").read_text())
        path = tmp_path / f"rank{r}.safetensors"
        out.append((numbers, load_file(str(path)) if path.exists() else {}))
    return out


@pytest.fixture
def one_thread():
    """The ranks run one thread each; float32 kernels may round differently with other thread counts, so the
    single-process reference runs with one too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_ranks_identical(results: list[tuple[dict, dict]]) -> None:
    (n0, t0), *others = results
    for n, t in others:
        assert n == n0
        assert t.keys() == t0.keys()
        for k in t0:
            assert torch.equal(t[k], t0[k]), k


def test_statistics_are_those_of_all_shards(tmp_path, one_thread):
    results = ranks(tmp_path, "stats")
    assert_ranks_identical(results)
    numbers, got = results[0]
    model, calib = setup.model(), setup.batches(8, seed=1)
    assert numbers["fisher_samples"] == numbers["hessian_samples"] == 8 * 16
    # gradient and Fisher diagonal: one process over the 8 batches, up to float64 summation order
    ref = gather_stats(model, F.cross_entropy, calib, kind="fisher")
    for name in ref.names:
        torch.testing.assert_close(got[f"fisher/g/{name}"], ref.gradient[name], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got[f"fisher/h/{name}"], ref.diagonal[name], rtol=1e-6, atol=1e-12)
    # Hutchinson: rank r draws its probes from seed + 1_000_003 r, rank 0 those of one process; the result is the
    # sample-weighted mean of the two shards' estimates
    parts = [hessian_diag(model, F.cross_entropy, setup.shard(calib, r, 2), probes=2, seed=5 + 1_000_003 * r)[0]
             for r in range(2)]
    for name in ref.names:
        want = (parts[0][name].double() + parts[1][name].double()) / 2  # equal shard sizes
        # (the shards' estimates come back in float32 here, the ranks merged theirs in float64)
        scale = float(want.abs().max())
        torch.testing.assert_close(got[f"hessian/h/{name}"].double(), want, rtol=1e-5, atol=1e-6 * scale)
        assert bool(torch.isfinite(got[f"hessian/v/{name}"]).all()) and bool((got[f"hessian/v/{name}"] >= 0).all())


def test_compress_equals_one_process_over_all_shards(tmp_path, one_thread):
    results = ranks(tmp_path, "compress")
    assert_ranks_identical(results)
    numbers, got = results[0]
    model, calib = setup.model(), setup.batches(8, seed=1)
    finetune = setup.batches(4, seed=2)
    # a fine-tuning step of the two ranks is one step over both ranks' batches
    merged_steps = [(torch.cat([finetune[i][0], finetune[i + 1][0]]), torch.cat([finetune[i][1], finetune[i + 1][1]]))
                    for i in (0, 2)]
    runs = {
        "loss_aware": dict(method="loss_aware", max_loss_increase="2%"),
        "kmeans": dict(method="kmeans", max_accuracy_drop=0.02,
                       eval_fn=lambda m: setup.accuracy(m, setup.batches(2, seed=3))),  # rank 0's held-out set
        "fixed_finetune": dict(method="loss_aware", bits={"fc1": 2, "fc2": 3, "conv": 3}, finetune_data=merged_steps),
    }
    for tag, kwargs in runs.items():
        ref = ws.compress(model, calib, F.cross_entropy, progress=False, **kwargs)
        assert numbers[tag]["ks"] == {n: f.k for n, f in ref.fits.items()}, tag
        assert numbers[tag]["trials"] == len(ref.steps), tag
        assert numbers[tag]["metric"] == ref.metric and numbers[tag]["base_metric"] == ref.base_metric, tag
        assert numbers[tag]["base_loss"] == pytest.approx(ref.base_loss, rel=1e-6), tag
        assert numbers[tag]["loss"] == pytest.approx(ref.loss, rel=1e-5), tag
        for name, fit in ref.fits.items():
            assert torch.equal(got[f"{tag}/{name}/idx"], fit.idx), (tag, name)
            torch.testing.assert_close(got[f"{tag}/{name}/codebook"], fit.codebook, rtol=1e-5, atol=1e-7)
    # the search really searched: several trials, and the constraint held
    assert numbers["loss_aware"]["trials"] > 3
    assert numbers["loss_aware"]["loss"] - numbers["loss_aware"]["base_loss"] <= 0.02 * numbers["loss_aware"][
        "base_loss"] + 1e-9


def test_unequal_finetune_batches_fail_on_every_rank(tmp_path):
    for numbers, _ in ranks(tmp_path, "unequal_finetune"):
        kind, message = numbers["error"]
        assert kind == "ValueError" and "finetune_data" in message and "[3, 2]" in message


def test_an_empty_shard_stops_every_rank(tmp_path):
    (n0, _), (n1, _) = ranks(tmp_path, "empty_shard")
    assert n1["error"][0] == "ValueError" and "data is empty on rank 1" in n1["error"][1]
    assert n0["error"][0] == "RuntimeError" and "rank(s) [1]" in n0["error"][1]


def test_a_bits_dict_in_another_order_on_one_rank(tmp_path):
    """The fits go out in the model's layer order, whatever order each rank built its bits dict in."""
    results = ranks(tmp_path, "bits_order")
    assert_ranks_identical(results)
    assert results[0][0]["order"] == ["conv", "fc1", "fc2"]


def test_user_code_failing_on_one_rank_stops_every_rank(tmp_path):
    """A data iterator, an eval_fn and a loss_fn that fail on rank 1 only: rank 1 raises its own error, rank 0 a
    RuntimeError naming rank 1, nobody waits; the group then compresses normally."""
    (n0, _), (n1, _) = ranks(tmp_path, "user_failures")
    assert n1["data"][0] == "OSError" and "data reader broke" in n1["data"][1]
    assert n1["eval_fn"][0] == "ValueError" and "not a number" in n1["eval_fn"][1]
    assert n1["loss_fn"][0] == "AttributeError"
    for case in ("data", "eval_fn", "loss_fn"):
        assert n0[case][0] == "RuntimeError" and "rank(s) [1]" in n0[case][1], case
    assert n0["after"] == n1["after"] == {"conv": 4, "fc1": 4, "fc2": 4}


def test_process_group_argument_checks():
    model, calib = setup.model(), setup.batches(2, seed=1)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        ws.compress(model, calib, F.cross_entropy, bits=2, progress=False, process_group="world")
    with pytest.raises(TypeError, match="process_group"):
        gather_stats(model, F.cross_entropy, calib, process_group=3)


def test_variance_merge_equals_one_accumulator():
    """WeightedMeanWithVariance.merge_ (how ranks combine Hutchinson samples): two accumulators merged give the
    mean and variance of one accumulator fed every sample."""
    g = torch.Generator().manual_seed(0)
    samples = [({"w": torch.randn(7, generator=g, dtype=torch.float64)}, float(w)) for w in (1, 3, 2, 5, 4, 2)]
    whole, a, b = WeightedMeanWithVariance(), WeightedMeanWithVariance(), WeightedMeanWithVariance()
    for i, (s, w) in enumerate(samples):
        whole.add(s, w)
        (a if i < 2 else b).add(s, w)
    a.merge_(b)
    like = {"w": torch.zeros(7, dtype=torch.float64)}
    torch.testing.assert_close(a.mean(like)["w"], whole.mean(like)["w"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.variance_of_mean(like)["w"], whole.variance_of_mean(like)["w"], rtol=1e-12,
                               atol=1e-12)
    empty = WeightedMeanWithVariance()
    empty.merge_(a)
    torch.testing.assert_close(empty.mean(like)["w"], whole.mean(like)["w"], rtol=1e-12, atol=1e-12)


class RanksOf:
    """A stand-in Group whose gather returns what each of several accumulators would contribute (no processes):
    WeightedMeanWithVariance.reduce_ merges exactly these."""

    def __init__(self, accumulators: list, like: dict):
        self.states = [acc.flat_state(like) for acc in accumulators]

    def gather(self, t):
        return self.states


def test_variance_reduce_over_ranks_equals_one_accumulator():
    """reduce_ over unequal shards and an empty rank: the mean, its variance, the sample count and the squared
    weights of one accumulator fed every sample (a wrong merged count or squared-weight sum changes the variance)."""
    g = torch.Generator().manual_seed(1)
    like = {"a": torch.zeros(3, 2, dtype=torch.float64), "b": torch.zeros(5, dtype=torch.float64)}
    samples = [({n: torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in like.items()}, float(w))
               for w in (3, 1, 4, 1, 5, 9, 2)]
    whole = WeightedMeanWithVariance()
    shards = [WeightedMeanWithVariance() for _ in range(4)]
    for i, (sample, w) in enumerate(samples):
        whole.add(sample, w)
        shards[[0, 0, 0, 2, 2, 3, 3][i]].add(sample, w)  # rank 1 has no sample
    merged = WeightedMeanWithVariance()
    merged.add(*samples[0])  # reduce_ replaces this rank's own state by the merge of all the states gathered
    merged.reduce_(RanksOf(shards, like), like)
    assert merged.count == whole.count == 7
    assert merged.total_squared_weight == whole.total_squared_weight
    for n in like:
        torch.testing.assert_close(merged.mean(like)[n], whole.mean(like)[n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged.variance_of_mean(like)[n], whole.variance_of_mean(like)[n], rtol=1e-12,
                                   atol=1e-12)


def test_layer_owners_balance_by_cost():
    """Group.owners: the costliest job first, each to the least loaded rank; deterministic."""
    group = Group()
    group.size = 3  # the assignment alone (no collective is made)
    assert group.owners([10, 1, 9, 8, 2, 2]) == [0, 0, 1, 2, 2, 1]
    assert Group().owners([5, 4]) == [0, 0]
