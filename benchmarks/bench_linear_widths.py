"""Shared Linear at every index width: bits 1-8, one codebook per layer or one per output row, batch 1 and 64,
float and int8 activations, against dense fp32 F.linear and torch's int8 dynamic Linear on the same weight.

    python benchmarks/bench_linear_widths.py        # writes benchmarks/results/linear_widths_cpu.json
    bash benchmarks/avx2_only.sh python benchmarks/bench_linear_widths.py   # an AVX2-only CPU, emulated

Why: the main benchmark (bench_shared_linear.py) times 4-bit layers; a probe over the other widths found paths
that ran at dense speed or slower (8-bit float GEMV, 3/5-bit int8, every non-1/2/4-bit width on AVX2, codebooks
per row). This keeps them all in view. One 4096x4096 layer, weights repeated from cache; every codebook has 2**bits
entries; the indices are uniform random (the kernels' speed does not depend on their values).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import weightshare as ws  # noqa: E402
from _common import (parse_cli, cpu_results_name, machine, rotating, simd_env, time_cpu, time_rounds,  # noqa: E402
                     write_json)
from bench_shared_linear import dram_copies, int8_dynamic  # noqa: E402

SHAPE = (4096, 4096)
BATCHES = [1, 64]
ROUNDS = 3  # every row's four timings in 3 rounds, medians reported (time_rounds)


def lookup8_forms(x, packed, cb, bits, dense_w) -> dict:
    """The AVX2 GEMV's two 6-8-bit lookups (WS_CPU_LOOKUP8: gathers, scalar loads; unset, the one measured faster
    at the first call) in rounds beside dense, batch 1 float from cache."""
    out_f, in_f = dense_w.shape
    env = os.environ.pop("WS_CPU_LOOKUP8", None)

    def form(name):
        def call():
            os.environ["WS_CPU_LOOKUP8"] = name
            return ws.ops.shared_linear(x, packed, cb, bits, out_f, in_f)
        return call
    try:
        t_dense, t_g, t_s = (t * 1e3 for t in time_rounds(
            [lambda: F.linear(x, dense_w), form("gather"), form("scalar")], [15] * 3, rounds=ROUNDS))
    finally:
        os.environ.pop("WS_CPU_LOOKUP8", None)
        if env is not None:
            os.environ["WS_CPU_LOOKUP8"] = env
    print(f"bits={bits} AVX2 lookups at batch 1: gathers {t_g:.3f} ms ({t_dense / t_g:.2f}x dense), scalar loads "
          f"{t_s:.3f} ms ({t_dense / t_s:.2f}x)", flush=True)
    return {"lookup8_gather_ms": t_g, "lookup8_scalar_ms": t_s, "lookup8_dense_fp32_ms": t_dense}


def run() -> dict:
    out_f, in_f = SHAPE
    g = torch.Generator().manual_seed(0)
    out = {"machine": machine(), "simd_caps": simd_env(), "shape": list(SHAPE), "rounds": ROUNDS, "rows": []}
    xs = {M: torch.randn(M, in_f, generator=g) for M in BATCHES}
    with torch.no_grad():
        dense_w = torch.randn(out_f, in_f, generator=g) * 0.02
        qlin = int8_dynamic(dense_w)
        base = {M: {"dense_fp32_ms": time_cpu(lambda: F.linear(xs[M], dense_w)) * 1e3,
                    "torch_int8_dynamic_ms": time_cpu(lambda: qlin(xs[M])) * 1e3} for M in BATCHES}
        # int8 at batch 1 with the weights from DRAM too (one codebook per layer): each call takes the next of
        # enough copies (packed indices; torch's int8 modules) to span twice the last-level cache, as
        # bench_shared_linear's "dram" regime. From cache the VNNI baseline's 16 MiB of int8 weights stay close;
        # from DRAM the index stream's size (bits/8 of it) decides.
        x1 = xs[1]
        qlin_dram = rotating([qlin] + [int8_dynamic(dense_w) for _ in range(dram_copies(dense_w.numel()) - 1)])
        base[1]["torch_int8_dynamic_dram_ms"] = time_cpu(lambda: qlin_dram()(x1), repeat=30) * 1e3
        out["baselines"] = {str(M): v for M, v in base.items()}
        for bits in range(1, 9):
            idx = torch.randint(0, 1 << bits, SHAPE, generator=g, dtype=torch.uint8)
            packed = ws.ops.pack(idx, bits)
            for groups in (1, out_f):
                cb = torch.randn(groups, 1 << bits, generator=g) * 0.02
                for M in BATCHES:
                    x = xs[M]
                    # the baselines again beside each row, in rounds: this VM's speed drifts within a run (dense
                    # 4096x4096 batch 1 measured 2.5-3.4 ms in one hour), so a ratio takes both sides from one time
                    t_dense, t_q, t_f, t_8 = (t * 1e3 for t in time_rounds(
                        [lambda: F.linear(x, dense_w), lambda: qlin(x),
                         lambda: ws.ops.shared_linear(x, packed, cb, bits, out_f, in_f),
                         lambda: ws.ops.shared_linear(x, packed, cb, bits, out_f, in_f, None, "int8")],
                        [15] * 4, rounds=ROUNDS))
                    row = {"bits": bits, "codebooks": "per layer" if groups == 1 else "per row", "batch": M,
                           "ws_float_ms": t_f, "ws_int8_ms": t_8, "dense_fp32_ms": t_dense,
                           "torch_int8_dynamic_ms": t_q,
                           "float_speedup_vs_dense": t_dense / t_f,
                           "int8_speedup_vs_torch_int8": t_q / t_8}
                    if M == 1 and groups == 1:
                        copies = rotating([packed] + [packed.clone() for _ in range(dram_copies(packed.numel()) - 1)])
                        t_qd, t_d = (t * 1e3 for t in time_rounds(
                            [lambda: qlin_dram()(x1),
                             lambda: ws.ops.shared_linear(x, copies(), cb, bits, out_f, in_f, None, "int8")],
                            [30, 30], rounds=ROUNDS))
                        row["ws_int8_dram_ms"] = t_d
                        row["torch_int8_dynamic_dram_ms"] = t_qd
                        row["int8_dram_speedup_vs_torch_int8"] = t_qd / t_d
                        if bits >= 6 and os.environ.get("WS_CPU_SIMD", "").startswith("avx2"):
                            row.update(lookup8_forms(x, packed, cb, bits, dense_w))
                    out["rows"].append(row)
                    print(f"bits={bits} {row['codebooks']:9s} M={M:3d}: float {t_f:7.3f} ms "
                          f"({row['float_speedup_vs_dense']:5.2f}x dense) | int8 {t_8:7.3f} ms "
                          f"({row['int8_speedup_vs_torch_int8']:5.2f}x torch int8)", flush=True)
    return out


if __name__ == "__main__":
    parse_cli(__doc__)
    torch.manual_seed(0)
    print(write_json(cpu_results_name("linear_widths_cpu"), run()))
