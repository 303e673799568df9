"""Writing the compact model file: `save`, and `size_report`, which counts exactly the bytes `save` writes. The
format is described in io_format.py; io_load.py reads it (`load`, re-exported here).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from weightshare import entropy, models, ops
from weightshare.bias_mask import stored_mask
from weightshare.container import aligned, container_size, write_container
from weightshare.io_format import (FORMAT_NAME, FORMAT_VERSION, HASH_NAME, HASHED_VALUES, KINDS, EntropyCoding,
                                   as_model, hashed_weight, prefix)
from weightshare.io_load import load
from weightshare.nn import SharedLayer
from weightshare.sizes import LayerSize, SizeReport

__all__ = ["save", "load", "size_report", "SizeReport", "LayerSize", "FORMAT_NAME", "FORMAT_VERSION"]


def _check_entropy_coding(entropy_coding: EntropyCoding) -> None:
    if not (entropy_coding is True or entropy_coding is False or entropy_coding == "auto"):
        raise ValueError(f"entropy_coding must be True, False or 'auto', got {entropy_coding!r}")


def _kind(layer: SharedLayer) -> str:
    return next(kind for kind, cls in KINDS.items() if isinstance(layer, cls))


def _layer_spec(layer: SharedLayer, encoding: str, codebook_dtype: str, bias_dtype: Optional[str],
                masked_bias: bool = False) -> dict:
    spec = {"kind": _kind(layer), "weight_shape": list(layer.weight_shape), "bits": layer.bits, "k": layer.k,
            "groups": layer.groups, "bias": layer.bias is not None, "activation": layer.activation,
            "index_encoding": encoding, "codebook_dtype": codebook_dtype}
    if bias_dtype is not None:
        spec["bias_dtype"] = bias_dtype
    if masked_bias:
        spec["bias_encoding"] = "masked"
    if spec["kind"] != "linear":
        spec.update(stride=list(layer.stride), padding=list(layer.padding), dilation=list(layer.dilation),
                    conv_groups=layer.conv_groups)
    return spec


def _stored_codebook(layer: SharedLayer, where: str) -> Tensor:
    """float16 when that is lossless for every value (e.g. a binary layer's +-1), else float32."""
    codebook = layer.codebook.detach().float()
    if not torch.isfinite(codebook).all():
        raise ValueError(f"layer {where!r}: the codebook holds NaN or Inf; refusing to save it")
    return _half_if_exact(codebook)


def _stored_bias(bias: Tensor) -> Tensor:
    """float16 when a float32 bias survives the round trip exactly (half the bytes, the same model), else as is.
    A bias of a shared layer is a few hundred values, but at 100-200x those are 10-25 % of a LeNet file."""
    bias = bias.detach()
    return _half_if_exact(bias) if bias.dtype == torch.float32 else bias


def _half_if_exact(values: Tensor) -> Tensor:
    """float32 values as float16 when every one survives the round trip exactly, else unchanged."""
    half = values.half()
    return half if torch.equal(half.float(), values) else values


def _dtype_name(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


@dataclass
class _Plan:
    tensors: dict[str, Tensor]  # exactly what the file stores, in order
    metadata: dict
    layers: list[LayerSize]
    shared_tensors: set[str]    # names of the tensors that belong to shared layers
    param_names: set[str]       # state_dict names that are parameters (the rest are buffers)


def _plan(model: nn.Module, entropy_coding: EntropyCoding, metadata: Optional[dict], measure: bool) -> _Plan:
    """Everything `save` would write: tensors in state_dict order and the JSON metadata. `measure` also runs the
    entropy coder and the Shannon bound where the file itself would not need them (for size_report)."""
    _check_entropy_coding(entropy_coding)
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    shared = {name: m for name, m in model.named_modules() if isinstance(m, SharedLayer)}
    owner = {prefix(name) + key: (name, key) for name, m in shared.items() for key in ("packed", "codebook", "bias")}
    hashed = {name: (m, hw) for name, m in model.named_modules() if (hw := hashed_weight(m)) is not None}
    owner.update({prefix(name) + HASHED_VALUES: (name, "hashed") for name in hashed})
    param_names = {name for name, _ in model.named_parameters()}
    streams: dict[str, dict[str, Tensor]] = {}  # layer -> encoding -> stream
    codebooks = {name: _stored_codebook(layer, name) for name, layer in shared.items()}
    biases = {name: _stored_bias(layer.bias) for name, layer in shared.items() if layer.bias is not None}
    masked_biases: dict[str, tuple[Tensor, Tensor]] = {}  # layer -> (mask, nonzero values): where it may pay
    for name, bias in biases.items():
        keep, mask = stored_mask(bias)
        nbytes = bias.element_size()
        if aligned(mask.numel()) + aligned(int(keep.sum()) * nbytes) < aligned(bias.numel() * nbytes):
            masked_biases[name] = (mask, bias.reshape(-1)[keep.to(bias.device)].contiguous())
    sizes: dict[str, LayerSize] = {}
    for name, layer in shared.items():
        options = {"packed": layer.packed.detach()}
        idx = layer.indices().cpu() if measure or entropy_coding else None
        if idx is not None:
            options["rans"] = entropy.encode(idx.reshape(-1), layer.k)
            options["context"] = ops.context_encode(idx.reshape(idx.shape[0], -1).contiguous(), layer.k)
        streams[name] = options
        n = math.prod(layer.weight_shape)
        nbias = 0 if layer.bias is None else layer.bias.numel()
        sizes[name] = LayerSize(
            name=name, kind=_kind(layer), weights=n, parameters=n + nbias, fp32_bytes=4 * (n + nbias),
            bits=layer.bits, k=layer.k, groups=layer.groups, packed_bytes=options["packed"].numel(),
            entropy_bytes=options["rans"].numel() if "rans" in options else 0,
            context_bytes=options["context"].numel() if "context" in options else 0,
            shannon_bytes=entropy.entropy_bits(idx) / 8 if measure else 0.0, encoding="packed",
            index_bytes=0, codebook_bytes=0, bias_bytes=0)

    def build(choose: Callable[[str], str], masked: frozenset = frozenset()) -> tuple[dict[str, Tensor], dict]:
        tensors, layers = {}, {}
        for key, tensor in model.state_dict().items():
            if not isinstance(tensor, Tensor):
                raise TypeError(f"state_dict entry {key!r} is a {type(tensor).__name__}; only tensors can be saved")
            if key not in owner:
                tensors[key] = tensor
                continue
            name, role = owner[key]
            if role == "hashed":
                values = _half_if_exact(tensor.detach().float())
                if not torch.isfinite(values).all():
                    raise ValueError(f"layer {name!r}: the HashedNets bucket values hold NaN or Inf; refusing to "
                                     "save them")
                hw = hashed[name][1]
                tensors[prefix(name) + "hashed_values"] = values
                layers[name] = {"kind": "hashed", "weight_shape": list(hw.shape), "buckets": hw.buckets,
                                "seed": hw.seed, "hash": HASH_NAME, "values_dtype": _dtype_name(values)}
                continue
            layer = shared[name]
            if role == "packed":
                encoding = choose(name)
                tensors[prefix(name) + "indices"] = streams[name][encoding]
                layers[name] = _layer_spec(layer, encoding, _dtype_name(codebooks[name]),
                                           _dtype_name(biases[name]) if name in biases else None, name in masked)
            elif role == "codebook":
                tensors[key] = codebooks[name]
            elif name in masked:
                tensors[prefix(name) + "bias_mask"], tensors[key] = masked_biases[name]
            else:
                tensors[key] = biases[name]
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                "model": {"class": type(model).__name__, "name": _registry_name(model)},
                "layers": layers, "user": {} if metadata is None else metadata}
        return tensors, meta

    def smaller(name: str, among=("packed", "rans", "context")) -> str:  # ties: the earlier in `among`
        return min(among, key=lambda e: (streams[name][e].numel(), among.index(e)))

    if entropy_coding == "auto":
        choose = smaller
        tensors, meta = build(choose)
        # per-layer choices shrink the buffers; make sure header details (shapes, names) cannot undo that
        packed_tensors, packed_meta = build(lambda name: "packed")
        if container_size(packed_tensors, packed_meta) < container_size(tensors, meta):
            choose = lambda name: "packed"
            tensors, meta = packed_tensors, packed_meta
    else:
        choose = lambda name: smaller(name, ("rans", "context")) if entropy_coding else "packed"
        tensors, meta = build(choose)
    # masked biases, one layer at a time, each kept only when the whole file (header included) gets smaller
    masked, best = frozenset(), container_size(tensors, meta)
    for name in masked_biases:
        trial_tensors, trial_meta = build(choose, masked | {name})
        trial = container_size(trial_tensors, trial_meta)
        if trial < best:
            masked, best, tensors, meta = masked | {name}, trial, trial_tensors, trial_meta

    for name, (_, hw) in hashed.items():
        n, bias = math.prod(hw.shape), tensors.get(prefix(name) + "bias")
        nbias = 0 if bias is None else bias.numel()
        values = tensors[prefix(name) + "hashed_values"]
        sizes[name] = LayerSize(
            name=name, kind="hashed", weights=n, parameters=n + nbias, fp32_bytes=4 * (n + nbias), bits=0,
            k=hw.buckets, groups=1, packed_bytes=0, entropy_bytes=0, shannon_bytes=0.0, encoding="hashed",
            index_bytes=0, codebook_bytes=values.numel() * values.element_size(),
            bias_bytes=0 if bias is None else nbias * bias.element_size())
    for name, spec in meta["layers"].items():
        if spec["kind"] == "hashed":
            continue
        size = sizes[name]
        size.encoding = spec["index_encoding"]
        size.index_bytes = tensors[prefix(name) + "indices"].numel()
        codebook, bias = tensors[prefix(name) + "codebook"], tensors.get(prefix(name) + "bias")
        mask = tensors.get(prefix(name) + "bias_mask")
        size.codebook_bytes = codebook.numel() * codebook.element_size()
        size.bias_bytes = (0 if bias is None else bias.numel() * bias.element_size()) + \
            (0 if mask is None else mask.numel())
        size.bias_encoding = spec.get("bias_encoding", "dense")
    owned = {prefix(name) + role for name in shared for role in ("indices", "codebook", "bias", "bias_mask")}
    owned |= {prefix(name) + role for name in hashed for role in ("hashed_values", "bias")}
    return _Plan(tensors, meta, [sizes[name] for name in meta["layers"]], owned, param_names)


def _registry_name(model: nn.Module) -> Optional[str]:
    try:
        return models.model_name(model)
    except ValueError:
        return None


def save(model_or_result: Any, path: Union[str, os.PathLike], entropy_coding: EntropyCoding = "auto",
         metadata: Optional[dict] = None) -> int:
    """Write a model (or anything with a `.model`, e.g. a compression result) to `path`; returns bytes written.

    entropy_coding: False stores packed indices; True stores entropy-coded indices (per layer the smaller of static
    rANS and context-adaptive coding); "auto" (default) stores, per layer, whichever of the three is smallest
    (and never makes the file larger than all-packed). `metadata`: a JSON-able dict
    stored with the file. The write is atomic. The size equals `size_report(model, entropy_coding,
    metadata).file_bytes`."""
    plan = _plan(as_model(model_or_result), entropy_coding, metadata, measure=False)
    return write_container(path, plan.tensors, plan.metadata)


def size_report(model_or_result: Any, entropy_coding: EntropyCoding = "auto",
                metadata: Optional[dict] = None) -> SizeReport:
    """Per shared layer and in total: parameters, fp32 bytes, index bits and bytes (packed, rANS, Shannon
    bound), codebook and bias bytes, other tensors, and the exact file size `save` would write with the same
    arguments (plus the compression ratio against the fp32 model, all parameters and buffers counted)."""
    model = as_model(model_or_result)
    plan = _plan(model, entropy_coding, metadata, measure=True)
    report = SizeReport(layers=plan.layers, file_bytes=container_size(plan.tensors, plan.metadata))
    for name, tensor in plan.tensors.items():
        if name in plan.shared_tensors:
            continue
        nbytes = tensor.numel() * tensor.element_size()
        report.other_tensors += 1
        report.other_bytes += nbytes
        report.other_fp32_bytes += 4 * tensor.numel() if tensor.is_floating_point() else nbytes
        if name in plan.param_names:
            report.parameters += tensor.numel()
    report.parameters += sum(l.parameters for l in plan.layers)
    report.fp32_bytes = report.other_fp32_bytes + sum(l.fp32_bytes for l in plan.layers)
    return report

