"""Small layers, where fixed per-call cost decides: LeNet-300-100's three layers one by one and the whole network at
batch 1 (inference; the int8 path against torch's int8 dynamic Linear too), and one training step of its first layer
(forward + backward at batch 64), shared against dense, in one run.

    python benchmarks/bench_small_layers.py        # writes benchmarks/results/small_layers_cpu.json

Why: the big-layer benchmarks measure the kernels' streaming speed; on a 300x784 layer the dense fp32 weight
(0.9 MB) sits in cache and a call costs a few microseconds, so the dispatcher, argument parsing, autograd layer and a
row's tail decide. Each candidate is timed as the median over rounds of a loop of calls (per-call microseconds),
the candidates alternating round by round so that all see the same machine state.
"""
from __future__ import annotations

import os
import copy
import statistics
import sys
import time

import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import weightshare as ws  # noqa: E402
from _common import parse_cli, cpu_results_name, machine, simd_env, write_json  # noqa: E402

LAYERS = [(300, 784), (100, 300), (10, 100)]  # LeNet-300-100, [out, in]
BITS = [4, 8]


def per_call_us(fns: dict, calls: int = 500, rounds: int = 15) -> dict:
    """Median microseconds per call of each function, rounds of `calls` calls alternating between them."""
    for fn in fns.values():
        for _ in range(50):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def shared_from(linear: nn.Linear, bits: int, gen: torch.Generator, activation: str = "float") -> ws.nn.SharedLinear:
    k = 1 << bits
    idx = torch.randint(0, k, linear.weight.shape, generator=gen, dtype=torch.uint8)
    codebook = torch.randn(k, generator=gen) * 0.05
    return ws.nn.SharedLinear.from_dense(linear, codebook, idx, activation=activation)


def torch_int8_of(module: nn.Module) -> nn.Module:
    """torch's int8 dynamic quantization of every Linear in module (deprecated by torch, still the baseline it ships)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)


def run() -> dict:
    gen = torch.Generator().manual_seed(0)
    out = {"machine": machine(), "simd_caps": simd_env(), "layers": [], "model": [], "training": []}
    with torch.no_grad():
        for out_f, in_f in LAYERS:
            dense = nn.Linear(in_f, out_f)
            x = torch.randn(1, in_f, generator=gen)
            for bits in BITS:
                layer = shared_from(dense, bits, gen)
                w = dense.weight.detach().clone()
                b = dense.bias.detach().clone()
                cb, packed = layer.codebook.detach(), layer.packed
                # torch's int8 Linear of the shared weight (as bench_shared_linear compares them)
                same = nn.Linear(in_f, out_f)
                with torch.no_grad():
                    same.weight.copy_(ws.ops.dequantize(packed, cb.view(1, -1), bits, (out_f, in_f)))
                    same.bias.copy_(b)
                torch_int8 = torch_int8_of(nn.Sequential(same))
                t = per_call_us({
                    "F.linear": lambda: F.linear(x, w, b),
                    "nn.Linear": lambda: dense(x),
                    "ws.ops.shared_linear": lambda: ws.ops.shared_linear(x, packed, cb, bits, out_f, in_f, b),
                    "SharedLinear": lambda: layer(x),
                    "ws.ops.shared_linear_int8": lambda: ws.ops.shared_linear(x, packed, cb, bits, out_f, in_f, b,
                                                                              "int8"),
                    "torch_int8_dynamic": lambda: torch_int8(x),
                })
                row = {"shape": [out_f, in_f], "bits": bits, "batch": 1, **{f"{k}_us": v for k, v in t.items()},
                       "module_ratio": t["nn.Linear"] / t["SharedLinear"],
                       "int8_ratio_vs_torch_int8": t["torch_int8_dynamic"] / t["ws.ops.shared_linear_int8"]}
                out["layers"].append(row)
                print(f"{out_f}x{in_f} {bits}-bit: " + ", ".join(f"{k} {v:.2f} us" for k, v in t.items()), flush=True)
        for bits in BITS:
            net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
            shared = nn.Sequential(*[shared_from(m, bits, gen) if isinstance(m, nn.Linear) else m for m in net])
            # the same layers on the int8 path, and torch's int8 Linear of the same (shared) weights
            shared_int8 = copy.deepcopy(shared)
            same = copy.deepcopy(net)
            for s_layer, i_layer, d_layer in zip(shared, shared_int8, same):
                if isinstance(s_layer, ws.nn.SharedLinear):
                    i_layer.activation = "int8"
                    with torch.no_grad():
                        d_layer.weight.copy_(s_layer.to_dense().weight)
            torch_int8 = torch_int8_of(same)
            x = torch.randn(1, 784, generator=gen)
            t = per_call_us({"dense": lambda: net(x), "shared": lambda: shared(x),
                             "shared_int8": lambda: shared_int8(x), "torch_int8": lambda: torch_int8(x)})
            out["model"].append({"model": "LeNet-300-100", "bits": bits, "batch": 1, "dense_us": t["dense"],
                                 "shared_us": t["shared"], "ratio": t["dense"] / t["shared"],
                                 "shared_int8_us": t["shared_int8"], "torch_int8_us": t["torch_int8"],
                                 "int8_ratio_vs_torch_int8": t["torch_int8"] / t["shared_int8"]})
            print(f"LeNet-300-100 {bits}-bit batch 1: dense {t['dense']:.2f} us, shared {t['shared']:.2f} us, "
                  f"shared int8 {t['shared_int8']:.2f} us, torch int8 {t['torch_int8']:.2f} us", flush=True)
    # training: forward + backward of the first layer at batch 64 (gradients to x, the codebook and the bias)
    dense = nn.Linear(784, 300)
    x = torch.randn(64, 784, generator=gen, requires_grad=True)
    for bits in BITS:
        layer = shared_from(dense, bits, gen)

        def step(module):
            module(x).square().sum().backward()

        t = per_call_us({"nn.Linear": lambda: step(dense), "SharedLinear": lambda: step(layer)}, calls=50)
        out["training"].append({"shape": [300, 784], "bits": bits, "batch": 64, "dense_us": t["nn.Linear"],
                                "shared_us": t["SharedLinear"], "ratio": t["nn.Linear"] / t["SharedLinear"]})
        print(f"train step 300x784 {bits}-bit batch 64: nn.Linear {t['nn.Linear']:.1f} us, "
              f"SharedLinear {t['SharedLinear']:.1f} us", flush=True)
    return out


if __name__ == "__main__":
    parse_cli(__doc__)
    torch.manual_seed(0)
    print(write_json(cpu_results_name("small_layers_cpu"), run()))
