"""Shared-weight layers: outputs equal the dense ops on the dequantised weight, gradients reach codebook, bias and
input, state_dict and to_dense round trips, validation, binary layers, torch.compile and torch.export."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import weightshare as ws
from weightshare.formats import bits_for
from weightshare.models import BinaryLinear
from weightshare.nn import SharedConv1d, SharedConv2d, SharedLinear, binary_assignment

from conftest import requires_native

TOL = dict(rtol=1e-5, atol=1e-5)


def random_assignment(weight_shape, k, groups, gen):
    codebook = torch.randn(groups, k, generator=gen)
    idx = torch.randint(0, k, tuple(weight_shape), generator=gen, dtype=torch.uint8)
    return codebook, idx


def dequantised(codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """codebook[group(row), idx]: the reference weight (differentiable in codebook)."""
    rows = idx.shape[0]
    group = torch.arange(rows, device=idx.device) // (rows // codebook.shape[0])
    return codebook[group[:, None], idx.reshape(rows, -1).long()].reshape(idx.shape)


def assert_grads_match(shared, reference_forward, x):
    """Gradients of sum(y * r) wrt input, codebook and bias equal those through the dequantised dense weight."""
    r = torch.randn_like(shared(x))
    xs = x.clone().requires_grad_()
    (shared(xs) * r).sum().backward()
    xr = x.clone().requires_grad_()
    codebook = shared.codebook.detach().clone().requires_grad_()
    bias = None if shared.bias is None else shared.bias.detach().clone().requires_grad_()
    (reference_forward(xr, dequantised(codebook, shared.indices()), bias) * r).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shared.codebook.grad, codebook.grad, rtol=1e-4, atol=1e-4)
    if bias is not None:
        torch.testing.assert_close(shared.bias.grad, bias.grad, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- linear


@pytest.mark.parametrize("k", [2, 5, 16, 256])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_dense(k, per_row, bias, device, gen):
    dense = nn.Linear(37, 24, bias=bias).to(device)
    codebook, idx = random_assignment(dense.weight.shape, k, 24 if per_row else 1, gen)
    layer = SharedLinear.from_dense(dense, codebook.to(device), idx.to(device))
    assert (layer.bits, layer.k, layer.groups) == (bits_for(k), k, codebook.shape[0])
    weight = dequantised(codebook, idx).to(device)
    assert torch.equal(layer.weight, weight)
    assert torch.equal(layer.indices(), idx.to(device))
    x = torch.randn(3, 5, 37, generator=gen).to(device)
    torch.testing.assert_close(layer(x), F.linear(x, weight, dense.bias), **TOL)
    x_t = torch.randn(37, 4, generator=gen).to(device).t()  # non-contiguous input
    torch.testing.assert_close(layer(x_t), F.linear(x_t, weight, dense.bias), **TOL)


@pytest.mark.parametrize("per_row", [False, True])
def test_linear_gradients_flow(per_row, device, gen):
    codebook, idx = random_assignment((12, 20), 8, 12 if per_row else 1, gen)
    layer = SharedLinear.from_dense(nn.Linear(20, 12).to(device), codebook.to(device), idx.to(device))
    assert layer.codebook.requires_grad and layer.bias.requires_grad and not layer.packed.requires_grad
    assert_grads_match(layer, F.linear, torch.randn(6, 20, generator=gen).to(device))


def test_explicit_bits_and_int8_activation(gen):
    codebook, idx = random_assignment((16, 64), 5, 1, gen)
    dense = nn.Linear(64, 16)
    layer = SharedLinear.from_dense(dense, codebook, idx, bits=8, activation="int8")
    assert layer.bits == 8 and layer.packed.shape == (16, 64)
    x = torch.randn(4, 64, generator=gen)
    want = F.linear(x, dequantised(codebook, idx), dense.bias)
    assert (layer(x) - want).abs().max() < 0.05 * want.abs().max()  # int8 activations: approximate by design


# ----------------------------------------------------------------------------------------------- conv

CONV2D_CASES = [  # (in, out, kernel, stride, padding, dilation, conv groups)
    (3, 8, 3, 1, 1, 1, 1),
    (4, 6, (3, 2), (2, 1), (1, 0), 1, 2),
    (8, 8, 3, 2, 2, 2, 8),  # depthwise, dilated
    (6, 4, 1, 1, 0, 1, 1),  # pointwise
    (3, 5, 3, 1, "same", 1, 1),
    (3, 5, 2, 1, "valid", 1, 1),
]


@pytest.mark.parametrize("case", CONV2D_CASES)
@pytest.mark.parametrize("per_row", [False, True])
def test_conv2d_matches_dense(case, per_row, device, gen):
    cin, cout, kernel, stride, padding, dilation, conv_groups = case
    dense = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, conv_groups, bias=per_row).to(device)
    codebook, idx = random_assignment(dense.weight.shape, 16, cout if per_row else 1, gen)
    layer = SharedConv2d.from_dense(dense, codebook.to(device), idx.to(device))
    weight = dequantised(codebook, idx).to(device)
    x = torch.randn(2, cin, 9, 8, generator=gen).to(device)
    torch.testing.assert_close(layer(x), dense._conv_forward(x, weight, dense.bias), **TOL)
    assert_grads_match(layer, lambda x, w, b: dense._conv_forward(x, w, b), x)


@pytest.mark.parametrize("case", [(4, 6, 3, 1, 1, 1, 1), (6, 6, 5, 2, 2, 2, 3), (4, 8, 1, 1, 0, 1, 4),
                                  (3, 4, 3, 1, "same", 1, 1)])
def test_conv1d_matches_dense(case, device, gen):
    cin, cout, kernel, stride, padding, dilation, conv_groups = case
    dense = nn.Conv1d(cin, cout, kernel, stride, padding, dilation, conv_groups).to(device)
    codebook, idx = random_assignment(dense.weight.shape, 8, 1, gen)
    layer = SharedConv1d.from_dense(dense, codebook.to(device), idx.to(device))
    weight = dequantised(codebook, idx).to(device)
    x = torch.randn(2, cin, 11, generator=gen).to(device)
    torch.testing.assert_close(layer(x), F.conv1d(x, weight, dense.bias, stride, padding, dilation, conv_groups),
                               **TOL)
    torch.testing.assert_close(layer(x[0]), dense._conv_forward(x[0], weight, dense.bias), **TOL)  # unbatched
    assert_grads_match(layer, lambda x, w, b: dense._conv_forward(x, w, b), x)


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                                  nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular")])
def test_padding_modes_other_than_zeros_are_refused(conv, gen):
    codebook, idx = random_assignment(conv.weight.shape, 4, 1, gen)
    cls = SharedConv2d if isinstance(conv, nn.Conv2d) else SharedConv1d
    with pytest.raises(NotImplementedError, match=conv.padding_mode):
        cls.from_dense(conv, codebook, idx)


def test_asymmetric_same_padding_is_refused(gen):
    conv = nn.Conv2d(2, 2, 4, padding="same")
    with pytest.raises(NotImplementedError, match="same"):
        SharedConv2d.from_dense(conv, *random_assignment(conv.weight.shape, 4, 1, gen))


# ----------------------------------------------------------------------------------------------- validation


def test_from_dense_validates_the_assignment(gen):
    dense = nn.Linear(10, 6)
    codebook, idx = random_assignment((6, 10), 4, 1, gen)
    with pytest.raises(ValueError, match="idx values"):
        SharedLinear.from_dense(dense, codebook, torch.full_like(idx, 4))
    with pytest.raises(ValueError, match="shape"):
        SharedLinear.from_dense(dense, codebook, idx.t())
    with pytest.raises(ValueError, match="groups"):
        SharedLinear.from_dense(dense, torch.randn(4, 4), idx)
    with pytest.raises(ValueError, match="1..256"):
        SharedLinear.from_dense(dense, torch.randn(300), idx)
    with pytest.raises(ValueError, match="bits"):
        SharedLinear.from_dense(dense, torch.randn(5), idx, bits=2)
    with pytest.raises(ValueError, match="NaN"):
        SharedLinear.from_dense(dense, torch.tensor([0.0, float("nan"), 1.0, 2.0]), idx)
    with pytest.raises(ValueError, match="codebook must be"):
        SharedLinear.from_dense(dense, torch.randn(1, 1, 4), idx)
    with pytest.raises(TypeError, match="integer"):
        SharedLinear.from_dense(dense, codebook, idx.float())
    with pytest.raises(ValueError, match="activation"):
        SharedLinear.from_dense(dense, codebook, idx, activation="int4")
    with pytest.raises(ValueError, match="idx values"):
        SharedLinear.from_dense(dense, codebook, idx.long() - 1)
    layer = SharedLinear.from_dense(dense, codebook, idx.long())  # any integer dtype in range is fine
    assert torch.equal(layer.indices(), idx)


# ----------------------------------------------------------------------------------------------- round trips


def make_layers(gen):
    linear = nn.Linear(20, 12)
    conv2d = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    conv1d = nn.Conv1d(4, 6, 3, stride=2, bias=False)
    made = []
    for dense, cls, x in [(linear, SharedLinear, torch.randn(3, 20, generator=gen)),
                          (conv2d, SharedConv2d, torch.randn(2, 4, 7, 7, generator=gen)),
                          (conv1d, SharedConv1d, torch.randn(2, 4, 9, generator=gen))]:
        codebook, idx = random_assignment(dense.weight.shape, 16, 2, gen)
        made.append((dense, cls.from_dense(dense, codebook, idx), x))
    return made


def test_state_dict_round_trip(gen):
    for dense, layer, x in make_layers(gen):
        state = layer.state_dict()
        assert set(state) == {"packed", "codebook"} | ({"bias"} if dense.bias is not None else set())
        fresh = type(layer).from_dense(dense, torch.zeros(2, 16), torch.zeros_like(dense.weight, dtype=torch.uint8))
        assert not torch.equal(fresh(x), layer(x))
        fresh.load_state_dict(state)
        assert torch.equal(fresh(x), layer(x))


def test_to_dense_round_trip(gen):
    for dense, layer, x in make_layers(gen):
        back = layer.to_dense()
        assert type(back) is type(dense)
        assert torch.equal(back.weight, layer.weight)
        torch.testing.assert_close(back(x), layer(x), **TOL)
        codebook, idx = layer.codebook.detach(), layer.indices()
        again = type(layer).from_dense(back, codebook, idx)
        assert torch.equal(again.packed, layer.packed) and torch.equal(again(x), layer(x))
        assert "bits=4, k=16, groups=2" in repr(layer)


def test_set_assignment_replaces_codebook_and_indices(gen):
    _, layer, x = make_layers(gen)[0]
    codebook, idx = random_assignment((12, 20), 16, 2, gen)
    layer.set_assignment(codebook, idx)
    torch.testing.assert_close(layer(x), F.linear(x, dequantised(codebook, idx), layer.bias), **TOL)


# ----------------------------------------------------------------------------------------------- binary layers


@pytest.mark.parametrize("bias", [False, True])
def test_binary_linear_keeps_one_bit_weights(bias, gen):
    binary = BinaryLinear(30, 9, bias=bias)
    with torch.no_grad():
        binary.weight[0, :3] = 0.0  # sign(0) is +1 in BinaryLinear; the shared layer must agree
    layer = SharedLinear.from_dense(binary)
    assert layer.bits == 1 and layer.k == 2 and layer.codebook.tolist() == [[-1.0, 1.0]]
    x = torch.randn(4, 30, generator=gen)
    torch.testing.assert_close(layer(x), binary(x), **TOL)
    codebook, idx = binary_assignment(binary, scale="mean")
    scaled = SharedLinear.from_dense(binary, codebook, idx)
    s = binary.weight.abs().mean()
    torch.testing.assert_close(scaled(x), F.linear(x, torch.where(binary.weight >= 0, s, -s), binary.bias), **TOL)
    with pytest.raises(ValueError, match="BinaryLinear"):
        SharedLinear.from_dense(nn.Linear(3, 2))


# ----------------------------------------------------------------------------------------------- compile / export


class Tiny(nn.Module):
    """Every shared layer kind, with a non-contiguous input to the linear."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.linear = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.conv2d(x)).mean(-1)
        return self.linear(self.conv1d(x).transpose(1, 2))


def tiny_shared(gen):
    torch.manual_seed(0)
    model = Tiny()
    report = ws.replace_layers(model, {n: random_assignment(m.weight.shape, 16, 1, gen)
                                       for n, m in model.named_children()})
    assert len(report.replaced) == 3
    return model, torch.randn(2, 3, 6, 6, generator=gen)


@requires_native
def test_torch_compile_fullgraph(gen):
    model, x = tiny_shared(gen)
    torch._dynamo.reset()
    # aot_eager traces the whole graph through the fake kernels and the registered autograd; inductor is
    # exercised by the slow test below (its C++ compile takes about a minute on a small CPU)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), model(x))
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for got, p in zip(grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, **TOL)


@requires_native
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("WS_SLOW_TESTS"), reason="inductor compile is slow: set WS_SLOW_TESTS=1")
def test_torch_compile_inductor(gen):
    model, x = tiny_shared(gen)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), **TOL)


@requires_native
def test_torch_export(gen):
    model, x = tiny_shared(gen)
    program = torch.export.export(model, (x,))
    assert {"conv2d.packed", "conv1d.packed", "linear.packed"} <= set(program.graph_signature.buffers)
    assert torch.equal(program.module()(x), model(x))
    ops_used = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("weightshare" in name for name in ops_used)  # the packed kernels, not a dense fallback
