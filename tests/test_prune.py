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


def test_gradual_masks_follow_the_cubic_schedule(problem):
    """A ramped step prunes a little at a time: the density falls along d(t) = end + (start - end)(1 - t/R)^3, never
    revives a weight, holds the pruned ones at zero after every step, and lands exactly on `end` at step R."""
    from weightshare.compress.prune import _GradualMasks
    model = copy.deepcopy(problem[0])
    masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in model.named_modules()
             if isinstance(m, nn.Linear)}
    total = sum(m.numel() for m in masks.values())
    hook = _GradualMasks(model, masks, 1.0, 0.2, ramp=12, every=3,
                         score=lambda: weight_scores(model, "magnitude", None, None), min_layer_density=0.01)
    seen, previous = [], masks
    for t in range(1, 16):
        with torch.no_grad():  # an "optimiser step" that moves every weight, pruned or not
            for p in model.parameters():
                p.add_(0.01)
        hook()
        kept = sum(int(m.sum()) for m in hook.masks.values())
        seen.append(kept / total)
        for n, m in hook.masks.items():
            assert not (m & ~previous[n]).any()
            assert torch.all(dict(model.named_modules())[n].weight[~m] == 0)
        previous = hook.masks
    expected = [0.2 + 0.8 * (1 - t / 12) ** 3 if t % 3 == 0 else None for t in range(1, 13)]
    for t, want in enumerate(expected, start=1):
        if want is not None:
            assert abs(seen[t - 1] - want) < 0.02, (t, seen[t - 1], want)
    assert seen[:2] == [1.0, 1.0]                        # nothing cut between re-scorings
    assert all(abs(d - 0.2) < 0.02 for d in seen[11:])   # at `end` from step R on, and no further
    assert seen == sorted(seen, reverse=True)


def test_prune_retrain_ramped_with_distillation(problem):
    model, train, val = problem
    acc = _accuracy(val)
    r = prune_retrain(model, train, F.cross_entropy, acc, saliency="magnitude", max_accuracy_drop=0.02,
                      start_density=0.3, factor=0.5, min_density=0.15, epochs=2, lr=0.02, batch_size=50,
                      ramp=0.5, distill=0.7, temperature=2.0, progress=False)
    assert [round(s.density, 4) for s in r.steps] == [0.3, 0.15]
    for s in r.steps:  # each step ends at its density (the layer floors aside)
        kept = sum(d * dict(r.model.named_modules())[n].weight.numel() for n, d in s.layer_density.items())
        assert abs(kept / sum(m.numel() for m in r.masks.values()) - s.density) < 0.02
    assert r.steps[0].feasible and r.base_metric - r.metric <= 0.02 + 1e-12
    with pytest.raises(ValueError, match="ramp"):
        prune_retrain(model, train, F.cross_entropy, acc, ramp=1.5)
    with pytest.raises(ValueError, match="rescore_every"):
        prune_retrain(model, train, F.cross_entropy, acc, ramp=0.5, rescore_every=0)


def test_train_distillation_pulls_towards_the_teacher(problem):
    """With distill=1 the student learns the teacher's soft outputs only: from a fresh init it ends far closer to
    the teacher's logits than the same training without distillation, and bad arguments are refused."""
    from weightshare.train import train as fit
    teacher, train, _ = problem
    x = train.tensors[0]

    def gap(distill):
        torch.manual_seed(3)
        student = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))
        fit(student, train, epochs=5, lr=0.05, batch_size=50, weight_decay=0.0, seed=3, progress=False,
            teacher=teacher, distill=distill, temperature=4.0)
        with torch.no_grad():
            return float((F.softmax(student(x) / 4, 1) - F.softmax(teacher(x) / 4, 1)).abs().mean())
    assert gap(1.0) < 0.5 * gap(0.0)
    for kw in (dict(distill=1.5, teacher=teacher), dict(distill=0.5), dict(distill=0.5, teacher=teacher,
                                                                             temperature=0.0)):
        with pytest.raises(ValueError, match="distill|temperature"):
            fit(copy.deepcopy(teacher), train, epochs=1, lr=0.01, batch_size=50, weight_decay=0.0, seed=0,
                progress=False, **kw)


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


@pytest.mark.parametrize("method", ["kmeans", "hessian_kmeans", "uniform"])
@pytest.mark.parametrize("k", [2, 4, 16, 256])
def test_baselines_keep_pruned_weights_on_the_zero_entry(method, k):
    """prune=True for the baselines: entry 0 is exactly zero and holds exactly the zero weights; the other entries
    fit the surviving weights alone (Deep Compression quantises only what pruning kept). Without it a k-means entry
    near zero absorbs the zeros and the smallest survivors, and its value is not exactly zero (seen on a pruned
    LeNet-300-100: no exact zero left in fc1)."""
    from weightshare.compress.baselines import fit_baseline
    g = torch.Generator().manual_seed(k)
    w = torch.randn(40, 30, generator=g)
    w[torch.rand(40, 30, generator=g) < 0.9] = 0
    fit = fit_baseline(method, w, torch.zeros_like(w), torch.rand(40, 30, generator=g) + 0.1, k, prune=True)
    wq = fit.codebook[0][fit.idx.long()]
    assert fit.codebook[0, 0] == 0 and fit.codebook.shape == (1, k)
    assert torch.equal(fit.idx == 0, w == 0)
    survivors = w[w != 0]
    if k >= 16:  # 15+ entries for ~120 survivors fit them closely
        assert (wq - w)[w != 0].square().mean() < 0.05 * survivors.square().mean()
    with pytest.raises(ValueError, match="k >= 2"):
        fit_baseline(method, w, torch.zeros_like(w), torch.ones_like(w), 1, prune=True)
    # all weights pruned: every index on the zero entry
    z = torch.zeros(5, 5)
    assert torch.all(fit_baseline(method, z, z, z + 1, k, prune=True).idx == 0)
