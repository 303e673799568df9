"""The index arithmetic of the CUDA kernels checked on the host, so that CI, which has no GPU, tests it: each
program under tests/native/ is built with the system C++ compiler and run. lane_layout_check: the GEMVs' LaneSpan
and field_at (packing.h). fused_gemm_layout_check: one block of the fused tensor-core GEMM run through its layout
(fused_gemm_layout.h) with ldmatrix and mma.m16n8k16 emulated, against x W^T, plus its bank-conflict claims.
implicit_conv_check: the implicit-GEMM conv's repack and x-tile copies (implicit_conv.h) against a direct conv.
depthwise_conv_check: the CUDA depthwise conv's taps and bounds (depthwise_geometry.h) against a direct conv."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("program", ["lane_layout_check", "fused_gemm_layout_check", "implicit_conv_check",
                                     "depthwise_conv_check"])
def test_native_layout_check(program, tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / program
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{ROOT / 'csrc' / 'include'}",
                    str(ROOT / "tests" / "native" / f"{program}.cpp"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
