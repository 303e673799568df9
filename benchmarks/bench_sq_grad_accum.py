"""Fisher diagonal of a Linear layer: the fused ws.ops.sq_grad_accum vs per-sample gradients with torch.func.vmap.

    python benchmarks/bench_sq_grad_accum.py        # writes benchmarks/results/sq_grad_accum_cpu.json

LeNet-5's fc1 (800 -> 500) at batch 128, and a transformer MLP layer (128 -> 512) at batch 16 x 32 tokens.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import weightshare as ws  # noqa: E402
from _common import parse_cli, machine, time_cpu, write_json  # noqa: E402

CASES = {"lenet5_fc1_b128": (128, None, 800, 500), "mlp_128x512_b16x32": (16, 32, 128, 512)}


def make(case):
    N, T, I, O = CASES[case]
    g = torch.Generator().manual_seed(0)
    shape = (N, I) if T is None else (N, T, I)
    x = torch.randn(*shape, generator=g)
    go = torch.randn(*shape[:-1], O, generator=g)
    return x, go


def vmap_fisher(x, go):
    """Per-sample weight gradients g_n^T x_n materialised by vmap, then squared and summed."""
    def grad_w(xi, gi):
        xi = xi if xi.dim() == 2 else xi[None]
        gi = gi if gi.dim() == 2 else gi[None]
        return gi.T @ xi
    return torch.func.vmap(grad_w)(x, go).square().sum(0)


def run():
    out = {"machine": machine(), "results": []}
    for case in CASES:
        x, go = make(case)
        torch.testing.assert_close(ws.ops.sq_grad_accum(x, go), vmap_fisher(x, go), rtol=1e-3, atol=1e-3)
        t_ws = time_cpu(lambda: ws.ops.sq_grad_accum(x, go), repeat=20)
        t_vmap = time_cpu(lambda: vmap_fisher(x, go), repeat=10)
        row = {"case": case, "ws_ms": t_ws * 1e3, "vmap_ms": t_vmap * 1e3, "speedup": t_vmap / t_ws}
        out["results"].append(row)
        print(f"{case:22s} sq_grad_accum {row['ws_ms']:8.2f} ms  vmap {row['vmap_ms']:8.2f} ms  ({row['speedup']:.1f}x)")
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", ["sq_grad_accum", "vmap"])
def test_fisher(benchmark, case, path):
    x, go = make(case)
    benchmark.group = case
    benchmark(ws.ops.sq_grad_accum if path == "sq_grad_accum" else vmap_fisher, x, go)


if __name__ == "__main__":
    parse_cli(__doc__)
    print(write_json("sq_grad_accum_cpu.json", run()))
