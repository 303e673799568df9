"""replace_layers: LeNet-5 and a small transformer block (attention q/k/v/out Linear, an MLP of GPT-2-style Conv1D
modules, a depthwise nn.Conv1d) run end to end on shared layers and match the dequantised dense model; what
cannot be compressed is skipped, reported and warned about once."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import weightshare as ws
from weightshare.models import build_model
from weightshare.nn import SharedConv1d, SharedConv2d, SharedLayer, SharedLinear, binary_assignment

TOL = dict(rtol=1e-4, atol=1e-4)


class Conv1D(nn.Module):
    """GPT-2's Conv1D (transformers.pytorch_utils): a Linear whose weight is stored [in, out]."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.05)
        self.bias = nn.Parameter(torch.randn(nf) * 0.01)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class Attention(nn.Module):
    """HF-style self-attention: q/k/v/out projections as nn.Linear."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return self.out_proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mixer = nn.Conv1d(dim, dim, 3, padding=1, groups=dim)  # depthwise token mixing
        self.mlp = nn.Sequential(Conv1D(4 * dim, dim), nn.GELU(), Conv1D(dim, 4 * dim))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mixer(x.transpose(1, 2)).transpose(1, 2)
        return x + self.mlp(self.ln_2(x))


class TinyTransformer(nn.Module):
    def __init__(self, dim: int = 32, vocab: int = 50):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def compressible(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or type(m).__name__ == "Conv1D"}


def kmeans_assignments(model: nn.Module, k: int = 16) -> dict:
    return {name: ws.kmeans(m.weight.detach(), k) for name, m in compressible(model).items()}


def dequantised_copy(model: nn.Module, assignments: dict) -> nn.Module:
    """The dense model with every assigned weight set to codebook[idx] (the reference for the shared model)."""
    dense = copy.deepcopy(model)
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, a in assignments.items():
            modules[name].weight.copy_(a.codebook[0][a.idx.long()])
    return dense


def test_lenet5_end_to_end(device):
    torch.manual_seed(0)
    model = build_model("lenet5").to(device).eval()
    assignments = kmeans_assignments(model)
    reference = dequantised_copy(model, assignments)
    report = ws.replace_layers(model, assignments)
    assert report.replaced == ["conv1", "conv2", "fc1", "fc2"] and report.skipped == []
    assert isinstance(model.conv1, SharedConv2d) and isinstance(model.fc1, SharedLinear)
    assert model.fc1.packed.device.type == device and not model.training
    x = torch.randn(8, 1, 28, 28).to(device)
    torch.testing.assert_close(model(x), reference(x), **TOL)


def test_transformer_block_end_to_end(device):
    torch.manual_seed(0)
    model = TinyTransformer().to(device)
    assignments = kmeans_assignments(model)
    assert len(assignments) == 2 * 7 + 1
    reference = dequantised_copy(model, assignments)
    report = ws.replace_layers(model, assignments)
    assert sorted(report.replaced) == sorted(assignments) and report.skipped == []
    fc = model.blocks[0].mlp[0]
    assert isinstance(fc, SharedLinear) and (fc.in_features, fc.out_features) == (32, 128)
    assert isinstance(model.blocks[1].attn.q_proj, SharedLinear)
    assert isinstance(model.blocks[1].mixer, SharedConv1d) and model.blocks[1].mixer.conv_groups == 32
    tokens = torch.randint(0, 50, (3, 7)).to(device)
    torch.testing.assert_close(model(tokens), reference(tokens), **TOL)
    model(tokens).sum().backward()  # trainable codebooks
    assert model.blocks[0].mlp[2].codebook.grad.abs().sum() > 0


def test_gpt2_conv1d_uses_the_transposed_assignment():
    torch.manual_seed(0)
    conv = Conv1D(6, 10)
    codebook, idx = torch.linspace(-1, 1, 8), torch.randint(0, 8, (10, 6), dtype=torch.uint8)
    holder = nn.Sequential(conv)
    ws.replace_layers(holder, {"0": (codebook, idx)})
    layer = holder[0]
    assert isinstance(layer, SharedLinear) and layer.weight_shape == (6, 10)
    assert torch.equal(layer.weight, codebook[idx.long()].t())
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), x @ codebook[idx.long()] + conv.bias, **TOL)


def test_skips_what_it_cannot_compress_and_warns_once():
    torch.manual_seed(0)
    model = TinyTransformer()
    model.mha = nn.MultiheadAttention(32, 4)
    good = kmeans_assignments(model.blocks[0])
    assignments = {f"blocks.0.{name}": a for name, a in good.items()}
    head = ws.kmeans(model.head.weight.detach(), 4)
    head_codebook, head_idx = head.codebook, head.idx
    assignments.update({
        "": (head_codebook, head_idx),
        "no.such.layer": (head_codebook, head_idx),
        "blocks.1.ln_1": (torch.randn(4), torch.zeros(32, dtype=torch.uint8)),
        "embed": (torch.randn(4), torch.zeros(50, 32, dtype=torch.uint8)),
        "head": (head_codebook, head_idx.t()),                                   # shape mismatch
        "blocks.1.attn.q_proj": (torch.randn(300), torch.zeros(32, 32, dtype=torch.uint8)),  # k > 256
        "blocks.1.mlp.0": (torch.randn(128, 4), torch.zeros(32, 128, dtype=torch.uint8)),    # per-row Conv1D
        "mha.out_proj": (torch.randn(4), torch.zeros(32, 32, dtype=torch.uint8)),
    })
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = ws.replace_layers(model, assignments)
    ours = [w for w in caught if "replace_layers skipped" in str(w.message)]
    assert len(ours) == 1 and "no.such.layer" in str(ours[0].message)
    reasons = dict(report.skipped)
    assert set(reasons) == set(assignments) - set(report.replaced)
    assert sorted(report.replaced) == sorted(f"blocks.0.{name}" for name in good)
    assert "root" in reasons[""] and "no module" in reasons["no.such.layer"]
    assert "LayerNorm" in reasons["blocks.1.ln_1"] and "Embedding" in reasons["embed"]
    assert "shape" in reasons["head"] and "256" in reasons["blocks.1.attn.q_proj"]
    assert "input features" in reasons["blocks.1.mlp.0"] and "MultiheadAttention" in reasons["mha.out_proj"]
    assert type(model.head) is nn.Linear and type(model.blocks[1].ln_1) is nn.LayerNorm
    assert "skipped" in str(report)


def test_already_shared_modules_are_skipped():
    model = nn.Sequential(nn.Linear(4, 3))
    assignment = (torch.randn(2), torch.zeros(3, 4, dtype=torch.uint8))
    ws.replace_layers(model, {"0": assignment})
    with pytest.warns(UserWarning, match="skipped 1"):
        report = ws.replace_layers(model, {"0": assignment})
    assert "already a shared layer" in report.skipped[0][1]


def test_assignment_forms():
    model = nn.Sequential(nn.Linear(8, 4), nn.ModuleList([nn.Conv2d(2, 4, 3)]))
    a = ws.kmeans(model[0].weight.detach(), 4)
    report = ws.replace_layers(model, {"0": a, "1.0": [torch.randn(1, 3), torch.zeros(4, 2, 3, 3, dtype=torch.long)]})
    assert report.replaced == ["0", "1.0"] and isinstance(model[1][0], SharedConv2d)
    with pytest.raises(TypeError, match="assignment"):
        ws.replace_layers(nn.Sequential(nn.Linear(2, 2)), {"0": torch.randn(2)})


def test_aliased_module_is_replaced_everywhere_and_modes_kept():
    shared = nn.Linear(5, 5)
    model = nn.Sequential(shared, nn.ReLU(), shared).train()
    ws.replace_layers(model, {"0": (torch.randn(4), torch.zeros(5, 5, dtype=torch.uint8))})
    assert model[0] is model[2] and isinstance(model[0], SharedLayer) and model[0].training


def test_binary_mlp_with_sign_assignments_is_exact():
    torch.manual_seed(0)
    model = build_model("bnn_mlp").eval()
    x = torch.randn(16, 1, 28, 28)
    want = model(x)
    report = ws.replace_layers(model, {f"linears.{i}": binary_assignment(m) for i, m in enumerate(model.linears)})
    assert len(report.replaced) == 3 and all(m.bits == 1 for m in model.linears)
    # binary hidden activations amplify last-bit differences of the sums only where they sit exactly at 0
    torch.testing.assert_close(model(x), want, **TOL)


class TinyCNN(nn.Module):
    """A MobileNet/ResNet-style stack: a 3-channel stem (too few channels for the implicit GEMM: decode + cuDNN),
    strided and plain 3x3 convs of 32-64 channels, a depthwise 3x3, a 1x1, in-place ReLUs, a classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU(inplace=True),
            nn.Conv2d(64, 128, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.features(x))


@pytest.mark.skipif(not (torch.cuda.is_available() and ws.cuda_built()), reason="needs a GPU and the CUDA kernels")
def test_cnn_channels_last_fp16_on_our_cuda_conv_kernels(monkeypatch):
    """A CNN replaced end to end, fp16 and channels-last on the GPU with our conv kernels asked for
    (WS_CUDA_CONV=all: the implicit GEMM for the dense convs, the depthwise kernel), against the dequantised dense
    model on cuDNN; then a training step through its in-place ReLUs."""
    from conftest import cuda_kernels_of
    monkeypatch.setenv("WS_CUDA_CONV", "all")
    torch.manual_seed(0)
    model = TinyCNN().eval()
    assignments = kmeans_assignments(model)
    reference = dequantised_copy(model, assignments).cuda().half().to(memory_format=torch.channels_last)
    ws.replace_layers(model, assignments)
    model = model.cuda().half().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).cuda().half().contiguous(memory_format=torch.channels_last)
    # every conv's output against its dense twin's (fed the same input, so errors do not hide behind pooling)
    got, want = {}, {}
    dense_convs = {name: m for name, m in reference.named_modules() if isinstance(m, nn.Conv2d)}
    for name, m in model.named_modules():
        if isinstance(m, SharedConv2d):
            def hook(module, inputs, output, name=name):  # copies: the in-place ReLUs overwrite the outputs
                got[name] = output.float().clone()
                want[name] = dense_convs[name](inputs[0]).float()
            m.register_forward_hook(hook)
    with torch.no_grad():
        y, names = cuda_kernels_of(lambda: model(x))
    if names is not None:
        assert any("depthwise_nhwc_kernel" in n for n in names)
        if torch.cuda.get_device_capability() == (9, 0):  # the default build's tensor-core code
            assert any("conv_mma_kernel" in n for n in names)
    assert sorted(got) == sorted(dense_convs)
    for name in got:
        assert got[name].is_contiguous(memory_format=torch.channels_last), name
        assert float((got[name] - want[name]).norm() / want[name].norm()) < 3e-3, name
    with torch.no_grad():
        assert float((y.float() - reference(x).float()).norm() / reference(x).float().norm()) < 1e-2
    model.train()
    model(x).float().square().mean().backward()
    assert model.features[2].codebook.grad.abs().sum() > 0
