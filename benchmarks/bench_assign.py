"""Codebook assignment speed on this CPU (and on a GPU when present).

    python benchmarks/bench_assign.py                 # writes benchmarks/results/assign_cpu.json (+ _cuda.json)
    pytest benchmarks/bench_assign.py --benchmark-enable   # the same comparisons under pytest-benchmark

CPU: N = 2**24 fp32 weights, k = 16 and 256, ws.ops.assign against torch.bucketize (midpoints, out_int32=True),
the naive (w[:, None] - c).abs().argmin(1) (timed on a 2**20 slice and scaled), and a plain copy of the weights
for the memory bandwidth of the same run. GPU: N = 2**30 bf16 against a device copy of the same bytes.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import weightshare as ws  # noqa: E402
from _common import parse_cli, machine, time_cpu, time_cuda, write_json  # noqa: E402

N_CPU = 1 << 24
N_GPU = 1 << 30
SLICE = 1 << 20


def _inputs(n, k, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, generator=g) * 0.05).to(dtype).to(device)
    c = torch.sort(torch.randn(k, generator=g) * 0.05).values
    mid = ((c[1:] + c[:-1]) / 2).contiguous().to(device)
    return w, c[None].to(device), mid


SIMD_PATHS = ("avx512", "avx2", "scalar")  # a path the CPU lacks runs its best one (see cpu_features.h)


def cpu_results() -> dict:
    out = {"machine": machine(), "n": N_CPU, "dtype": "float32", "results": []}
    w, _, _ = _inputs(N_CPU, 2)
    dst = torch.empty_like(w)
    copy_s = time_cpu(lambda: dst.copy_(w), repeat=30)
    copy_gbs = 2 * w.numel() * 4 / copy_s / 1e9  # read + write
    out["copy_gbps"] = copy_gbs
    for k in (16, 256):
        w, cb, mid = _inputs(N_CPU, k)
        t_bucket = time_cpu(lambda: torch.bucketize(w, mid, out_int32=True), repeat=5, graph=False)
        ws_slice = w[:SLICE]
        t_naive = time_cpu(lambda: (ws_slice[:, None] - cb[0]).abs().argmin(1), repeat=3) * (N_CPU / SLICE)
        row = {"k": k, "bucketize_ms": t_bucket * 1e3, "naive_argmin_ms_scaled": t_naive * 1e3, "paths": {}}
        for path in SIMD_PATHS:
            os.environ["WS_CPU_SIMD"] = path
            try:
                assert torch.equal(ws.ops.assign(w[:65536].contiguous(), cb),
                                   (torch.bucketize(w[:65536], mid)).to(torch.uint8)), "disagrees with bucketize"
                t = time_cpu(lambda: ws.ops.assign(w, cb), repeat=30)
            finally:
                os.environ.pop("WS_CPU_SIMD", None)
            gbs = (w.numel() * 4 + w.numel()) / t / 1e9
            row["paths"][path] = {"ms": t * 1e3, "gbps": gbs, "fraction_of_copy_gbps": gbs / copy_gbs,
                                  "speedup_vs_bucketize": t_bucket / t, "speedup_vs_naive": t_naive / t}
        out["results"].append(row)
    return out


def cuda_results() -> dict:
    out = {"machine": machine(), "n": N_GPU, "dtype": "bfloat16", "results": []}
    w, _, _ = _inputs(N_GPU, 2, torch.bfloat16, "cuda")
    dst = torch.empty_like(w)
    copy_s = time_cuda(lambda: dst.copy_(w), graph=False)  # big ops: host overhead is noise
    copy_gbs = 2 * w.numel() * 2 / copy_s / 1e9
    out["copy_gbps"] = copy_gbs
    del dst
    for k in (16, 256):
        _, cb, mid = _inputs(16, k, torch.bfloat16, "cuda")
        t = time_cuda(lambda: ws.ops.assign(w, cb), graph=False)
        t_bucket = time_cuda(lambda: torch.bucketize(w, mid.to(torch.bfloat16), out_int32=True), repeat=5, graph=False)
        gbs = (w.numel() * 2 + w.numel()) / t / 1e9
        out["results"].append({"k": k, "ms": t * 1e3, "gbps": gbs, "fraction_of_copy_gbps": gbs / copy_gbs,
                               "bucketize_ms": t_bucket * 1e3, "speedup_vs_bucketize": t_bucket / t})
    return out


# ------------------------------------------------------------------------------------------ pytest-benchmark
@pytest.fixture(scope="module", params=[16, 256])
def data(request):
    return _inputs(N_CPU, request.param)


def test_ws_assign(benchmark, data):
    w, cb, _ = data
    benchmark(ws.ops.assign, w, cb)


def test_bucketize(benchmark, data):
    w, _, mid = data
    benchmark(torch.bucketize, w, mid, out_int32=True)


def test_naive_argmin_slice(benchmark, data):
    w, cb, _ = data
    ws_slice = w[:SLICE]
    benchmark(lambda: (ws_slice[:, None] - cb[0]).abs().argmin(1))


def test_copy(benchmark, data):
    w, _, _ = data
    dst = torch.empty_like(w)
    benchmark(dst.copy_, w)


if __name__ == "__main__":
    if parse_cli(__doc__, cuda=True).cuda:
        res = cuda_results()
        print(write_json("assign_cuda.json", res))
        for row in res["results"]:
            print(f"cuda k={row['k']} {row['ms']:.3f} ms {row['gbps']:.0f} GB/s "
                  f"({100 * row['fraction_of_copy_gbps']:.0f}% of copy {res['copy_gbps']:.0f} GB/s)")
        sys.exit(0)
    res = cpu_results()
    print(write_json("assign_cpu.json", res))
    for row in res["results"]:
        for path, r in row["paths"].items():
            print(f"k={row['k']:3d} {path:7s} {r['ms']:7.2f} ms  {r['gbps']:5.1f} GB/s "
                  f"({100 * r['fraction_of_copy_gbps']:.0f}% of copy {res['copy_gbps']:.1f} GB/s)  "
                  f"{r['speedup_vs_bucketize']:5.1f}x bucketize ({row['bucketize_ms']:.1f} ms)  "
                  f"{r['speedup_vs_naive']:6.1f}x naive")
