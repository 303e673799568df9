"""The R-forward over traced ATen ops (weightshare.curvature.tangents / traced): every rule against torch.func.jvp
of its op, the rules' own derivatives (what the exact Hessian product differentiates), the trace cache and the
fallbacks for ops without a rule and for models that cannot be traced."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weightshare import curvature as cv
from weightshare.curvature import traced
from weightshare.curvature.tangents import RULES, fallback

aten = torch.ops.aten
D = dict(dtype=torch.float64)


def g(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **D)


# op, args, kwargs, which positional args carry a tangent (index, or (index, list position))
CASES = {
    "view": (aten.view.default, (g(4, 6), [6, 4]), {}, [0]),
    "permute": (aten.permute.default, (g(2, 3, 4), [2, 0, 1]), {}, [0]),
    "mean_dim": (aten.mean.dim, (g(3, 5), [1], True), {}, [0]),
    "unbind": (aten.unbind.int, (g(3, 4),), {}, [0]),
    "avg_pool2d": (aten.avg_pool2d.default, (g(1, 2, 4, 4), [2, 2]), {}, [0]),
    "add_broadcast_alpha": (aten.add.Tensor, (g(3, 4), g(4, seed=1)), {"alpha": 0.5}, [0, 1]),
    "add_only_second": (aten.add.Tensor, (g(3, 4), g(4, seed=1)), {}, [1]),
    "sub": (aten.sub.Tensor, (g(3, 4), g(3, 4, seed=1)), {"alpha": 2}, [0, 1]),
    "mul": (aten.mul.Tensor, (g(3, 4), g(3, 1, seed=1)), {}, [0, 1]),
    "div": (aten.div.Tensor, (g(3, 4), g(3, 4, seed=1).abs() + 0.5), {}, [0, 1]),
    "div_scalar": (aten.div.Tensor, (g(3, 4), 5.5), {}, [0]),
    "mm": (aten.mm.default, (g(3, 4), g(4, 5, seed=1)), {}, [0, 1]),
    "bmm": (aten.bmm.default, (g(2, 3, 4), g(2, 4, 5, seed=1)), {}, [0, 1]),
    "addmm": (aten.addmm.default, (g(5), g(3, 4, seed=1), g(4, 5, seed=2)), {"beta": 0.5, "alpha": 2.0}, [0, 1, 2]),
    "addmm_weight_only": (aten.addmm.default, (g(5), g(3, 4, seed=1), g(4, 5, seed=2)), {}, [2]),
    "conv2d": (aten.convolution.default, (g(2, 4, 6, 6), g(6, 2, 3, 3, seed=1), g(6, seed=2), [2, 1], [1, 0],
                                          [1, 2], False, [0, 0], 2), {}, [0, 1, 2]),
    "conv1d_weight_only": (aten.convolution.default, (g(2, 3, 7), g(4, 3, 3, seed=1), None, [1], [1], [1], False,
                                                      [0], 1), {}, [1]),
    "cat": (aten.cat.default, ([g(2, 3), g(2, 2, seed=1)], 1), {}, [(0, 0)]),
    "where": (aten.where.self, (g(3, 4) > 0, g(3, 4, seed=1), g(3, 4, seed=2)), {}, [1, 2]),
    "embedding": (aten.embedding.default, (g(10, 3), torch.tensor([[1, 4], [9, 0]])), {}, [0]),
    "relu": (aten.relu.default, (g(3, 4),), {}, [0]),
    "gelu": (aten.gelu.default, (g(3, 4),), {}, [0]),
    "gelu_tanh": (aten.gelu.default, (g(3, 4),), {"approximate": "tanh"}, [0]),
    "silu": (aten.silu.default, (g(3, 4),), {}, [0]),
    "tanh": (aten.tanh.default, (g(3, 4),), {}, [0]),
    "sigmoid": (aten.sigmoid.default, (g(3, 4),), {}, [0]),
    "leaky_relu": (aten.leaky_relu.default, (g(3, 4), 0.2), {}, [0]),
    "hardtanh": (aten.hardtanh.default, (g(3, 4), -0.5, 0.7), {}, [0]),
    "softmax": (aten._softmax.default, (g(3, 5), 1, False), {}, [0]),
    "log_softmax": (aten._log_softmax.default, (g(3, 5), 0, False), {}, [0]),
    "max_pool2d": (aten.max_pool2d_with_indices.default, (g(2, 3, 6, 6), [2, 2], [2, 2]), {}, [0]),
    "max_pool2d_overlapping": (aten.max_pool2d_with_indices.default, (g(1, 2, 7, 7), [3, 3], [2, 2], [1, 1]), {},
                               [0]),
    "layer_norm": (aten.native_layer_norm.default, (g(2, 3, 8), [8], g(8, seed=1), g(8, seed=2), 1e-5), {},
                   [0, 2, 3]),
    "layer_norm_2d_no_affine": (aten.native_layer_norm.default, (g(2, 3, 4), [3, 4], None, None, 1e-5), {}, [0]),
    "batch_norm_eval": (aten._native_batch_norm_legit_no_training.default,
                        (g(2, 3, 4, 4), g(3, seed=1), g(3, seed=2), g(3, seed=3), g(3, seed=4).abs() + 0.1, 0.1,
                         1e-5), {}, [0, 1, 2]),
}


def _tangent_args(args, which, seed=10):
    targs = [None] * len(args)
    for k, slot in enumerate(which):
        if isinstance(slot, tuple):
            i, j = slot
            targs[i] = [None] * len(args[i])
            targs[i][j] = g(*args[i][j].shape, seed=seed + k)
        else:
            targs[slot] = g(*args[slot].shape, seed=seed + k)
    return tuple(targs)


def _first(t):
    return t[0] if isinstance(t, (tuple, list)) else t


@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_torch_func_jvp(name):
    op, args, kwargs, which = CASES[name]
    assert op in RULES
    targs = _tangent_args(args, which)
    out = op(*args, **kwargs)
    got = RULES[op](args, kwargs, targs, out)
    expected = fallback(op, args, kwargs, targs, out)
    if isinstance(expected, (tuple, list)) and not isinstance(got, (tuple, list)):
        expected = expected[0]
    if isinstance(got, (tuple, list)):
        got, expected = [t for t in got if t is not None], list(expected)[:len([t for t in got if t is not None])]
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "softmax", "log_softmax", "layer_norm", "div", "mul",
                                  "addmm", "conv2d", "max_pool2d", "tanh", "sigmoid", "silu",
                                  "layer_norm_2d_no_affine", "batch_norm_eval", "leaky_relu", "hardtanh", "relu",
                                  "where", "embedding"])
def test_recorded_rule_has_the_right_derivative(name):
    """The exact Hessian product differentiates the tangent pass: the autograd derivative of <u, rule(x, t)>
    w.r.t. x along a direction e must equal the central finite difference of <u, rule(x + h e, t)> (second-order
    terms such as layer norm's statistics included)."""
    op, args, kwargs, which = CASES[name]
    targs = _tangent_args(args, which)
    first = which[1] if name == "addmm" else which[0]  # addmm: x, not the bias

    def directional(x):
        call_args = list(args)
        call_args[first] = x
        out = op(*call_args, **kwargs)
        t = _first(RULES[op](tuple(call_args), kwargs, targs, out))
        return (g(*t.shape, seed=99) * t).sum()

    x = args[first].clone().requires_grad_(True)
    with torch.enable_grad():
        d = directional(x)
        # a tangent linear in x (a bias, say) has no derivative w.r.t. it
        grad = torch.autograd.grad(d, x)[0] if d.requires_grad else torch.zeros_like(x)
    e, h = g(*x.shape, seed=98), 1e-6
    with torch.no_grad():
        finite = (directional(args[first] + h * e) - directional(args[first] - h * e)) / (2 * h)
    torch.testing.assert_close((grad * e).sum(), finite, rtol=1e-6, atol=1e-8)


def test_dropout_rule_uses_the_forward_mask():
    x, t = g(4, 5), g(4, 5, seed=1)
    out, mask = aten.native_dropout(x, 0.3, True)
    got, _ = RULES[aten.native_dropout.default]((x, 0.3, True), {}, (t, None, None), (out, mask))
    torch.testing.assert_close(got, t * mask / 0.7)


# ----------------------------------------------------------------------------------------- whole networks
class Attention(nn.Module):
    """A pre-norm attention + GELU MLP block with residuals, written out (every weight an nn.Linear)."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(n, t, d))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


class ConvBN(nn.Module):
    """Conv, eval-mode batch norm, ReLU, max-pool, a squared term (aten.pow has no rule: the fallback) and Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(h.flatten(1) + 0.1 * h.flatten(1) ** 2)


def _model(cls, shape):
    torch.manual_seed(0)
    model = cls().double().eval()
    if isinstance(model, ConvBN):  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    v = {n: torch.randn_like(p) for n, p in cv.compressible_parameters(model).items()}
    return model, x, y, v


NETS = {"attention": (Attention, (4, 8)), "conv_bn": (ConvBN, (2, 6, 6))}


CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no GPU"))])
@pytest.mark.parametrize("net", list(NETS))
def test_traced_products_equal_autograd_products(net, device):
    model, x, y, v = _model(*NETS[net])
    model, x, y, v = model.to(device), x.to(device), y.to(device), {n: t.to(device) for n, t in v.items()}
    assert traced.trace(model, x) is not None
    loss = nn.CrossEntropyLoss()
    reference = cv.hvp(model, loss, (x, y), v, method="double_backward")
    ours = cv.hvp(model, loss, (x, y), v, method="reverse_over_forward")
    for n in v:
        torch.testing.assert_close(ours[n], reference[n], rtol=1e-9, atol=1e-12)
    # the Gauss-Newton product through the traced R-forward against torch.func.jvp
    from torch.func import functional_call
    params = {n: p.detach() for n, p in model.named_parameters()}
    _, jv = torch.func.jvp(lambda p: functional_call(model, p, (x,)), (params,),
                           ({n: v.get(n, torch.zeros_like(p)) for n, p in params.items()},))
    f = cv.functional.FunctionalLoss(model, loss, cv.compressible_parameters(model), "test")
    tr = traced.trace(model, x)
    env = tr.primal(f.traced_values(f.primals()), x)
    torch.testing.assert_close(tr.tangent(env, f.traced_directions(v)), jv, rtol=1e-10, atol=1e-12)


def test_trace_is_cached_per_signature_and_renewed_when_the_model_changes():
    model, x, _, _ = _model(*NETS["conv_bn"])
    first = traced.trace(model, x)
    assert traced.trace(model, x) is first
    assert traced.trace(model, x[:3]) is not first  # another input shape
    model.fc = nn.Linear(36, 3).double()
    assert traced.trace(model, x) is not first  # another module: traced again
    model.train()
    assert traced.trace(model, x) is None  # batch-norm statistics updated in place: not traced


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) if float(x.sum()) > 0 else -self.fc(x)


def test_untraceable_model_falls_back_to_autograd_products():
    torch.manual_seed(0)
    model = DataDependent().double()
    x, y = -torch.rand(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert traced.trace(model, x) is None
    v = {"fc.weight": torch.randn(3, 4, dtype=torch.float64)}
    loss = nn.CrossEntropyLoss()
    a = cv.hvp(model, loss, (x, y), v, method="reverse_over_forward")
    b = cv.hvp(model, loss, (x, y), v, method="double_backward")
    torch.testing.assert_close(a["fc.weight"], b["fc.weight"])
    gv = cv.ggn_vp(model, loss, (x, y), v)  # the jvp path
    assert torch.isfinite(gv["fc.weight"]).all() and gv["fc.weight"].abs().sum() > 0
