"""compress.qat: retraining through shared weights, and the exact shared form of its result."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import weightshare as ws
from weightshare.compress.qat import SharedValues, parse_bit_config, quantize_retrain, to_shared
from weightshare.models import build_model


def toy_data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    return TensorDataset(x, (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 14, 14] > 0).long())


def pruned_lenet(density=0.2, seed=0):
    torch.manual_seed(seed)
    model = build_model("lenet5").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(torch.rand(m.weight.shape) < density)
    return model


@pytest.mark.parametrize("bits", [2, 3])
def test_retrained_network_holds_few_values_keeps_zeros_and_shares_exactly(bits):
    model = pruned_lenet()
    zeros = {n: (m.weight == 0).clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    r = quantize_retrain(model, toy_data(), bits, epochs=1, lr=0.01, batch_size=64, refit_every=3)
    for name, m in r.model.named_modules():
        if name in zeros:
            assert torch.equal(m.weight == 0, zeros[name])  # pruned weights stay pruned, no survivor hits zero
            assert torch.unique(m.weight).numel() <= 1 << bits  # 2**bits - 1 shared values plus the zero
    shared = to_shared(r.model)
    assert all(isinstance(getattr(shared, n), ws.nn.SharedLayer) for n in zeros)
    assert all(getattr(shared, n).k <= 1 << bits for n in zeros)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(shared(x), r.model(x), rtol=1e-3, atol=1e-3)  # biases rounded to float16
    assert all(layer.bias_bytes == 2 * layer.parameters - 2 * layer.weights for layer in ws.size_report(shared).layers)
    # half_values (the default): every shared value is float16-representable, so the codebooks are stored at 2 B
    assert all(layer.codebook_bytes == 2 * layer.k * layer.groups for layer in ws.size_report(shared).layers)
    for name in zeros:
        w = getattr(r.model, name).weight
        assert torch.equal(w.half().float(), w)
    exact = to_shared(r.model, half_bias=False)
    torch.testing.assert_close(exact(x), r.model(x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(r.model.fc1.weight, model.fc1.weight)  # it trained; the argument is untouched
    assert torch.equal(model.fc1.weight == 0, zeros["fc1"])


def test_half_values_only_rounds_the_final_values():
    """Training is the same with and without half_values; only the final shared values differ, by float16
    rounding (a latent weight within rounding distance of the midpoint of two values may also change side)."""
    model = pruned_lenet()
    a = quantize_retrain(model, toy_data(), 3, epochs=1, batch_size=64, refit_every=3, half_values=False)
    b = quantize_retrain(model, toy_data(), 3, epochs=1, batch_size=64, refit_every=3)
    for ma, mb in zip(a.model.modules(), b.model.modules()):
        if isinstance(ma, (nn.Linear, nn.Conv2d)):
            assert torch.equal(mb.weight.half().float(), mb.weight)
            assert (ma.weight.half().float() != mb.weight).float().mean() < 0.01
            assert not torch.equal(ma.weight.half().float(), ma.weight)  # float32 values before rounding


def test_unpruned_layers_use_every_entry_and_a_teacher_is_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    r = quantize_retrain(model, toy_data(), {"1": 2, "3": 1}, epochs=1, batch_size=64, teacher=model, distill=0.5)
    assert torch.unique(r.model[1].weight).numel() == 4 and torch.unique(r.model[3].weight).numel() == 2
    assert r.bits == {"1": 2, "3": 1}


def test_straight_through_gradient_reaches_the_kept_latent_weights_only():
    latent = torch.tensor([[0.0, 0.5, -0.2, 0.9]], requires_grad=True)
    p = SharedValues(latent.detach(), entries=2)
    out = p(latent)
    assert out[0, 0] == 0 and set(out[0, 1:].tolist()) <= set(p.values.tolist())
    out.sum().backward()
    assert latent.grad.tolist() == [[0.0, 1.0, 1.0, 1.0]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        quantize_retrain(pruned_lenet(), toy_data(64), 9, epochs=1)
    with pytest.raises(ValueError, match="no weights left"):
        SharedValues(torch.zeros(3, 3), entries=2)


def test_parse_bit_config():
    layers = ["fc1", "fc2", "fc3"]
    assert parse_bit_config("3", layers) == {"fc1": 3, "fc2": 3, "fc3": 3}
    assert parse_bit_config(4, layers) == {"fc1": 4, "fc2": 4, "fc3": 4}
    assert parse_bit_config("fc1=3,*=4", layers) == {"fc1": 3, "fc2": 4, "fc3": 4}
    assert parse_bit_config(" fc1=2, fc2=3, fc3=5 ", layers) == {"fc1": 2, "fc2": 3, "fc3": 5}
    with pytest.raises(ValueError, match="unknown layers"):
        parse_bit_config("conv1=3,*=4", layers)
    with pytest.raises(ValueError, match="gives no bits"):
        parse_bit_config("fc1=3", layers)
    with pytest.raises(ValueError, match="must be"):
        parse_bit_config("three", layers)
