"""The index arithmetic of the CUDA GEMVs (LaneSpan and field_at in packing.h) checked on the host, so that CI,
which has no GPU, tests it: tests/native/lane_layout_check.cpp is built with the system C++ compiler and run."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_lane_layout_matches_the_packing(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "lane_layout_check"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{ROOT / 'csrc' / 'include'}",
                    str(ROOT / "tests" / "native" / "lane_layout_check.cpp"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
