"""sq_grad_accum: the Fisher-diagonal accumulation of a Linear layer, against per-sample gradients from vmap."""
import pytest
import torch
from torch.library import opcheck

import weightshare as ws
from weightshare import reference

from conftest import requires_native

pytestmark = requires_native


@pytest.mark.parametrize("shape", [(7, None, 5, 3), (4, 6, 5, 3), (300, None, 64, 32), (3, 9, 16, 8)])
def test_matches_vmap_per_sample_gradients(shape, device, gen):
    N, T, I, O = shape
    lin = torch.nn.Linear(I, O)
    x = torch.randn(N, *(() if T is None else (T,)), I, generator=gen)
    y = torch.randint(0, O, (N,), generator=gen)

    def loss_one(w, b, xi, yi):  # one sample's loss: cross-entropy of the (sequence-mean) logits
        out = torch.nn.functional.linear(xi, w, b)
        out = out if T is None else out.mean(0)
        return torch.nn.functional.cross_entropy(out[None], yi[None])

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, None, 0, 0))(lin.weight, lin.bias, x, y)
    want = grads.double().square().sum(0).float()
    # the output gradients the op takes: d loss_n / d out_n
    outs = torch.nn.functional.linear(x, lin.weight, lin.bias).detach().requires_grad_()
    logits = outs if T is None else outs.mean(1)
    torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
    got = ws.ops.sq_grad_accum(x.to(device), outs.grad.to(device)).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got, reference.sq_grad_accum(x, outs.grad), rtol=1e-4, atol=1e-7)


def test_long_sequences_are_chunked(gen):
    x = torch.randn(40, 33, 200, generator=gen)
    g = torch.randn(40, 33, 300, generator=gen)
    torch.testing.assert_close(ws.ops.sq_grad_accum(x, g), reference.sq_grad_accum(x, g), rtol=1e-4, atol=1e-4)


def test_opcheck(device, gen):
    opcheck(torch.ops.weightshare.sq_grad_accum.default, (torch.randn(5, 4).to(device), torch.randn(5, 3).to(device)))
    opcheck(torch.ops.weightshare.sq_grad_accum.default,
            (torch.randn(2, 3, 4).to(device), torch.randn(2, 3, 6).to(device)))


@pytest.mark.parametrize("x,g,exc,match", [
    ((5, 4), (6, 3), ValueError, "must agree on the sample"),
    ((5, 4), (5, 2, 3), ValueError, "must both be"),
    ((2, 3, 4), (2, 4, 3), ValueError, "must agree on the sample"),
])
def test_bad_input(x, g, exc, match):
    with pytest.raises(exc, match=match):
        torch.ops.weightshare.sq_grad_accum(torch.randn(*x), torch.randn(*g))


def test_integer_input_is_a_type_error():
    with pytest.raises(TypeError, match="must be floating point"):
        torch.ops.weightshare.sq_grad_accum(torch.ones(3, 2, dtype=torch.long), torch.randn(3, 2))
