"""A ResNet-18 (built here with random weights, no download: torchvision's layout, 11.7 M parameters) with every
Conv2d and the classifier replaced by 4-bit shared layers, against the dense model computing the same function, at
batch 1 and 8 on 224x224 images, in one run; the per-stage times say where the shared model gains and loses.

    python benchmarks/bench_resnet.py        # writes benchmarks/results/resnet18_cpu.json
    bash benchmarks/avx2_only.sh python benchmarks/bench_resnet.py    # an AVX2-only CPU, emulated
    python benchmarks/bench_resnet.py --cuda # fp16 on the GPU against cuDNN (CUDA graphs): resnet18_cuda.json

Why: bench_shared_conv times single convolutions; a deployed CNN is a stack whose stages differ (large images and
few channels first, 7x7 images and 2.4 M-weight layers last) with BatchNorm and ReLU between them. The dense model
carries the shared weights (dequantised), so both compute the same function up to fp32 rounding.
"""
from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import weightshare as ws  # noqa: E402
from _common import parse_cli, cpu_results_name, machine, simd_env, time_interleaved, write_json  # noqa: E402

BITS = 4
BATCHES = [1, 8]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        widths, cin, stages = (64, 128, 256, 512), 64, []
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(512, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for s in self.stages:
            x = s(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build() -> nn.Module:
    torch.manual_seed(0)
    model = ResNet18()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):  # trained-looking statistics, so activations keep their scale
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def stage_fns(model: nn.Module, x: torch.Tensor) -> list:
    """One callable per stage (stem, stages 1-4, head), each on that stage's own input."""
    parts = [model.stem, *model.stages]
    inputs = [x]
    with torch.no_grad():
        for p in parts:
            inputs.append(p(inputs[-1]))
    fns = [(lambda p, a: lambda: p(a))(p, a) for p, a in zip(parts, inputs)]
    return fns + [(lambda a: lambda: model.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(a, 1), 1)))(inputs[-1])]


def build_pair() -> tuple[nn.Module, nn.Module, dict]:
    """The dense model and its shared twin (every conv and the classifier at BITS bits), computing the same
    function: the dense one carries the shared weights."""
    dense, shared = build(), build()
    layers = {name: m for name, m in shared.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assignments = {}
    for name, m in layers.items():
        r = ws.kmeans(m.weight.detach().reshape(m.weight.shape[0], -1), 1 << BITS)
        assignments[name] = (r.codebook, r.idx.reshape(m.weight.shape))
    report = ws.replace_layers(shared, assignments)
    with torch.no_grad():  # the dense reference carries the shared weights
        for name, m in dense.named_modules():
            if name in assignments:
                cb, idx = assignments[name]
                m.weight.copy_(cb[0][idx.long()])
    return dense, shared, {"replaced": len(report.replaced), "skipped": [list(s) for s in report.skipped]}


def run() -> dict:
    dense, shared, replaced = build_pair()
    sizes = {"dense_fp32_mb": sum(p.numel() * 4 for p in dense.parameters()) / 2**20,
             "shared_file_mb": ws.size_report(shared, entropy_coding=False).file_bytes / 2**20}
    out = {"machine": machine(), "simd_caps": simd_env(), "bits": BITS, **replaced, "sizes": sizes, "rows": []}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in BATCHES:
            x = torch.randn(n, 3, 224, 224, generator=gen)
            ref = dense(x)
            err = float((shared(x) - ref).norm() / ref.norm())
            repeat = 20 if n == 1 else 6
            t_dense, t_shared = time_interleaved([lambda: dense(x), lambda: shared(x)], repeat=repeat)
            stages_both = time_interleaved(stage_fns(dense, x) + stage_fns(shared, x), repeat=repeat)
            st_dense, st_shared = stages_both[:6], stages_both[6:]
            row = {"batch": n, "dense_ms": t_dense * 1e3, "shared_ms": t_shared * 1e3,
                   "speed_vs_dense": t_dense / t_shared, "rel_error": err,
                   "stages": ["stem", "stage1_56x56", "stage2_28x28", "stage3_14x14", "stage4_7x7", "head"],
                   "stage_dense_ms": [t * 1e3 for t in st_dense], "stage_shared_ms": [t * 1e3 for t in st_shared]}
            out["rows"].append(row)
            stages = " ".join(f"{s.split('_')[0]} {d * 1e3:.2f}/{w * 1e3:.2f}"
                              for s, d, w in zip(row["stages"], st_dense, st_shared))
            print(f"batch {n}: dense {row['dense_ms']:.2f} ms | shared {row['shared_ms']:.2f} ms "
                  f"({row['speed_vs_dense']:.2f}x) | rel. error {err:.1e} | stages dense/shared ms: {stages}",
                  flush=True)
    return out


def run_cuda() -> dict:
    """The issue's GPU conv target on a whole network: fp16 on the GPU, the shared model against the dense one on
    cuDNN, times from CUDA-graph replays of whole forwards (time_cuda), batch 1 and 8; where the implicit-GEMM conv
    takes channels-last calls, both models again in channels-last memory, ours with WS_CUDA_CONV=implicit."""
    from _common import time_cuda
    from bench_shared_conv import implicit_conv_taken
    implicit = implicit_conv_taken()  # then also both models channels-last, ours by the implicit-GEMM conv
    dense32, shared, replaced = build_pair()
    dense32 = dense32.cuda()
    dense, shared = copy.deepcopy(dense32).half(), shared.half().cuda()
    out = {"machine": machine(), "bits": BITS, "dtype": "float16", **replaced, "implicit_conv_taken": implicit,
           "rows": []}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for n in BATCHES:
            x = torch.randn(n, 3, 224, 224, generator=gen).half().cuda()
            ref = dense32(x.float())
            err = {name: float((m(x).float() - ref).norm() / ref.norm()) for name, m in (("dense", dense),
                                                                                       ("shared", shared))}
            t_dense, t_shared = time_cuda(lambda: dense(x)), time_cuda(lambda: shared(x))
            row = {"batch": n, "cudnn_fp16_ms": t_dense * 1e3, "shared_ms": t_shared * 1e3,
                   "speed_vs_cudnn": t_dense / t_shared, "rel_error_vs_fp32": err}
            if implicit:  # both models channels-last, ours through the implicit GEMM where it takes a layer
                # copies: Module.to converts in place, and the NCHW models are timed again at the next batch
                dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
                shared_cl = copy.deepcopy(shared).to(memory_format=torch.channels_last)
                xl = x.contiguous(memory_format=torch.channels_last)
                t_dense_cl = time_cuda(lambda: dense_cl(xl))
                os.environ["WS_CUDA_CONV"] = "implicit"  # read per call: at capture and in the check below
                try:
                    t_implicit = time_cuda(lambda: shared_cl(xl))
                    err_implicit = float((shared_cl(xl).float() - ref).norm() / ref.norm())
                finally:
                    os.environ.pop("WS_CUDA_CONV", None)
                row.update({"cudnn_channels_last_ms": t_dense_cl * 1e3, "shared_implicit_ms": t_implicit * 1e3,
                            "implicit_speed_vs_cudnn_channels_last": t_dense_cl / t_implicit,
                            "implicit_rel_error_vs_fp32": err_implicit})
            out["rows"].append(row)
            extra = (f" | channels-last: cuDNN {row['cudnn_channels_last_ms']:.3f} ms, implicit GEMM "
                     f"{row['shared_implicit_ms']:.3f} ms ({row['implicit_speed_vs_cudnn_channels_last']:.2f}x)"
                     if implicit else "")
            print(f"cuda batch {n}: dense (cuDNN fp16) {row['cudnn_fp16_ms']:.3f} ms | shared "
                  f"{row['shared_ms']:.3f} ms ({row['speed_vs_cudnn']:.2f}x) | rel. error vs fp32 {err}{extra}",
                  flush=True)
    return out


if __name__ == "__main__":
    if parse_cli(__doc__, cuda=True).cuda:
        print(write_json("resnet18_cuda.json", run_cuda()))
    else:
        print(write_json(cpu_results_name("resnet18_cpu"), run()))
