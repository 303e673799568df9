"""What the GPU defaults should be, from a gpu_check.sh run's JSON: the first GPU run after sessions 19-20 must set
kFusedDefaultFirstM (csrc/cuda/fused_gemm_staging.h), kImplicitConvDefault / kDepthwiseConvDefault
(csrc/cuda/shared_conv_cuda.h) and kGemvBytesDefault (csrc/cuda/shared_linear.cu), which keep the fused GEMMs, our
conv kernels and the SIMT GEMV's byte tables opt-in until measured.

    python benchmarks/gpu_defaults.py [benchmarks/results/gpu/<date>-H200]    (default: the newest such folder)

Rules (each printed with its evidence):
* shared_linear: per batch size, the fastest path over every layer and bit width measured (the geometric mean of
  its time against the default's). The fused GEMMs become the default from the smallest batch at which one of them
  is fastest at that batch and at every larger one; the printed line is the constant to set (INT64_MAX: never).
* the SIMT GEMV's byte tables: the default only if faster than the plain form on every row that timed both.
* conv: a kernel becomes the default only if it beats what runs without it (decode + cuDNN, the "ws" column) on
  every layer and batch it took; one loss keeps it opt-in (a default must not slow down any layer measured).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "gpu"
LINEAR_PATHS = ("simt", "mma", "panels", "tiles", "fused", "wgmma")


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def linear_advice(rows: list[dict]) -> tuple[str, list[str]]:
    """(the kFusedDefaultFirstM line, the evidence lines): per batch, each path's geometric-mean speed against the
    default path of the run, over the layers and widths where every compared path ran."""
    lines, fastest = [], {}
    for m in sorted({r["batch"] for r in rows}):
        at_m = [r for r in rows if r["batch"] == m]
        speed = {}
        for p in LINEAR_PATHS:
            if all(f"ws_{p}_ms" in r for r in at_m):
                speed[p] = geomean([r["ws_ms"] / r[f"ws_{p}_ms"] for r in at_m])
        vs_cublas = geomean([r["speedup_vs_cublas"] for r in at_m])
        best = max(speed, key=speed.get) if speed else "default"
        fastest[m] = best if speed and speed[best] > 1.0 else "default"
        lines.append(f"  batch {m:4d}: default {vs_cublas:.2f}x cuBLAS; paths vs default: "
                     + ", ".join(f"{p} {s:.2f}x" for p, s in speed.items()) + f" -> {fastest[m]}")
    first = None
    for m in sorted(fastest, reverse=True):  # the smallest batch from which a fused GEMM wins at every larger one
        if fastest[m] not in ("fused", "wgmma"):
            break
        first = m
    value = "INT64_MAX" if first is None else str(first)
    return f"constexpr int64_t kFusedDefaultFirstM = {value};", lines


def gemv_bytes_advice(rows: list[dict]) -> tuple[str, list[str]]:
    """(the kGemvBytesDefault line, the evidence lines): the SIMT GEMV's byte-table form on only if it beat the plain
    form on every row where both ran."""
    taken = [r for r in rows if "ws_simt_bytes_ms" in r and "ws_simt_ms" in r]
    if not taken:
        return "kGemvBytesDefault stays false (no row timed both forms)", []
    lines = [f"  {r['shape'][0]}x{r['shape'][1]} {r['bits']}-bit M={r['batch']}: bytes "
             f"{r['ws_simt_ms'] / r['ws_simt_bytes_ms']:.2f}x the plain SIMT GEMV" for r in taken]
    on = all(r["ws_simt_bytes_ms"] < r["ws_simt_ms"] for r in taken)
    return f"constexpr bool kGemvBytesDefault = {'true' if on else 'false'};", lines


def conv_advice(rows: list[dict], column: str, constant: str) -> tuple[str, list[str]]:
    """(the constant's line, the evidence lines): on only if the kernel beat decode + cuDNN on every row it took."""
    taken = [r for r in rows if column in r]
    if not taken:
        return f"{constant} stays false (no row took the kernel)", []
    lines = [f"  {r['conv']} N={r['batch']}: {r['ws_ms'] / r[column]:.2f}x decode + cuDNN" for r in taken]
    on = all(r[column] < r["ws_ms"] for r in taken)
    return f"constexpr bool {constant} = {'true' if on else 'false'};", lines


def newest() -> Path:
    runs = sorted(p for p in RESULTS.iterdir() if p.is_dir() and (p / "shared_linear_cuda.json").exists())
    if not runs:
        raise SystemExit(f"no GPU run with shared_linear_cuda.json under {RESULTS}")
    return runs[-1]


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    folder = Path(argv[0]) if argv else newest()
    print(f"GPU run: {folder}")
    linear = json.loads((folder / "shared_linear_cuda.json").read_text())["results"]
    line, evidence = linear_advice(linear)
    print("shared_linear (fused_gemm_staging.h):", line, *evidence, sep="\n")
    line, evidence = gemv_bytes_advice(linear)
    print("SIMT GEMV byte tables (shared_linear.cu):", line, *evidence, sep="\n")
    conv_file = folder / "shared_conv_cuda.json"
    if conv_file.exists():
        conv = json.loads(conv_file.read_text())["results"]
        for column, constant in (("ws_implicit_ms", "kImplicitConvDefault"),
                                 ("ws_depthwise_ms", "kDepthwiseConvDefault")):
            line, evidence = conv_advice(conv, column, constant)
            print(f"conv (shared_conv_cuda.h): {line}", *evidence, sep="\n")


if __name__ == "__main__":
    main(sys.argv[1:])
