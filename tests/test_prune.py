"""Pruning with retraining (ws.compress.prune) and the compress() pieces the pruned pipeline uses."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from weightshare.compress import compress
from weightshare.compress.prune import global_masks, prune_retrain, weight_scores
from weightshare.curvature import gather_stats


def _problem(seed=0, n=1200):
    """A small, learnable 3-class problem and an MLP trained on it (a few seconds)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x[:, :3] @ torch.tensor([[2.0, -1, 0.5], [0.3, 2, -1], [-1, 0.2, 2]])).argmax(1)
    train, val = TensorDataset(x[:1000], y[:1000]), TensorDataset(x[1000:], y[1000:])
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))
    from weightshare.train import train as fit
    fit(model, train, epochs=15, lr=0.05, batch_size=50, weight_decay=1e-4, seed=seed, progress=False)
    return model, train, val


@pytest.fixture(scope="module")
def problem():
    return _problem()


def _accuracy(dataset):
    x, y = dataset.tensors

    def acc(m):
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())
    return acc


def test_global_masks_density_floor_and_monotone():
    g = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(100, 50, generator=g), "b": torch.rand(10, 10, generator=g) * 1e-3}
    prev = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    m = global_masks(scores, prev, 0.3, 0.05)
    kept = sum(int(v.sum()) for v in m.values())
    total = sum(v.numel() for v in m.values())
    # "b" scores far below "a": the global threshold would empty it; the floor keeps its best 5 %
    assert int(m["b"].sum()) == math.ceil(0.05 * 100)
    assert abs(kept - 0.3 * total) <= int(m["b"].sum()) + 1
    assert torch.equal(m["b"].reshape(-1), torch.zeros(100, dtype=torch.bool).index_fill_(
        0, scores["b"].reshape(-1).topk(5).indices, True))
    # the kept "a" weights are exactly the top-scored ones
    ka = int(m["a"].sum())
    assert torch.equal(m["a"].reshape(-1).nonzero().squeeze(1).sort().values,
                       scores["a"].reshape(-1).topk(ka).indices.sort().values)
    # a second, sparser step never revives a pruned weight, even one that now scores highest
    scores2 = {n: s.clone() for n, s in scores.items()}
    scores2["a"][~m["a"]] = 10.0
    m2 = global_masks(scores2, m, 0.1, 0.05)
    for n in m:
        assert not (m2[n] & ~m[n]).any()
    assert sum(int(v.sum()) for v in m2.values()) <= round(0.1 * total) + int(m2["b"].sum())


def test_weight_scores_formulas(problem):
    model, train, _ = problem
    x, y = train.tensors
    calib = [(x[:500], y[:500]), (x[500:], y[500:])]
    mag = weight_scores(model, "magnitude", None, F.cross_entropy)
    w0 = model[0].weight.detach()
    torch.testing.assert_close(mag["0"], w0.abs() / w0.std())
    obd = weight_scores(model, "obd", calib, F.cross_entropy)
    stats = gather_stats(model, F.cross_entropy, calib, kind="fisher")
    torch.testing.assert_close(obd["2"], 0.5 * stats.diagonal["2.weight"] * model[2].weight.detach().square())
    with pytest.raises(ValueError, match="saliency"):
        weight_scores(model, "random", calib, F.cross_entropy)
    with pytest.raises(ValueError, match="calibration"):
        weight_scores(model, "obd", None, F.cross_entropy)


@pytest.mark.parametrize("saliency", ["obd", "magnitude"])
def test_prune_retrain_keeps_zeros_and_meets_the_constraint(problem, saliency):
    model, train, val = problem
    before = copy.deepcopy(model.state_dict())
    acc = _accuracy(val)
    x, y = train.tensors
    seen = []
    r = prune_retrain(model, train, F.cross_entropy, acc, calib_batches=[(x[:500], y[:500])], saliency=saliency,
                      max_accuracy_drop=0.02, start_density=0.5, factor=0.5, min_density=0.05, epochs=2, lr=0.02,
                      batch_size=50, progress=False, on_step=lambda s, m: seen.append((s.density, acc(m))))
    for k, v in model.state_dict().items():  # the argument is untouched
        assert torch.equal(v, before[k])
    assert [s.density for s in r.steps] == [d for d, _ in seen]
    assert all(abs(s.metric - a) < 1e-12 for s, (_, a) in zip(r.steps, seen))
    feasible = [s for s in r.steps if s.feasible]
    assert feasible, "the 20-unit problem keeps its accuracy at half the weights"
    assert r.base_metric - r.metric <= 0.02 + 1e-12
    assert abs(r.metric - acc(r.model)) < 1e-12
    # the returned network is the sparsest feasible step, its pruned weights exactly zero
    assert r.density <= min(s.density for s in feasible) + 0.02
    mods = dict(r.model.named_modules())
    for name, mask in r.masks.items():
        w = mods[name].weight.detach()
        assert torch.all(w[~mask] == 0)
        assert (w[mask] != 0).float().mean() > 0.99  # retraining moved every kept weight off zero


def test_prune_retrain_bad_arguments(problem):
    model, train, val = problem
    acc = _accuracy(val)
    for kw in (dict(factor=1.0), dict(factor=0.0), dict(start_density=1.5), dict(min_density=0.9, start_density=0.5),
               dict(epochs=0), dict(patience=0)):
        with pytest.raises(ValueError, match="prune"):
            prune_retrain(model, train, F.cross_entropy, acc, saliency="magnitude", **kw)


def test_compress_pruned_model_against_dense_baseline(problem):
    """The pruned pipeline: pruned zeros stay on the pinned zero entry through quantisation and codebook fine-tuning,
    and the accuracy constraint is measured from the dense model's accuracy when it is given."""
    model, train, val = problem
    acc = _accuracy(val)
    x, y = train.tensors
    calib = [(x[:500], y[:500])]
    r = prune_retrain(model, train, F.cross_entropy, acc, saliency="magnitude", max_accuracy_drop=0.05,
                      start_density=0.4, factor=0.5, min_density=0.4, epochs=2, lr=0.02, batch_size=50,
                      progress=False)
    tune = [(x[i:i + 50], y[i:i + 50]) for i in range(0, 1000, 50)]
    out = compress(r.model, calib, F.cross_entropy, bits=2, prune=True, progress=False, shared_layers=False,
                   finetune_data=tune, finetune_lr=1e-2)
    untuned = compress(r.model, calib, F.cross_entropy, bits=2, prune=True, progress=False, shared_layers=False)
    changed = False
    for name, fit in out.fits.items():
        cb = fit.codebook[0]
        assert (cb == 0).sum() == 1, cb
        zero = int((cb == 0).nonzero())
        assert torch.all(fit.idx[r.masks[name] == 0] == zero)  # every pruned weight stays pruned
        changed |= not torch.equal(cb, untuned.fits[name].codebook[0])
    assert changed, "fine-tuning moved the free entries"
    base = acc(model)
    c = compress(r.model, calib, F.cross_entropy, max_accuracy_drop=0.05, eval_fn=acc, baseline_metric=base,
                 prune=True, progress=False, shared_layers=False)
    assert c.base_metric == base
    assert base - acc(c.model) <= 0.05 + 1e-12
