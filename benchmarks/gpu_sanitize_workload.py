"""Small CUDA workloads for the tools of benchmarks/gpu_check.sh that watch a process from outside.

    python benchmarks/gpu_sanitize_workload.py full    # every CUDA kernel once, small shapes (compute-sanitizer memcheck)
    python benchmarks/gpu_sanitize_workload.py small   # forward + backward of shared_linear (racecheck: slow tool)
    python benchmarks/gpu_sanitize_workload.py gemv    # an 8192x8192 4-bit layer: the batch-1 GEMVs, the fused GEMMs
                                                       # at 256 rows (ncu probe)
"""
import os
import sys

import torch

import weightshare as ws


def full() -> None:
    w = torch.randn(1000, 77, device="cuda")
    cb = torch.randn(1, 16, device="cuda")
    i = ws.ops.assign(w, cb)
    p = ws.ops.pack(i, 4)
    ws.ops.unpack(p, 4, 77)
    ws.ops.kmeans_step(w, i, 16)
    ws.ops.loss_aware_assign(w, w, w.abs(), cb)
    x = torch.randn(3, 77, device="cuda", dtype=torch.float16)
    ws.ops.shared_linear(x, p, cb, 4, 1000, 77)
    ws.ops.shared_linear(x, p, cb, 4, 1000, 77, None, "int8")
    wt = torch.randn(40, 8192, device="cuda")  # thin rows: split-K + finalize
    pt = ws.ops.pack(ws.ops.assign(wt, cb), 4)
    xt = torch.randn(11, 8192, device="cuda")
    ws.ops.shared_linear(xt[:1], pt, cb, 4, 40, 8192)
    ws.ops.shared_linear(xt, pt, cb, 4, 40, 8192, None, "int8")
    xb = torch.randn(96, 77, device="cuda", dtype=torch.float16)  # past the GEMV: the panels (decode + cuBLAS)
    ws.ops.shared_linear(xb, p, cb, 4, 1000, 77)
    os.environ["WS_CUDA_GEMV"] = "mma"  # the tensor-core GEMV: pair tables (4-bit) and per-row tables (3-bit)
    ws.ops.shared_linear(x, p, cb, 4, 1000, 77)
    cr = torch.randn(1000, 8, device="cuda")
    ws.ops.shared_linear(x[:, 1:].contiguous(), ws.ops.pack(ws.ops.assign(w[:, :76].contiguous(), cr), 3), cr, 3,
                         1000, 76)
    os.environ.pop("WS_CUDA_GEMV")
    fused()
    torch.cuda.synchronize()
    print("memcheck workload done")


def fused() -> None:
    """The fused tensor-core GEMMs (WS_CUDA_LINEAR=fused, and =wgmma where the build and GPU have sm_90a): pair
    codes (4-bit), single codes (8-bit) and per-row tables (3-bit; mma.sync only), a last block of output rows and
    of x rows that end inside it, and the split-K form (40 rows of 4096)."""
    for kernel in ("fused", "wgmma"):
        os.environ["WS_CUDA_LINEAR"] = kernel
        try:
            for bits, (out_f, in_f), m, g in ((4, (300, 256), 70, 1), (8, (300, 384), 130, 1), (4, (40, 4096), 40, 1),
                                              (3, (300, 256), 70, 300)):  # the last: per-row tables (mma.sync)
                cb = torch.randn(g, 1 << bits, device="cuda")
                p = ws.ops.pack(torch.randint(0, 1 << bits, (out_f, in_f), dtype=torch.uint8, device="cuda"), bits)
                x = torch.randn(m, in_f, device="cuda", dtype=torch.float16)
                ws.ops.shared_linear(x, p, cb, bits, out_f, in_f)
        finally:
            os.environ.pop("WS_CUDA_LINEAR")
    own_convs()


def own_convs() -> None:
    """Our CUDA conv kernels (WS_CUDA_CONV=all). The implicit GEMM: its repack, padding taps (zero-filled copies), a
    partial last unit (64 channels x 9 taps), rows past the pixels, split-K (512 channels at 7x7), a 1x1 layer
    without repack. The depthwise kernel: both layouts, multiplier 2, stride 2."""
    os.environ["WS_CUDA_CONV"] = "all"
    try:
        for bits, (o, c, k), n, hw in ((4, (64, 64, 3), 1, 9), (8, (512, 512, 3), 1, 7), (3, (96, 128, 1), 2, 7)):
            cb = torch.randn(1, 1 << bits, device="cuda")
            p = ws.ops.pack(torch.randint(0, 1 << bits, (o, c * k * k), dtype=torch.uint8, device="cuda"), bits)
            x = torch.randn(n, c, hw, hw, device="cuda", dtype=torch.float16).contiguous(
                memory_format=torch.channels_last)
            ws.ops.shared_conv2d(x, p, cb, bits, [o, c, k, k], None, 1, k // 2)
        cb = torch.randn(1, 16, device="cuda")
        p = ws.ops.pack(torch.randint(0, 16, (64, 9), dtype=torch.uint8, device="cuda"), 4)
        for x in (torch.randn(2, 32, 11, 9, device="cuda"),
                  torch.randn(2, 32, 11, 9, device="cuda").half().contiguous(memory_format=torch.channels_last)):
            ws.ops.shared_conv2d(x, p, cb, 4, [64, 1, 3, 3], None, 2, 1, 1, 32)
    finally:
        os.environ.pop("WS_CUDA_CONV")


def small() -> None:
    w = torch.randn(512, 300, device="cuda")
    cb = torch.randn(1, 16, device="cuda")
    i = ws.ops.assign(w, cb)
    p = ws.ops.pack(i, 4)
    ws.ops.kmeans_step(w, i, 16)
    for m in (1, 64):
        x = torch.randn(m, 300, device="cuda", dtype=torch.float16, requires_grad=True)
        c = cb.half().clone().requires_grad_()
        ws.ops.shared_linear(x, p, c, 4, 512, 300).sum().backward()
    fused()  # its shared-memory pipeline: x stages, code buffers, tables (and the conv kernels')
    torch.cuda.synchronize()
    print("racecheck workload done")


def gemv() -> None:
    n = 8192
    cb = (torch.randn(1, 16) * 0.02).half().cuda()
    p = ws.ops.pack(torch.randint(0, 16, (n, n), dtype=torch.uint8, device="cuda"), 4)
    x = torch.randn(1, n, device="cuda", dtype=torch.float16)
    for mode in ("default", "mma"):
        if mode == "mma":
            os.environ["WS_CUDA_GEMV"] = "mma"
        for _ in range(2):
            ws.ops.shared_linear(x, p, cb, 4, n, n)
    xb = torch.randn(256, n, device="cuda", dtype=torch.float16)
    for kernel in ("fused", "wgmma"):  # and the fused GEMMs at 256 rows (the batch-256 target)
        os.environ["WS_CUDA_LINEAR"] = kernel
        for _ in range(2):
            ws.ops.shared_linear(xb, p, cb, 4, n, n)
    torch.cuda.synchronize()
    print("gemv workload done")


if __name__ == "__main__":
    modes = {"full": full, "small": small, "gemv": gemv}
    if len(sys.argv) != 2 or sys.argv[1] not in modes:
        sys.exit(__doc__)
    modes[sys.argv[1]]()
