"""compress.dead_units.zero_dead_units_: units nothing reads get a zero weight row and bias, and the network's
outputs stay bit-identical; anything the analysis does not understand (a residual add, int8 activations, a grouped
conv, a binary layer) is left alone."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import weightshare as ws
from weightshare.compress import zero_dead_units_
from weightshare.models import build_model
from weightshare.nn import SharedConv2d, SharedLinear

from conftest import requires_native

pytestmark = requires_native

CODEBOOK = torch.tensor([0.0, -0.3, -0.2, -0.1, 0.1, 0.2, 0.3, 0.05])  # entry 0 is the exact zero


def assign(shape, density, gen):
    """Indices into CODEBOOK: a `density` fraction of nonzero entries, the rest 0."""
    keep = torch.rand(shape, generator=gen) < density
    return torch.where(keep, torch.randint(1, len(CODEBOOK), shape, generator=gen), 0).to(torch.uint8)


def with_weights(model, idx: dict, shared: bool, codebooks=None):
    """The model with weight = codebook[idx] per layer, dense, or as shared layers (ws.replace_layers)."""
    codebooks = codebooks or {}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, i in idx.items():
            modules[name].weight.copy_(codebooks.get(name, CODEBOOK)[i.long()])
            modules[name].bias.copy_(torch.randn(modules[name].bias.shape))  # nonzero everywhere
    if shared:
        ws.replace_layers(model, {name: (codebooks.get(name, CODEBOOK), i) for name, i in idx.items()})
    return model.eval()


def dense_weights(model) -> dict:
    return {name: m.weight.detach().clone() for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, SharedLinear, SharedConv2d))}


def same_outputs(before, after, shape, gen, device="cpu"):
    x = (torch.randn(*shape, generator=gen) * 3).to(device)
    with torch.no_grad():
        return torch.equal(before(x), after(x))


def lenet5_pattern(gen):
    """LeNet-5 indices with dead units at every level, one of them only reachable on the second round:
    fc1 units 0..199 unread (fc2's columns zero); conv2 channels 0..9 unread (fc1's blocks zero); conv2 channel 10
    read only by dead fc1 rows (unread once those are zeroed); conv1 channels 0..4 unread (conv2's inputs zero)."""
    idx = {"conv1": assign((20, 1, 5, 5), 0.8, gen), "conv2": assign((50, 20, 5, 5), 0.3, gen),
           "fc1": assign((500, 800), 0.1, gen), "fc2": assign((10, 500), 0.5, gen)}
    idx["fc2"][:, :200] = 0
    idx["fc1"][:, :10 * 16] = 0
    idx["fc1"][200:, 10 * 16:11 * 16] = 0
    idx["fc1"][:200, 10 * 16:11 * 16] = 1  # nonzero, but only in rows that nothing reads
    idx["conv2"][:, :5] = 0
    return idx


def lenet5_expected(idx):
    """The unread units by hand, for LeNet-5's chain conv1 -> conv2 -> fc1 -> fc2 (one backward sweep)."""
    fc1_dead = (idx["fc2"] == 0).all(0)
    fc1 = idx["fc1"].clone()
    fc1[fc1_dead] = 0
    conv2_dead = (fc1.reshape(500, 50, 16) == 0).all(-1).all(0)
    conv2 = idx["conv2"].clone()
    conv2[conv2_dead] = 0
    conv1_dead = (conv2 == 0).transpose(0, 1).reshape(20, -1).all(1)
    return {"conv1": conv1_dead, "conv2": conv2_dead, "fc1": fc1_dead, "fc2": torch.zeros(10, dtype=torch.bool)}


@pytest.mark.parametrize("shared", [False, True])
def test_lenet5_dead_units_are_zeroed_exactly(shared):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    idx = lenet5_pattern(gen)
    model = with_weights(build_model("lenet5"), idx, shared)
    before = copy.deepcopy(model)
    old = dense_weights(model)
    report = zero_dead_units_(model, torch.zeros(1, 1, 28, 28))

    expected = lenet5_expected(idx)
    assert {l.name: l.dead for l in report.layers} == {n: int(d.sum()) for n, d in expected.items()}
    assert expected["conv2"][10] and expected["conv2"][:10].all() and expected["conv1"][:5].all()
    assert report.rounds >= 2  # conv2 channel 10 needs fc1's dead rows zeroed first
    new = dense_weights(model)
    modules = dict(model.named_modules())
    for name, dead in expected.items():
        entry = next(l for l in report.layers if l.name == name)
        assert (new[name][dead] == 0).all() and torch.equal(new[name][~dead], old[name][~dead])
        bias = modules[name].bias.detach()
        assert (bias[dead] == 0).all() and not torch.signbit(bias[dead]).any()
        assert torch.equal(bias[~dead], dict(before.named_modules())[name].bias.detach()[~dead])
        assert entry.weights_zeroed == int((old[name][dead] != 0).sum()) and entry.weights_kept == 0
        assert entry.biases_zeroed == int(dead.sum())
    assert report.weights_zeroed > 0 and "dead units" in str(report)
    for seed in range(3):
        assert same_outputs(before, model, (8, 1, 28, 28), torch.Generator().manual_seed(seed))
    # a fixed point: a second call finds nothing new to change
    state = copy.deepcopy(model.state_dict())
    again = zero_dead_units_(model, torch.zeros(2, 1, 28, 28))
    assert again.weights_zeroed == again.biases_zeroed == 0 and again.dead == report.dead
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("shared", [False, True])
def test_lenet300100_dead_units_are_zeroed_exactly(shared, device):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    idx = {"fc1": assign((300, 784), 0.1, gen), "fc2": assign((100, 300), 0.03, gen),
           "fc3": assign((10, 100), 0.5, gen)}
    idx["fc3"][:, torch.randperm(100, generator=gen)[:30]] = 0
    idx["fc2"][:, torch.randperm(300, generator=gen)[:60]] = 0
    model = with_weights(build_model("lenet300100"), idx, shared).to(device)
    before = copy.deepcopy(model)
    report = zero_dead_units_(model, torch.zeros(1, 1, 28, 28, device=device))
    fc2_dead = (idx["fc3"] == 0).all(0)
    fc2 = idx["fc2"].clone()
    fc2[fc2_dead] = 0
    fc1_dead = (fc2 == 0).all(0)
    assert {l.name: l.dead for l in report.layers} == {"fc1": int(fc1_dead.sum()), "fc2": int(fc2_dead.sum()),
                                                       "fc3": 0}
    assert int(fc1_dead.sum()) > 60  # more than the columns zeroed by hand: fc2's dead rows freed some
    fc1_w, fc2_w, fc1_b = model.fc1.weight.cpu(), model.fc2.weight.cpu(), model.fc1.bias.detach().cpu()
    assert (fc1_w[fc1_dead] == 0).all() and (fc2_w[fc2_dead] == 0).all()
    assert (fc1_b[fc1_dead] == 0).all() and (fc1_b[~fc1_dead] != 0).all()
    for seed in range(3):
        assert same_outputs(before, model, (16, 1, 28, 28), torch.Generator().manual_seed(seed), device)


def test_shared_layer_without_a_zero_entry_keeps_its_weights_and_zeroes_the_bias():
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    nonzero = CODEBOOK[1:].contiguous()
    idx = {"fc1": torch.randint(0, len(nonzero), (300, 784), generator=gen, dtype=torch.uint8),
           "fc2": assign((100, 300), 0.2, gen), "fc3": assign((10, 100), 0.5, gen)}
    idx["fc2"][:, :40] = 0
    model = with_weights(build_model("lenet300100"), idx, True, codebooks={"fc1": nonzero})
    before = copy.deepcopy(model)
    packed = model.fc1.packed.clone()
    report = zero_dead_units_(model, torch.zeros(1, 1, 28, 28))
    fc1 = next(l for l in report.layers if l.name == "fc1")
    assert fc1.dead >= 40 and fc1.weights_zeroed == 0 and fc1.weights_kept == fc1.dead * 784
    assert fc1.biases_zeroed == fc1.dead and torch.equal(model.fc1.packed, packed)
    assert (model.fc1.bias[:40] == 0).all()
    assert same_outputs(before, model, (16, 1, 28, 28), gen)


def test_per_row_codebooks_use_each_rows_zero_entry():
    """groups = out: each row's own codebook; rows whose codebook has a zero get it, the others keep weights."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    codebook = torch.randn(6, 4)
    codebook[:3, 2] = 0.0  # rows 0-2 have a zero entry (at index 2), rows 3-5 do not
    idx = torch.randint(0, 4, (6, 12), dtype=torch.uint8)
    idx[:3] = torch.where(idx[:3] == 2, 1, idx[:3])  # but do not use it yet
    ws.replace_layers(model, {"0": (codebook, idx)})
    with torch.no_grad():
        model[2].weight[:, [1, 4]] = 0  # units 1 and 4 unread
    before = copy.deepcopy(model)
    report = zero_dead_units_(model, torch.zeros(2, 12))
    first = report.layers[0]
    assert (first.dead, first.weights_zeroed, first.weights_kept) == (2, 12, 12)
    w = model[0].weight
    assert (w[1] == 0).all() and torch.equal(w[4], before[0].weight[4])
    assert same_outputs(before, model, (5, 12), torch.Generator().manual_seed(0))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = h + self.fc2(h)  # fc1's units are read by the add, whatever fc2's weights
        return self.fc3(h)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc3(torch.cat([h, self.fc2(h)], dim=1))


class Transposed(nn.Module):
    """A channel-mixing op between producer and consumer (transpose): not unit-preserving."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x).reshape(-1, 2, 4).transpose(1, 2).reshape(-1, 8))


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3, groups=2)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.conv2.weight[:, 0] = 0  # conv1 channel 0 is not read, but grouped convs are left alone

    def forward(self, x):
        return self.fc(self.conv2(F.relu(self.conv1(x))).mean(dim=(2, 3)))


def int8_consumer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    idx = torch.randint(1, 4, (4, 8), dtype=torch.uint8)
    idx[:, :3] = 0
    ws.replace_layers(model, {"2": (torch.tensor([0.0, 0.5, -0.5, 0.25]), idx)}, activation="int8")
    return model


def binary_consumer():
    from weightshare.models import BinaryLinear
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), BinaryLinear(8, 4))
    with torch.no_grad():
        model[2].weight[:, :3] = 0  # sign(0) = +1: the binary layer reads these inputs
    return model


@pytest.mark.parametrize("build, shape", [
    (Residual, (5, 8)), (Concat, (5, 8)), (Transposed, (5, 8)), (GroupedConv, (2, 2, 9, 9)),
    (int8_consumer, (5, 8)), (binary_consumer, (5, 8))])
def test_nothing_changes_where_units_are_read_or_the_ops_are_unknown(build, shape):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        for m in model.modules():  # every consumer ignores its first three inputs
            if type(m) in (nn.Linear, nn.Conv2d) and m.weight.shape[1] >= 4:
                m.weight[:, :3] = 0
    before = copy.deepcopy(model)
    report = zero_dead_units_(model, torch.zeros(shape))
    assert report.dead == 0 and report.weights_zeroed == 0 and report.biases_zeroed == 0
    assert all(torch.equal(v, before.state_dict()[k]) for k, v in model.state_dict().items())


class ConvHead(nn.Module):
    """BatchNorm, dropout, adaptive pooling, x.view(x.size(0), -1), and a layer called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(24, 5)
        self.same = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        x = self.drop(self.pool(F.relu(self.bn(self.conv(x)))))
        x = torch.sigmoid(self.fc(x.view(x.size(0), -1)))
        x = self.same(self.same(x))  # unit j of `same` is unread only when unread at both calls
        return self.out(x)


def test_layouts_through_batchnorm_pooling_view_and_a_layer_called_twice():
    torch.manual_seed(0)
    model = ConvHead()
    model.train()(torch.randn(4, 3, 8, 8))  # BatchNorm statistics with f(0) != 0
    model.eval()
    with torch.no_grad():
        model.fc.weight[:, 4:8] = 0  # conv channel 1 (columns 4..7 after a 2x2 pool): unread
        model.fc.weight[:, 12:14] = 0  # half of channel 3: still read
        model.same.weight[:, 3] = 0  # fc unit 3 (read by the first call of `same` only): unread
        model.out.weight[:, 4] = 0  # `same` unit 4: unread by `out`, but read by the second call of `same`
        model.same.weight[:, 2] = 0  # `same` unit 2: unread by both (and fc unit 2 too)
        model.out.weight[:, 2] = 0
    before = copy.deepcopy(model)
    bn_stats = model.bn.running_mean.clone()
    report = zero_dead_units_(model, torch.zeros(1, 3, 8, 8))
    dead = {l.name: l.dead for l in report.layers}
    assert dead == {"conv": 1, "fc": 2, "same": 1, "out": 0}
    assert (model.same.weight[2] == 0).all() and (model.same.weight[4] != 0).any()
    assert (model.conv.weight[1] == 0).all() and model.conv.bias[1] == 0 and (model.conv.weight[3] != 0).any()
    assert torch.equal(model.bn.running_mean, bn_stats) and not model.training
    assert same_outputs(before, model, (6, 3, 8, 8), torch.Generator().manual_seed(0))


def test_training_mode_is_kept_and_untraceable_models_are_refused():
    model = build_model("lenet300100").train()
    zero_dead_units_(model, torch.zeros(1, 1, 28, 28))
    assert model.training and model.fc1.training

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(ValueError, match="cannot trace"):
        zero_dead_units_(Branchy(), torch.zeros(1, 4))


class MeanHead(nn.Module):
    """Global average pooling by x.mean(dim=(2, 3)) and a bias-free conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3, bias=False)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))


def test_global_average_pooling_by_mean_and_bias_free_producers():
    torch.manual_seed(0)
    model = MeanHead().eval()
    with torch.no_grad():
        model.fc.weight[:, [0, 3]] = 0
    before = copy.deepcopy(model)
    report = zero_dead_units_(model, torch.zeros(1, 2, 6, 6))
    assert report.layers[0].dead == 2 and report.layers[0].weights_zeroed == 2 * 18
    assert (model.conv.weight[[0, 3]] == 0).all() and (model.conv.weight[[1, 2, 4]] != 0).any()
    assert same_outputs(before, model, (4, 2, 6, 6), torch.Generator().manual_seed(0))
