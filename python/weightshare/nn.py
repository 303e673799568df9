"""Drop-in shared-weight layers: nn.Linear / nn.Conv1d / nn.Conv2d whose weight is bit-packed codebook indices.

Each layer holds
* `packed`: a uint8 buffer [out, packed_row_bytes(n, bits)] (n = weights per output row; layout: formats.py),
* `codebook`: a float32 Parameter [groups, k] (groups = 1: one codebook per layer; groups = out: one per output
  row), trainable: fine-tuning the shared values is Han et al.'s centroid update (its gradient sums dL/dW over
  the weights that share an entry; ws.ops computes it without materialising W),
* `bias`: an optional Parameter, as in the dense layer.

The forward runs directly on the packed form (ws.ops.shared_linear / ws.ops.shared_conv2d); the dense weight is
never stored. `weight` is a read-only, detached dequantised copy for users and tools that want to look at it.

Binary layers (models.BinaryLinear: the forward uses sign(latent weight)). A shared layer simply computes with
the codebook and indices it is given, so the caller decides what a binary layer becomes. `binary_assignment`
gives the exact equivalent of sign(): a 1-bit layer with codebook [-1, +1] (or [-s, +s], s = mean |w|, XNOR-Net
style, when asked), and `SharedLinear.from_dense(binary_linear)` without a codebook uses it. A k-means assignment
of the *latent* weights would instead approximate the latent values, which is not what the binary layer computes.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from weightshare import ops
from weightshare._native import has_kernel
from weightshare.formats import MAX_BITS, MIN_BITS, bits_for, packed_row_bytes
from weightshare.models import BinaryLinear

# shared_linear's op overload, resolved once (None without the native library: forward then takes ws.ops' path)
_SHARED_LINEAR = torch.ops.weightshare.shared_linear.default if has_kernel("shared_linear", "cpu") else None

__all__ = ["SharedLinear", "SharedConv1d", "SharedConv2d", "SharedLayer", "binary_assignment", "is_binary_linear"]

ACTIVATIONS = ("float", "int8")


def _check_config(bits: int, k: int, groups: int, rows: int, activation: str) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    if not 1 <= k <= (1 << bits):
        raise ValueError(f"k={k} entries need 1 <= k <= 2**bits = {1 << bits}")
    if groups < 1 or rows % groups:
        raise ValueError(f"groups={groups} must divide the {rows} output rows")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_assignment(weight_shape: Sequence[int], codebook: Tensor, idx: Tensor,
                      bits: Optional[int]) -> tuple[Tensor, Tensor, int]:
    """Validate a (codebook, idx) pair against a weight shape; returns (codebook float32 [G, k], idx uint8, bits)."""
    if not isinstance(codebook, Tensor) or not isinstance(idx, Tensor):
        raise TypeError("codebook and idx must be tensors")
    if not codebook.is_floating_point():
        raise TypeError(f"codebook must be a float tensor, got {codebook.dtype}")
    if codebook.dim() == 1:
        codebook = codebook.unsqueeze(0)
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be [k] or [groups, k], got shape {tuple(codebook.shape)}")
    groups, k = codebook.shape
    if not 1 <= k <= 256:
        raise ValueError(f"codebook has {k} entries; a shared layer holds 1..256")
    if not torch.isfinite(codebook).all():
        raise ValueError("codebook contains NaN or Inf")
    if tuple(idx.shape) != tuple(weight_shape):
        raise ValueError(f"idx has shape {tuple(idx.shape)} but the weight is {tuple(weight_shape)}")
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"idx must be an integer tensor (uint8), got {idx.dtype}")
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"idx values must be in [0, k={k}), found {lo if lo < 0 else hi}")
    bits = bits_for(k) if bits is None else int(bits)
    if not k <= (1 << bits):
        raise ValueError(f"k={k} entries do not fit in bits={bits}")
    rows = weight_shape[0]
    if rows % groups:
        raise ValueError(f"codebook groups={groups} must divide the {rows} output rows")
    return codebook.detach().float(), idx.to(torch.uint8), bits


class SharedLayer(nn.Module):
    """What every shared layer has: packed indices, a codebook, an optional bias (see the module docstring).

    weight_shape: the dense weight's shape (output rows first); groups: codebooks (dividing the rows); device:
    where the buffers live; dtype: the bias dtype (the codebook is always created float32). A new layer's
    codebook and indices are zeros: fill them with `set_assignment`, `from_dense` or `load_state_dict`."""

    def __init__(self, weight_shape: Sequence[int], bits: int, k: int, groups: int, bias: bool, activation: str,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        _check_config(bits, k, groups, self.weight_shape[0], activation)
        self.bits, self.k, self.groups, self.activation = int(bits), int(k), int(groups), activation
        row = math.prod(self.weight_shape[1:])
        self.register_buffer("packed", torch.zeros(self.weight_shape[0], packed_row_bytes(row, bits),
                                                   dtype=torch.uint8, device=device))
        self.codebook = nn.Parameter(torch.zeros(groups, k, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.weight_shape[0], dtype=dtype or torch.float32, device=device))
        else:
            self.register_parameter("bias", None)

    @property
    def weight(self) -> Tensor:
        """The dequantised weight (a detached copy: edit `codebook` or the indices, not this)."""
        return ops.dequantize(self.packed, self.codebook.detach(), self.bits, self.weight_shape)

    def indices(self) -> Tensor:
        """The codebook index of every weight, uint8 shaped like the weight."""
        return ops.unpack(self.packed, self.bits, math.prod(self.weight_shape[1:])).reshape(self.weight_shape)

    @torch.no_grad()
    def set_assignment(self, codebook: Tensor, idx: Tensor) -> None:
        """Replace the codebook and indices (same k, groups and shape as the layer was built with)."""
        codebook, idx, _ = _check_assignment(self.weight_shape, codebook, idx, self.bits)
        if codebook.shape != self.codebook.shape:
            raise ValueError(f"codebook must be {tuple(self.codebook.shape)}, got {tuple(codebook.shape)}")
        self.codebook.copy_(codebook)
        self.packed.copy_(ops.pack(idx.to(self.packed.device).reshape(self.weight_shape[0], -1).contiguous(),
                                   self.bits))

    def _config_repr(self) -> str:
        return (f"bits={self.bits}, k={self.k}, groups={self.groups}, bias={self.bias is not None}, "
                f"activation={self.activation}")

    def _dense_bias(self) -> Optional[Tensor]:
        return None if self.bias is None else self.bias.detach().clone()


class SharedLinear(SharedLayer):
    """nn.Linear with a shared weight [out_features, in_features]: y = x @ W^T + b, W = codebook[group, index]."""

    def __init__(self, in_features: int, out_features: int, bits: int, k: int, groups: int = 1, bias: bool = True,
                 activation: str = "float", device=None, dtype=None) -> None:
        super().__init__((out_features, in_features), bits, k, groups, bias, activation, device, dtype)
        self.in_features, self.out_features = int(in_features), int(out_features)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:  # .to() on a matching dtype still costs a dispatch
            bias = bias.to(x.dtype)
        x = x if x.is_contiguous() else x.contiguous()
        packed = self.packed
        if _SHARED_LINEAR is not None and ops._native("shared_linear", packed):
            # the op itself (codebook already [G, K]): ws.ops' wrapper would only add a Python frame (~0.5 us)
            return _SHARED_LINEAR(x, packed, self.codebook, self.bits, self.out_features, self.in_features, bias,
                                  self.activation)
        return ops.shared_linear(x, packed, self.codebook, self.bits, self.out_features, self.in_features, bias,
                                 self.activation)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Optional[Tensor], codebook: Tensor, idx: Tensor,
                    bits: Optional[int] = None, activation: str = "float") -> "SharedLinear":
        """A SharedLinear from a dense weight's shape [out, in] (its values are not used), a bias, and the
        assignment: codebook [k] or [G, k], idx shaped like the weight."""
        if weight.dim() != 2:
            raise ValueError(f"a linear weight is 2-D [out, in], got shape {tuple(weight.shape)}")
        codebook, idx, bits = _check_assignment(weight.shape, codebook, idx, bits)
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bits, codebook.shape[1], codebook.shape[0], bias is not None, activation,
                    device=weight.device, dtype=None if bias is None else bias.dtype)
        _fill(layer, codebook, idx, bias)
        return layer

    @classmethod
    def from_dense(cls, linear: nn.Linear, codebook: Optional[Tensor] = None, idx: Optional[Tensor] = None,
                   bits: Optional[int] = None, activation: str = "float") -> "SharedLinear":
        """Compress an nn.Linear (or subclass) with the given assignment: codebook [k] or [G, k] and idx (uint8,
        shaped like the weight, every value < k). bits defaults to formats.bits_for(k).

        A BinaryLinear given no codebook/idx becomes its exact 1-bit equivalent (`binary_assignment`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        if codebook is None and idx is None and is_binary_linear(linear):
            codebook, idx = binary_assignment(linear)
        if codebook is None or idx is None:
            raise ValueError("from_dense needs a codebook and idx (only a BinaryLinear can do without)")
        return cls.from_weight(linear.weight, linear.bias, codebook, idx, bits, activation)

    def to_dense(self) -> nn.Linear:
        """An ordinary nn.Linear with the dequantised weight (same device; float32 weight)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.packed.device)
        _copy_dense(dense, self.weight, self._dense_bias())
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._config_repr()}"


class _SharedConv(SharedLayer):
    """Shared conv layers: the conv arguments and the from_dense/to_dense plumbing common to 1-D and 2-D."""

    dense_type: type = nn.Module
    spatial_dims: int = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size, bits: int, k: int, stride=1, padding=0,
                 dilation=1, conv_groups: int = 1, groups: int = 1, bias: bool = True, activation: str = "float",
                 device=None, dtype=None) -> None:
        n = self.spatial_dims
        kernel = _tuple(kernel_size, n, "kernel_size")
        if in_channels % conv_groups or out_channels % conv_groups:
            raise ValueError(f"conv groups={conv_groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        if activation != "float":
            raise ValueError("shared convolutions support activation='float' only")
        super().__init__((out_channels, in_channels // conv_groups, *kernel), bits, k, groups, bias, activation,
                         device, dtype)
        self.in_channels, self.out_channels, self.kernel_size = int(in_channels), int(out_channels), kernel
        self.stride, self.padding, self.dilation = (_tuple(stride, n, "stride"), _tuple(padding, n, "padding"),
                                                    _tuple(dilation, n, "dilation"))
        self.conv_groups = int(conv_groups)

    @classmethod
    def from_dense(cls, conv: nn.Module, codebook: Tensor, idx: Tensor, bits: Optional[int] = None,
                   activation: str = "float"):
        """Compress a dense conv (same type as `dense_type`, or a subclass) with codebook [k] or [G, k] and idx
        (uint8 shaped like conv.weight, values < k). padding_mode must be 'zeros'; string padding 'valid' and
        'same' (when it is symmetric) are turned into numbers."""
        if not isinstance(conv, cls.dense_type):
            raise TypeError(f"expected an {cls.dense_type.__name__}, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"padding_mode={conv.padding_mode!r} is not supported by shared "
                                      "convolutions (only 'zeros')")
        codebook, idx, bits = _check_assignment(conv.weight.shape, codebook, idx, bits)
        padding = _numeric_padding(conv.padding, conv.kernel_size, conv.dilation)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, bits=bits, k=codebook.shape[1],
                    stride=conv.stride, padding=padding, dilation=conv.dilation, conv_groups=conv.groups,
                    groups=codebook.shape[0], bias=conv.bias is not None, activation=activation,
                    device=conv.weight.device, dtype=None if conv.bias is None else conv.bias.dtype)
        _fill(layer, codebook, idx, conv.bias)
        return layer

    def to_dense(self):
        """An ordinary conv of `dense_type` with the dequantised weight (same device; float32 weight)."""
        dense = self.dense_type(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                                self.dilation, self.conv_groups, bias=self.bias is not None,
                                device=self.packed.device)
        _copy_dense(dense, self.weight, self._dense_bias())
        return dense

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, conv_groups={self.conv_groups}, "
                f"{self._config_repr()}")


class SharedConv2d(_SharedConv):
    """nn.Conv2d (padding_mode 'zeros') with a shared weight [out, in/conv_groups, kh, kw].

    `groups` is the number of codebooks (as in every shared layer); the convolution's own groups is
    `conv_groups`."""

    dense_type = nn.Conv2d
    spatial_dims = 2

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return ops.shared_conv2d(x, self.packed, self.codebook, self.bits, self.weight_shape, bias,
                                 self.stride, self.padding, self.dilation, self.conv_groups)


class SharedConv1d(_SharedConv):
    """nn.Conv1d (padding_mode 'zeros') with a shared weight [out, in/conv_groups, k]: runs as a height-1
    shared_conv2d (weight [out, in/conv_groups, 1, k]) on the input unsqueezed to [N, C, 1, L]."""

    dense_type = nn.Conv1d
    spatial_dims = 1

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        out, cin, width = self.weight_shape
        y = ops.shared_conv2d(x.unsqueeze(-2), self.packed, self.codebook, self.bits, (out, cin, 1, width), bias,
                              (1, self.stride[0]), (0, self.padding[0]), (1, self.dilation[0]), self.conv_groups)
        return y.squeeze(-2)


# ----------------------------------------------------------------------------------------------- helpers


def _tuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} must have {n} entries, got {value}")
    return value


def _numeric_padding(padding, kernel_size, dilation) -> tuple[int, ...]:
    """nn.Conv's padding as numbers: 'valid' is 0; 'same' is (d*(k-1))/2 per side when that is whole (an odd
    total would pad one side more, which the packed kernel's symmetric padding cannot express)."""
    if padding == "valid":
        return tuple(0 for _ in kernel_size)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        if any(t % 2 for t in totals):
            raise NotImplementedError("padding='same' with an even effective kernel pads asymmetrically, which "
                                      "shared convolutions do not support")
        return tuple(t // 2 for t in totals)
    return tuple(int(p) for p in padding)


@torch.no_grad()
def _fill(layer: SharedLayer, codebook: Tensor, idx: Tensor, bias: Optional[Tensor]) -> None:
    device = layer.packed.device
    layer.codebook.copy_(codebook.to(device))
    layer.packed.copy_(ops.pack(idx.to(device).reshape(layer.weight_shape[0], -1).contiguous(), layer.bits))
    if bias is not None:
        layer.bias.copy_(bias.detach())


@torch.no_grad()
def _copy_dense(dense: nn.Module, weight: Tensor, bias: Optional[Tensor]) -> None:
    dense.weight.copy_(weight)
    if bias is not None:
        dense.bias.copy_(bias)


def is_binary_linear(module: nn.Module) -> bool:
    """Whether `module` is a models.BinaryLinear (its forward uses sign(weight), not weight)."""
    return isinstance(module, BinaryLinear)


def binary_assignment(linear: nn.Linear, scale: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """The exact 1-bit assignment of a binary layer's sign(weight): (codebook [[-s, +s]], idx = weight >= 0).

    scale None: s = 1, so the shared layer computes exactly what BinaryLinear does (sign maps 0 to +1, and so
    does idx). scale "mean": s = mean |w| (XNOR-Net's scaling), for layers whose latent magnitude should carry."""
    w = linear.weight.detach()
    if scale is None:
        s = torch.ones((), device=w.device)
    elif scale == "mean":
        s = w.abs().mean().float()
    else:
        raise ValueError(f"scale must be None or 'mean', got {scale!r}")
    codebook = torch.stack([-s, s]).reshape(1, 2).float()
    return codebook, (w >= 0).to(torch.uint8)
