"""Accuracy of shared_linear's int8 path against torch's int8 dynamic quantized Linear, by kind of input.

    python benchmarks/bench_int8_accuracy.py        # writes benchmarks/results/int8_accuracy.json

The issue bounds the int8 path's output error (relative Frobenius norm against fp32 F.linear with the dequantised
weight) at 1.25x that of torch's int8 dynamic Linear on the same weight. bench_shared_linear.py measures it with
zero-mean activations; real layers mostly see one-signed ones (after ReLU or GELU), where every weight that shares a
codebook entry shares its int8 rounding residual, so the residuals add up coherently instead of like noise. This
script draws 8 layers per case (4096x4096, Gaussian weights with a small random mean, a ws.kmeans codebook of
2**bits entries, indices by nearest entry; 4 rows of x) and reports the ratio of the two errors per draw: its
median and its worst. No timings: nothing here depends on the machine's speed.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import weightshare as ws  # noqa: E402
from _common import machine, parse_cli, write_json  # noqa: E402
from bench_shared_linear import int8_dynamic  # noqa: E402

OUT_F = IN_F = 4096
DRAWS = 8
INPUTS = {"gaussian": lambda t: t, "relu": torch.relu, "gelu": F.gelu}


def layer(bits: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT_F, IN_F, generator=g) * 0.02 + 0.004 * (torch.rand(1, generator=g).item() - 0.5)
    r = ws.kmeans(w, 1 << bits)
    packed = ws.ops.pack(r.idx, bits)
    return packed, r.codebook, ws.ops.dequantize(packed, r.codebook, bits, (OUT_F, IN_F)), g


def run() -> dict:
    out = {"machine": machine(), "shape": [OUT_F, IN_F], "draws": DRAWS, "results": []}
    for bits in (2, 3, 4, 8):
        ratios = {name: [] for name in INPUTS}
        errors = {name: [] for name in INPUTS}
        for seed in range(DRAWS):
            packed, cb, dense, g = layer(bits, seed)
            q = int8_dynamic(dense)
            base = torch.randn(4, IN_F, generator=g)
            for name, act in INPUTS.items():
                x = act(base)
                exact = x.double() @ dense.double().T
                ours = ws.ops.shared_linear(x, packed, cb, bits, OUT_F, IN_F, None, "int8").double()
                e_ws = float((ours - exact).norm() / exact.norm())
                e_torch = float((q(x).double() - exact).norm() / exact.norm())
                ratios[name].append(e_ws / e_torch)
                errors[name].append((e_ws, e_torch))
        for name in INPUTS:
            r = sorted(ratios[name])
            row = {"bits": bits, "input": name, "ratios": ratios[name], "errors": errors[name],
                   "median_ratio": (r[DRAWS // 2 - 1] + r[DRAWS // 2]) / 2, "worst_ratio": r[-1]}
            out["results"].append(row)
            print(f"{bits} bits, {name:8s} x: ws/torch error median {row['median_ratio']:.2f}x, worst "
                  f"{row['worst_ratio']:.2f}x", flush=True)
    return out


if __name__ == "__main__":
    parse_cli(__doc__)
    print(write_json("int8_accuracy.json", run()))
