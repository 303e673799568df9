"""HashedNets as published (ws.compress.hashednets): virtual weights from trained hashed buckets."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from weightshare.compress.hashednets import HashedWeight, hashed_parametrizations, hashednets, hashednets_size


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))


def test_virtual_weight_is_signed_bucket_lookup():
    h = HashedWeight(torch.Size([30, 40]), 50, seed=3)
    values = torch.randn(50)
    w = h(values)
    idx, sign = h.index.reshape(30, 40), h.sign.reshape(30, 40)
    assert torch.equal(w, values[idx] * sign)
    assert set(sign.unique().tolist()) == {-1.0, 1.0}
    assert 0.4 < float((sign > 0).float().mean()) < 0.6                 # the sign hash is balanced
    counts = torch.bincount(h.index, minlength=50).float()
    assert counts.min() > 0 and counts.max() < 3 * counts.mean()         # and the buckets roughly even
    # right_inverse is the least-squares projection: the mean of sign * w over each bucket
    target = torch.randn(30, 40)
    proj = h.right_inverse(target)
    for b in (0, 17, 49):
        sel = h.index == b
        torch.testing.assert_close(proj[b], (target.reshape(-1)[sel] * h.sign[sel]).mean())
    # projecting a virtual weight gives its values back
    torch.testing.assert_close(h.right_inverse(w), values)
    # different seeds hash differently
    assert not torch.equal(HashedWeight(torch.Size([30, 40]), 50, seed=4).index, h.index)


def test_hashednets_copy_counts_and_trains():
    model = _mlp()
    x = torch.randn(600, 20, generator=torch.Generator().manual_seed(1))
    y = (x[:, :3] @ torch.randn(3, 3, generator=torch.Generator().manual_seed(2))).argmax(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = hashednets(model, compression=8)
    for k, v in model.state_dict().items():  # the argument is untouched
        assert torch.equal(v, before[k])
    hashed = hashed_parametrizations(net)
    assert [h.buckets for h in hashed] == [round(20 * 64 / 8), round(64 * 3 / 8)]
    # stored: the buckets and a seed per layer, biases as fp32; no index per weight
    assert hashednets_size(net) == 4 * (160 + 24) + 8 * 2 + 4 * (64 + 3)
    params = dict(net.named_parameters())
    assert params["0.parametrizations.weight.original"].shape == (160,)
    # the virtual weights are what the layers use, and training moves the buckets
    from weightshare.train import train
    with torch.no_grad():
        loss0 = float(F.cross_entropy(net(x), y))
    train(net, TensorDataset(x, y), epochs=20, lr=0.05, batch_size=50, weight_decay=0.0, seed=0, progress=False)
    with torch.no_grad():
        assert float(F.cross_entropy(net(x), y)) < 0.5 * loss0
    w = net[0].weight
    h = hashed[0]
    torch.testing.assert_close(w, net[0].parametrizations.weight.original[h.index].mul(h.sign).reshape(64, 20))


def test_hashednets_bad_arguments():
    with pytest.raises(ValueError, match="compression"):
        hashednets(_mlp(), 0.5)
    with pytest.raises(ValueError, match="buckets"):
        HashedWeight(torch.Size([4, 4]), 17, 0)
    with pytest.raises(ValueError, match="no HashedNets layer"):
        hashednets_size(_mlp())
