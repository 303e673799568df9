"""Shared test fixtures: the devices to run on (CUDA only when a GPU and the CUDA kernels are both present) and the
CPU SIMD paths (each test that takes `simd` runs once per path the kernels have)."""
import pytest
import torch

import weightshare as ws

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ws.cuda_built() else [])
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pytest_report_header(config):
    return (f"weightshare: native={ws.NATIVE} cuda_built={ws.cuda_built()} "
            f"cuda_available={torch.cuda.is_available()} devices={DEVICES}")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


SIMD_PATHS = ["scalar", "avx2", "avx2vnni", "avx512"]  # the WS_CPU_SIMD settings the kernels have


@pytest.fixture(params=SIMD_PATHS)
def simd(request, monkeypatch):
    """CPU SIMD path (a path the CPU lacks falls back to the best it has, which is still a valid run). avx2vnni: the
    AVX2 path with AVX-VNNI where the CPU has it (some int8 kernels), plain AVX2 where not."""
    monkeypatch.setenv("WS_CPU_SIMD", request.param)
    return request.param


@pytest.fixture(params=SIMD_PATHS + (["cuda"] if "cuda" in DEVICES else []))
def path(request, monkeypatch):
    """Every kernel path once: the CPU SIMD paths (as `simd`) and the CUDA device where there is one. Returns the
    device to run on. For the tests that hold kernels to their definition bit for bit, so that a GPU run checks the
    CUDA kernels on the same edge cases."""
    if request.param == "cuda":
        return "cuda"
    monkeypatch.setenv("WS_CPU_SIMD", request.param)
    return "cpu"


def on(device, fn, *args):
    """fn(*args) with every tensor argument moved to device; the result back on the CPU."""
    return fn(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args]).cpu()


def cuda_kernels_of(fn):
    """(fn()'s result, the names of the CUDA kernels it ran, or None where the profiler records none: no CUPTI)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return out, (names or None)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


requires_native = pytest.mark.skipif(not ws.NATIVE, reason=f"native library missing: {ws.NATIVE_ERROR}")
