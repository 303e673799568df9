"""The native library: ops registered per device, and the package still working (reference path) without it."""
import subprocess
import sys
import textwrap

import pytest
import torch

import weightshare as ws

OPS = ["pack", "unpack", "assign", "kmeans_step", "loss_aware_assign", "kmeans1d_optimal"]
CUDA_OPS = [op for op in OPS if op != "kmeans1d_optimal"]  # the DP is a sequential CPU algorithm


def test_native_loaded():
    assert ws.NATIVE, ws.NATIVE_ERROR


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"weightshare::{op}", "CPU")


@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_kernels_registered_when_built(op):
    if not ws.cuda_built():
        pytest.skip("built without CUDA (WS_CUDA=0 or no CUDA toolchain)")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"weightshare::{op}", "CUDA")


def test_package_works_without_native_library():
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["weightshare._C"] = None          # make `from weightshare import _C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import weightshare as ws
        assert not ws.NATIVE and "could not be loaded" in str(caught[0].message), caught
        import torch
        w = torch.randn(50, 20)
        idx = ws.ops.assign(w, torch.linspace(-1, 1, 4))
        assert torch.equal(ws.ops.unpack(ws.ops.pack(idx, 2), 2, 20), idx)
        r = ws.kmeans(w, 4)
        assert torch.equal(r.idx, ws.ops.assign(w, r.codebook))
        print("reference path ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "reference path ok" in out.stdout
