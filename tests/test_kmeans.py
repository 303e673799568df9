"""ws.kmeans (Lloyd on the kernels) and ws.kmeans_optimal (dynamic programming): properties and optimality."""
import pytest
import torch

import weightshare as ws
from weightshare.kmeans import init_codebook


def _direct_distortion(w, codebook, idx, importance=None, groups=1):
    x = w.double().reshape(groups, -1)
    c = torch.gather(codebook.double(), 1, idx.reshape(groups, -1).long())
    h = torch.ones_like(x) if importance is None else importance.double().reshape(groups, -1)
    return (h * (x - c) ** 2).sum(1)


@pytest.mark.parametrize("init", ["linear", "quantile", "kmeans++"])
@pytest.mark.parametrize("k", [2, 5, 16])
def test_result_is_consistent(init, k, device, gen):
    w = (torch.randn(40, 250, generator=gen) * 0.05).to(device)
    r = ws.kmeans(w, k, init=init)
    assert r.codebook.shape == (1, k) and r.codebook.dtype == torch.float32
    assert torch.all(r.codebook[:, 1:] >= r.codebook[:, :-1])
    assert torch.equal(r.idx, ws.ops.assign(w, r.codebook))  # the assignment is the nearest one
    torch.testing.assert_close(r.distortion, _direct_distortion(w, r.codebook, r.idx), rtol=1e-9, atol=1e-12)


def test_lloyd_improves_on_its_initialisation(gen):
    w = torch.randn(20_000, generator=gen)
    c0 = init_codebook(w, 8, "linear")
    before = _direct_distortion(w, c0, ws.ops.assign(w, c0))
    after = ws.kmeans(w, 8, init="linear").distortion
    assert after < 0.8 * before


def test_coarse_histogram_phase_matches_full_lloyd(gen):
    # large enough for the histogram phase; the result must be as good as plain full-data Lloyd
    w = torch.randn(400_000, generator=gen)
    fast = ws.kmeans(w, 16, init="linear")
    slow = ws.kmeans(w, 16, init="linear", coarse_bins=0, max_iter=300, tol=1e-9)
    assert float(fast.distortion) <= float(slow.distortion) * (1 + 1e-3)  # within 0.1% of 300 full passes
    assert fast.iterations <= 6


def test_importance_pulls_centroids(gen):
    w = torch.randn(5000, generator=gen)
    h = torch.full_like(w, 1e-6)
    special = torch.tensor([10, 20, 30])
    h[special] = 1e6  # three weights that matter enormously
    r = ws.kmeans(w, 3, importance=h, init="quantile")
    got = torch.sort(r.codebook[0]).values
    want = torch.sort(w[special]).values
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_per_row_groups_equal_separate_runs(gen):
    w = torch.randn(6, 500, generator=gen)
    r = ws.kmeans(w, 4, groups=6, init="quantile")
    for g in range(6):
        rg = ws.kmeans(w[g:g + 1].contiguous(), 4, init="quantile")
        torch.testing.assert_close(r.codebook[g], rg.codebook[0])
        assert torch.equal(r.idx[g], rg.idx[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(dtype, gen):
    w = torch.randn(3000, generator=gen).to(dtype)
    r = ws.kmeans(w, 8)
    assert torch.equal(r.idx, ws.ops.assign(w, r.codebook))


def test_fewer_distinct_values_than_k():
    w = torch.tensor([0.0, 1.0, 1.0, 0.0, 2.0] * 10)
    r = ws.kmeans_optimal(w, 8)
    assert float(r.distortion) == 0.0
    r = ws.kmeans(w, 8, init="linear")
    assert float(r.distortion) < 1e-12


# ----------------------------------------------------------------------------------------------- optimum
@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_optimal_is_no_worse_than_any_lloyd(k, gen):
    w = torch.randn(3000, generator=gen) ** 3  # skewed, heavy-tailed: Lloyd has poor local optima here
    opt = float(ws.kmeans_optimal(w, k).distortion)
    for init in ["linear", "quantile", "kmeans++"]:
        assert opt <= float(ws.kmeans(w, k, init=init, tol=0, max_iter=200).distortion) * (1 + 1e-9)


def test_optimal_exact_matches_quadratic_reference(gen):
    w = torch.randn(60, generator=gen)
    h = torch.rand(60, generator=gen)
    opt = ws.kmeans_optimal(w, 5, importance=h)
    from weightshare import reference
    vals, inv = torch.unique(w.double(), sorted=True, return_inverse=True)
    wts = torch.zeros_like(vals).index_add_(0, inv, h.double())
    _, cost = reference.kmeans1d_optimal(vals, wts, 5)
    torch.testing.assert_close(opt.distortion.sum(), cost, rtol=1e-6, atol=1e-9)


def test_optimal_binned_close_to_exact(gen):
    w = torch.randn(50_000, generator=gen)
    exact = float(ws.kmeans_optimal(w, 16).distortion)
    binned = float(ws.kmeans_optimal(w, 16, bins=2048).distortion)
    assert exact <= binned <= exact * 1.001


def test_optimal_per_row(gen):
    w = torch.randn(4, 300, generator=gen)
    r = ws.kmeans_optimal(w, 4, groups=4)
    for g in range(4):
        assert torch.allclose(r.distortion[g], ws.kmeans_optimal(w[g:g + 1].contiguous(), 4).distortion[0])


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(k=0), ValueError, "k must be in 1..256"),
    (dict(k=257), ValueError, "k must be in 1..256"),
    (dict(k=4, groups=7), ValueError, "groups=7 must divide"),
    (dict(k=4, init="random"), ValueError, "init must be"),
    (dict(k=4, importance=-torch.ones(6, 10)), ValueError, "importance must be finite and >= 0"),
    (dict(k=4, importance=torch.ones(3)), ValueError, "importance must have the shape of w"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ws.kmeans(torch.randn(6, 10), **kwargs)


def test_bad_weights():
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        ws.kmeans(torch.arange(10), 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ws.kmeans_optimal(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="empty"):
        ws.kmeans(torch.empty(0), 2)
