"""io.py's masked bias storage ("bias_encoding": "masked"): a bit mask of the entries that are not +0.0 plus only
those values. Chosen per layer only when the file gets strictly smaller; round trips bit-exactly; counted exactly by
size_report; every inconsistency in a hostile file is refused naming the layer, before the model is touched."""
import math
import os

import pytest
import torch
from torch import nn

import weightshare as ws
from weightshare.container import ContainerError, read_container, write_container
from weightshare.models import build_model

from conftest import requires_native

pytestmark = requires_native


def shared_lenet300(fc1_bias=None, fc2_bias=None) -> nn.Module:
    """LeNet-300-100 with random 3-bit shared layers and the given biases (float32 tensors)."""
    torch.manual_seed(0)
    model = build_model("lenet300100").eval()
    codebook = torch.linspace(-0.3, 0.3, 8)
    ws.replace_layers(model, {name: (codebook, torch.randint(0, 8, m.weight.shape, dtype=torch.uint8))
                              for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    with torch.no_grad():
        for layer, bias in ((model.fc1, fc1_bias), (model.fc2, fc2_bias)):
            if bias is not None:
                layer.bias.copy_(bias)
    return model


def sparse_bias(n, zeros, half=True, seed=0):
    """n float32 values, `zeros` of them +0.0, one -0.0, the rest nonzero (float16-exact when `half`)."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(n, generator=g).clamp(min=0.01) * torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0)
    if half:
        bias = bias.half().float()
    bias[torch.randperm(n, generator=g)[:zeros]] = 0.0
    nonzero = bias.nonzero().reshape(-1)
    bias[nonzero[0]] = -0.0
    return bias


def same_state(a: nn.Module, b: nn.Module) -> bool:
    """Same names, dtypes and bits (the sign of zero included)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k])
        and (not sa[k].is_floating_point() or torch.equal(torch.signbit(sa[k]), torch.signbit(sb[k]))) for k in sa)


def rewrite(source, target, edit):
    tensors, metadata = read_container(source)
    edit(tensors, metadata)
    write_container(target, tensors, metadata)
    return target


def as_dense(name):
    """Turn a masked bias back into the dense encoding (what an older writer would have stored)."""
    def edit(tensors, metadata):
        mask, values = tensors.pop(f"{name}.bias_mask"), tensors.pop(f"{name}.bias")
        n = metadata["layers"][name]["weight_shape"][0]
        bits = ((mask.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:n].bool()
        full = torch.zeros(n, dtype=values.dtype)
        full[bits] = values
        tensors[f"{name}.bias"] = full
        del metadata["layers"][name]["bias_encoding"]
    return edit


def as_masked(name):
    """Turn a dense bias into the masked encoding (valid, but not what save chose)."""
    def edit(tensors, metadata):
        bias = tensors[f"{name}.bias"]
        keep = ~((bias == 0) & ~torch.signbit(bias))
        padded = torch.zeros(8 * math.ceil(len(bias) / 8), dtype=torch.uint8)
        padded[:len(bias)] = keep.to(torch.uint8)
        mask = (padded.reshape(-1, 8).int() << torch.arange(8)).sum(1).to(torch.uint8)
        rest = {k: v for k, v in tensors.items() if k != f"{name}.bias"}
        tensors.clear()
        for k, v in rest.items():
            if k == f"{name}.indices":
                tensors[f"{name}.bias_mask"], tensors[f"{name}.bias"] = mask, bias[keep].contiguous()
            tensors[k] = v
        metadata["layers"][name]["bias_encoding"] = "masked"
    return edit


@pytest.fixture(scope="module")
def masked_file(tmp_path_factory):
    model = shared_lenet300(sparse_bias(300, 180))  # fc1: 180 of 300 biases zero; fc2, fc3 dense random
    path = tmp_path_factory.mktemp("bias") / "m.ws"
    ws.save(model, path)
    return model, path


def test_masked_round_trip_is_bit_exact(masked_file, tmp_path):
    model, path = masked_file
    tensors, metadata = read_container(path)
    fc1 = metadata["layers"]["fc1"]
    assert fc1["bias_encoding"] == "masked" and fc1["bias_dtype"] == "float16"
    assert tensors["fc1.bias_mask"].dtype == torch.uint8 and tensors["fc1.bias_mask"].shape == (38,)
    assert tensors["fc1.bias"].dtype == torch.float16 and tensors["fc1.bias"].shape == (120,)  # -0.0 kept
    assert "bias_encoding" not in metadata["layers"]["fc2"] and "fc2.bias_mask" not in tensors
    assert list(tensors).index("fc1.bias_mask") == list(tensors).index("fc1.bias") - 1
    loaded = ws.load(path)
    assert same_state(loaded, model) and torch.signbit(loaded.fc1.bias).sum() >= 1
    x = torch.randn(7, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    ws.save(loaded, tmp_path / "again.ws")
    assert (tmp_path / "again.ws").read_bytes() == path.read_bytes()  # canonical


def test_the_same_bytes_from_any_device(masked_file, device, tmp_path):
    model, path = masked_file
    try:
        ws.save(model.to(device), tmp_path / "d.ws")
    finally:
        model.cpu()
    assert (tmp_path / "d.ws").read_bytes() == path.read_bytes()


def test_float32_values_and_all_zero_biases():
    """A bias that float16 cannot hold exactly keeps float32 values; an all-zero bias stores no values at all."""
    model = shared_lenet300(sparse_bias(300, 200, half=False), torch.zeros(100))
    report = ws.size_report(model)
    fc1, fc2 = report.layers[0], report.layers[1]
    assert fc1.bias_encoding == fc2.bias_encoding == "masked"
    assert fc1.bias_bytes == 38 + 4 * 100 and fc2.bias_bytes == 13
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ws-bias-{os.getpid()}.ws")
    try:
        assert ws.save(model, path) == report.file_bytes == os.path.getsize(path)
        tensors, metadata = read_container(path)
        assert tensors["fc1.bias"].dtype == torch.float32 and metadata["layers"]["fc1"]["bias_dtype"] == "float32"
        assert tensors["fc2.bias"].shape == (0,)
        assert same_state(ws.load(path), model)
    finally:
        os.unlink(path)


@pytest.mark.parametrize("entropy_coding", [False, True, "auto"])
def test_size_report_counts_mask_and_values(masked_file, entropy_coding, tmp_path):
    model, _ = masked_file
    report = ws.size_report(model, entropy_coding)
    assert report.file_bytes == ws.save(model, tmp_path / "m.ws", entropy_coding) == \
        os.path.getsize(tmp_path / "m.ws")
    fc1 = report.layers[0]
    assert fc1.bias_encoding == "masked" and fc1.bias_bytes == 38 + 2 * 120
    assert [l.bias_encoding for l in report.layers[1:]] == ["dense", "dense"]
    assert report.parameters == 266_610


def test_masked_only_when_strictly_smaller(masked_file, tmp_path):
    """The chosen file is smaller than the same file with the other encoding for any one layer (both valid)."""
    model, path = masked_file
    chosen = os.path.getsize(path)
    dense = rewrite(path, tmp_path / "dense.ws", as_dense("fc1"))
    assert os.path.getsize(dense) > chosen and same_state(ws.load(dense), model)
    for name in ("fc2", "fc3"):
        masked = rewrite(path, tmp_path / f"{name}.ws", as_masked(name))
        assert os.path.getsize(masked) >= chosen and same_state(ws.load(masked), model)
    # few zeros: the mask costs more than the zeros save (fc1), or saves 8 bytes of buffers but its header entry
    # costs more (fc2: 12 of 100 zero, 16 + 176 < 200 bytes)
    few = shared_lenet300(sparse_bias(300, 20), sparse_bias(100, 12, seed=1))
    assert {l.bias_encoding for l in ws.size_report(few).layers} == {"dense"}
    ws.save(few, tmp_path / "few.ws")
    for name in ("fc1", "fc2"):
        masked = rewrite(tmp_path / "few.ws", tmp_path / "few-masked.ws", as_masked(name))
        assert os.path.getsize(masked) >= os.path.getsize(tmp_path / "few.ws")
        assert same_state(ws.load(masked), few)


def set_mask(fn):
    return lambda t, m: t.__setitem__("fc1.bias_mask", fn(t["fc1.bias_mask"]).contiguous())


def set_values(fn):
    return lambda t, m: t.__setitem__("fc1.bias", fn(t["fc1.bias"]).contiguous())


def flip_padding(mask):
    mask = mask.clone()
    mask[-1] |= 0x80  # 300 entries: bits 300..303 of the 38 bytes are padding
    return mask


def clear_a_set_bit(mask):
    mask = mask.clone()
    byte = int((mask != 0).nonzero()[0])
    mask[byte] &= mask[byte] - 1  # one value fewer marked than stored
    return mask


def store_positive_zero(values):
    values = values.clone()
    values[0] = 0.0
    return values


def set_spec(key, value):
    return lambda t, m: m["layers"]["fc1"].__setitem__(key, value)


HOSTILE = [  # (edit, what the error says)
    (set_mask(lambda m: m[:-1]), r"layer 'fc1'.*bias mask must be uint8 \[38\]"),
    (set_mask(lambda m: torch.cat([m, torch.zeros(1, dtype=torch.uint8)])), r"layer 'fc1'.*bias mask must be"),
    (set_mask(lambda m: m.reshape(2, 19)), r"layer 'fc1'.*bias mask must be"),
    (set_mask(lambda m: m.to(torch.int8)), r"layer 'fc1'.*bias mask must be uint8"),
    (set_mask(flip_padding), r"layer 'fc1'.*padding bits"),
    (set_mask(clear_a_set_bit), r"layer 'fc1'.*marks 119 stored values but the file holds 120"),
    (set_values(lambda v: v[:-1]), r"layer 'fc1'.*marks 120 stored values but the file holds 119"),
    (set_values(lambda v: torch.cat([v, v[:1]])), r"layer 'fc1'.*file holds 121"),
    (set_values(lambda v: v.reshape(10, 12)), r"layer 'fc1'.*1-D"),
    (set_values(store_positive_zero), r"layer 'fc1'.*\+0\.0"),
    (set_values(lambda v: v.float()), r"fc1.bias.*metadata says float16"),
    (lambda t, m: t.pop("fc1.bias_mask"), r"missing tensor 'fc1.bias_mask'.*layer 'fc1'"),
    (lambda t, m: t.__setitem__("fc2.bias_mask", torch.zeros(13, dtype=torch.uint8)), "unexpected tensor"),
    (set_spec("bias_encoding", "sparse"), r"layer 'fc1'.*bias encoding must be 'masked'"),
    (set_spec("bias_encoding", None), r"layer 'fc1'.*bias encoding"),
    (set_spec("bias", False), r"layer 'fc1'.*(bias encoding|bias dtype)"),
    (lambda t, m: (m["layers"]["fc1"].update(bias=False), m["layers"]["fc1"].pop("bias_dtype")),
     r"layer 'fc1'.*bias encoding must be 'masked' \(or absent: dense\) and needs bias=true"),
    (as_dense("fc1"), None),  # the dense encoding is still read: not hostile at all
]


@pytest.mark.parametrize("edit, message", HOSTILE)
def test_hostile_masked_biases_are_refused_and_leave_the_model_alone(edit, message, masked_file, tmp_path):
    model, path = masked_file
    bad = rewrite(path, tmp_path / "bad.ws", edit)
    torch.manual_seed(3)
    target = build_model("lenet300100")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    if message is None:
        assert same_state(ws.load(bad, model=target), model)
        return
    with pytest.raises(ContainerError, match=message):
        ws.load(bad, model=target)
    assert type(target.fc1) is nn.Linear and all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
