"""Which parameters the curvature routines differentiate, and checks on the arguments every routine shares.

Only the weights of nn.Linear / nn.Conv1d / nn.Conv2d (and subclasses) are compressed: biases and
normalisation parameters are few, sensitive, and kept in full precision, so their curvature is never needed.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional, Union

from torch import Tensor, nn

COMPRESSIBLE_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)

# What `params=` may be: a name -> parameter mapping (as compressible_parameters returns) or parameter names.
ParamsArg = Optional[Union[Mapping[str, Tensor], Iterable[str]]]
Batch = tuple[Tensor, Any]


def compressible_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of every nn.Linear, nn.Conv1d and nn.Conv2d in `model` (subclasses included), by qualified name.

    Order is module registration order (`model.named_modules()`), so it is the same on every call and every
    process. A weight shared by several layers appears once, under its first name; uninitialised lazy weights
    are skipped."""
    _check_model(model, "compressible_parameters")
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        if not isinstance(module, COMPRESSIBLE_MODULE_TYPES):
            continue
        # _parameters, not getattr: a parametrized weight is a computed tensor, not a parameter we can perturb.
        weight = module._parameters.get("weight")
        if (not isinstance(weight, nn.Parameter) or isinstance(weight, nn.parameter.UninitializedParameter)
                or id(weight) in seen):
            continue
        seen.add(id(weight))
        found[f"{prefix}.weight" if prefix else "weight"] = weight
    return found


def resolve_parameters(model: nn.Module, params: ParamsArg, caller: str) -> dict[str, Tensor]:
    """The parameters to differentiate: `params` checked against the model, or the compressible weights."""
    _check_model(model, caller)
    if params is None:
        resolved: dict[str, Tensor] = dict(compressible_parameters(model))
        if not resolved:
            raise ValueError(f"weightshare.curvature.{caller}: model has no nn.Linear/Conv1d/Conv2d weights; "
                             f"pass params= to choose the parameters")
        return resolved
    # remove_duplicate=False so that every alias of a tied weight is accepted as a name.
    owned = dict(model.named_parameters(remove_duplicate=False))
    if isinstance(params, Mapping):
        resolved = {}
        for name, tensor in params.items():
            if name not in owned:
                raise ValueError(f"weightshare.curvature.{caller}: params names {name!r}, which is not a "
                                 f"parameter of the model")
            if tensor is not owned[name]:
                raise ValueError(f"weightshare.curvature.{caller}: params[{name!r}] is not the model's "
                                 f"parameter of that name (pass the parameter itself, or just its name)")
            resolved[name] = tensor
    elif isinstance(params, (str, Tensor)) or not isinstance(params, Iterable):
        raise TypeError(f"weightshare.curvature.{caller}: params must be a dict name -> parameter or a list of "
                        f"parameter names, got {type(params).__name__}")
    else:
        resolved = {}
        for name in params:
            if not isinstance(name, str) or name not in owned:
                raise ValueError(f"weightshare.curvature.{caller}: params names {name!r}, which is not a "
                                 f"parameter of the model")
            resolved[name] = owned[name]
    if not resolved:
        raise ValueError(f"weightshare.curvature.{caller}: params is empty")
    if len({id(t) for t in resolved.values()}) != len(resolved):
        raise ValueError(f"weightshare.curvature.{caller}: params names the same (tied) parameter twice")
    for name, tensor in resolved.items():
        if not tensor.is_floating_point():
            raise TypeError(f"weightshare.curvature.{caller}: parameter {name!r} is {tensor.dtype}, "
                            f"not floating point")
    return resolved


def check_direction(v: Any, params: Mapping[str, Tensor], caller: str, arg: str = "v") -> dict[str, Tensor]:
    """`v` as a dict ordered like `params`, on the parameters' device and dtype; keys and shapes must match."""
    if not isinstance(v, Mapping):
        raise TypeError(f"weightshare.curvature.{caller}: {arg} must be a dict name -> tensor shaped like the "
                        f"parameters, got {type(v).__name__}")
    missing = [n for n in params if n not in v]
    unexpected = [n for n in v if n not in params]
    if missing or unexpected:
        raise ValueError(f"weightshare.curvature.{caller}: {arg} keys must equal the parameter names; "
                         f"missing {missing}, unexpected {unexpected}")
    out: dict[str, Tensor] = {}
    for name, p in params.items():
        t = v[name]
        if not isinstance(t, Tensor):
            raise TypeError(f"weightshare.curvature.{caller}: {arg}[{name!r}] must be a tensor, "
                            f"got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"weightshare.curvature.{caller}: {arg}[{name!r}] must be a real floating-point "
                            f"tensor, got {t.dtype}")
        if t.shape != p.shape:
            raise ValueError(f"weightshare.curvature.{caller}: {arg}[{name!r}] has shape {tuple(t.shape)}, "
                             f"the parameter has {tuple(p.shape)}")
        # Forward-mode AD requires tangents of the primal's dtype; a silent cast is what callers want here.
        out[name] = t.detach().to(device=p.device, dtype=p.dtype)
    return out


def check_batch(batch: Any, caller: str, arg: str = "batch") -> Batch:
    """`batch` as an (x, y) pair whose x is a tensor with a leading batch dimension of at least one sample."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"weightshare.curvature.{caller}: {arg} must be an (x, y) pair, got "
                        f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list))
                                                     else ""))
    x, y = batch
    if not isinstance(x, Tensor):
        raise TypeError(f"weightshare.curvature.{caller}: {arg} x must be a tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"weightshare.curvature.{caller}: {arg} x must have a non-empty leading batch "
                         f"dimension, got shape {tuple(x.shape)}")
    return x, y


def iterate_batches(data: Any, caller: str) -> Iterator[Batch]:
    """The checked (x, y) batches of `data` (an iterable of pairs, or one (x, y) pair of tensors); raises
    ValueError when there is none."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        data = [data]  # one (x, y) batch passed directly: an (x, y) pair is never a list of two batches
    if isinstance(data, (Tensor, str)) or not isinstance(data, Iterable):
        raise TypeError(f"weightshare.curvature.{caller}: data must be an iterable of (x, y) batches, got "
                        f"{type(data).__name__}")
    count = 0
    for batch in data:
        count += 1
        yield check_batch(batch, caller, arg=f"data batch {count - 1}")
    if count == 0:
        raise ValueError(f"weightshare.curvature.{caller}: data is empty (no batches)")


def _check_model(model: Any, caller: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"weightshare.curvature.{caller}: model must be an nn.Module, got {type(model).__name__}")
