"""Build driver: setuptools hands the native library to CMake (CMakeLists.txt is the one build definition).

Switches (environment variables):
  WS_CUDA=auto|1|0   build the CUDA kernels: auto = when torch is a CUDA build and nvcc is found (default)
  TORCH_CUDA_ARCH_LIST   CUDA architectures, default "9.0a" (H100/H200, with their sm_90a-only wgmma); "9.0" for
                         sm_90 code without it, "8.0;9.0a" etc. for more GPUs
  MAX_JOBS           parallel compile jobs (default: all cores)
  WS_BUILD_TYPE      CMake build type, default Release (Debug, RelWithDebInfo, ASan, UBSan also accepted)
Edit loop: `WS_CUDA=0 pip install --no-build-isolation -e .` rebuilds only what changed, CPU only, in build/cpu.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cuda_home():
    """The CUDA toolkit folder: $CUDA_HOME, else the folder whose bin/nvcc and include/cuda_runtime.h both exist.

    The nvcc on PATH may be a wrapper script (as on our machines), so the folder is verified, not just derived."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
        try:  # nvcc --dryrun prints the toolkit folder it really runs from ("#$ TOP=...")
            out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True)
            for line in (out.stdout + out.stderr).splitlines():
                if line.startswith("#$ TOP="):
                    candidates.append(str(Path(line.split("=", 1)[1].strip()).resolve().parent))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return str(Path(c).resolve())
    return None


def _pip_cuda_dir(torch_cuda_version):
    """site-packages/nvidia/cu13 (or cu12): where the pip CUDA torch keeps cuBLAS/nvrtc headers and libraries."""
    try:
        import nvidia  # namespace package installed with the CUDA torch wheels
    except ImportError:
        return None
    major = torch_cuda_version.split(".")[0]
    for base in nvidia.__path__:
        d = Path(base) / f"cu{major}"
        if (d / "include").is_dir():
            return d
    return None


def _tool(module, attr, name):
    """Prefer the pip-installed cmake/ninja (CMake >= 4 is required for CUDA C++20)."""
    try:
        mod = __import__(module)
        path = Path(getattr(mod, attr)) / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which(name)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch
        import torch.utils

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        want = os.environ.get("WS_CUDA", "auto").strip().lower()
        cuda_home = _cuda_home()
        have_cuda = torch.version.cuda is not None and cuda_home is not None
        if want in ("1", "on", "true", "yes"):
            if not have_cuda:
                raise RuntimeError(
                    f"WS_CUDA=1 but CUDA cannot be built: torch.version.cuda={torch.version.cuda}, nvcc toolkit={cuda_home}")
            use_cuda = True
        elif want in ("0", "off", "false", "no"):
            use_cuda = False
        else:
            use_cuda = have_cuda
        build_type = os.environ.get("WS_BUILD_TYPE", "Release")
        build_dir = ROOT / "build" / (("cuda" if use_cuda else "cpu") + ("" if build_type == "Release" else "-" + build_type.lower()))
        build_dir.mkdir(parents=True, exist_ok=True)

        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        if cmake is None:
            raise RuntimeError("cmake >= 4 is required: pip install 'cmake>=4'")
        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DWS_OUTPUT_DIR={out_dir}",
            f"-DWS_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"-DWS_CUDA={'ON' if use_cuda else 'OFF'}",
        ]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        env = dict(os.environ)
        if use_cuda:
            env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
            env["CUDACXX"] = str(Path(cuda_home) / "bin" / "nvcc")
            env["CUDA_HOME"] = cuda_home
            args += [f"-DCUDAToolkit_ROOT={cuda_home}", f"-DCMAKE_CUDA_COMPILER={env['CUDACXX']}"]
            pip_cuda = _pip_cuda_dir(torch.version.cuda)
            if pip_cuda is not None:  # cuBLAS/cuSPARSE headers that torch's CUDA headers include
                args.append(f"-DWS_PIP_CUDA_INCLUDE={pip_cuda / 'include'}")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)

        t0 = time.time()
        subprocess.check_call([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], env=env)
        subprocess.check_call([cmake, "--build", str(build_dir), "-j", jobs], env=env)
        print(f"weightshare: native build ({'CPU+CUDA ' + env['TORCH_CUDA_ARCH_LIST'] if use_cuda else 'CPU only'}) "
              f"took {time.time() - t0:.1f} s", flush=True)


setup(ext_modules=[CMakeExtension("weightshare._C")], cmdclass={"build_ext": CMakeBuild})
