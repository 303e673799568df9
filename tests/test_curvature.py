"""weightshare.curvature against explicit float64 matrices on tiny networks: Hessian and Gauss-Newton products,
Hutchinson and Fisher diagonals, gradients; the model is never modified; bad arguments raise."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from weightshare import curvature as cv
from weightshare.curvature.accumulators import WeightedMeanWithVariance


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: a second thread only adds synchronisation (and contention on shared machines)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- tiny models
class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class TinyConvNet(nn.Module):
    """Conv2d + max-pool + Linear: pooling makes the Hessian structured, tanh keeps finite differences smooth."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        h = F.max_pool2d(torch.tanh(self.conv(x)), 2)
        return self.fc(h.flatten(1))


class TinyConv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


INPUT_SHAPES = {TinyMLP: (5,), TinyConvNet: (2, 6, 6), TinyConv1dNet: (2, 6)}
MODELS = list(INPUT_SHAPES)


def make(model_cls, n=6, seed=0, classes=3):
    torch.manual_seed(seed)
    model = model_cls().double().eval()
    x = torch.randn(n, *INPUT_SHAPES[model_cls], dtype=torch.float64)
    y = torch.randint(0, classes, (n,))
    return model, x, y


def random_like(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}


# ------------------------------------------------------------------------------------- explicit references
def flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


def unflat(theta, params):
    out, offset = {}, 0
    for n, p in params.items():
        out[n] = theta[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


def explicit_hessian(model, loss_fn, x, y, params):
    theta = flat(params, params).detach()
    return torch.autograd.functional.hessian(
        lambda t: loss_fn(functional_call(model, unflat(t, params), (x,)), y), theta, vectorize=True)


def explicit_ggn(model, loss_fn, x, y, params):
    theta = flat(params, params).detach()
    out = model(x).detach()
    jac = torch.autograd.functional.jacobian(
        lambda t: functional_call(model, unflat(t, params), (x,)).reshape(-1), theta, vectorize=True)
    h_out = torch.autograd.functional.hessian(lambda o: loss_fn(o.view_as(out), y), out.reshape(-1), vectorize=True)
    return jac.T @ h_out @ jac


def loss_gradient(model, loss_fn, x, y, params, theta):
    t = theta.detach().requires_grad_(True)
    loss = loss_fn(functional_call(model, unflat(t, params), (x,)), y)
    return torch.autograd.grad(loss, t)[0]


# ---------------------------------------------------------------------------------- compressible_parameters
def test_compressible_parameters_finds_linear_and_conv_weights_in_order():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Embedding(4, 2),
                          nn.Sequential(MyLinear(3, 3), nn.Conv1d(2, 2, 1)), nn.LayerNorm(3), nn.Linear(3, 3))
    model[6].weight = model[4][0].weight  # tied: reported once, under its first name
    params = cv.compressible_parameters(model)
    assert list(params) == ["0.weight", "4.0.weight", "4.1.weight"]
    assert params["4.0.weight"] is model[4][0].weight


# --------------------------------------------------------------------------------------------------- hvp
@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("method", cv.HVP_METHODS)
def test_hvp_matches_explicit_hessian_and_finite_differences(model_cls, method):
    model, x, y = make(model_cls)
    loss_fn = nn.CrossEntropyLoss()
    params = cv.compressible_parameters(model)
    v = random_like(params)
    hv = cv.hvp(model, loss_fn, (x, y), v, method=method)
    assert list(hv) == list(params)

    expected = explicit_hessian(model, loss_fn, x, y, params) @ flat(v, params)
    torch.testing.assert_close(flat(hv, params), expected, rtol=1e-10, atol=1e-12)

    theta, eps = flat(params, params).detach(), 1e-5
    v_flat = flat(v, params)
    central = (loss_gradient(model, loss_fn, x, y, params, theta + eps * v_flat)
               - loss_gradient(model, loss_fn, x, y, params, theta - eps * v_flat)) / (2 * eps)
    torch.testing.assert_close(flat(hv, params), central, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", cv.HVP_METHODS)
def test_hvp_on_chosen_parameters_including_biases(method):
    model, x, y = make(TinyMLP)
    loss_fn = nn.CrossEntropyLoss()
    params = {"fc1.bias": model.fc1.bias, "fc2.weight": model.fc2.weight}
    v = random_like(params)
    expected = explicit_hessian(model, loss_fn, x, y, params) @ flat(v, params)
    for chosen in (params, list(params)):
        hv = cv.hvp(model, loss_fn, (x, y), v, params=chosen, method=method)
        torch.testing.assert_close(flat(hv, params), expected, rtol=1e-10, atol=1e-12)


def test_hvp_methods_agree_on_mse_in_float32():
    model, x, _ = make(TinyConvNet)
    model = model.float()
    x, target = x.float(), torch.randn(x.shape[0], 3)
    params = cv.compressible_parameters(model)
    v = random_like({n: p.detach().float() for n, p in params.items()})
    a = cv.hvp(model, nn.MSELoss(), (x, target), v, method="double_backward")
    b = cv.hvp(model, nn.MSELoss(), (x, target), v, method="forward_over_reverse")
    for n in params:
        assert a[n].dtype == torch.float32
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ ggn_vp
GGN_LOSSES = {
    "cross_entropy": nn.CrossEntropyLoss(),
    "functional_cross_entropy": F.cross_entropy,
    "cross_entropy_sum_smoothed": nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1),
    "cross_entropy_ignore_index": nn.CrossEntropyLoss(ignore_index=1),
    "autograd_fallback": lambda out, y: F.cross_entropy(out, y) + 0.1 * (out ** 4).mean(),
}


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("loss_name", list(GGN_LOSSES))
def test_ggn_vp_matches_explicit_gauss_newton(model_cls, loss_name):
    model, x, y = make(model_cls)
    loss_fn = GGN_LOSSES[loss_name]
    params = cv.compressible_parameters(model)
    v = random_like(params)
    expected = explicit_ggn(model, loss_fn, x, y, params) @ flat(v, params)
    torch.testing.assert_close(flat(cv.ggn_vp(model, loss_fn, (x, y), v), params), expected,
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.MSELoss(reduction="sum"), F.mse_loss],
                         ids=["mse", "mse_sum", "functional_mse"])
def test_ggn_vp_closed_form_mse(loss_fn):
    model, x, _ = make(TinyMLP)
    target = torch.randn(x.shape[0], 3, dtype=torch.float64)
    params = cv.compressible_parameters(model)
    v = random_like(params)
    expected = explicit_ggn(model, loss_fn, x, target, params) @ flat(v, params)
    torch.testing.assert_close(flat(cv.ggn_vp(model, loss_fn, (x, target), v), params), expected,
                               rtol=1e-10, atol=1e-12)
    # For MSE on a linear last layer the GGN block of that layer is the Hessian block.
    only_last = {"fc2.weight": model.fc2.weight}
    v_last = random_like(only_last)
    torch.testing.assert_close(cv.ggn_vp(model, loss_fn, (x, target), v_last, params=only_last)["fc2.weight"],
                               cv.hvp(model, loss_fn, (x, target), v_last, params=only_last)["fc2.weight"])


@pytest.mark.parametrize("model_cls", MODELS)
def test_ggn_vp_is_positive_semidefinite(model_cls):
    model, x, y = make(model_cls)
    params = cv.compressible_parameters(model)
    for seed in range(5):
        v = random_like(params, seed=seed)
        gv = cv.ggn_vp(model, nn.CrossEntropyLoss(), (x, y), v)
        assert float(flat(v, params) @ flat(gv, params)) >= -1e-12


# ------------------------------------------------------------------------------------ Hutchinson diagonals
def test_hessian_diag_converges_within_its_own_error_estimate():
    model, x, y = make(TinyConvNet, n=8)
    loss_fn = nn.CrossEntropyLoss()
    params = cv.compressible_parameters(model)
    true_diag = torch.diagonal(explicit_hessian(model, loss_fn, x, y, params))

    errors = {}
    for probes in (2, 32, 512):
        diag, variance = cv.hessian_diag(model, loss_fn, [(x, y)], probes=probes, seed=3)
        errors[probes] = float((flat(diag, params) - true_diag).abs().mean())
    assert errors[512] < errors[32] < errors[2]
    # 512 probes: the standard error shrinks ~sqrt(512/2) = 16 times; ask for at least 4.
    assert errors[512] < errors[2] / 4

    std_error = flat(variance, params).sqrt()
    deviation = (flat(diag, params) - true_diag).abs()
    # Entries are (close to) normal around the truth; 5 standard errors is never exceeded by chance here.
    assert bool((deviation <= 5 * std_error + 1e-12).all()), float((deviation / std_error).max())
    # The estimate is honest: the errors are not all far below the claimed standard error either.
    assert float((deviation / std_error.clamp_min(1e-30)).square().mean()) > 0.2


def test_hessian_diag_is_deterministic_per_seed_and_weights_batches_by_size():
    model, x, y = make(TinyMLP, n=9)
    loss_fn = nn.CrossEntropyLoss()
    params = cv.compressible_parameters(model)
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    a, va = cv.hessian_diag(model, loss_fn, data, probes=4, seed=7)
    b, vb = cv.hessian_diag(model, loss_fn, data, probes=4, seed=7)
    c, _ = cv.hessian_diag(model, loss_fn, data, probes=4, seed=8)
    assert all(torch.equal(a[n], b[n]) and torch.equal(va[n], vb[n]) for n in params)
    assert not all(torch.equal(a[n], c[n]) for n in params)

    # Size-weighted average of the per-batch diagonals = diagonal of the mean loss over all 9 samples.
    true_diag = torch.diagonal(explicit_hessian(model, loss_fn, x, y, params))
    diag, variance = cv.hessian_diag(model, loss_fn, data, probes=400, seed=1)
    deviation = (flat(diag, params) - true_diag).abs()
    assert bool((deviation <= 5 * flat(variance, params).sqrt() + 1e-12).all())


def test_ggn_diag_converges_to_explicit_gauss_newton_diagonal():
    model, x, y = make(TinyMLP)
    loss_fn = nn.CrossEntropyLoss()
    params = cv.compressible_parameters(model)
    true_diag = torch.diagonal(explicit_ggn(model, loss_fn, x, y, params))
    diag, variance = cv.ggn_diag(model, loss_fn, [(x, y)], probes=400, seed=0)
    deviation = (flat(diag, params) - true_diag).abs()
    assert bool((deviation <= 5 * flat(variance, params).sqrt() + 1e-12).all())


def test_single_probe_variance_is_unknown():
    model, x, y = make(TinyMLP)
    _, variance = cv.hessian_diag(model, nn.CrossEntropyLoss(), (x, y), probes=1)
    assert all(bool(torch.isinf(t).all()) for t in variance.values())


def test_weighted_variance_of_mean_reduces_to_sample_variance_over_count():
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    acc = WeightedMeanWithVariance()
    for s in samples:
        acc.add({"w": s}, weight=2.5)
    like = {"w": samples[0]}
    torch.testing.assert_close(acc.mean(like)["w"], samples.mean(0))
    torch.testing.assert_close(acc.variance_of_mean(like)["w"], samples.var(0) / 10)


# ------------------------------------------------------------------------------------------ Fisher, gradient
def explicit_fisher(model, loss_fn, batches, params):
    total, count = None, 0
    for x, y in batches:
        for i in range(x.shape[0]):
            loss = loss_fn(model(x[i:i + 1]), y[i:i + 1])
            g = flat(dict(zip(params, torch.autograd.grad(loss, list(params.values())))), params)
            total = g.square() if total is None else total + g.square()
            count += 1
    return total / count


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_fisher_diag_matches_explicit_loop_over_samples(model_cls, chunk_size):
    model, x, y = make(model_cls, n=7)
    loss_fn = nn.CrossEntropyLoss()
    params = cv.compressible_parameters(model)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    fisher = cv.fisher_diag(model, loss_fn, data, chunk_size=chunk_size)
    assert list(fisher) == list(params)
    torch.testing.assert_close(flat(fisher, params), explicit_fisher(model, loss_fn, data, params),
                               rtol=1e-10, atol=1e-14)


def test_fisher_diag_with_mse_targets():
    model, x, _ = make(TinyMLP, n=5)
    target = torch.randn(5, 3, dtype=torch.float64)
    params = cv.compressible_parameters(model)
    fisher = cv.fisher_diag(model, nn.MSELoss(), [(x, target)])
    torch.testing.assert_close(flat(fisher, params), explicit_fisher(model, nn.MSELoss(), [(x, target)], params))


def test_gradient_is_size_weighted_average_of_batch_gradients():
    model, x, y = make(TinyConvNet, n=7)
    loss_fn = nn.CrossEntropyLoss()
    params = cv.compressible_parameters(model)
    grad = cv.gradient(model, loss_fn, [(x[:5], y[:5]), (x[5:], y[5:])])
    expected = torch.autograd.grad(loss_fn(model(x), y), list(params.values()))
    for (name, g), e in zip(grad.items(), expected):
        torch.testing.assert_close(g, e)


# ------------------------------------------------------------------------------------------------ gather_stats
@pytest.mark.parametrize("kind", cv.stats.STAT_KINDS)
def test_gather_stats_equals_the_separate_statistics_in_one_pass(kind):
    model, x, y = make(TinyMLP, n=8)
    loss_fn = nn.CrossEntropyLoss()
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    stats = cv.gather_stats(model, loss_fn, (b for b in batches), kind=kind, probes=3, seed=2)  # one-shot data
    assert stats.method == kind and stats.num_samples == 8
    expected_grad = cv.gradient(model, loss_fn, batches)
    if kind == "fisher":
        expected_diag, expected_var = cv.fisher_diag(model, loss_fn, batches), None
    elif kind == "hessian":
        expected_diag, expected_var = cv.hessian_diag(model, loss_fn, batches, probes=3, seed=2)
    else:
        expected_diag, expected_var = cv.ggn_diag(model, loss_fn, batches, probes=3, seed=2)
    for n in stats.names:
        torch.testing.assert_close(stats.gradient[n], expected_grad[n])
        torch.testing.assert_close(stats.diagonal[n], expected_diag[n])
        if expected_var is not None:
            torch.testing.assert_close(stats.variance[n], expected_var[n])

    delta = random_like(cv.compressible_parameters(model))
    predicted = sum(float((stats.gradient[n] * delta[n]).sum() + 0.5 * (stats.diagonal[n] * delta[n] ** 2).sum())
                    for n in stats.names)
    assert math.isclose(stats.predicted_loss_change(delta), predicted, rel_tol=1e-12)


# ------------------------------------------------------------------------------------- the model is untouched
def test_model_parameters_flags_grads_and_mode_are_unchanged():
    model, x, y = make(TinyConvNet)
    model.fc.bias.requires_grad_(False)  # a frozen parameter stays frozen
    model.conv.weight.requires_grad_(False)  # ... also when it is differentiated
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    loss_fn = nn.CrossEntropyLoss()
    params = cv.compressible_parameters(model)
    v = random_like(params)
    with torch.no_grad():  # the caller's grad mode does not matter either
        for method in cv.HVP_METHODS:
            cv.hvp(model, loss_fn, (x, y), v, method=method)
        cv.ggn_vp(model, loss_fn, (x, y), v)
        cv.hessian_diag(model, loss_fn, [(x, y)], probes=2)
        cv.fisher_diag(model, loss_fn, [(x, y)])
        cv.gather_stats(model, loss_fn, [(x, y)], kind="ggn_diag", probes=2)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None, n
    assert not model.training


# -------------------------------------------------------------------------------------------------- errors
def test_bad_arguments_raise_clear_errors():
    model, x, y = make(TinyMLP)
    loss_fn = nn.CrossEntropyLoss()
    params = cv.compressible_parameters(model)
    v = random_like(params)

    with pytest.raises(ValueError, match="v keys"):
        cv.hvp(model, loss_fn, (x, y), {"fc1.weight": v["fc1.weight"]})
    with pytest.raises(ValueError, match="v keys"):
        cv.ggn_vp(model, loss_fn, (x, y), {**v, "fc1.bias": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"v\['fc2.weight'\] has shape"):
        cv.hvp(model, loss_fn, (x, y), {**v, "fc2.weight": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="v must be a dict"):
        cv.hvp(model, loss_fn, (x, y), [v["fc1.weight"], v["fc2.weight"]])
    with pytest.raises(TypeError, match=r"v\['fc1.weight'\] must be a tensor"):
        cv.hvp(model, loss_fn, (x, y), {**v, "fc1.weight": 1.0})
    with pytest.raises(ValueError, match="method"):
        cv.hvp(model, loss_fn, (x, y), v, method="finite_differences")
    with pytest.raises(ValueError, match="method"):
        cv.hessian_diag(model, loss_fn, [(x, y)], method="nope")
    with pytest.raises(TypeError, match="batch must be an"):
        cv.hvp(model, loss_fn, x, v)
    with pytest.raises(ValueError, match="data is empty"):
        cv.gradient(model, loss_fn, [])
    with pytest.raises(ValueError, match="data is empty"):
        cv.fisher_diag(model, loss_fn, iter([]))
    with pytest.raises(TypeError, match="data must be an iterable"):
        cv.hessian_diag(model, loss_fn, x)
    with pytest.raises(ValueError, match="probes"):
        cv.hessian_diag(model, loss_fn, [(x, y)], probes=0)
    with pytest.raises(ValueError, match="kind"):
        cv.gather_stats(model, loss_fn, [(x, y)], kind="kfac")
    with pytest.raises(ValueError, match="params names 'fc3.weight'"):
        cv.hvp(model, loss_fn, (x, y), v, params=["fc3.weight"])
    with pytest.raises(ValueError, match="is not the model's parameter"):
        cv.gradient(model, loss_fn, [(x, y)], params={"fc1.weight": nn.Parameter(torch.zeros(4, 5))})
    with pytest.raises(ValueError, match="scalar"):
        cv.hvp(model, nn.CrossEntropyLoss(reduction="none"), (x, y), v)
    with pytest.raises(ValueError, match="scalar"):
        cv.ggn_vp(model, nn.CrossEntropyLoss(reduction="none"), (x, y), v)
    with pytest.raises(ValueError, match="no nn.Linear/Conv1d/Conv2d weights"):
        cv.gradient(nn.Sequential(nn.Tanh()), loss_fn, [(x, y)])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        cv.compressible_parameters(lambda t: t)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        cv.gradient(model, "cross_entropy", [(x, y)])
    with pytest.raises(ValueError, match="leading dimension"):
        cv.fisher_diag(model, loss_fn, [(x, y[:2])])
