"""The compact model file's format, shared by its writer (io.py: `save`, and `size_report`, which counts exactly the
bytes `save` writes) and its reader (io_load.py: `load`).

A file is one container (container.py: JSON header, raw little-endian buffers, SHA-256 trailer; never pickle)
holding, in the model's state_dict order:

* per shared layer L (a SharedLinear / SharedConv1d / SharedConv2d):
    - `L.indices`: the index stream, one of: the packed rows (uint8 [out, packed_row_bytes(n, bits)], exactly the
      layer's `packed` buffer); the static rANS-coded stream of the unpacked indices ("rans": uint8 [bytes],
      entropy.py, alphabet k, row-major over the weight); or the context-adaptive arithmetic-coded index matrix
      [out, n] ("context": uint8 [bytes], ops.context_encode, which predicts pruned positions from their
      neighbourhood). "auto" picks whichever is smallest, per layer;
    - `L.codebook`: [groups, k], float16 when every value survives the round trip exactly, else float32;
    - `L.bias` (if the layer has one): float16 when the model's float32 bias survives that round trip exactly
      (ws.compress rounds the biases of the layers it shares to float16 for this), else as stored in the model.
      Stored densely (all the layer's n values), or, when the spec says "bias_encoding": "masked", as
      `L.bias_mask` (uint8 [ceil(n / 8)], written just before `L.bias`: bit i % 8 of byte i // 8 (least
      significant bit first) is set when bias[i] is anything but +0.0, so -0.0 and NaN are kept; the unused high
      bits of the last byte are zero) and `L.bias` holding only the values at the set bits, in order (1-D, same
      dtype rule; none of them +0.0). `save` masks a bias only when that makes the file strictly smaller (a unit
      that compress.dead_units zeroed, or a pruned-away output row, then costs one bit instead of 2-4 bytes);
* per HashedNets layer L (a Linear / Conv whose weight is parametrised by compress.hashednets.HashedWeight: the
  virtual matrix xi * values[h], Chen et al. 2015): `L.hashed_values`, its bucket values ([buckets], float16 when
  that is exact, else float32). No index is stored: the bucket and sign of each weight are the seeded position
  hash (compress/baselines.position_hash), which `load` recomputes from the seed;
* every other state_dict tensor (BatchNorm weights and statistics, layers left dense, a HashedNets layer's bias,
  ...) raw, under its state_dict name.

Metadata (the container's JSON)::

    {"format": "weightshare.model", "version": 1,
     "model": {"class": "LeNet5", "name": "lenet5" or null},     # name: ws.models.build_model's, if it is one
     "layers": {L: {"kind": "linear" | "conv1d" | "conv2d", "weight_shape": [...], "bits": b, "k": k,
                    "groups": G, "bias": bool, "activation": "float" | "int8",
                    "index_encoding": "packed" | "rans" | "context", "codebook_dtype": "float32" | "float16",
                    "bias_dtype": "float32" | "float16",    # optional (absent: the model's bias dtype)
                    "bias_encoding": "masked",              # optional (absent: the bias is stored densely)
                    # conv kinds only:
                    "stride": [...], "padding": [...], "dilation": [...], "conv_groups": g},
                L2: {"kind": "hashed", "weight_shape": [...], "buckets": K, "seed": s, "hash": "position_hash.v1",
                     "values_dtype": "float32" | "float16"}},
     "user": {... the caller's metadata ...}}

`load` trusts nothing in the file: every field is validated against the format and against the model it loads
into before the model is touched, decoded indices must be < k, and every problem raises ContainerError (a
ValueError) naming the file and what is wrong.
"""
from __future__ import annotations

from typing import Any, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from weightshare.compress.hashednets import HashedWeight
from weightshare.nn import SharedConv1d, SharedConv2d, SharedLayer, SharedLinear

FORMAT_NAME = "weightshare.model"
FORMAT_VERSION = 1
KINDS: dict[str, type] = {"linear": SharedLinear, "conv1d": SharedConv1d, "conv2d": SharedConv2d}
COMMON_KEYS = {"kind", "weight_shape", "bits", "k", "groups", "bias", "activation", "index_encoding",
                "codebook_dtype"}
CONV_KEYS = {"stride", "padding", "dilation", "conv_groups"}
OPTIONAL_KEYS = {"bias_dtype", "bias_encoding"}
CODEBOOK_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# HashedNets layers: the hash that maps a weight's position to its bucket and sign (compress/baselines.py); a file
# names it so that a reader with a different hash refuses the file instead of scrambling the weights
HASH_NAME = "position_hash.v1"
HASHED_KEYS = {"kind", "weight_shape", "buckets", "seed", "hash", "values_dtype"}
HASHED_VALUES = "parametrizations.weight.original"  # where a parametrised module keeps the bucket values
MAX_SEED = (1 << 31) - 1

EntropyCoding = Union[bool, str]


def as_model(model_or_result: Any) -> nn.Module:
    if isinstance(model_or_result, nn.Module):
        return model_or_result
    model = getattr(model_or_result, "model", None)
    if isinstance(model, nn.Module):
        return model
    raise TypeError(f"expected an nn.Module or an object with a .model module, got {type(model_or_result).__name__}")


def prefix(name: str) -> str:
    return f"{name}." if name else ""


def hashed_weight(module: nn.Module):
    """The module's HashedWeight when its weight is a HashedNets virtual matrix (and nothing else), else None."""
    if isinstance(module, SharedLayer) or not parametrize.is_parametrized(module, "weight"):
        return None
    chain = module.parametrizations.weight
    return chain[0] if len(chain) == 1 and isinstance(chain[0], HashedWeight) else None
