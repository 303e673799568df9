"""The compiled CUDA kernels keep the machine-code properties they were built for, read from their SASS by
benchmarks/sass_report.py. No GPU needed: wherever the library was built with its CUDA kernels (CI builds them) and
cuobjdump is found (the toolkit's, or triton's copy), these run; elsewhere they skip.

What a timing would show only on a lent GPU, held here on every build: the wgmma GEMM keeps its tensor pipe fed
(ptxas silently serialises wgmma when a register use reaches one in flight: C7515, once hidden by a filtered log),
the fused GEMMs and the implicit-GEMM conv stream x by cp.async into ldmatrix and run tensor-core ops, no kernel
spills more than it did (new spills in a main loop fail), and no main loop grows past its instruction budget: the
baseline benchmarks/results/sass_sm90a.json, which `python benchmarks/sass_report.py` rewrites after a deliberate
kernel change (commit it with the change, and say why a loop grew).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import weightshare as ws

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import sass_report  # noqa: E402

BASELINE = ROOT / "benchmarks" / "results" / "sass_sm90a.json"
GROWTH = 1.10  # a main loop may grow by this factor (plus a few instructions) before the budget test fails
REFRESH = "refresh the baseline with `python benchmarks/sass_report.py` and commit it with the kernel change"

pytestmark = [
    pytest.mark.skipif(not ws.cuda_built(), reason="the library was built without its CUDA kernels"),
    pytest.mark.skipif(sass_report.find_cuobjdump() is None, reason="no cuobjdump (CUDA toolkit or triton)"),
]


@pytest.fixture(scope="module")
def kernels() -> dict:
    """(arch, kernel) -> its record, for the library this process loaded (~30 s: cuobjdump prints ~400 MB). A
    cuobjdump that cannot read the library (older than the compiler that wrote it) skips, saying so."""
    try:
        records = sass_report.report(sass_report.library_path())
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"{exc.cmd[0]} could not read the library: {(exc.stderr or '').strip()[:200]}")
    return {(r["arch"], r["kernel"]): r for r in records}


@pytest.fixture(scope="module")
def baseline() -> dict:
    return {(r["arch"], r["kernel"]): r for r in json.loads(BASELINE.read_text())}


def family(kernels: dict, name: str, arch: str | None = None) -> list[dict]:
    return [r for (a, k), r in sorted(kernels.items()) if k.startswith(name + "<") and arch in (None, a)]


def loop(r: dict, cls: str) -> int:
    return (r["main_loop"] or {}).get(cls, 0)


def test_wgmma_gemm_keeps_its_tensor_pipe_fed(kernels):
    """Every wgmma GEMM's main loop issues wgmma and waits with one group left in flight (wait_group 1); the
    in-flight form (PIPE, the last template argument true) never drains the pipe inside the loop (no wait_group 0),
    the draining form once per unit. A serialised pipeline (C7515) would wait for 0 after every wgmma."""
    gemms = family(kernels, "gemm_wgmma_kernel", "sm_90a")  # other architectures compile it out
    if not gemms:
        pytest.skip("no wgmma kernels in this build (not built for sm_90a)")
    for r in gemms:
        assert loop(r, "wgmma") >= 8 and loop(r, "wgmma_wait1") >= 1, r["kernel"]
        in_flight = r["kernel"].endswith("true>")
        assert loop(r, "wgmma_wait0") == (0 if in_flight else 1), r["kernel"]


@pytest.mark.parametrize("name", ["gemm_mma_kernel", "conv_mma_kernel"])
def test_fused_tensor_core_kernels_stream_x_by_cp_async_into_ldmatrix(kernels, name):
    rs = family(kernels, name)
    assert rs, f"no {name} in the library"
    for r in rs:
        assert loop(r, "mma") >= 16 and loop(r, "ldgsts") >= 1 and loop(r, "ldsm") >= 1, r["kernel"]


def test_tensor_core_gemv_runs_mma_in_its_main_loop(kernels):
    rs = family(kernels, "gemv_mma_kernel")
    assert rs
    for r in rs:
        assert loop(r, "mma") >= 8, r["kernel"]


def test_baseline_lists_every_kernel_of_its_architectures(kernels, baseline):
    archs = {a for a, _ in baseline}
    built = {key for key in kernels if key[0] in archs}
    if not built:
        pytest.skip(f"built for {sorted({a for a, _ in kernels})}, the baseline holds {sorted(archs)}")
    new, gone = sorted(built - set(baseline)), sorted(set(baseline) - built)
    assert not new and not gone, f"kernels new to the baseline {new[:5]}, gone from the build {gone[:5]}: {REFRESH}"


def test_no_kernel_spills_more_than_its_baseline(kernels, baseline):
    """Stack frames and local-memory instructions in main loops (register spills) no larger than recorded; a kernel
    not in the baseline has none. Recorded today: the fp32 codebook-gradient tiles (training only), the 2-bit
    8-tile fused GEMM and the 4- and 6-bit tensor-core GEMV with 8-wide x (8-byte frames, one or two local
    instructions per main loop)."""
    worse = []
    for key, r in kernels.items():
        base = baseline.get(key, {"stack": 0, "main_loop": {}})
        if r.get("stack", 0) > base.get("stack", 0) or loop(r, "local") > (base["main_loop"] or {}).get("local", 0):
            worse.append(f"{key[1]}: stack {base.get('stack', 0)} -> {r.get('stack')}, "
                         f"main-loop local ops {(base['main_loop'] or {}).get('local', 0)} -> {loop(r, 'local')}")
    assert not worse, "\n".join(worse[:20])


def test_main_loops_stay_within_their_instruction_budget(kernels, baseline):
    grown = []
    for key, r in kernels.items():
        base = (baseline.get(key) or {}).get("main_loop")
        if base and r["main_loop"] and r["main_loop"]["total"] > GROWTH * base["total"] + 8:
            grown.append(f"{key[1]}: {base['total']} -> {r['main_loop']['total']} instructions")
    assert not grown, "main loops past their budget (" + REFRESH + "):\n" + "\n".join(grown[:20])
