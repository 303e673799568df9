"""Loads the native library (weightshare._C), whose import registers torch.ops.weightshare.*.

If it is missing or broken the package still imports: `NATIVE` is False, `NATIVE_ERROR` says why, a warning
is shown once, and ws.ops.* fall back to the pure-PyTorch reference implementations (slow but correct).
"""
import warnings

import torch

NATIVE = False
NATIVE_ERROR = None
try:
    from weightshare import _C  # noqa: F401  (import for its side effect: op registration)

    NATIVE = True
except Exception as exc:  # ImportError, or OSError from a library that does not load against this torch
    NATIVE_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "weightshare: the native library weightshare._C could not be loaded "
        f"({NATIVE_ERROR}); using the slow pure-PyTorch reference ops. "
        "Rebuild with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the native library registered `op` (e.g. "assign") for a device type ("cpu" or "cuda")."""
    if not NATIVE:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"weightshare::{op}", key)


def cuda_built() -> bool:
    """Whether the native library was built with its CUDA kernels."""
    return has_kernel("assign", "cuda")
