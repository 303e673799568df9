"""Builds the CUDA emulator library: the project's CUDA sources (csrc/cuda/*.cu, unchanged kernels and host code)
compiled by the host C++ compiler into `weightshare_emu` ops that take CPU tensors, so that every CUDA kernel runs,
thread by thread, on a machine without a GPU (emu_runtime.h says how and what is not modelled).

The sources are copied into the build folder with mechanical rewrites: `kernel<<<grid, block, smem,
stream>>>(args)` becomes `::ws_emu::launcher("kernel", __PRETTY_FUNCTION__, kernel, grid, block, smem,
stream)(args)` (the names for the launch log), `extern __shared__ T
name[];` becomes a pointer to the emulator's dynamic shared area, the CUDA registrations `TORCH_LIBRARY_IMPL
(weightshare, CUDA, m)` register for the CPU key of the `weightshare_emu` namespace (ops.cpp's schemas are
compiled again under that name), a tensor's device index reads 0 (CPU tensors stand for device memory), and
mma_ptx.h / wgmma_ptx.h are replaced by their emulations (ptx/).

    python tests/cuda_emu/build.py          # prints the library's path (built once, then cached by ninja)
    python tests/cuda_emu/build.py --asan   # the AddressSanitizer variant (cannot be loaded without LD_PRELOAD)
    python tests/cuda_emu/build.py --tsan   # the ThreadSanitizer variant (racecheck; the same)
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EMU = Path(__file__).resolve().parent
NAMESPACE = "weightshare_emu"


def _matching(text: str, i: int, open_ch: str, close_ch: str, step: int) -> int:
    """Index of the bracket matching text[i] (step +1: forwards from an opening one, -1: backwards from a closing)."""
    depth = 0
    while 0 <= i < len(text):
        if text[i] == (open_ch if step > 0 else close_ch):
            depth += 1
        elif text[i] == (close_ch if step > 0 else open_ch):
            depth -= 1
            if depth == 0:
                return i
        i += step
    raise ValueError("unbalanced brackets")


def rewrite_launches(text: str) -> str:
    """`K<<<cfg>>>(args)` -> `::ws_emu::launcher("K", __PRETTY_FUNCTION__, K, cfg)(args)`, K a name with optional
    template arguments."""
    out = []
    pos = 0
    while True:
        i = text.find("<<<", pos)
        if i < 0:
            out.append(text[pos:])
            return "".join(out)
        j = i
        while text[j - 1].isspace():
            j -= 1
        if text[j - 1] == ">":  # template arguments
            j = _matching(text, j - 1, "<", ">", -1)
        while j > 0 and (text[j - 1].isalnum() or text[j - 1] in "_:"):
            j -= 1
        kernel = text[j:i].strip()
        end_cfg = text.index(">>>", i)
        cfg = text[i + 3:end_cfg]
        k = end_cfg + 3
        while text[k].isspace():
            k += 1
        if text[k] != "(":
            raise ValueError(f"launch of {kernel} without arguments")
        close = _matching(text, k, "(", ")", +1)
        args = text[k + 1:close]
        out.append(text[pos:j])
        name = " ".join(kernel.split()).replace('"', "")
        out.append(f'::ws_emu::launcher("{name}", __PRETTY_FUNCTION__, {kernel}, {cfg})({args})')
        pos = close + 1


_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")


def rewrite(text: str) -> str:
    text = rewrite_launches(text)
    text = _EXTERN_SHARED.sub(
        lambda m: f"{m[1]}* const {m[2]} = reinterpret_cast<{m[1]}*>(::ws_emu::dynamic_shared());", text)
    # CPU tensors stand for device memory: their device index (-1) reads as device 0
    text = re.sub(r"\b([\w.>-]+?)\.get_device\(\)", r"std::max<int64_t>(0, \1.get_device())", text)
    text = re.sub(r"TORCH_LIBRARY_IMPL\(\s*weightshare\s*,\s*CUDA\s*,", f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU,", text)
    text = re.sub(r"TORCH_LIBRARY\(\s*weightshare\s*,", f"TORCH_LIBRARY({NAMESPACE},", text)
    return text


def cuda_include() -> list[str]:
    import shutil

    found = []
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda-13.0", "/usr/local/cuda"]
    if nvcc:
        # /usr/local/bin/nvcc may be a wrapper script: ask it where its toolkit is
        for line in Path(nvcc).read_text(errors="ignore").splitlines():
            m = re.search(r"(/\S+)/bin/nvcc", line)
            if m:
                homes.insert(0, m[1])
        homes.insert(0, str(Path(nvcc).resolve().parents[1]))
    for h in homes:
        if h and (Path(h) / "include" / "cuda_runtime.h").exists():
            found.append(str(Path(h) / "include"))
            break
    if not found:
        raise RuntimeError("cuda_emu needs the CUDA toolkit's headers (cuda_runtime.h, cuda_fp16.h): none found")
    return found


def sources(src_dir: Path) -> list[Path]:
    """Writes the rewritten sources into src_dir; returns the translation units."""
    src_dir.mkdir(parents=True, exist_ok=True)
    units = []
    replaced = {"mma_ptx.h", "wgmma_ptx.h"}
    for f in sorted((ROOT / "csrc" / "cuda").iterdir()):
        if f.name in replaced:
            text = (EMU / "ptx" / f.name).read_text()
        else:
            text = rewrite(f.read_text())
        name = f.name[:-3] + ".cpp" if f.suffix == ".cu" else f.name
        dst = src_dir / name
        if not dst.exists() or dst.read_text() != text:  # keep mtimes of unchanged files: ninja rebuilds only edits
            dst.write_text(text)
        if f.suffix == ".cu":
            units.append(dst)
    # the project's headers too (cuda_linear.h launches the split-K finaliser), found here before csrc/include
    (src_dir / "weightshare").mkdir(exist_ok=True)
    for f in sorted((ROOT / "csrc" / "include" / "weightshare").iterdir()):
        dst = src_dir / "weightshare" / f.name
        text = rewrite(f.read_text())
        if not dst.exists() or dst.read_text() != text:
            dst.write_text(text)
    for extra in [ROOT / "csrc" / "ops.cpp", ROOT / "csrc" / "common" / "checks.cpp", EMU / "selftest_kernels.cu"]:
        dst = src_dir / ("project_" + extra.name if extra.suffix == ".cpp" else extra.stem + ".cpp")
        text = rewrite(extra.read_text())
        if not dst.exists() or dst.read_text() != text:
            dst.write_text(text)
        units.append(dst)
    units.append(EMU / "emu_runtime.cpp")
    units.append(EMU / "emu_ops.cpp")
    return units


SANITIZERS = {"asan": "address", "tsan": "thread"}


def sanitizer_preload(variant: str) -> str:
    """LD_PRELOAD for the process that loads a sanitizer variant: the compiler's runtime (libasan / libtsan), which
    must come first, and libstdc++ (a Python process loads it only later, with torch, and the runtime's C++ exception
    interceptor then finds no __cxa_throw to forward to: the first TORCH_CHECK that throws aborts the process)."""
    import subprocess

    def lib(name: str) -> str:
        return subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True,
                              check=True).stdout.strip()

    return f"{lib(f'lib{variant}.so')} {lib('libstdc++.so.6')}"


def sanitizer_env(variant: str) -> dict[str, str]:
    """The environment of a process that loads a sanitizer variant: the preload, the runtime's options (the first
    report ends the process; torch's own libraries are not checked: ODR and leak reports of theirs are off) and one
    OpenMP thread (libgomp is not instrumented, so TSan would take the CPU ops' worker threads for racing ones)."""
    return {
        "LD_PRELOAD": sanitizer_preload(variant),
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:detect_odr_violation=0",
        "TSAN_OPTIONS": "halt_on_error=1:report_signal_unsafe=0",
        "OMP_NUM_THREADS": "1",
    }


def build(verbose: bool = False, variant: str = "") -> Path:
    """The library's path, built if needed. variant "asan": compiled with AddressSanitizer, so every out-of-bounds
    access of a kernel is reported; "tsan": with ThreadSanitizer, so every data race between the threads of a block
    is (emu_runtime.cpp says how). Load either in a process started with LD_PRELOAD=sanitizer_preload(variant)."""
    from torch.utils.cpp_extension import load

    if variant not in ("", *SANITIZERS):
        raise ValueError(f"cuda_emu: unknown variant {variant!r}")
    build_dir = ROOT / "build" / "cuda_emu"
    obj_dir = build_dir / ("obj" if not variant else f"obj_{variant}")
    name = "weightshare_cuda_emu" + (f"_{variant}" if variant else "")
    units = sources(build_dir / "src")
    obj_dir.mkdir(parents=True, exist_ok=True)
    sanitize = [f"-fsanitize={SANITIZERS[variant]}", "-fno-omit-frame-pointer"] if variant else []
    flags = [*sanitize,
        "-std=c++20", "-O1", "-ffp-contract=off", "-fno-strict-aliasing", "-Wno-attributes", "-DWS_CUDA_EMU=1",
        "-DWS_SM90A", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-include", str(EMU / "emu_prelude.h"),
    ]
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    # the compilers run without the sanitizer runtime a sanitizer variant's process was started with
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        load(name=name, sources=[str(u) for u in units], extra_cflags=flags,
             extra_include_paths=[str(EMU / "include"), str(EMU), str(build_dir / "src"),
                                  *cuda_include()],
             # the CUDA runtime calls bind to emu_runtime.cpp's, not to libcudart's, which torch has loaded already
             extra_ldflags=["-Wl,-Bsymbolic-functions", *sanitize[:1]],
             build_directory=str(obj_dir), is_python_module=False, verbose=verbose)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    return obj_dir / f"{name}.so"


if __name__ == "__main__":
    chosen = [v for v in SANITIZERS if f"--{v}" in sys.argv]
    if chosen and "LD_PRELOAD" not in os.environ:  # a sanitizer variant loads only with its runtime preloaded
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, **sanitizer_env(chosen[0])))
    print(build(verbose="-v" in sys.argv, variant=chosen[0] if chosen else ""))
