"""Shared helpers for the benchmark scripts: robust timing, the machine description, atomic JSON results."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

# benchmarks/results, or $WS_RESULTS_DIR (gpu_check.sh points it at the device tool's $OUT)
RESULTS = Path(os.environ.get("WS_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def parse_cli(doc: str | None, cuda: bool = False, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The benchmark scripts' command line: --help prints the script's docstring, an unknown argument is an error
    (before, `--help` ran the whole benchmark and overwrote its results), and --cuda where the script has a GPU
    form."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if cuda:
        parser.add_argument("--cuda", action="store_true", help="time the CUDA kernels (writes *_cuda.json)")
    return parser.parse_args(argv)


def time_cpu(fn: Callable[[], object], repeat: int = 15, warmup: int = 2, min_time: float = 0.0) -> float:
    """Median wall time in seconds of fn() over `repeat` runs (after warm-up)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(fns: list, repeat: int = 200, warmup: int = 5) -> list:
    """Median wall time in seconds of each fn, the calls alternating (a, b, a, b, ...): on this shared VM some
    kernels' (oneDNN's) speed drifts by 2-6x between processes and minutes, so timing the candidates in separate
    loops compares different machine states; alternating gives every candidate the same ones."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def time_rounds(fns: Sequence[Callable[[], object]], repeats: Sequence[int], rounds: int = 3) -> list[float]:
    """Median over `rounds` rounds of each fn's time_cpu median (repeats[i] calls), the fns taking turns round by
    round. Each fn still runs in a block of its own calls, so its operands stay in cache as in time_cpu (unlike
    time_interleaved, where each call follows the others'); the rounds spread the candidates over the minutes in
    which this shared VM's speed drifts (the same dense 4096x4096 GEMV measured 2.5 and 3.3 ms an hour apart)."""
    per_fn: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            per_fn[i].append(time_cpu(fn, repeat=repeats[i]))
    return [statistics.median(t) for t in per_fn]


def time_cuda(fn: Callable[[], object] | Sequence[Callable[[], object]], repeat: int = 20, warmup: int = 3,
              graph: bool = True, calls_per_replay: int = 32) -> float:
    """Median GPU seconds per call of fn, measured with CUDA events on the current stream.

    fn may be a list of callables that do the same work on distinct copies of the operands; they are called in
    rotation, so that an operand smaller than the GPU's L2 cache is not served from L2 on the next call (weights
    of a deployed model are read once per token, from HBM). graph=True (the issue's protocol: CUDA graphs) captures
    calls_per_replay calls in one CUDA graph and times its replays, so the figure is the kernels' time without
    the host's launch and dispatch overhead; graph=False times each eager call between two events, which includes
    that overhead whenever the host is slower than the GPU (small ops)."""
    fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
    calls = [fns[i % len(fns)] for i in range(max(calls_per_replay, len(fns)) if graph else len(fns))]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # graph capture needs warmed-up kernels and allocator state off the main stream
        for _ in range(warmup):
            for f in calls:
                f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in calls:
                f()
        g.replay()
        torch.cuda.synchronize()
        run, per_run = g.replay, len(calls)
    else:
        state = {"i": 0}

        def run():
            fns[state["i"] % len(fns)]()
            state["i"] += 1
        per_run = 1
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / per_run)
    return statistics.median(times)


def cuda_kernel_breakdown(fn: Callable[[], object] | Sequence[Callable[[], object]], calls: int = 16) -> dict:
    """Mean GPU microseconds per call of each kernel that fn launches (torch.profiler over eager calls, operands
    rotated as in time_cuda), slowest first, plus "span_us": first kernel start to last kernel end per call, which
    adds the gaps between a call's kernels. Says where a call's time goes (a GEMV, its table or split-K kernels);
    {"error": ...} where the profiler sees no kernels (no CUPTI)."""
    import re

    from torch.profiler import ProfilerActivity, profile
    fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
    for f in fns:
        f()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(calls):
                fns[i % len(fns)]()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    except Exception as exc:  # a diagnostic: never fail the benchmark over it
        return {"error": f"{type(exc).__name__}: {exc}"}
    if not kernels:
        return {"error": "the profiler recorded no CUDA kernels"}
    per: dict[str, float] = {}
    for e in kernels:
        name = re.sub(r"\(anonymous namespace\)::|weightshare::|cuda::|void |at::native::", "", e.name)
        name = name.split("(")[0][:100]
        per[name] = per.get(name, 0.0) + e.time_range.elapsed_us() / calls
    out = {k: round(v, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1])}
    starts = sorted(e.time_range.start for e in kernels)
    out["span_us"] = round((max(e.time_range.end for e in kernels) - starts[0]) / calls, 2)
    return out


def cold_l2_copies(nbytes: int, device: int | None = None) -> int:
    """How many copies of an nbytes operand to rotate through so that each call reads it from HBM, not L2 (the
    copies together span at least twice the L2 size)."""
    l2 = getattr(torch.cuda.get_device_properties(device or 0), "L2_cache_size", 64 << 20) or (64 << 20)
    return max(1, -(-2 * l2 // max(1, nbytes)))


def last_level_cache_bytes(default: int = 64 << 20) -> int:
    """Size of the largest CPU cache (sysfs), for benchmarks that must stream their operands from DRAM."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (d / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or default


def rotating(items: list) -> Callable[[], object]:
    """A function returning the items in turn: timing fn(rotating(copies)()) touches a different copy per call."""
    state = {"i": 0}

    def next_item():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]
    return next_item


def error_point(rows: list) -> tuple:
    """(mean ratio, mean test error %, minus, plus) of rows measured at one setting over several seeds; the error
    bar spans min..max."""
    errs = [100 * r["test_error"] for r in rows]
    mean = sum(errs) / len(errs)
    return sum(r["compression_ratio"] for r in rows) / len(rows), mean, mean - min(errs), max(errs) - mean


def plot_error_vs_ratio(panels: list, path: Path, log_error: bool = False) -> Path:
    """One panel per (title, baseline test error in [0, 1], {label: [error_point, ...]}): test error against the
    file's compression ratio, log ratio axis, the uncompressed model as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (title, baseline, curves) in zip(axes[0], panels):
        for label, pts in curves.items():
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[2] for p in pts], [p[3] for p in pts]],
                            marker="o", capsize=3, label=label)
        ax.axhline(100 * baseline, color="gray", ls="--", label="uncompressed")
        ax.set_xscale("log")
        if log_error:
            ax.set_yscale("log")
        ax.set_xlabel("compression ratio (fp32 model bytes / file bytes)")
        ax.set_ylabel("test error (%)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine() -> dict:
    from weightshare._sysinfo import cpu_isa, cpu_name
    info = {"cpu": cpu_name(), "isa": cpu_isa(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "last_level_cache_mib": last_level_cache_bytes() >> 20,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def simd_env() -> dict:
    """The SIMD caps in force (our kernels', oneDNN's, MKL's, FBGEMM's): set together (benchmarks/avx2_only.sh)
    they emulate an AVX2-only CPU."""
    keys = ("WS_CPU_SIMD", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "FBGEMM_ENABLE_INSTRUCTIONS")
    return {k: os.environ[k] for k in keys if k in os.environ}


def cpu_results_name(stem: str) -> str:
    """results/<stem>.json, or <stem>_avx2.json (etc.) when WS_CPU_SIMD caps our kernels; WS_RESULTS_TAG=<tag> adds
    _<tag> (a second machine's results beside the first's, e.g. _intel)."""
    simd = os.environ.get("WS_CPU_SIMD")
    tag = os.environ.get("WS_RESULTS_TAG")
    return stem + (f"_{simd}" if simd else "") + (f"_{tag}" if tag else "") + ".json"


def write_json(name: str, payload: dict) -> Path:
    """Write results/<name> atomically (temp file + rename)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    fd, tmp = tempfile.mkstemp(dir=RESULTS, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path
