"""kmeans_step and loss_aware_assign kernels against the reference; kmeans1d_optimal against the O(k n^2) DP."""
import pytest
import torch
from torch.library import opcheck

import weightshare as ws
from weightshare import reference

from conftest import FLOAT_DTYPES, requires_native

pytestmark = requires_native


# ----------------------------------------------------------------------------------------------- kmeans_step
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("groups", [1, 4, 32])
@pytest.mark.parametrize("weighted", [False, True])
def test_kmeans_step_matches_reference(dtype, groups, weighted, device, gen):
    k = 13
    w = torch.randn(32, 1500, generator=gen).to(dtype)  # 48000 weights: several fixed chunks per group
    idx = torch.randint(0, k, w.shape, generator=gen, dtype=torch.uint8)
    h = torch.rand(w.shape, generator=gen).to(dtype) if weighted else None
    got = ws.ops.kmeans_step(w.to(device), idx.to(device), k, None if h is None else h.to(device), groups)
    want = reference.kmeans_step(w, idx, k, h, groups)
    for g, r in zip(got, want):
        assert g.dtype == torch.float64 and g.shape == (groups, k)
        torch.testing.assert_close(g.cpu(), r, rtol=1e-12, atol=1e-9)


def test_kmeans_step_distortion_identity(gen):
    w = torch.randn(5000, generator=gen)
    cb = torch.randn(1, 8, generator=gen)
    idx = ws.ops.assign(w, cb)
    sums, weights, sqsums = ws.ops.kmeans_step(w, idx, 8)
    direct = ((w.double() - cb[0].double()[idx.long()]) ** 2).sum()
    via_stats = (sqsums - 2 * cb.double() * sums + cb.double() ** 2 * weights).sum()
    torch.testing.assert_close(via_stats, direct, rtol=1e-9, atol=1e-9)


def test_kmeans_step_bit_identical_for_any_thread_count(gen):
    w = torch.randn(200_000, generator=gen)
    idx = torch.randint(0, 16, w.shape, generator=gen, dtype=torch.uint8)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ws.ops.kmeans_step(w, idx, 16)
    finally:
        torch.set_num_threads(n)
    many = ws.ops.kmeans_step(w, idx, 16)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_kmeans_step_index_out_of_range(device):
    w = torch.zeros(10, device=device)
    idx = torch.zeros(10, dtype=torch.uint8, device=device)
    idx[3] = 5
    with pytest.raises(ValueError, match="idx holds a value >= k = 5"):
        torch.ops.weightshare.kmeans_step(w, idx, 5)


def test_kmeans_step_opcheck(device, gen):
    w = torch.randn(8, 30, generator=gen).to(device)
    idx = torch.randint(0, 4, (8, 30), generator=gen, dtype=torch.uint8).to(device)
    opcheck(torch.ops.weightshare.kmeans_step.default, (w, idx, 4, None, 8))
    opcheck(torch.ops.weightshare.kmeans_step.default, (w, idx, 4, torch.rand_like(w), 2))


# ----------------------------------------------------------------------------------------------- loss-aware
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("k", [2, 7, 16, 64])
@pytest.mark.parametrize("groups", [1, 16])
def test_loss_aware_matches_reference(dtype, k, groups, simd, device, gen):
    shape = (16, 70)
    w = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
    g = (torch.randn(shape, generator=gen) * 0.01).to(dtype)
    h = (torch.rand(shape, generator=gen) * 2 - 0.2).to(dtype)  # some negative curvature too
    cb = torch.randn(groups, k, generator=gen) * 0.1
    pen = torch.rand(groups, k, generator=gen) * 1e-3
    for grad, penalty in [(g, pen), (None, None), (g, None)]:
        args = (w, grad, h, cb, penalty)
        got = ws.ops.loss_aware_assign(*[a.to(device) if a is not None else None for a in args]).cpu()
        assert torch.equal(got, reference.loss_aware_assign(*args)), (grad is None, penalty is None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_weights_read_fp32_statistics_in_full(dtype, simd, device, gen):
    """grad, hdiag and importance keep their own (fp32) precision when w is 16-bit, as the reference reads them:
    curvatures above fp16's 65504 (a sharp minimum's Hessian diagonal) stay finite, and gradients that differ only
    beyond 8-11 mantissa bits still change the choice."""
    w = (torch.randn(8, 300, generator=gen) * 0.1).to(dtype)
    g = torch.randn(8, 300, generator=gen) * 1e-3 + 1e-4 * torch.rand(8, 300, generator=gen)
    h = torch.rand(8, 300, generator=gen) * 2e5 + 1.0  # up to 2e5: Inf in fp16
    cb = torch.randn(2, 16, generator=gen) * 0.1
    got = ws.ops.loss_aware_assign(w.to(device), g.to(device), h.to(device), cb.to(device)).cpu()
    assert torch.equal(got, reference.loss_aware_assign(w, g, h, cb))
    idx = torch.randint(0, 16, (8, 300), generator=gen, dtype=torch.uint8)
    got = ws.ops.kmeans_step(w.to(device), idx.to(device), 16, h.to(device), 2)
    for a, b in zip(got, reference.kmeans_step(w, idx, 16, h, 2)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-9)


def test_loss_aware_reduces_to_nearest_without_gradient(gen):
    w = torch.randn(4000, generator=gen)
    cb = torch.sort(torch.randn(1, 16, generator=gen)).values
    got = ws.ops.loss_aware_assign(w, None, torch.ones_like(w), cb)
    # same entry or an equally distant one
    d = (w[:, None] - cb[0]).abs()
    assert torch.allclose(d.gather(1, got.long()[:, None])[:, 0], d.min(1).values, atol=1e-6)


def test_loss_aware_follows_gradient(device):
    # with hdiag = 1 the model's minimiser is w - grad: a gradient pushes the weight to the neighbour entry
    cb = torch.tensor([[-1.0, 0.0, 1.0]], device=device)
    w = torch.zeros(32, device=device)
    grad = torch.full_like(w, -0.9)
    out = ws.ops.loss_aware_assign(w, grad, torch.ones_like(w), cb)
    assert out.unique().tolist() == [2]


def test_loss_aware_penalty_forbids_entry(simd, device):
    cb = torch.tensor([[0.0, 1.0]], device=device)
    w = torch.zeros(40, device=device)
    pen = torch.tensor([[float("inf"), 0.0]], device=device)
    assert ws.ops.loss_aware_assign(w, None, torch.ones_like(w), cb, pen).unique().tolist() == [1]


@pytest.mark.parametrize("which", ["w", "grad", "hdiag"])
def test_loss_aware_nonfinite_raises(which, simd, device):
    t = {n: torch.zeros(50, device=device) for n in ("w", "grad", "hdiag")}
    t[which][7] = float("nan")
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        torch.ops.weightshare.loss_aware_assign(t["w"], t["grad"], t["hdiag"], torch.zeros(1, 2, device=device))


def test_loss_aware_bad_penalty(device):
    z = torch.zeros(5, device=device)
    with pytest.raises(ValueError, match="penalty contains NaN or -Inf"):
        torch.ops.weightshare.loss_aware_assign(z, None, z, torch.zeros(1, 2, device=device),
                                                torch.tensor([[0.0, float("-inf")]], device=device))


def test_loss_aware_opcheck(device, gen):
    w = torch.randn(4, 33, generator=gen).to(device)
    cb = torch.randn(4, 5, generator=gen).to(device)
    opcheck(torch.ops.weightshare.loss_aware_assign.default, (w, w * 0.1, w.abs(), cb, torch.rand_like(cb)))
    opcheck(torch.ops.weightshare.loss_aware_assign.default, (w, None, w.abs(), cb[:1], None))


# ----------------------------------------------------------------------------------------------- 1-D optimum
@pytest.mark.parametrize("n,k", [(1, 3), (5, 5), (12, 3), (40, 7), (60, 16)])
def test_kmeans1d_optimal_matches_quadratic_dp(n, k, gen):
    x = torch.sort(torch.randn(n, generator=gen, dtype=torch.float64)).values
    wt = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    c, cost = ws.ops.kmeans1d_optimal(x, wt, k)
    rc, rcost = reference.kmeans1d_optimal(x, wt, k)
    torch.testing.assert_close(cost, rcost, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(c, rc, rtol=1e-9, atol=1e-12)
    assert c.shape == (min(n, k),)


def test_kmeans1d_optimal_beats_every_contiguous_split_bruteforce(gen):
    import itertools
    x = torch.sort(torch.randn(9, generator=gen, dtype=torch.float64)).values
    wt = torch.rand(9, generator=gen, dtype=torch.float64)
    _, cost = ws.ops.kmeans1d_optimal(x, wt, 3)
    best = float("inf")
    for a, b in itertools.combinations(range(1, 9), 2):
        total = 0.0
        for s, e in ((0, a), (a, b), (b, 9)):
            m = (wt[s:e] * x[s:e]).sum() / wt[s:e].sum()
            total += float((wt[s:e] * (x[s:e] - m) ** 2).sum())
        best = min(best, total)
    assert abs(float(cost) - best) <= 1e-12 + 1e-9 * best


@pytest.mark.parametrize("bad", ["unsorted", "negative_weight", "nan"])
def test_kmeans1d_optimal_bad_input(bad):
    x = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    w = torch.ones(3, dtype=torch.float64)
    if bad == "unsorted":
        x = x.flip(0)
    elif bad == "negative_weight":
        w[1] = -1
    else:
        x[1] = float("nan")
    with pytest.raises(ValueError):
        torch.ops.weightshare.kmeans1d_optimal(x, w, 2)


def test_kmeans1d_optimal_opcheck(gen):
    x = torch.sort(torch.randn(30, generator=gen, dtype=torch.float64)).values
    opcheck(torch.ops.weightshare.kmeans1d_optimal.default, (x, torch.ones_like(x), 4))
