"""Compressed MNIST networks with int8 activations: test error and logits error against their float forward, next
to torch's int8 dynamic quantization of the same (dequantised) weights.

    python benchmarks/bench_int8_models.py out/demo/*.ws     # writes benchmarks/results/int8_models.json

Each file is a model saved by `ws.save` (the demo writes them under its --out directory). Every SharedLinear runs
with activation="int8"; shared convolutions stay float (they have no int8 path), and torch's quantize_dynamic
likewise converts only the Linear layers, so both sides quantize the same layers. Logits error: relative
Frobenius norm against the float forward over the 10,000 test images.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
import weightshare as ws  # noqa: E402
from _common import machine, write_json  # noqa: E402
from weightshare.data import mnist_splits  # noqa: E402


def logits(model, xs):
    with torch.no_grad():
        return torch.cat([model(xs[i:i + 1000]) for i in range(0, len(xs), 1000)])


def set_activation(model, activation):
    for m in model.modules():
        if isinstance(m, ws.nn.SharedLinear):
            m.activation = activation


def dense_int8(model):
    dense = copy.deepcopy(model)
    for parent in list(dense.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ws.nn.SharedLinear):
                setattr(parent, name, child.to_dense())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(dense, {torch.nn.Linear}, dtype=torch.qint8)


def run(paths) -> dict:
    xs, ys = mnist_splits().test.tensors
    out = {"machine": machine(), "results": []}
    for path in paths:
        model = ws.load(path).eval()
        set_activation(model, "float")
        f = logits(model, xs)
        set_activation(model, "int8")
        i8 = logits(model, xs)
        set_activation(model, "float")
        t = logits(dense_int8(model), xs)

        def err(y):
            return float((y - f).norm() / f.norm())

        def test_error(y):
            return float((y.argmax(1) != ys).float().mean()) * 100

        row = {"file": os.path.basename(path), "test_error_float": test_error(f), "test_error_int8": test_error(i8),
               "test_error_torch_int8": test_error(t), "logits_err_int8": err(i8), "logits_err_torch_int8": err(t)}
        out["results"].append(row)
        print(f"{row['file']}: test error float {row['test_error_float']:.2f}% | int8 {row['test_error_int8']:.2f}% "
              f"(logits {row['logits_err_int8']:.2e}) | torch int8 {row['test_error_torch_int8']:.2f}% (logits "
              f"{row['logits_err_torch_int8']:.2e})", flush=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="files saved by ws.save")
    print(write_json("int8_models.json", run(ap.parse_args().models)))
