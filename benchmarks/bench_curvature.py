"""Cost of the curvature primitives relative to one gradient, on LeNet-5 and a small transformer-style model.

    pytest benchmarks/bench_curvature.py --benchmark-enable     # pytest-benchmark tables (disabled by default:
                                                                # without the flag every case runs once, untimed)
    python benchmarks/bench_curvature.py [rounds]               # medians and ratios -> results/curvature_cpu.json

Each case is one call on one batch: gradient, hvp (all three methods), ggn_vp, fisher_diag. hvp's
reverse_over_forward and ggn_vp run the traced R-forward (weightshare/curvature/traced.py); its one-time trace per
model and input shape happens before the timed calls and is reported separately
("trace_ms_once_per_model_and_shape"). The ratios to the gradient are what matter for the compressor: Hutchinson
costs probes x HVP per batch, the Fisher one per-sample pass.
"""
from __future__ import annotations

import datetime
import json
import math
import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightshare import curvature as cv
from weightshare.curvature import traced

RESULTS = Path(__file__).resolve().parent / "results" / "curvature_cpu.json"
TRACE_MS: dict[str, float] = {}  # first (uncached) trace of each case's model, filled by measure()


class LeNet5(nn.Module):
    """conv 1->20 5x5, maxpool 2, conv 20->50 5x5, maxpool 2, fc 800->500, ReLU, fc 500->10 (431,080 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class TransformerBlock(nn.Module):
    """Pre-norm block: multi-head self-attention then a 4x GELU MLP, each with a residual. Attention is written
    out (not nn.MultiheadAttention) so every weight is an nn.Linear and every op has forward-mode AD."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Two TransformerBlocks over [batch, seq, d] inputs, mean-pooled into a 10-way classifier."""

    def __init__(self, d: int = 128, heads: int = 4, layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[TransformerBlock(d, heads) for _ in range(layers)])
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x).mean(1))


def make_case(name: str):
    """(model in eval mode, loss, batch, a random direction v) with fixed seeds."""
    torch.manual_seed(0)
    if name == "lenet5":
        model, x = LeNet5(), torch.randn(128, 1, 28, 28)
    elif name == "transformer":
        model, x = TinyTransformer(), torch.randn(16, 32, 128)
    else:
        raise ValueError(f"unknown case {name!r}")
    model.eval()
    y = torch.randint(0, 10, (x.shape[0],))
    v = {n: torch.randn_like(p) for n, p in cv.compressible_parameters(model).items()}
    return model, nn.CrossEntropyLoss(), (x, y), v


def operations(model: nn.Module, loss_fn, batch, v) -> dict[str, Callable[[], object]]:
    return {
        "gradient": lambda: cv.gradient(model, loss_fn, [batch]),
        "hvp_double_backward": lambda: cv.hvp(model, loss_fn, batch, v, method="double_backward"),
        "hvp_forward_over_reverse": lambda: cv.hvp(model, loss_fn, batch, v, method="forward_over_reverse"),
        "hvp_reverse_over_forward": lambda: cv.hvp(model, loss_fn, batch, v, method="reverse_over_forward"),
        "ggn_vp": lambda: cv.ggn_vp(model, loss_fn, batch, v),
        "fisher_diag": lambda: cv.fisher_diag(model, loss_fn, [batch]),
    }


CASES = ["lenet5", "transformer"]
OPERATIONS = ["gradient", "hvp_double_backward", "hvp_forward_over_reverse", "hvp_reverse_over_forward", "ggn_vp",
              "fisher_diag"]


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("case", CASES)
def test_curvature_cost(benchmark, case, operation):
    model, loss_fn, batch, v = make_case(case)
    benchmark.group = case
    benchmark(operations(model, loss_fn, batch, v)[operation])


def _machine() -> dict[str, object]:
    model_name = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            model_name = names[0]
    except OSError:
        pass
    return {"cpu": model_name, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}


def measure(rounds: int = 15, warmup: int = 2) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Median and minimum wall time (ms) per case and operation. Operations are interleaved round by round, so
    that load from other processes is spread over all of them instead of skewing one; on a shared machine the
    minimum is the better estimate of the unloaded cost."""
    medians: dict[str, dict[str, float]] = {}
    minima: dict[str, dict[str, float]] = {}
    for case in CASES:
        model, loss_fn, batch, v = make_case(case)
        start = time.perf_counter()
        traced.trace(model, batch[0])
        TRACE_MS[case] = (time.perf_counter() - start) * 1e3
        ops = operations(model, loss_fn, batch, v)
        for fn in ops.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in ops}
        for _ in range(rounds):
            for name, fn in ops.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
        medians[case] = {name: statistics.median(t) for name, t in times.items()}
        minima[case] = {name: min(t) for name, t in times.items()}
    return medians, minima


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rounds", nargs="?", type=int, default=15, help="timed rounds per operation (default 15)")
    rounds = parser.parse_args(argv).rounds
    load_before = os.getloadavg()[0]  # other processes on the machine skew every number: record how busy it was
    medians, minima = measure(rounds)

    def ratios_of(times: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        return {case: {f"{name}/gradient": t[name] / t["gradient"] for name in OPERATIONS if name != "gradient"}
                for case, t in times.items()}

    ratios = ratios_of(medians)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "rounds": rounds,
        "batches": {"lenet5": "128 x 1x28x28", "transformer": "16 x 32 tokens x d=128, 2 layers, 4 heads"},
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "median_ms": medians,
        "ratios": ratios,
        "min_ms": minima,
        "ratios_of_min": ratios_of(minima),
        "trace_ms_once_per_model_and_shape": TRACE_MS,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    for case in CASES:
        print(f"{case}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in medians[case].items()))
        print("   " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios[case].items()))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
