"""The remaining ops against their plain-PyTorch equivalents, on this CPU, in one run:
pack/unpack (vs the bit-twiddling reference), dequantize (vs indexing the codebook with unpacked indices),
loss_aware_assign (vs the broadcast argmin of the objective), kmeans_step (vs index_add of the three sums),
shared_linear_backward at batch 64 (vs dequantize + two dense matmuls + index_add into the codebook).

    python benchmarks/bench_ops.py                 # writes benchmarks/results/ops_cpu.json
    pytest benchmarks/bench_ops.py --benchmark-enable
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import weightshare as ws  # noqa: E402
from weightshare import reference  # noqa: E402
from _common import parse_cli, machine, time_cpu, write_json  # noqa: E402

ROWS, COLS, BITS, K = 4096, 4096, 4, 16


def inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(ROWS, COLS, generator=g) * 0.02
    idx = torch.randint(0, K, (ROWS, COLS), generator=g, dtype=torch.uint8)
    cb = torch.sort(torch.randn(1, K, generator=g) * 0.02).values
    return w, idx, ws.ops.pack(idx, BITS), cb, torch.rand(ROWS, COLS, generator=g), torch.randn(ROWS, COLS) * 1e-4


def cases():
    w, idx, packed, cb, h, grad = inputs()
    small = slice(0, 256)
    x, gout = torch.randn(64, COLS), torch.randn(64, ROWS)  # the broadcast baselines materialise [n, K]: time a slice and scale
    return {
        "pack": (lambda: ws.ops.pack(idx, BITS), lambda: reference.pack(idx[small], BITS), ROWS / 256),
        "unpack": (lambda: ws.ops.unpack(packed, BITS, COLS), lambda: reference.unpack(packed[small], BITS, COLS),
                   ROWS / 256),
        "dequantize": (lambda: ws.ops.dequantize(packed, cb, BITS, (ROWS, COLS)),
                       lambda: cb[0][ws.ops.unpack(packed, BITS, COLS).long()], 1.0),
        "loss_aware_assign": (lambda: ws.ops.loss_aware_assign(w, grad, h, cb),
                              lambda: reference.loss_aware_assign(w[small].contiguous(), grad[small].contiguous(),
                                                                  h[small].contiguous(), cb), ROWS / 256),
        "shared_linear_backward": (
            lambda: torch.ops.weightshare.shared_linear_backward(gout, x, packed, cb, BITS, ROWS, COLS, True, True),
            lambda: reference.shared_linear_backward(gout, x, packed, cb, BITS, ROWS, COLS, True, True), 1.0),
        "kmeans_step": (lambda: ws.ops.kmeans_step(w, idx, K, h),
                        lambda: reference.kmeans_step(w[small].contiguous(), idx[small].contiguous(), K,
                                                      h[small].contiguous()), ROWS / 256),
    }


def run():
    out = {"machine": machine(), "shape": [ROWS, COLS], "bits": BITS, "k": K, "results": []}
    for name, (ours, baseline, scale) in cases().items():
        t_ours = time_cpu(ours, repeat=15)
        t_base = time_cpu(baseline, repeat=3) * scale
        row = {"op": name, "ws_ms": t_ours * 1e3, "pytorch_ms": t_base * 1e3, "speedup": t_base / t_ours}
        out["results"].append(row)
        print(f"{name:18s} ws {row['ws_ms']:8.2f} ms   plain PyTorch {row['pytorch_ms']:9.2f} ms   "
              f"{row['speedup']:7.1f}x", flush=True)
    return out


@pytest.mark.parametrize("name", ["pack", "unpack", "dequantize", "loss_aware_assign", "kmeans_step",
                                  "shared_linear_backward"])
@pytest.mark.parametrize("path", ["ws", "pytorch"])
def test_op(benchmark, name, path):
    ours, baseline, _ = cases()[name]
    benchmark.group = name
    benchmark(ours if path == "ws" else baseline)


if __name__ == "__main__":
    parse_cli(__doc__)
    print(write_json("ops_cpu.json", run()))
