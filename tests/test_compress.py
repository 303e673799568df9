"""ws.compress on the real MNIST (bundled) and the bundled LeNet-300-100 checkpoint, plus the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import weightshare as ws
from weightshare.compress import compress, fit_layer
from weightshare.data import mnist_splits
from weightshare.train import evaluate, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist():
    return mnist_splits()


@pytest.fixture(scope="module")
def lenet300(mnist):
    model = load_checkpoint(REPO / "checkpoints" / "lenet300100.safetensors")
    xs, ys = mnist.train.tensors
    calib = [(xs[i:i + 500], ys[i:i + 500]) for i in range(0, 2000, 500)]
    return model, calib


@pytest.fixture(scope="module")
def fixed_bits_errors(lenet300, mnist):
    model, calib = lenet300
    errs = {}
    for bits in (2, 3):
        for method in ("loss_aware", "kmeans", "uniform"):
            r = compress(model, calib, F.cross_entropy, method=method, bits=bits, progress=False,
                         shared_layers=False)
            errs[bits, method] = evaluate(r.model, mnist.test)[1]
    return errs


@pytest.mark.parametrize("bits", [2, 3])
def test_loss_aware_beats_kmeans_and_uniform_at_equal_bits(fixed_bits_errors, bits):
    e = fixed_bits_errors
    assert e[bits, "loss_aware"] < e[bits, "kmeans"], e
    assert e[bits, "loss_aware"] < e[bits, "uniform"], e


def test_accuracy_constraint_holds_on_held_out_data(lenet300, mnist):
    model, calib = lenet300

    def val_acc(m):
        return 1 - evaluate(m, mnist.val)[1]

    r = compress(model, calib, F.cross_entropy, max_accuracy_drop=0.002, eval_fn=val_acc, progress=False)
    assert r.base_metric - val_acc(r.model) <= 0.002 + 1e-9
    assert r.weight_compression_ratio > 4
    for name, fit in r.fits.items():  # the compressed model carries exactly the fitted codebooks
        layer = dict(r.model.named_modules())[name]
        assert torch.equal(layer.indices(), fit.idx.reshape(layer.indices().shape))


def test_compressed_model_saves_and_reloads(lenet300, tmp_path):
    model, calib = lenet300
    r = compress(model, calib, F.cross_entropy, method="kmeans", bits=3, progress=False)
    path = tmp_path / "m.ws"
    n = ws.save(r, path)
    assert n == path.stat().st_size == ws.size_report(r.model).file_bytes
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(ws.load(path)(x), r.model(x))
    # half_bias (the default): the biases are rounded to float16 values, stored at 2 bytes each, and the loss the
    # constraint sees is that of the rounded model
    for layer in ws.size_report(r.model).layers:
        bias = dict(r.model.named_modules())[layer.name].bias
        assert torch.equal(bias.half().float(), bias) and layer.bias_bytes == 2 * bias.numel()
    assert not torch.equal(model.fc1.bias.half().float(), model.fc1.bias)  # the argument is left alone
    full = compress(model, calib, F.cross_entropy, method="kmeans", bits=3, progress=False, half_bias=False)
    assert torch.equal(full.model.fc1.bias, model.fc1.bias)
    assert [l.bias_bytes for l in ws.size_report(full.model).layers] == [4 * 300, 4 * 100, 4 * 10]


def test_fit_layer_is_exact_optimum_of_its_model():
    # with g = 0 the fit minimises sum h (c_idx - w)^2: no Lloyd run from any start does better
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2000, generator=gen) ** 3
    h = torch.rand(2000, generator=gen)
    fit = fit_layer(w, torch.zeros_like(w), h, 6, damping=1e-12)
    model_value = float((h * (fit.dequantized() - w) ** 2).sum())
    for init in ("linear", "quantile", "kmeans++"):
        r = ws.kmeans(w, 6, importance=h, init=init, tol=0, max_iter=100)
        assert model_value <= float(r.distortion.sum()) * (1 + 1e-4)


def test_bad_arguments(lenet300):
    model, calib = lenet300
    with pytest.raises(ValueError, match="method must be one of"):
        compress(model, calib, F.cross_entropy, method="magic")
    with pytest.raises(ValueError, match="needs eval_fn"):
        compress(model, calib, F.cross_entropy, max_accuracy_drop=0.0)
    with pytest.raises(ValueError, match="data is empty"):
        compress(model, [], F.cross_entropy)
    with pytest.raises(ValueError, match="max_loss_increase must be"):
        compress(model, calib, F.cross_entropy, max_loss_increase="lots")


def test_cli_compress_and_report(tmp_path):
    out = subprocess.run([sys.executable, "-m", "weightshare", "compress", "--model", "lenet300100", "--method",
                          "uniform", "--bits", "4", "--calib", "500", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout[out.stdout.index("{"):])
    assert rec["model"] == "lenet300100" and Path(rec["file"]).exists()
    assert rec["compression_ratio"] > 5
    rep = subprocess.run([sys.executable, "-m", "weightshare", "report", rec["file"]], capture_output=True,
                         text=True, timeout=120)
    assert rep.returncode == 0 and "total" in rep.stdout, rep.stderr


def test_cli_compress_pruned(tmp_path):
    """compress --prune at fixed bits: one pruning step (to 10 % of the weights, the schedule's first), then the
    sparsest candidate with a pinned zero entry, so ~90 % of the weights land on it and the file shrinks far below
    the unpruned 4-bit one."""
    out = subprocess.run([sys.executable, "-m", "weightshare", "compress", "--model", "lenet300100", "--method",
                          "kmeans", "--bits", "4", "--calib", "500", "--finetune", "0", "--prune", "--prune-now",
                          "--prune-max-steps", "1", "--prune-slack", "1.0", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout[out.stdout.index("{"):])
    assert rec["method"] == "kmeans+prune" and rec["pruned_density"] == 0.1 and rec["pruned_candidates"] == [0.1]
    model = ws.load(rec["file"])
    zeros = [float((m.to_dense().weight == 0).float().mean()) for m in model.modules() if hasattr(m, "to_dense")]
    assert all(z >= 0.85 for z in zeros), zeros
    # the unpruned network at 4-bit k-means gives 9.1x (entropy-coded); half zeros gave 11.9x, 10 % kept 35.8x
    assert rec["compression_ratio"] > 25


def test_cli_demo_small(tmp_path):
    out = subprocess.run([sys.executable, "-m", "weightshare", "demo", "--out", str(tmp_path), "--models",
                          "lenet300100", "--methods", "uniform", "--calib", "500", "--prune-now",
                          "--prune-max-steps", "1", "--qat-bits"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    records = json.loads((tmp_path / "summary.json").read_text())
    assert {"model", "method", "baseline_test_error", "test_error", "compression_ratio", "file"} <= set(records[0])
    assert ws.load(records[0]["file"]) is not None
    pruned = [r for r in records if r["method"] == "uniform+prune"]
    density = pruned[0]["pruned_density"] if len(pruned) == 1 else None
    assert density is not None and (abs(density - 0.1) < 0.01 or density == 1.0), records
    assert pruned[0]["baseline_test_error"] == records[0]["baseline_test_error"]  # counted from the dense model
    assert pruned[0]["baseline_val_error"] == records[0]["baseline_val_error"]
    assert ws.load(pruned[0]["file"]) is not None
    assert (tmp_path / "error_vs_ratio.png").exists()


def test_cli_help():
    for cmd in ([], ["demo"], ["compress"], ["bench"], ["report"]):
        out = subprocess.run([sys.executable, "-m", "weightshare", *cmd, "--help"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and "usage" in out.stdout


def test_codebook_finetuning_lowers_the_loss(lenet300, mnist):
    from weightshare.compress.finetune import finetune_codebooks
    from weightshare.compress.layers import compressible_layers, mean_loss, weights_swapped
    model, calib = lenet300
    layers = {l.name: l for l in compressible_layers(model)}
    r = compress(model, calib, F.cross_entropy, method="uniform", bits=3, progress=False, shared_layers=False)
    xs, ys = mnist.train.tensors
    tune = [(xs[i:i + 100], ys[i:i + 100]) for i in range(2000, 7000, 100)]

    def loss_of(fits):
        with weights_swapped(layers, {n: f.dequantized() for n, f in fits.items()}):
            return mean_loss(model, F.cross_entropy, tune)

    tuned = finetune_codebooks(model, layers, r.fits, tune, F.cross_entropy, epochs=1, lr=1e-4)
    assert loss_of(tuned) < 0.9 * loss_of(r.fits)
    for n in r.fits:  # assignments untouched, model untouched
        assert torch.equal(tuned[n].idx, r.fits[n].idx)
        assert torch.equal(layers[n].module.weight, layers[n].weight)


@pytest.mark.skipif(not any((REPO / "checkpoints" / "pruned").glob("lenet300100-d*.safetensors")),
                    reason="no committed pruned LeNet-300-100")
def test_cli_demo_committed_pruned_networks_and_qat(tmp_path):
    """The demo's default route: the committed pruned networks (no pruning in the demo) compressed by a method,
    and the qat+prune row (retrained with shared weights), whose file holds at most 2**bits values per layer."""
    out = subprocess.run([sys.executable, "-m", "weightshare", "demo", "--out", str(tmp_path), "--models",
                          "lenet300100", "--methods", "uniform", "--calib", "500", "--qat-bits", "3", "--no-bnn"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert "committed (checkpoints/pruned)" in out.stdout + out.stderr
    records = {r["method"]: r for r in json.loads((tmp_path / "summary.json").read_text())}
    assert set(records) == {"uniform", "uniform+prune", "qat+prune"}
    qat = records["qat+prune"]
    # the sparsest candidate first; when no 3-bit file keeps the validation error the last attempt is reported
    assert qat["bits"] == 3 and qat["qat_trials"][0]["density"] == min(qat["pruned_candidates"]) < 0.1
    assert qat["pruned_density"] == qat["qat_trials"][-1]["density"]
    assert qat["constraint_met"] == qat["qat_trials"][-1]["feasible"]
    model = ws.load(qat["file"])
    for m in model.modules():
        if hasattr(m, "to_dense"):
            assert m.k <= 8 and bool((m.to_dense().weight == 0).float().mean() >= 0.75)  # fc3 keeps 20 %
    assert qat["test_error"] == pytest.approx(evaluate(model, mnist_splits().test)[1])
