"""data / models / train: the verified MNIST reader, the experiment models, deterministic training, checkpoints."""
import shutil
import struct
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from weightshare import data, models, train
from weightshare.data import load_mnist, mnist_splits
from weightshare.models import BinaryLinear, build_model, count_parameters
from weightshare.train import evaluate, load_checkpoint, read_checkpoint_metadata, save_checkpoint

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


@pytest.fixture(scope="module")
def splits():
    return mnist_splits()


@pytest.fixture
def mnist_copy(tmp_path, monkeypatch):
    """A private copy of the MNIST folder, selected through WS_DATA_DIR, that a test may damage."""
    for name in MNIST_FILES:
        shutil.copy(data.data_dir() / name, tmp_path / name)
    monkeypatch.setenv("WS_DATA_DIR", str(tmp_path))
    return tmp_path


# --------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("split,counts", [("train", TRAIN_COUNTS), ("test", TEST_COUNTS)])
def test_load_mnist_shapes_dtypes_and_counts(split, counts):
    images, labels = load_mnist(split)
    n = sum(counts)
    assert images.shape == (n, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert images.min() == 0.0 and images.max() == 1.0
    assert torch.bincount(labels, minlength=10).tolist() == counts


def test_load_mnist_is_cached_and_returns_fresh_tensors():
    images, _ = load_mnist("test")
    hits = data._decoded_split.cache_info().hits
    images.zero_()  # must not leak into the cache
    again, _ = load_mnist("test")
    assert data._decoded_split.cache_info().hits == hits + 1
    assert again.max() == 1.0


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation")


def test_splits_are_deterministic_held_out_and_normalised(splits):
    assert [len(d) for d in splits] == [55000, 5000, 10000]
    train_labels, val_labels = splits.train.tensors[1], splits.val.tensors[1]
    # train and validation partition the training files
    assert (torch.bincount(train_labels, minlength=10) + torch.bincount(val_labels, minlength=10)).tolist() == \
        TRAIN_COUNTS
    again = mnist_splits()
    assert torch.equal(again.val.tensors[0], splits.val.tensors[0])
    assert not torch.equal(mnist_splits(seed=1).val.tensors[1], val_labels)
    mean, std = splits.train.tensors[0].mean().item(), splits.train.tensors[0].std().item()
    assert abs(mean) < 0.01 and abs(std - 1) < 0.01
    raw = mnist_splits(normalize=False)
    assert torch.allclose(data.normalize(raw.test.tensors[0]), splits.test.tensors[0])


def test_flipped_byte_gives_clear_error(mnist_copy):
    target = mnist_copy / "train-labels-idx1-ubyte.gz"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz.*md5"):
        load_mnist("train")


def test_truncated_file_gives_clear_error(mnist_copy):
    target = mnist_copy / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_mnist("test")


def test_missing_file_names_it(mnist_copy):
    (mnist_copy / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        load_mnist("test")


def _idx(magic, dims, payload):
    return struct.pack(f">{1 + len(dims)}I", magic, *dims) + payload


def test_idx_header_is_checked():
    good = _idx(data.LABEL_MAGIC, (3,), bytes([1, 2, 3]))
    assert data.parse_idx(good, data.LABEL_MAGIC, (3,), "x").tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="x: IDX magic number 2051"):
        data.parse_idx(_idx(data.IMAGE_MAGIC, (3,), bytes(3)), data.LABEL_MAGIC, (3,), "x")
    with pytest.raises(ValueError, match="dimensions"):
        data.parse_idx(_idx(data.LABEL_MAGIC, (4,), bytes(4)), data.LABEL_MAGIC, (3,), "x")
    with pytest.raises(ValueError, match="bytes after decompression"):
        data.parse_idx(good[:-1], data.LABEL_MAGIC, (3,), "x")
    with pytest.raises(ValueError, match="too short"):
        data.parse_idx(good[:5], data.LABEL_MAGIC, (3,), "x")


def test_label_counts_are_checked():
    data.check_label_counts(np.array([0, 1, 1], dtype=np.uint8), (1, 2), "x")
    with pytest.raises(ValueError, match="x: label counts"):
        data.check_label_counts(np.array([0, 0, 1], dtype=np.uint8), (1, 2), "x")
    with pytest.raises(ValueError, match="outside"):
        data.check_label_counts(np.array([0, 2], dtype=np.uint8), (1, 2), "x")


# --------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("name,params,input_shape", [
    ("lenet300100", 266_610, (4, 1, 28, 28)),
    ("lenet5", 431_080, (4, 1, 28, 28)),
    ("bnn_mlp", 784 * 500 + 500 * 500 + 500 * 10 + 2 * (500 + 500 + 10), (4, 1, 28, 28)),
    ("smallconv", None, (4, 3, 32, 32)),
])
def test_model_parameter_counts_and_output_shapes(name, params, input_shape):
    torch.manual_seed(0)
    model = build_model(name)
    if params is not None:
        assert count_parameters(model) == params
    assert model(torch.randn(input_shape)).shape == (4, 10)
    assert models.model_name(model) == name


def test_smallconv_has_depthwise_grouped_and_batchnorm():
    model = build_model("smallconv")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert any(c.groups == c.in_channels == c.out_channels > 1 for c in convs)  # depthwise
    assert any(1 < c.groups < c.in_channels for c in convs)                     # grouped
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_unknown_model_name_is_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet50")


def test_binary_linear_forward_uses_only_signs():
    torch.manual_seed(0)
    layer = BinaryLinear(16, 8)
    assert isinstance(layer, nn.Linear)
    with torch.no_grad():
        layer.weight[0, 0] = 0.0  # sign(0) must still be +-1
    signs = models.binarize(layer.weight.detach())
    assert set(signs.unique().tolist()) <= {-1.0, 1.0} and signs[0, 0] == 1.0
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), F.linear(x, signs, layer.bias))


def test_binary_linear_gradient_reaches_latent_weights():
    torch.manual_seed(0)
    layer = BinaryLinear(16, 8, bias=False)
    with torch.no_grad():
        layer.weight.uniform_(-0.9, 0.9)
        layer.weight[0] = 1.5  # beyond the clip: the straight-through gradient is cut
    layer(torch.randn(5, 16)).square().sum().backward()
    grad = layer.weight.grad
    assert grad is not None and grad[1:].abs().min() > 0
    assert torch.all(grad[0] == 0)


def test_bnn_mlp_trains_and_keeps_latent_weights_clipped():
    torch.manual_seed(0)
    model = build_model("bnn_mlp")
    subset = TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    train.train(model, subset, epochs=1, lr=0.5, batch_size=32, weight_decay=0.0, seed=0, progress=False,
                optimizer="adam")
    for layer in model.linears:
        assert layer.weight.abs().max() <= 1.0


# --------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", ["lenet300100", "lenet5", "bnn_mlp", "smallconv"])
def test_checkpoint_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name)
    shape = (8, 3, 32, 32) if name == "smallconv" else (8, 1, 28, 28)
    model.train()
    model(torch.randn(shape))  # move BatchNorm running statistics off their defaults
    model.eval()
    path = save_checkpoint(model, tmp_path / "model.safetensors", {"seed": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temp file left behind
    assert path.stat().st_mode & 0o777 == 0o666 & ~train._current_umask()      # not mkstemp's 0600
    loaded = load_checkpoint(path)
    assert type(loaded) is type(model) and not loaded.training
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    meta = read_checkpoint_metadata(path)
    assert meta["model"] == name and meta["seed"] == "7"


def test_checkpoint_with_wrong_model_name_is_rejected(tmp_path):
    lenet5 = build_model("lenet5")
    path = save_checkpoint(lenet5, tmp_path / "m.safetensors", name="lenet300100")  # tensors do not fit the name
    with pytest.raises(ValueError, match="m.safetensors.*do not match model 'lenet300100'"):
        load_checkpoint(path)
    good = save_checkpoint(lenet5, tmp_path / "good.safetensors")
    with pytest.raises(ValueError, match="expected 'lenet300100'"):
        load_checkpoint(good, expected_model="lenet300100")
    unknown = tmp_path / "unknown.safetensors"
    save_file({"w": torch.zeros(1)}, str(unknown), metadata={"format": train.CHECKPOINT_FORMAT, "model": "vgg"})
    with pytest.raises(ValueError, match="model name 'vgg'"):
        load_checkpoint(unknown)


def test_checkpoint_with_wrong_shape_is_rejected(tmp_path):
    tensors = {k: v.clone() for k, v in build_model("lenet5").state_dict().items()}
    tensors["fc2.weight"] = torch.zeros(10, 499)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"format": train.CHECKPOINT_FORMAT, "model": "lenet5"})
    with pytest.raises(ValueError, match=r"bad.safetensors: tensor 'fc2.weight'.*\(10, 499\)"):
        load_checkpoint(path)


def test_non_checkpoint_files_are_rejected(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign))
    with pytest.raises(ValueError, match="format"):
        load_checkpoint(foreign)


# --------------------------------------------------------------------------------------------- training
def _subset(dataset, n=512):
    return TensorDataset(*(t[:n] for t in dataset.tensors))


def test_one_tiny_epoch_is_fast_and_deterministic(splits):
    subset = _subset(splits.train)
    results = []
    start = time.perf_counter()
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("lenet5")
        train.train(model, subset, epochs=1, lr=0.05, batch_size=64, weight_decay=5e-4, seed=3, progress=False)
        results.append(model.state_dict())
    assert time.perf_counter() - start < 2 * 10
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    loss, error = evaluate(model, _subset(splits.val, 1000))
    assert 0.0 <= error < 0.5 and loss < 2.3  # 8 steps already beat chance (90% error)


def test_main_writes_a_checkpoint_with_metadata(tmp_path, capsys):
    out = tmp_path / "ckpt" / "lenet300100.safetensors"
    train.main(["--model", "lenet300100", "--out", str(out), "--epochs", "0", "--no-progress", "--seed", "5"])
    meta = read_checkpoint_metadata(out)
    assert meta["model"] == "lenet300100" and meta["seed"] == "5" and meta["epochs"] == "0"
    assert {"test_error", "train_time_s", "torch_version"} <= set(meta)
    assert "test error" in capsys.readouterr().out
    assert isinstance(load_checkpoint(out), models.LeNet300100)
