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


def _registered_kernels() -> frozenset:
    """(op, device type) pairs the native library registered, read once at import: a plain set lookup is what
    torch.compile can trace (the dispatcher query itself would break the graph)."""
    if not NATIVE:
        return frozenset()
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("weightshare::")]
    return frozenset((op, dev) for op in names for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                     if torch._C._dispatch_has_kernel_for_dispatch_key(f"weightshare::{op}", key))


_KERNELS = _registered_kernels()


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the native library registered `op` (e.g. "assign") for a device type ("cpu" or "cuda")."""
    return (op, device_type) in _KERNELS


def cuda_built() -> bool:
    """Whether the native library was built with its CUDA kernels."""
    return has_kernel("assign", "cuda")
