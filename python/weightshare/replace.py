"""Swap dense layers for shared-weight layers in place: `replace_layers(model, assignments)`.

Supported modules (subclasses included, found anywhere in the tree: nested modules, nn.Sequential, nn.ModuleList):
nn.Linear -> SharedLinear, nn.Conv1d -> SharedConv1d, nn.Conv2d -> SharedConv2d, and HuggingFace GPT-2's
`Conv1D` (recognised by class name: weight [in, out], y = x @ W + b) -> SharedLinear with the transposed weight
and assignment. Anything else is skipped, with the reason recorded in the report and one warning listing them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from torch import Tensor, nn

from weightshare.nn import SharedConv1d, SharedConv2d, SharedLayer, SharedLinear

__all__ = ["replace_layers", "ReplaceReport", "shared_layer_for"]


@dataclass
class ReplaceReport:
    """What `replace_layers` did: the names it replaced, and (name, reason) for each it skipped."""

    replaced: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} layer(s), skipped {len(self.skipped)}"]
        lines += [f"  replaced {name}" for name in self.replaced]
        lines += [f"  skipped  {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    """HF GPT-2's Conv1D: a Linear stored transposed (weight [in, out]); recognised by name so that transformers
    need not be installed."""
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2
            and (bias is None or (isinstance(bias, Tensor) and tuple(bias.shape) == (weight.shape[1],))))


def _unpack_assignment(value: Any) -> tuple[Tensor, Tensor]:
    """(codebook, idx) from a KMeansResult-like object or a 2-tuple."""
    if hasattr(value, "codebook") and hasattr(value, "idx"):
        codebook, idx = value.codebook, value.idx
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        codebook, idx = value
    else:
        raise TypeError(f"an assignment must have .codebook and .idx or be a (codebook, idx) pair, got "
                        f"{type(value).__name__}")
    if not isinstance(codebook, Tensor) or not isinstance(idx, Tensor):
        raise TypeError(f"an assignment's codebook and idx must be tensors, got {type(codebook).__name__} and "
                        f"{type(idx).__name__}")
    return codebook, idx


def shared_layer_for(module: nn.Module, codebook: Tensor, idx: Tensor, activation: str = "float") -> SharedLayer:
    """The shared layer that replaces `module` under the assignment (codebook [k] or [G, k], idx shaped like
    module.weight). Raises TypeError for an unsupported module, ValueError for an assignment that does not fit,
    NotImplementedError for a conv feature the packed kernels lack."""
    if isinstance(module, SharedLayer):
        raise TypeError("already a shared layer")
    # Exact-type checks first would miss subclasses (BinaryLinear, NonDynamicallyQuantizableLinear): isinstance.
    if isinstance(module, nn.Linear):
        return SharedLinear.from_dense(module, codebook, idx, activation=activation)
    if isinstance(module, nn.Conv2d):
        return SharedConv2d.from_dense(module, codebook, idx, activation=activation)
    if isinstance(module, nn.Conv1d):
        return SharedConv1d.from_dense(module, codebook, idx, activation=activation)
    if _is_gpt2_conv1d(module):
        if codebook.dim() == 2 and codebook.shape[0] > 1:
            # per-row groups of the [in, out] weight are input features: a SharedLinear groups output rows
            raise ValueError("per-row codebooks of a Conv1D weight [in, out] group input features, which a "
                             "SharedLinear (grouping output rows) cannot represent; use one codebook per layer")
        if tuple(idx.shape) != tuple(module.weight.shape):
            raise ValueError(f"idx has shape {tuple(idx.shape)} but the weight is {tuple(module.weight.shape)}")
        return SharedLinear.from_weight(module.weight.t(), module.bias, codebook, idx.t(), activation=activation)
    raise TypeError(f"{type(module).__name__} is not a Linear, Conv1d, Conv2d or GPT-2 Conv1D")


def _parents(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """For every module object, each (parent, attribute) that holds it: a module registered twice (an alias) is
    replaced everywhere, not just under the first name named_modules() reports."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                holders.setdefault(id(child), []).append((parent, attr))
    return holders


def _skip_reason(name: str, modules: Mapping[str, nn.Module], model: nn.Module) -> Optional[str]:
    if name == "":
        return "the root module cannot be replaced in place"
    if name not in modules:
        return "no module of that name in the model"
    parent = modules.get(name.rpartition(".")[0]) if "." in name else model
    if isinstance(parent, nn.MultiheadAttention):
        # nn.MultiheadAttention reads out_proj.weight directly instead of calling out_proj: the packed kernel
        # would be bypassed and the codebook would get no gradient
        return "a projection inside nn.MultiheadAttention (its forward reads the weight, not the layer)"
    return None


def replace_layers(model: nn.Module, assignments: Mapping[str, Any], activation: str = "float") -> ReplaceReport:
    """Replace, in place, each module named in `assignments` (names as in model.named_modules()) by a shared
    layer built from its assignment: a KMeansResult-like object (.codebook, .idx) or a (codebook, idx) pair, with
    idx shaped like the module's weight (for a GPT-2 Conv1D: its [in, out] weight, transposed here).

    Modules that cannot be compressed (unknown names, other types, shape mismatches, k > 256, unsupported conv
    options) are left alone and listed in the report's `skipped` with the reason; one warning names them all.
    Replacements keep the old module's device and train/eval mode. Returns the report."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    holders = _parents(model)
    report = ReplaceReport()
    done: dict[int, str] = {}  # id of a replaced module -> the name it was replaced under
    for name, value in assignments.items():
        codebook, idx = _unpack_assignment(value)
        reason = _skip_reason(name, modules, model)
        if reason is None and id(modules[name]) in done:
            reason = f"the same module was already replaced as {done[id(modules[name])]!r}"
        if reason is None:
            old = modules[name]
            try:
                weight = next(old.parameters(), None)
                if weight is not None:
                    codebook, idx = codebook.to(weight.device), idx.to(weight.device)
                new = shared_layer_for(old, codebook, idx, activation)
            except (TypeError, ValueError, NotImplementedError) as exc:
                reason = str(exc)
            else:
                new.train(old.training)
                for parent, attr in holders.get(id(old), []):
                    setattr(parent, attr, new)
                done[id(old)] = name
                report.replaced.append(name)
                continue
        report.skipped.append((name, reason))
    if report.skipped:
        names = ", ".join(name for name, _ in report.skipped)
        warnings.warn(f"replace_layers skipped {len(report.skipped)} module(s) it could not compress: {names} "
                      "(see the report's `skipped` for why)", UserWarning, stacklevel=2)
    return report
