"""save / load / size_report: bit-exact round trips (in process and in a fresh one), exact size accounting,
entropy coding that never loses, and a clear ContainerError for every corrupt, truncated or hostile file."""
import copy
import os
import pickle
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from torch import nn

import weightshare as ws
from weightshare.container import ContainerError, read_container, write_container
from weightshare.formats import packed_row_bytes
from weightshare.models import build_model
from weightshare.nn import SharedConv2d, SharedLinear, binary_assignment

from test_replace import TinyTransformer, kmeans_assignments


def compressed_lenet5(device="cpu", k=16) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("lenet5").to(device).eval()
    ws.replace_layers(model, kmeans_assignments(model, k))
    return model


def compressed_smallconv() -> nn.Module:
    """BatchNorm buffers, bias-free convs, per-row codebooks: everything that is not a shared layer too."""
    torch.manual_seed(1)
    model = build_model("smallconv")
    model.train()(torch.randn(4, 3, 32, 32))  # non-trivial running statistics
    model.eval()
    assignments = {name: ws.kmeans(m.weight.detach(), 8, groups=m.weight.shape[0])
                   for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    ws.replace_layers(model, assignments)  # the classifier stays dense
    return model


def all_tensors_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def lenet5():
    return compressed_lenet5()


@pytest.fixture(scope="module")
def lenet5_file(lenet5, tmp_path_factory):
    path = tmp_path_factory.mktemp("io") / "lenet5.ws"
    ws.save(lenet5, path)
    return path


# ----------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("entropy_coding", [False, True, "auto"])
def test_round_trip_is_bit_exact(entropy_coding, lenet5, tmp_path, device):
    model = copy.deepcopy(lenet5).to(device)
    path = tmp_path / "m.ws"
    user = {"note": "hi", "acc": [0.99]}
    written = ws.save(model, path, entropy_coding=entropy_coding, metadata=user)
    assert written == os.path.getsize(path) == ws.size_report(model, entropy_coding, user).file_bytes
    loaded = ws.load(path)
    assert type(loaded) is type(model) and not loaded.training
    assert isinstance(loaded.conv1, SharedConv2d) and isinstance(loaded.fc1, SharedLinear)
    assert all_tensors_equal(loaded, lenet5)
    x = torch.randn(5, 1, 28, 28).to(device)
    assert torch.equal(loaded.to(device)(x), model(x))
    _, metadata = read_container(path)
    assert metadata["user"] == {"note": "hi", "acc": [0.99]} and metadata["model"] == {"class": "LeNet5",
                                                                                       "name": "lenet5"}
    encodings = {spec["index_encoding"] for spec in metadata["layers"].values()}
    allowed = {False: {"packed"}, True: {"rans", "context"}, "auto": {"packed", "rans", "context"}}[entropy_coding]
    assert encodings <= allowed


def test_round_trip_with_buffers_dense_layers_and_per_row_codebooks(tmp_path):
    model = compressed_smallconv()
    path = tmp_path / "m.ws"
    assert ws.save(model, path) == os.path.getsize(path) == ws.size_report(model).file_bytes
    loaded = ws.load(path)
    assert type(loaded.classifier) is nn.Linear and loaded.features[1][0].conv_groups == 32
    assert all_tensors_equal(loaded, model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


def test_load_into_a_given_model(lenet5_file, lenet5):
    dense = build_model("lenet5")
    loaded = ws.load(lenet5_file, model=dense)
    assert loaded is dense and isinstance(dense.fc1, SharedLinear) and dense.training  # mode kept
    assert all_tensors_equal(dense, lenet5)
    again = ws.load(lenet5_file, model=compressed_lenet5(k=4))  # shared layers with another k: replaced
    assert again.fc1.k == 16 and all_tensors_equal(again, lenet5)


def test_custom_architecture_needs_the_model(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer()
    ws.replace_layers(model, kmeans_assignments(model))
    path = tmp_path / "t.ws"
    ws.save(types.SimpleNamespace(model=model), path)  # anything with a .model (a compression result)
    with pytest.raises(ValueError, match="pass model="):
        ws.load(path)
    loaded = ws.load(path, model=TinyTransformer())  # dense GPT-2 Conv1D modules become SharedLinear
    assert all_tensors_equal(loaded, model)
    tokens = torch.randint(0, 50, (2, 9))
    assert torch.equal(loaded(tokens), model(tokens))


def test_load_into_a_meta_device_skeleton(tmp_path):
    """A model built on the meta device takes the file's tensors themselves: every tensor ends on the CPU with the
    file's values (GPT-2 Conv1D modules become SharedLinear layers, the embedding and LayerNorms stay dense), and
    the outputs are bit-identical; no dense weight of a shared layer is ever allocated."""
    torch.manual_seed(0)
    model = TinyTransformer()
    ws.replace_layers(model, kmeans_assignments(model))
    path = tmp_path / "t.ws"
    ws.save(model, path)
    with torch.device("meta"):
        skeleton = TinyTransformer()
    loaded = ws.load(path, model=skeleton)
    assert loaded is skeleton and skeleton.training  # mode kept (a fresh module trains)
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert all(t.device.type == "cpu" for t in tensors)
    assert all_tensors_equal(loaded, model)
    shared = (loaded.head, loaded.blocks[0].attn.q_proj, loaded.blocks[1].mlp[0])
    assert all(isinstance(m, SharedLinear) for m in shared)
    assert all(p.requires_grad for p in loaded.parameters())  # parameters stay parameters (trainable codebooks)
    tokens = torch.randint(0, 50, (2, 9))
    assert torch.equal(loaded(tokens), model(tokens))
    # the rebuilt architecture is a skeleton too: nothing is left on meta, outputs exact
    lenet = compressed_lenet5()
    ws.save(lenet, tmp_path / "l.ws")
    rebuilt = ws.load(tmp_path / "l.ws")
    assert all(not t.is_meta for t in list(rebuilt.parameters()) + list(rebuilt.buffers()))
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(rebuilt(x), lenet.eval()(x))


def test_meta_skeleton_with_a_non_persistent_buffer_is_refused(tmp_path):
    """A buffer outside the state dict has no values in the file: a skeleton holding one on meta is refused before
    it is touched (it would fail later, at its first forward)."""
    torch.manual_seed(0)

    class WithMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)
            self.register_buffer("mask", torch.ones(4), persistent=False)

        def forward(self, x):
            return self.fc(x) * self.mask

    model = WithMask()
    ws.replace_layers(model, {"fc": ws.kmeans(model.fc.weight.detach(), 4)})
    ws.save(model, tmp_path / "m.ws")
    with torch.device("meta"):
        skeleton = WithMask()
    with pytest.raises(ValueError, match="'mask' is a non-persistent buffer on the meta device"):
        ws.load(tmp_path / "m.ws", model=skeleton)
    assert type(skeleton.fc) is nn.Linear and skeleton.fc.weight.is_meta  # untouched
    skeleton.mask = torch.ones(4)  # materialised: now it loads
    assert torch.equal(ws.load(tmp_path / "m.ws", model=skeleton)(torch.ones(2, 8)), model(torch.ones(2, 8)))


def test_bit_exact_in_a_fresh_process(lenet5_file, lenet5, tmp_path):
    x = torch.randn(7, 1, 28, 28)
    inputs, outputs = tmp_path / "x.ws", tmp_path / "y.ws"
    write_container(inputs, {"x": x}, {})
    script = textwrap.dedent(f"""
        import torch, weightshare as ws
        from weightshare.container import read_container, write_container
        model = ws.load({str(lenet5_file)!r})
        x = read_container({str(inputs)!r})[0]["x"]
        state = {{"state." + k: v for k, v in model.state_dict().items()}}
        write_container({str(outputs)!r}, {{"y": model(x).detach(), **state}}, {{}})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    got, _ = read_container(outputs)
    assert torch.equal(got.pop("y"), lenet5(x))
    want = lenet5.state_dict()
    assert {k.removeprefix("state."): v for k, v in got.items()}.keys() == want.keys()
    assert all(torch.equal(got["state." + k], v) for k, v in want.items())


# ----------------------------------------------------------------------------------------------- sizes


def test_size_report_accounts_for_every_byte(lenet5, tmp_path):
    for entropy_coding in (False, True, "auto"):
        report = ws.size_report(lenet5, entropy_coding)
        path = tmp_path / f"{entropy_coding}.ws"
        assert report.file_bytes == ws.save(lenet5, path, entropy_coding) == os.path.getsize(path)
        assert report.parameters == 431_080 and report.fp32_bytes == 4 * 431_080
        assert report.ratio == pytest.approx(report.fp32_bytes / report.file_bytes)
        assert 0 < report.overhead_bytes < 4096
        for layer in report.layers:
            assert layer.bits == 4 and layer.k == 16 and layer.codebook_bytes in (32, 64)
            rows = {"conv1": 20, "conv2": 50, "fc1": 500, "fc2": 10}[layer.name]  # each row pads to 32 bits
            assert layer.packed_bytes == rows * packed_row_bytes(layer.weights // rows, 4)
            assert layer.entropy_bytes >= int(layer.shannon_bytes)
            assert layer.index_bytes == {"packed": layer.packed_bytes, "rans": layer.entropy_bytes,
                                         "context": layer.context_bytes}[layer.encoding]
            if entropy_coding == "auto":
                assert layer.index_bytes == min(layer.packed_bytes, layer.entropy_bytes, layer.context_bytes)
    text = str(ws.size_report(lenet5))
    assert "fc1" in text and "conv2" in text and "total" in text


def pruned_lenet300(density=0.05) -> nn.Module:
    """A LeNet-300-100 with most weights at an exact-zero entry and dead input pixels, as pruning leaves it."""
    torch.manual_seed(0)
    model = build_model("lenet300100").eval()
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False  # MNIST's empty border: pruning removes every weight reading it
    assignments = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            keep = torch.rand(m.weight.shape) < density
            if name == "fc1":
                keep[:, border.reshape(-1)] = False
            idx = torch.where(keep, torch.randint(1, 8, m.weight.shape), 0).to(torch.uint8)
            assignments[name] = (torch.linspace(-0.3, 0.3, 8).index_fill(0, torch.tensor([0]), 0.0), idx)
    ws.replace_layers(model, assignments)
    return model


def test_context_coding_is_chosen_for_pruned_layers_and_round_trips(tmp_path):
    model = pruned_lenet300()
    report = ws.size_report(model)
    fc1 = report.layers[0]
    # below the Shannon bound of any coder that treats the indices as independent: the dead border is nearly free
    assert fc1.encoding == "context" and fc1.context_bytes < 0.96 * fc1.shannon_bytes
    ws.save(model, tmp_path / "m.ws")
    assert all_tensors_equal(ws.load(tmp_path / "m.ws"), model)
    tensors, metadata = read_container(tmp_path / "m.ws")
    assert metadata["layers"]["fc1"]["index_encoding"] == "context"

    def flip(tensors, metadata):  # a bit in the middle of the coded stream
        tensors["fc1.indices"][len(tensors["fc1.indices"]) // 2] ^= 0x04
    for edit in (flip, lambda t, m: t.__setitem__("fc1.indices", t["fc1.indices"][:-3].clone()),
                 lambda t, m: t.__setitem__("fc1.indices", torch.cat([t["fc1.indices"], torch.zeros(2, dtype=torch.uint8)]))):
        with pytest.raises(ContainerError, match="fc1"):
            ws.load(rewrite(tmp_path / "m.ws", tmp_path / "bad.ws", edit))


def test_auto_is_never_larger_than_packed(lenet5):
    torch.manual_seed(0)
    uniform = nn.Sequential(nn.Linear(64, 8))  # uniformly random indices: rANS cannot win
    ws.replace_layers(uniform, {"0": (torch.randn(16), torch.randint(0, 16, (8, 64), dtype=torch.uint8))})
    binary = build_model("bnn_mlp")
    ws.replace_layers(binary, {f"linears.{i}": binary_assignment(m) for i, m in enumerate(binary.linears)})
    for model in (lenet5, uniform, binary, compressed_smallconv()):
        auto, packed = ws.size_report(model, "auto"), ws.size_report(model, False)
        assert auto.file_bytes <= packed.file_bytes
        assert all(a.index_bytes <= p.index_bytes for a, p in zip(auto.layers, packed.layers))
    assert {l.encoding for l in ws.size_report(uniform).layers} == {"packed"}


def test_lossless_float16_codebooks(tmp_path):
    binary = build_model("bnn_mlp")
    ws.replace_layers(binary, {f"linears.{i}": binary_assignment(m) for i, m in enumerate(binary.linears)})
    ws.save(binary, tmp_path / "b.ws")
    tensors, metadata = read_container(tmp_path / "b.ws")
    assert tensors["linears.0.codebook"].dtype == torch.float16
    assert metadata["layers"]["linears.0"]["codebook_dtype"] == "float16"
    loaded = ws.load(tmp_path / "b.ws")
    assert loaded.linears[0].codebook.dtype == torch.float32 and all_tensors_equal(loaded, binary)


def test_float16_exact_biases_are_stored_at_half_the_bytes(tmp_path):
    model = compressed_lenet5()
    with torch.no_grad():  # what ws.compress does by default (half_bias=True): fc1's bias becomes float16-exact
        model.fc1.bias.copy_(model.fc1.bias.half().float())
    assert not torch.equal(model.fc2.bias.half().float(), model.fc2.bias)  # fc2's is not: it stays float32
    size = ws.save(model, tmp_path / "m.ws")
    tensors, metadata = read_container(tmp_path / "m.ws")
    assert tensors["fc1.bias"].dtype == torch.float16 and metadata["layers"]["fc1"]["bias_dtype"] == "float16"
    assert tensors["fc2.bias"].dtype == torch.float32 and metadata["layers"]["fc2"]["bias_dtype"] == "float32"
    report = ws.size_report(model)
    assert report.file_bytes == size and next(l for l in report.layers if l.name == "fc1").bias_bytes == 2 * 500
    loaded = ws.load(tmp_path / "m.ws")
    assert loaded.fc1.bias.dtype == torch.float32 and all_tensors_equal(loaded, model)

    def claim_half(tensors, metadata):  # the metadata says float16 but the tensor is float32
        metadata["layers"]["fc2"]["bias_dtype"] = "float16"
    with pytest.raises(ContainerError, match="fc2.bias"):
        ws.load(rewrite(tmp_path / "m.ws", tmp_path / "bad.ws", claim_half))
    for bad in ("int8", None):
        edit = set_layer("fc1", "bias_dtype", bad)
        with pytest.raises(ContainerError, match="bias dtype"):
            ws.load(rewrite(tmp_path / "m.ws", tmp_path / "bad.ws", edit))


def test_bad_arguments(lenet5, tmp_path):
    with pytest.raises(ValueError, match="entropy_coding"):
        ws.save(lenet5, tmp_path / "x.ws", entropy_coding="yes")
    with pytest.raises(TypeError, match="nn.Module"):
        ws.save(object(), tmp_path / "x.ws")
    with pytest.raises(ContainerError, match="tuple"):
        ws.save(lenet5, tmp_path / "x.ws", metadata={"bad": (1, 2)})


# ----------------------------------------------------------------------------------------------- hostile files


def rewrite(source, target, edit):
    """Apply edit(tensors, metadata) and write a well-formed container (valid checksum) with the result."""
    tensors, metadata = read_container(source)
    edit(tensors, metadata)
    write_container(target, tensors, metadata)
    return target


def test_truncated_and_corrupted_files_are_refused(lenet5_file, tmp_path):
    data = lenet5_file.read_bytes()
    for cut in (0, 10, 100, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.ws").write_bytes(data[:cut])
        with pytest.raises(ContainerError):
            ws.load(tmp_path / "cut.ws")
    for position in (30, len(data) // 3, len(data) - 40):
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        (tmp_path / "flip.ws").write_bytes(bytes(flipped))
        with pytest.raises(ContainerError):
            ws.load(tmp_path / "flip.ws")


def test_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ContainerError, match="not a weightshare container"):
        ws.load(path, model=build_model("lenet5"))
    torch.save(build_model("lenet5").state_dict(), tmp_path / "state.pt")
    with pytest.raises(ContainerError):
        ws.load(tmp_path / "state.pt")
    assert not marker.exists()


def set_first_index(tensors, metadata, name, value):
    """Overwrite the first index of a packed layer (bits >= 3: the low bits of byte 0)."""
    assert metadata["layers"][name]["index_encoding"] == "packed"
    tensors[f"{name}.indices"][0, 0] = value


def test_indices_not_below_k_are_refused(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4))
    ws.replace_layers(model, {"0": (torch.randn(5), torch.randint(0, 5, (4, 16), dtype=torch.uint8))})  # 3 bits
    good = tmp_path / "good.ws"
    ws.save(model, good, entropy_coding=False)
    bad = rewrite(good, tmp_path / "bad.ws", lambda t, m: set_first_index(t, m, "0", 0b111))  # index 7 >= k = 5
    with pytest.raises(ContainerError, match="not below k=5"):
        ws.load(bad, model=nn.Sequential(nn.Linear(16, 4)))

    ws.save(model, good, entropy_coding=True)

    def shrink_k(tensors, metadata):  # the rANS stream codes symbols up to 4, the metadata now says k = 2
        metadata["layers"]["0"]["k"] = 2
        tensors["0.codebook"] = tensors["0.codebook"][:, :2].contiguous()
    with pytest.raises(ContainerError, match="layer '0'"):
        ws.load(rewrite(good, tmp_path / "bad2.ws", shrink_k), model=nn.Sequential(nn.Linear(16, 4)))


def delete(name):
    return lambda tensors, metadata: tensors.pop(name)


def set_layer(name, key, value):
    return lambda tensors, metadata: metadata["layers"][name].__setitem__(key, value)


HOSTILE = [  # (edit, what the error says)
    (delete("fc1.bias"), "missing tensor"),
    (delete("conv2.indices"), "missing tensor 'conv2.indices'"),
    (lambda t, m: t.__setitem__("extra", torch.zeros(3)), "unexpected tensor"),
    (lambda t, m: t.__setitem__("fc2.bias", t["fc2.bias"].double()), "float64"),
    (lambda t, m: t.__setitem__("fc2.bias", t["fc2.bias"][:5].clone()), "shape"),
    (lambda t, m: t.__setitem__("fc2.codebook", t["fc2.codebook"].half()), "metadata says"),
    (lambda t, m: t.__setitem__("fc2.codebook", torch.full_like(t["fc2.codebook"], float("nan"))), "NaN"),
    (lambda t, m: t.__setitem__("fc1.indices", t["fc1.indices"][:10].clone()), "fc1"),
    (set_layer("fc1", "kind", "conv3d"), "unknown layer kind"),
    (set_layer("fc1", "kind", "conv2d"), "keys"),
    (set_layer("fc1", "bits", "4"), "bits must be an integer"),
    (set_layer("fc1", "bits", True), "bits must be an integer"),
    (set_layer("fc1", "k", 17), "k must be an integer"),
    (set_layer("fc1", "groups", 3), "groups"),
    (set_layer("fc1", "weight_shape", [500, -800]), "weight_shape"),
    (set_layer("fc1", "weight_shape", [1 << 40, 800]), "weight shape"),
    (set_layer("fc1", "index_encoding", "zstd"), "index encoding"),
    (set_layer("fc1", "activation", "int4"), "activation"),
    (set_layer("conv1", "stride", [2, 2]), "conv"),
    (set_layer("fc1", "extra", 1), "keys"),
    (lambda t, m: m["layers"].__setitem__("fc9", m["layers"].pop("fc1")), "not a module of the model"),
    (lambda t, m: m.__setitem__("version", 2), "version"),
    (lambda t, m: m.__setitem__("format", "other"), "not a weightshare model file"),
    (lambda t, m: m.__setitem__("layers", []), "layers"),
    (lambda t, m: m.__setitem__("model", {"class": 3, "name": None}), "model"),
]


def test_unknown_model_name_needs_a_model(lenet5_file, tmp_path):
    bad = rewrite(lenet5_file, tmp_path / "bad.ws", lambda t, m: m["model"].__setitem__("name", "resnet9000"))
    with pytest.raises(ValueError, match="pass model="):
        ws.load(bad)
    assert isinstance(ws.load(bad, model=build_model("lenet5")).fc1, SharedLinear)


# ----------------------------------------------------------------------------------------------- HashedNets layers


@pytest.fixture(scope="module")
def hashed_lenet5():
    """LeNet-5 as HashedNets (compress.hashednets): convs and Linear layers parametrised by 1/8 as many buckets."""
    from weightshare.compress.hashednets import hashednets
    torch.manual_seed(0)
    return hashednets(build_model("lenet5").eval(), 8, seed=5)


@pytest.fixture(scope="module")
def hashed_file(hashed_lenet5, tmp_path_factory):
    path = tmp_path_factory.mktemp("hashed") / "lenet5_hashed.ws"
    ws.save(hashed_lenet5, path)
    return path


def test_hashednets_round_trip_is_bit_exact(hashed_lenet5, hashed_file):
    """A HashedNets model saves its bucket values and seeds only (no index per weight) and loads bit-exactly into
    the rebuilt architecture, a dense model and a HashedNets one; the file's bytes are size_report's."""
    from weightshare.compress.hashednets import hashed_parametrizations, hashednets, hashednets_size
    x = torch.randn(4, 1, 28, 28)
    want = hashed_lenet5(x)
    report = ws.size_report(hashed_lenet5)
    assert os.path.getsize(hashed_file) == report.file_bytes
    assert [l.kind for l in report.layers] == ["hashed"] * 4
    buckets = sum(p.buckets for p in hashed_parametrizations(hashed_lenet5))
    assert sum(l.codebook_bytes for l in report.layers) == 4 * buckets  # kaiming-scaled values: not fp16-exact
    # HashedNets' own count (buckets, biases and a seed per layer) and the header are all the file holds
    assert report.file_bytes - report.overhead_bytes <= hashednets_size(hashed_lenet5)
    _, metadata = read_container(hashed_file)
    assert metadata["layers"]["fc1"] == {"kind": "hashed", "weight_shape": [500, 800], "buckets": 50000,
                                         "seed": metadata["layers"]["fc1"]["seed"], "hash": "position_hash.v1",
                                         "values_dtype": "float32"}
    rebuilt = ws.load(hashed_file)
    dense = build_model("lenet5").eval()
    ws.load(hashed_file, model=dense)
    same = hashednets(build_model("lenet5").eval(), 8, seed=5)
    ws.load(hashed_file, model=same)
    for model in (rebuilt, dense, same):
        assert torch.equal(model(x), want)
    assert len(hashed_parametrizations(rebuilt)) == 4


def test_hashednets_values_stored_as_float16_when_exact(tmp_path):
    from weightshare.compress.hashednets import hashed_parametrizations, hashednets
    torch.manual_seed(0)
    model = hashednets(nn.Sequential(nn.Linear(64, 32)), 4)
    with torch.no_grad():
        model[0].parametrizations.weight.original.copy_(torch.randint(-64, 64, (512,)).float() / 64)
    path = tmp_path / "h.ws"
    ws.save(model, path)
    tensors, metadata = read_container(path)
    assert metadata["layers"]["0"]["values_dtype"] == "float16" and tensors["0.hashed_values"].dtype == torch.float16
    x = torch.randn(3, 64)
    loaded = ws.load(path, model=nn.Sequential(nn.Linear(64, 32)))
    assert torch.equal(loaded(x), model(x))
    assert hashed_parametrizations(loaded)[0].buckets == 512


def set_hashed(name, key, value):
    return lambda tensors, metadata: metadata["layers"][name].__setitem__(key, value)


HOSTILE_HASHED = [  # (edit, what the error says)
    (set_hashed("fc1", "hash", "murmur3"), "cannot be recomputed"),
    (set_hashed("fc1", "buckets", 500 * 800 + 1), "buckets must be an integer"),
    (set_hashed("fc1", "buckets", 0), "buckets must be an integer"),
    (set_hashed("fc1", "seed", -1), "seed must be an integer"),
    (set_hashed("fc1", "seed", 1 << 40), "seed must be an integer"),
    (set_hashed("fc1", "seed", "5"), "seed must be an integer"),
    (set_hashed("fc1", "weight_shape", [800, 500]), "weight shape"),
    (set_hashed("fc1", "weight_shape", [500]), "weight_shape"),
    (set_hashed("fc1", "values_dtype", "float64"), "values dtype"),
    (set_hashed("fc1", "bits", 4), "keys"),
    (lambda t, m: t.__setitem__("fc1.hashed_values", t["fc1.hashed_values"].half()), "metadata says"),
    (lambda t, m: t.__setitem__("fc1.hashed_values", t["fc1.hashed_values"][:100].clone()), "shape"),
    (lambda t, m: t.__setitem__("fc1.hashed_values", torch.full_like(t["fc1.hashed_values"], float("inf"))), "Inf"),
    (lambda t, m: t.pop("fc1.hashed_values"), "missing tensor"),
    (lambda t, m: m["layers"].__setitem__("pool", m["layers"].pop("fc1")), "not a module of the model"),
    (lambda t, m: t.__setitem__("fc1.parametrizations.weight.original", t["fc1.hashed_values"]), "unexpected"),
]


@pytest.mark.parametrize("source, edit, message", [("lenet5_file", *case) for case in HOSTILE]
                         + [("hashed_file", *case) for case in HOSTILE_HASHED])
def test_hostile_files_are_refused_and_leave_the_model_alone(source, edit, message, request, tmp_path):
    """Each edit of a good file (shared LeNet-5, or its HashedNets form) is refused with a message saying what is
    wrong, before the model is touched."""
    bad = rewrite(request.getfixturevalue(source), tmp_path / "bad.ws", edit)
    torch.manual_seed(3)
    model = build_model("lenet5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ContainerError, match=message):
        ws.load(bad, model=model)
    assert type(model.fc1) is nn.Linear and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_hashednets_values_in_a_bfloat16_model(hashed_lenet5, tmp_path):
    """A bfloat16 HashedNets model round-trips (its values stored as float16 or float32, whichever holds them
    exactly); values that the model's dtype cannot hold exactly are refused, not rounded."""
    bf16 = copy.deepcopy(hashed_lenet5).bfloat16()
    path = tmp_path / "bf16.ws"
    ws.save(bf16, path)
    loaded = ws.load(path, model=build_model("lenet5").eval().bfloat16())
    x = torch.randn(2, 1, 28, 28).bfloat16()
    assert torch.equal(loaded(x), bf16(x))

    def inexact(tensors, metadata):
        metadata["layers"]["fc2"]["values_dtype"] = "float32"
        tensors["fc2.hashed_values"] = tensors["fc2.hashed_values"].float() + 1e-5
    with pytest.raises(ContainerError, match="do not fit the model's torch.bfloat16 exactly"):
        ws.load(rewrite(path, tmp_path / "bad.ws", inexact), model=build_model("lenet5").eval().bfloat16())


def test_hashednets_file_refuses_a_differently_hashed_model(hashed_file):
    from weightshare.compress.hashednets import hashednets
    other = hashednets(build_model("lenet5").eval(), 8, seed=6)  # other seeds: other buckets for every weight
    with pytest.raises(ContainerError, match="parametrised differently"):
        ws.load(hashed_file, model=other)
    shared = compressed_lenet5()
    with pytest.raises(ContainerError, match="shared layer"):
        ws.load(hashed_file, model=shared)
