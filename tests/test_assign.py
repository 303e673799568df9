"""assign: bit-exact agreement with the reference rule, nearest-entry property, ties, groups, dtypes, SIMD paths."""
import pytest
import torch
from torch.library import opcheck

import weightshare as ws
from weightshare import reference

from conftest import FLOAT_DTYPES, requires_native

pytestmark = requires_native

KS = [1, 2, 3, 5, 16, 17, 32, 33, 100, 256]


def _codebook(k, groups, gen, dtype=torch.float32):
    return (torch.randn(groups, k, generator=gen) * 0.5).to(dtype)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_matches_reference(k, dtype, simd, device, gen):
    w = (torch.randn(64, 129, generator=gen) * 0.6).to(dtype)  # 8256 weights: SIMD body + scalar tail
    cb = _codebook(k, 1, gen)
    got = ws.ops.assign(w.to(device), cb.to(device)).cpu()
    assert got.dtype == torch.uint8 and got.shape == w.shape
    assert torch.equal(got, reference.assign(w, cb))


@pytest.mark.parametrize("k", [4, 16, 64])
def test_is_nearest_entry(k, simd, gen):
    w = torch.randn(100_003, generator=gen)
    cb = _codebook(k, 1, gen)
    idx = ws.ops.assign(w, cb).long()
    dist = (w[:, None] - cb[0][None, :]).abs()
    chosen = dist.gather(1, idx[:, None])[:, 0]
    best = dist.min(1).values
    # equal up to the rounding of fp32 midpoints (one ulp of the weight scale)
    assert torch.all(chosen - best <= 1e-6 * (1 + w.abs()))


@pytest.mark.parametrize("groups_of_rows", ["per_layer", "per_row", "two_rows"])
def test_groups(groups_of_rows, simd, device, gen):
    w = torch.randn(12, 77, generator=gen)
    G = {"per_layer": 1, "per_row": 12, "two_rows": 6}[groups_of_rows]
    cb = _codebook(16, G, gen)
    got = ws.ops.assign(w.to(device), cb.to(device)).cpu()
    assert torch.equal(got, reference.assign(w, cb))
    for g in range(G):  # each row block uses its own codebook
        rows = slice(g * 12 // G, (g + 1) * 12 // G)
        assert torch.equal(got[rows], reference.assign(w[rows].contiguous(), cb[g:g + 1]))


def test_conv_shaped_weight(device, gen):
    w = torch.randn(8, 3, 3, 3, generator=gen)
    cb = _codebook(4, 8, gen)
    assert torch.equal(ws.ops.assign(w.to(device), cb.to(device)).cpu(), reference.assign(w, cb))


def test_ties_go_to_lower_index(simd, device):
    # midpoint of 0 and 1 is 0.5: the entry listed first wins, whichever value it has
    w = torch.tensor([0.5] * 40)
    assert ws.ops.assign(w.to(device), torch.tensor([[0.0, 1.0]], device=device)).unique().tolist() == [0]
    assert ws.ops.assign(w.to(device), torch.tensor([[1.0, 0.0]], device=device)).unique().tolist() == [0]
    # duplicate entries resolve to the lowest index holding the value
    cb = torch.tensor([[2.0, -1.0, 2.0, -1.0]], device=device)
    out = ws.ops.assign(torch.tensor([1.9, -0.9] * 20, device=device), cb).cpu()
    assert out.tolist() == [0, 1] * 20


def test_exact_values_map_to_themselves(simd, gen):
    cb = torch.randn(1, 37, generator=gen)
    # adjacent floats are the hardest case for midpoint rounding
    cb[0, 1] = torch.nextafter(cb[0, 0], torch.tensor(10.0))
    w = cb[0].repeat(50)
    assert torch.equal(ws.ops.assign(w, cb), torch.arange(37, dtype=torch.uint8).repeat(50))


def test_infinities_go_to_extremes(device):
    cb = torch.tensor([[0.3, -2.0, 5.0, 1.0]], device=device)
    w = torch.tensor([float("inf"), float("-inf")] * 20, device=device)
    assert ws.ops.assign(w, cb).cpu().tolist() == [2, 1] * 20


def test_nan_weight_raises(simd, device):
    w = torch.zeros(100, device=device)
    w[57] = float("nan")
    with pytest.raises(ValueError, match="w contains NaN"):
        torch.ops.weightshare.assign(w, torch.tensor([[0.0, 1.0]], device=device))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_codebook_raises(bad, device):
    with pytest.raises(ValueError, match="codebook contains NaN or Inf"):
        torch.ops.weightshare.assign(torch.zeros(10, device=device), torch.tensor([[0.0, bad]], device=device))


def test_unaligned_view(device, gen):
    base = torch.randn(1001, generator=gen).to(device)
    w = base[1:]  # contiguous, but its data pointer is 4 bytes off the allocation
    cb = _codebook(16, 1, gen).to(device)
    assert torch.equal(ws.ops.assign(w, cb).cpu(), reference.assign(w.cpu(), cb.cpu()))


def test_thread_count_invariance(gen):
    w = torch.randn(300_000, generator=gen)
    cb = _codebook(16, 1, gen)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ws.ops.assign(w, cb)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, ws.ops.assign(w, cb))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_opcheck(dtype, device, gen):
    w = torch.randn(16, 40, generator=gen).to(dtype).to(device)
    opcheck(torch.ops.weightshare.assign.default, (w, _codebook(8, 16, gen).to(device)))
    opcheck(torch.ops.weightshare.assign.default, (w, _codebook(8, 1, gen, dtype).to(device)))
