"""Reading the compact model file (`load`): the format of io_format.py, written by io.py. Nothing in a file is
trusted: every field is validated against the format and against the model it loads into before the model is
touched, decoded indices must be < k, and every problem raises ContainerError (a ValueError) naming the file and
what is wrong. No pickle: the container holds a JSON header and raw buffers.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from weightshare import entropy, models, ops
from weightshare.bias_mask import unmask
from weightshare.compress.hashednets import HashedWeight
from weightshare.container import ContainerError, read_container
from weightshare.formats import MAX_BITS, MIN_BITS, packed_row_bytes
from weightshare.io_format import (CODEBOOK_DTYPES, COMMON_KEYS, CONV_KEYS, FORMAT_NAME, FORMAT_VERSION, HASH_NAME,
                                   HASHED_KEYS, HASHED_VALUES, KINDS, MAX_SEED, OPTIONAL_KEYS, as_model,
                                   hashed_weight, prefix)
from weightshare.nn import ACTIVATIONS, SharedLayer, SharedLinear, _numeric_padding
from weightshare.replace import _is_gpt2_conv1d, _parents


def _fail_for(path: Union[str, os.PathLike]) -> Callable[[str], ContainerError]:
    where = os.fspath(path)
    return lambda message: ContainerError(f"{where}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(spec: dict, key: str, lo: int, hi: Optional[int], what: str, fail) -> int:
    value = spec[key]
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise fail(f"{what}: {key} must be an integer {bound}, got {value!r:.80}")
    return value


def _int_list(spec: dict, key: str, length: int, lo: int, what: str, fail) -> tuple[int, ...]:
    value = spec[key]
    if not isinstance(value, list) or len(value) != length or not all(_is_int(v) and v >= lo for v in value):
        raise fail(f"{what}: {key} must be a list of {length} integers >= {lo}, got {value!r:.120}")
    return tuple(value)


def _parse_layer(name: str, spec: Any, fail) -> dict:
    """Schema-check one layer's metadata; returns it with tuples for the shape lists."""
    what = f"layer {name!r}"
    if not isinstance(spec, dict):
        raise fail(f"{what}: metadata is a {type(spec).__name__}, not an object")
    kind = spec.get("kind")
    if kind == "hashed":
        return _parse_hashed(spec, what, fail)
    if kind not in KINDS:
        raise fail(f"{what}: unknown layer kind {kind!r:.60} (this reader knows {', '.join(KINDS)}, hashed)")
    keys = COMMON_KEYS | (CONV_KEYS if kind != "linear" else set())
    if not keys <= set(spec) <= keys | OPTIONAL_KEYS:
        raise fail(f"{what}: metadata keys are {sorted(spec)}, expected {sorted(keys)} (optionally "
                   f"{sorted(OPTIONAL_KEYS)})")
    dims = {"linear": 2, "conv1d": 3, "conv2d": 4}[kind]
    out = dict(spec)
    out["weight_shape"] = _int_list(spec, "weight_shape", dims, 1, what, fail)
    bits = _int_field(spec, "bits", MIN_BITS, MAX_BITS, what, fail)
    _int_field(spec, "k", 1, 1 << bits, what, fail)
    groups = _int_field(spec, "groups", 1, None, what, fail)
    if out["weight_shape"][0] % groups:
        raise fail(f"{what}: groups={groups} does not divide the {out['weight_shape'][0]} output rows")
    if not isinstance(spec["bias"], bool):
        raise fail(f"{what}: bias must be true or false, got {spec['bias']!r:.60}")
    if spec["activation"] not in (ACTIVATIONS if kind == "linear" else ("float",)):
        raise fail(f"{what}: activation {spec['activation']!r:.60} is not supported for a {kind} layer")
    if spec["index_encoding"] not in ("packed", "rans", "context"):
        raise fail(f"{what}: unknown index encoding {spec['index_encoding']!r:.60}")
    if spec["codebook_dtype"] not in CODEBOOK_DTYPES:
        raise fail(f"{what}: codebook dtype must be one of {list(CODEBOOK_DTYPES)}, got "
                   f"{spec['codebook_dtype']!r:.60}")
    if "bias_dtype" in spec and (spec["bias_dtype"] not in CODEBOOK_DTYPES or not spec["bias"]):
        raise fail(f"{what}: bias dtype must be one of {list(CODEBOOK_DTYPES)} and needs bias=true, got "
                   f"{spec['bias_dtype']!r:.60}")
    if "bias_encoding" in spec and (spec["bias_encoding"] != "masked" or not spec["bias"]):
        raise fail(f"{what}: bias encoding must be 'masked' (or absent: dense) and needs bias=true, got "
                   f"{spec['bias_encoding']!r:.60} with bias={spec['bias']!r:.10}")
    if kind != "linear":
        n = dims - 2
        out["stride"] = _int_list(spec, "stride", n, 1, what, fail)
        out["padding"] = _int_list(spec, "padding", n, 0, what, fail)
        out["dilation"] = _int_list(spec, "dilation", n, 1, what, fail)
        _int_field(spec, "conv_groups", 1, None, what, fail)
    return out


def _parse_hashed(spec: dict, what: str, fail) -> dict:
    """Schema-check a HashedNets layer's metadata."""
    if set(spec) != HASHED_KEYS:
        raise fail(f"{what}: metadata keys are {sorted(spec)}, expected {sorted(HASHED_KEYS)}")
    shape = spec["weight_shape"]
    if not isinstance(shape, list) or not 2 <= len(shape) <= 5:
        raise fail(f"{what}: weight_shape must be a list of 2 to 5 integers >= 1, got {shape!r:.120}")
    out = dict(spec)
    out["weight_shape"] = _int_list(spec, "weight_shape", len(shape), 1, what, fail)
    _int_field(spec, "buckets", 1, math.prod(out["weight_shape"]), what, fail)
    _int_field(spec, "seed", 0, MAX_SEED, what, fail)
    if spec["hash"] != HASH_NAME:
        raise fail(f"{what}: hash {spec['hash']!r:.60} is not this reader's ({HASH_NAME!r}): the weights' buckets "
                   "cannot be recomputed")
    if spec["values_dtype"] not in CODEBOOK_DTYPES:
        raise fail(f"{what}: values dtype must be one of {list(CODEBOOK_DTYPES)}, got {spec['values_dtype']!r:.60}")
    return out


def _hashed_target(target: nn.Module, spec: dict, what: str, fail):
    """The HashedWeight the model's module will carry for `spec` (its own when it already matches, else a new
    one, not yet registered), after checking the module can hold the layer."""
    if isinstance(target, SharedLayer):
        raise fail(f"{what}: the file has a HashedNets layer but the model's module is a shared layer")
    weight = getattr(target, "weight", None)
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise fail(f"{what}: the file has a HashedNets layer but the model's module has no floating-point weight")
    if tuple(weight.shape) != spec["weight_shape"]:
        raise fail(f"{what}: weight shape {list(spec['weight_shape'])} in the file, {list(weight.shape)} in the model")
    if parametrize.is_parametrized(target, "weight"):
        hw = hashed_weight(target)
        if hw is None or (hw.buckets, hw.seed) != (spec["buckets"], spec["seed"]):
            raise fail(f"{what}: the model's weight is parametrised differently (not HashedNets with "
                       f"{spec['buckets']} buckets and seed {spec['seed']})")
        return hw
    # a skeleton's weight is on meta: the hash tables (non-persistent, computed here) stay on the CPU with the file's
    # tensors
    return HashedWeight(weight.shape, spec["buckets"], spec["seed"]).to("cpu" if weight.is_meta else weight.device)


def _parse_metadata(metadata: dict, fail) -> tuple[dict, dict[str, dict]]:
    """Check the file-level metadata; returns (model info, {layer name: parsed spec})."""
    if metadata.get("format") != FORMAT_NAME:
        raise fail(f"not a weightshare model file (format {metadata.get('format')!r:.60}, expected {FORMAT_NAME!r})")
    if metadata.get("version") != FORMAT_VERSION:
        raise fail(f"unsupported model file version {metadata.get('version')!r:.30} (this reader knows "
                   f"{FORMAT_VERSION})")
    expected = {"format", "version", "model", "layers", "user"}
    if set(metadata) != expected:
        raise fail(f"metadata keys are {sorted(metadata)}, expected {sorted(expected)}")
    info, layers = metadata["model"], metadata["layers"]
    if not isinstance(info, dict) or set(info) != {"class", "name"} or not isinstance(info["class"], str) \
            or not (info["name"] is None or isinstance(info["name"], str)):
        raise fail(f"metadata 'model' must be {{'class': str, 'name': str or null}}, got {info!r:.120}")
    if not isinstance(layers, dict):
        raise fail(f"metadata 'layers' is a {type(layers).__name__}, not an object")
    return info, {name: _parse_layer(name, spec, fail) for name, spec in layers.items()}


def _rebuild(info: dict) -> nn.Module:
    name = info["name"]
    if name not in models.MODELS:
        raise ValueError(f"the file holds a {info['class']!r} model that ws.models.build_model cannot rebuild "
                         f"(recorded name {name!r}); pass model= (an instance of that architecture)")
    # a skeleton: the file provides every tensor, so the dense ones are never allocated (nor randomly initialised)
    with torch.device("meta"):
        return models.build_model(name)


def _conv_args(module: nn.Module, numeric_padding: tuple) -> tuple:
    return (tuple(module.weight_shape if isinstance(module, SharedLayer) else module.weight.shape),
            tuple(module.stride), tuple(numeric_padding), tuple(module.dilation),
            module.conv_groups if isinstance(module, SharedLayer) else module.groups)


def _mismatch(target: nn.Module, spec: dict) -> Optional[str]:
    """Why the model's module cannot hold the file's layer, or None when it can."""
    kind, shape = spec["kind"], spec["weight_shape"]
    bias = getattr(target, "bias", None)
    if (bias is not None) != spec["bias"]:
        return f"bias {'present' if spec['bias'] else 'absent'} in the file but not in the model's module"
    if kind == "linear":
        if isinstance(target, SharedLinear) or (isinstance(target, nn.Linear) and not isinstance(target, SharedLayer)):
            got = tuple(target.weight_shape if isinstance(target, SharedLayer) else target.weight.shape)
        elif _is_gpt2_conv1d(target):
            got = tuple(target.weight.shape[::-1])
        else:
            return f"the file has a linear layer but the model's module is a {type(target).__name__}"
        return None if got == shape else f"weight shape {list(shape)} in the file, {list(got)} in the model"
    shared_type, dense_type = KINDS[kind], KINDS[kind].dense_type
    if isinstance(target, shared_type):
        padding = target.padding
    elif isinstance(target, dense_type):
        if target.padding_mode != "zeros":
            return f"the model's conv uses padding_mode={target.padding_mode!r}"
        try:
            padding = _numeric_padding(target.padding, target.kernel_size, target.dilation)
        except NotImplementedError as exc:
            return str(exc)
    else:
        return f"the file has a {kind} layer but the model's module is a {type(target).__name__}"
    want = (shape, spec["stride"], spec["padding"], spec["dilation"], spec["conv_groups"])
    got = _conv_args(target, padding)
    return None if got == want else f"conv (shape, stride, padding, dilation, groups) {want} in the file, {got} " \
                                    "in the model"


def _same_config(target: nn.Module, spec: dict) -> bool:
    return (isinstance(target, KINDS[spec["kind"]]) and target.weight_shape == spec["weight_shape"]
            and (target.bits, target.k, target.groups, target.activation)
            == (spec["bits"], spec["k"], spec["groups"], spec["activation"]))


def _new_layer(target: nn.Module, spec: dict) -> SharedLayer:
    """An empty shared layer for `spec` on the target's device (bias in the target's bias dtype)."""
    param = next(target.parameters(), None)
    device = None if param is None else param.device
    bias_dtype = None if getattr(target, "bias", None) is None else target.bias.dtype
    shape, common = spec["weight_shape"], dict(bits=spec["bits"], k=spec["k"], groups=spec["groups"],
                                               bias=spec["bias"], activation=spec["activation"], device=device,
                                               dtype=bias_dtype)
    if spec["kind"] == "linear":
        return SharedLinear(shape[1], shape[0], **common)
    cls = KINDS[spec["kind"]]
    return cls(shape[1] * spec["conv_groups"], shape[0], shape[2:], stride=spec["stride"], padding=spec["padding"],
               dilation=spec["dilation"], conv_groups=spec["conv_groups"], **common)


def _decode_indices(name: str, spec: dict, stream: Tensor, fail) -> Tensor:
    """The layer's packed buffer from its stored stream, after checking every decoded index is < k."""
    what = f"layer {name!r}"
    shape, bits, k = spec["weight_shape"], spec["bits"], spec["k"]
    rows, n = shape[0], math.prod(shape[1:])
    if stream.dtype != torch.uint8:
        raise fail(f"{what}: index stream must be uint8, got {stream.dtype}")
    if spec["index_encoding"] == "packed":
        expected = (rows, packed_row_bytes(n, bits))
        if tuple(stream.shape) != expected:
            raise fail(f"{what}: packed indices must be {list(expected)}, got {list(stream.shape)}")
        idx = ops.unpack(stream.contiguous(), bits, n)
    else:
        if stream.dim() != 1 or stream.numel() == 0:
            raise fail(f"{what}: an entropy-coded stream must be 1-D and non-empty, got shape {list(stream.shape)}")
        try:  # n is bounded: the model holds a weight of exactly this shape
            if spec["index_encoding"] == "rans":
                idx = entropy.decode(stream, rows * n, k).reshape(rows, n)
            else:
                idx = ops.context_decode(stream.contiguous(), rows, n, k)
        except ValueError as exc:  # ContainerError is a ValueError; so are the coder's own checks
            raise fail(f"{what}: {exc}") from None
    if idx.numel() and int(idx.max()) >= k:
        raise fail(f"{what}: a decoded index is {int(idx.max())}, not below k={k}")
    # re-pack: canonical bytes (zero padding bits) whatever the stored rows held there
    return ops.pack(idx.contiguous(), bits)


def load(path: Union[str, os.PathLike], model: Optional[nn.Module] = None) -> nn.Module:
    """Read a file written by `save` and return the model with its shared layers.

    model None: the architecture is rebuilt with ws.models.build_model from the recorded name (ValueError if
    there is none: then pass `model`) and returned in eval mode. A given model (dense, or already shared) is
    modified in place and keeps its mode. A model built on the meta device (`with torch.device("meta"):
    model = Arch()`) is a skeleton: its tensors are the file's, on the CPU, and its dense weights are never
    allocated, so a model whose dense form does not fit in memory loads in its compressed size (the rebuilt
    architecture is such a skeleton too). Everything is validated before the model is touched; a corrupt,
    truncated or hostile file raises ContainerError (a ValueError). Never unpickles."""
    fail = _fail_for(path)
    tensors, metadata = read_container(path)
    info, specs = _parse_metadata(metadata, fail)
    rebuilt = model is None
    model = _rebuild(info) if rebuilt else as_model(model)
    # a skeleton (any tensor on the meta device) takes the file's tensors themselves (load_state_dict's assign)
    skeleton = any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())
    modules = dict(model.named_modules())

    layers: dict[str, SharedLayer] = {}
    hashed: dict[str, Any] = {}  # HashedNets layers: name -> the HashedWeight its module will carry
    for name, spec in specs.items():
        target = modules.get(name)
        if target is None:
            raise fail(f"layer {name!r} is not a module of the model")
        if spec["kind"] == "hashed":
            hashed[name] = _hashed_target(target, spec, f"layer {name!r}", fail)
            continue
        reason = _mismatch(target, spec)
        if reason:
            raise fail(f"layer {name!r}: {reason}")
        if _same_config(target, spec):
            layers[name] = target
        elif name == "":
            raise fail("the file's root layer cannot replace the model's root module in place")
        else:
            layers[name] = _new_layer(target, spec)

    # the state the model will have once its layers are replaced: what the file must provide, exactly
    expected = model.state_dict()
    for name, layer in layers.items():
        for key in modules[name].state_dict():
            expected.pop(prefix(name) + key, None)
        expected.update({prefix(name) + key: value for key, value in layer.state_dict().items()})
    for name, hw in hashed.items():  # the weight becomes the bucket values, stored as `hashed_values`
        weight = modules[name].weight
        expected.pop(prefix(name) + "weight", None)
        expected[prefix(name) + HASHED_VALUES] = torch.empty(hw.buckets, dtype=weight.dtype)
    values = {prefix(name) + "hashed_values": prefix(name) + HASHED_VALUES for name in hashed}
    clash = sorted(set(values.values()) & set(tensors))
    if clash:  # the bucket values come under their stored name only
        raise fail(f"unexpected tensor(s) {clash[:10]} that the model does not have")
    tensors = {values.get(key, key): tensor for key, tensor in tensors.items()}
    hashed_dtypes = {prefix(name) + HASHED_VALUES: specs[name]["values_dtype"] for name in hashed}
    streams = {prefix(name) + "indices": name for name in layers}
    masks = {prefix(name) + "bias_mask": name for name, spec in specs.items() if "bias_encoding" in spec}
    masked_biases = {prefix(name) + "bias": mask for mask, name in masks.items()}  # bias -> its mask
    provided = set(tensors) - set(streams) - set(masks)
    needed = set(expected) - {prefix(name) + "packed" for name in layers}
    for stream in streams:
        if stream not in tensors:
            raise fail(f"missing tensor {stream!r} (the indices of layer {streams[stream]!r})")
    for mask in masks:
        if mask not in tensors:
            raise fail(f"missing tensor {mask!r} (the bias mask of layer {masks[mask]!r})")
    if needed - provided:
        raise fail(f"missing tensor(s) {sorted(needed - provided)[:10]} that the model needs")
    if provided - needed:
        raise fail(f"unexpected tensor(s) {sorted(provided - needed)[:10]} that the model does not have")

    codebooks = {prefix(name) + "codebook": name for name in layers}
    # a float16-stored bias becomes the model's float32 bias exactly (_stored_bias only writes lossless ones)
    half_biases = {prefix(name) + "bias" for name, spec in specs.items() if spec.get("bias_dtype") == "float16"}
    state: dict[str, Tensor] = {}
    for key in sorted(needed):
        tensor, want = tensors[key], expected[key]
        if key in codebooks:
            _check_values(key, tensor, specs[codebooks[key]]["codebook_dtype"], "the codebook holds", fail)
            tensor = tensor.float()
        elif key in hashed_dtypes:
            _check_values(key, tensor, hashed_dtypes[key], "the HashedNets bucket values hold", fail)
            converted = tensor.to(want.dtype)
            if not torch.equal(converted.to(tensor.dtype), tensor):
                raise fail(f"tensor {key!r}: its {tensor.dtype} values do not fit the model's {want.dtype} exactly")
            tensor = converted
        elif key in half_biases and want.dtype == torch.float32:
            if tensor.dtype != torch.float16:
                raise fail(f"tensor {key!r} is {tensor.dtype} but the metadata says float16")
            tensor = tensor.float()
        elif tensor.dtype != want.dtype:
            raise fail(f"tensor {key!r} is {tensor.dtype} but the model's is {want.dtype}")
        if key in masked_biases:
            mask = masked_biases[key]
            tensor = unmask(masks[mask], tensors[mask], tensor, want, fail)
        if tensor.shape != want.shape:
            raise fail(f"tensor {key!r} has shape {list(tensor.shape)} but the model's is {list(want.shape)}")
        state[key] = tensor
    for stream, name in streams.items():  # each stream dropped once decoded: the peak stays near the file's size
        state[prefix(name) + "packed"] = _decode_indices(name, specs[name], tensors.pop(stream), fail)

    if skeleton:
        _check_skeleton(model, set(layers) | set(hashed))
    for name, hw in hashed.items():
        if hashed_weight(modules[name]) is not hw:
            parametrize.register_parametrization(modules[name], "weight", hw, unsafe=True)
    holders = _parents(model)
    for name, layer in layers.items():
        old = modules[name]
        if layer is not old:
            layer.train(old.training)
            for parent, attr in holders.get(id(old), []):
                setattr(parent, attr, layer)
    model.load_state_dict(state, strict=True, assign=skeleton)
    return model.eval() if rebuilt else model


def _check_values(key: str, tensor: Tensor, dtype_name: str, what: str, fail) -> None:
    """A stored table (a codebook, HashedNets bucket values; `what` names it with its verb): the dtype its
    metadata names, and finite."""
    dtype = CODEBOOK_DTYPES[dtype_name]
    if tensor.dtype != dtype:
        raise fail(f"tensor {key!r} is {tensor.dtype} but the metadata says {dtype}")
    if not torch.isfinite(tensor).all():
        raise fail(f"tensor {key!r}: {what} NaN or Inf")


def _check_skeleton(model: nn.Module, replaced: set[str]) -> None:
    """A meta-device model can take the file's tensors only if nothing outside the state dict stays on meta: a
    non-persistent buffer (a rotary table, a causal mask) has no values in the file. Checked before the model is
    touched; the buffers of modules the file replaces do not count."""
    persistent = set(model.state_dict())
    for module_name, module in model.named_modules():
        if any(module_name == r or module_name.startswith(r + ".") for r in replaced if r):
            continue
        for name, buf in module.named_buffers(recurse=False):
            key = prefix(module_name) + name
            if buf is not None and buf.is_meta and key not in persistent:
                raise ValueError(f"{key!r} is a non-persistent buffer on the meta device: the file has no values for "
                                 "it; build the model on the CPU, or materialise that buffer before loading")
