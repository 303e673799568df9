"""Memory of a deployed model: the resident memory a process needs to hold a model and run it, dense fp32 against
the shared model loaded from its file into a meta-device skeleton (`ws.load(path, model)`: the dense weights are
never allocated), for the GPT-2-small stack of bench_transformer.py and the ResNet-18 of bench_resnet.py, both at 4
bits.

    python benchmarks/bench_memory.py        # writes benchmarks/results/memory_cpu.json

Each case runs in a fresh process, which reports from /proc/self/status: the resident set after imports (the
baseline), after the model is ready (dense: built and initialised; shared: loaded), the peak while loading, and the
peak over the forward passes (the peak counter is reset once the model is ready; Linux clear_refs). Figures are
megabytes above the baseline. The forward's peak holds activations and the kernels' work buffers (the blocked GEMM's
transposed x and y, the conv decode panels), which the shared model keeps bounded (a few MiB) instead of ever
materialising a dense weight.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import weightshare as ws  # noqa: E402
from _common import parse_cli, cpu_results_name, machine, simd_env, write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, module, how the child builds the architecture, the forward inputs)
MODELS = {
    "gpt2_small_stack": ("bench_transformer",
                         "nn.Sequential(*[bench.Block() for _ in range(bench.BLOCKS)])",
                         ["torch.randn(1, 1, bench.DIM)", "torch.randn(1, 128, bench.DIM)"]),
    "resnet18": ("bench_resnet", "bench.ResNet18()", ["torch.randn(1, 3, 224, 224)"]),
}

CHILD = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {here!r})

    def status():
        fields = {{}}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
        return fields

    import torch
    from torch import nn
    import weightshare as ws
    import {module} as bench
    torch.manual_seed(0)
    # warm-up, the same in both modes: a tiny model saved, loaded into a skeleton and run, so the lazy imports and
    # one-time set-up (thread pools, kernel tables) count in the baseline, not as the model's memory
    import tempfile
    with torch.no_grad(), tempfile.TemporaryDirectory() as d:
        tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 4))
        ws.replace_layers(tiny, {{n: ws.kmeans(m.weight.detach().reshape(m.weight.shape[0], -1), 4)
                                 for n, m in tiny.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}})
        ws.save(tiny, os.path.join(d, "tiny.ws"))
        with torch.device("meta"):
            skeleton = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 4))
        ws.load(os.path.join(d, "tiny.ws"), skeleton)(torch.randn(2, 3, 8, 8))
        del tiny, skeleton
    inputs = [{inputs}]
    base = status()["VmRSS"]
    with torch.no_grad():
        if {mode!r} == "dense":
            model = {build}
            for m in model.modules():  # initialised as the benchmarks do (the values do not matter here)
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        else:
            with torch.device("meta"):
                model = {build}
            model = ws.load({path!r}, model)
        model.eval()
        ready = status()
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak: what follows is the forward's
            f.write("5")
        for x in inputs:
            for _ in range(3):
                model(x)
        after = status()
    tensors = list(model.parameters()) + list(model.buffers())
    print(json.dumps({{"model_mb": ready["VmRSS"] - base, "load_peak_mb": ready["VmHWM"] - base,
                      "forward_peak_mb": after["VmHWM"] - base,
                      "tensor_mb": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
                      "meta_left": sum(t.is_meta for t in tensors)}}))
""")


def child(name: str, mode: str, path: str) -> dict:
    module, build, inputs = MODELS[name]
    script = CHILD.format(here=HERE, module=module, inputs=", ".join(inputs), mode=mode, build=build, path=path)
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def shared_file(name: str, directory: str) -> tuple[str, int]:
    """The 4-bit shared model's file (k-means codebooks of the initialised weights, as the other benchmarks)."""
    module = __import__(MODELS[name][0])
    model = module.build() if name == "gpt2_small_stack" else module.build_pair()[1]
    if name == "gpt2_small_stack":
        ws.replace_layers(model, {n: ws.kmeans(m.weight.detach(), 16) for n, m in model.named_modules()
                                  if isinstance(m, nn.Linear)})
    path = os.path.join(directory, f"{name}.ws")
    return path, ws.save(model, path)


def run() -> dict:
    out = {"machine": machine(), "simd_caps": simd_env(), "bits": 4, "rows": []}
    with tempfile.TemporaryDirectory() as directory:
        for name in MODELS:
            path, file_bytes = shared_file(name, directory)
            dense, shared = child(name, "dense", path), child(name, "shared", path)
            assert shared["meta_left"] == 0
            row = {"model": name, "file_mb": file_bytes / 2**20, "dense": dense, "shared": shared}
            out["rows"].append(row)
            print(f"{name}: file {row['file_mb']:.1f} MiB | model in memory: dense {dense['model_mb']:.1f} MiB, "
                  f"shared {shared['model_mb']:.1f} MiB (its tensors {shared['tensor_mb']:.1f}, load peak "
                  f"{shared['load_peak_mb']:.1f}) | forward peak: "
                  f"dense {dense['forward_peak_mb']:.1f} MiB, shared {shared['forward_peak_mb']:.1f} MiB", flush=True)
    return out


if __name__ == "__main__":
    parse_cli(__doc__)
    print(write_json(cpu_results_name("memory_cpu"), run()))
