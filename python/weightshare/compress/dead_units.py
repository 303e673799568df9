"""Exact dead-unit elimination: zero the weight rows and biases of units that nothing reads.

A unit is one output row of a Linear (one output feature) or one output channel of a Conv2d. When every layer that
consumes a producer's output has all-zero weights for the inputs that come from unit j, unit j is *unread*: its
value cannot change the network's output. Setting its weight row and its bias to exactly 0 then changes nothing
either, and it makes the file smaller (a zero row costs a few bits in an entropy-coded index stream; a zero bias
costs nothing with io.py's masked bias storage). Pruning leaves many such units: in the demo's pruned LeNet-5 266
of fc1's 500 units are unread by fc2, and zeroing their fc1 rows in turn leaves conv2 channels unread by fc1, and
so on: `zero_dead_units_` iterates to a fixed point.

How the readers are found: the model is traced with torch.fx (shared layers are leaves) and its shapes propagated
with `example_input` (fx's ShapeProp, in eval mode without gradients; nothing in the model changes). From every
producer the output is followed through ops that keep units apart, with the layout of the units tracked
(which dimension holds them, and how many consecutive features each unit spans there):

* elementwise ops (ReLU and friends, sigmoid/tanh, dropout, Identity, contiguous/clone): any f, f(0) != 0 too,
  since the unit is unread anyway;
* BatchNorm (per channel: only when the units are the channel dimension, dim 1);
* 1-D/2-D/3-D max/avg (and adaptive) pooling, and `mean` over dimensions other than the units';
* flatten / view / reshape / squeeze / unsqueeze when the units' dimension stays, or is the outermost of the
  merged ones ([N, C, H, W] -> [N, C*H*W]: channel c is the column block [c*H*W, (c+1)*H*W));
* size / shape queries (they read no values);

into consumers, which must be nn.Linear, nn.Conv2d (conv groups 1), SharedLinear (activation "float") or
SharedConv2d (conv groups 1), reading the units in their input dimension. Anything else that touches the output
(an add or cat, the model's output, an unknown function, a channel-mixing op, a grouped conv, a SharedLinear
with int8 activations, whose per-row dynamic scale reads every input) leaves the producer alone. Producers must
be one of the same four layer types (exact types: a subclass such as models.BinaryLinear computes with something
other than its weight, and parametrised layers compute their weight on the fly).

Zeroing an unread unit: dense layers get a zero weight row and bias entry. Shared layers get a zero bias entry,
and their row's indices point at an exactly-zero codebook entry of the row's group (then repacked) when there is
one; otherwise the row's weights stay as they are (still exact: the unit is unread).

Exact means bit-identical outputs for finite activations: a consumer's term for an unread input is 0 * x = +-0
before and after, and adding a zero leaves every partial sum unchanged. (A producer that emits Inf/NaN for some
input is the one exception: 0 * Inf is NaN.)
"""
from __future__ import annotations

import builtins
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from weightshare import ops
from weightshare.nn import SharedConv2d, SharedLayer, SharedLinear

__all__ = ["zero_dead_units_", "DeadUnitReport", "LayerDeadUnits"]

_LINEAR_TYPES = (nn.Linear, SharedLinear)
_CONV_TYPES = (nn.Conv2d, SharedConv2d)

_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
    F.mish, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.sigmoid, F.tanh, torch.sigmoid, torch.tanh,
    F.dropout, torch.nn.functional.alpha_dropout,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone"}
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                        nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.Identity,
                        nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# pooling over the last n dimensions
_POOL_FUNCTIONS = {F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_max_pool1d: 1, F.adaptive_avg_pool1d: 1,
                   F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_max_pool2d: 2, F.adaptive_avg_pool2d: 2,
                   F.max_pool3d: 3, F.avg_pool3d: 3, F.adaptive_max_pool3d: 3, F.adaptive_avg_pool3d: 3}
_POOL_MODULES = ((nn.MaxPool1d, 1), (nn.AvgPool1d, 1), (nn.AdaptiveMaxPool1d, 1), (nn.AdaptiveAvgPool1d, 1),
                 (nn.MaxPool2d, 2), (nn.AvgPool2d, 2), (nn.AdaptiveMaxPool2d, 2), (nn.AdaptiveAvgPool2d, 2),
                 (nn.MaxPool3d, 3), (nn.AvgPool3d, 3), (nn.AdaptiveMaxPool3d, 3), (nn.AdaptiveAvgPool3d, 3))
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}
_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)
_QUERY_METHODS = {"size", "dim"}
_QUERY_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}


# ----------------------------------------------------------------------------------------------- report


@dataclass
class LayerDeadUnits:
    """What zero_dead_units_ did to one producer layer."""

    name: str
    kind: str              # "linear" | "conv2d"
    units: int             # output rows / channels
    dead: int = 0          # units found unread (weights already zero included)
    weights_zeroed: int = 0   # weights that were nonzero and are now exactly 0
    biases_zeroed: int = 0    # bias entries that were nonzero and are now exactly 0
    weights_kept: int = 0     # nonzero weights left in unread rows (a shared layer whose codebook has no 0.0)


@dataclass
class DeadUnitReport:
    """Per producer layer (every supported layer the trace found, in graph order) and in total."""

    layers: list[LayerDeadUnits] = field(default_factory=list)
    rounds: int = 0        # passes until nothing changed (the last one changes nothing)

    @property
    def dead(self) -> int:
        return sum(l.dead for l in self.layers)

    @property
    def weights_zeroed(self) -> int:
        return sum(l.weights_zeroed for l in self.layers)

    @property
    def biases_zeroed(self) -> int:
        return sum(l.biases_zeroed for l in self.layers)

    def summary(self) -> str:
        return (f"dead units: {self.dead} unread units in {sum(1 for l in self.layers if l.dead)} layers; zeroed "
                f"{self.weights_zeroed:,} weights and {self.biases_zeroed:,} biases ({self.rounds} rounds)")

    def __str__(self) -> str:
        head = ("layer", "kind", "units", "dead", "weights zeroed", "biases zeroed", "weights kept")
        rows = [(l.name, l.kind, str(l.units), str(l.dead), f"{l.weights_zeroed:,}", str(l.biases_zeroed),
                 f"{l.weights_kept:,}") for l in self.layers]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        return "\n".join([fmt(head), "-" * len(fmt(head)), *map(fmt, rows), self.summary()])


# ----------------------------------------------------------------------------------------------- tracing


class _Tracer(fx.Tracer):
    """fx's default tracer, with the shared layers as leaves too (their forward calls custom ops)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, SharedLayer) or super().is_leaf_module(m, module_qualified_name)


def _layer_kind(module: nn.Module) -> Optional[str]:
    """'linear' / 'conv2d' for the supported layer types (exact types, conv groups 1), else None."""
    t = type(module)
    if t in _LINEAR_TYPES:
        return "linear"
    if t in _CONV_TYPES:
        return "conv2d" if (module.conv_groups if isinstance(module, SharedLayer) else module.groups) == 1 else None
    return None


def _shape(node: fx.Node) -> Optional[tuple[int, ...]]:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _node_refs(value: Any) -> list[fx.Node]:
    refs: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: refs.append(n))
    return refs


def _only_as_first_arg(user: fx.Node, src: fx.Node) -> bool:
    """src is the user's first positional argument and appears nowhere else in its arguments."""
    return (bool(user.args) and user.args[0] is src and src not in _node_refs(user.args[1:])
            and src not in _node_refs(user.kwargs))


def _no_other_tensors(user: fx.Node) -> bool:
    """Besides args[0], the user's arguments hold no graph values (a second tensor would be a binary op)."""
    return not _node_refs(user.args[1:]) and not _node_refs(user.kwargs)


def _arg(user: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(user.args) > index:
        return user.args[index]
    return user.kwargs.get(name, default)


@dataclass(frozen=True)
class _Layout:
    """Where a producer's units sit in a tensor: dimension `dim`, each unit `width` consecutive entries of it."""
    dim: int
    width: int


def _reshaped(layout: _Layout, before: tuple[int, ...], after: tuple[int, ...]) -> Optional[_Layout]:
    """The units' layout after a row-major reshape from `before` to `after`, or None when a unit's entries stop
    being one contiguous block of one dimension."""
    if math.prod(before) != math.prod(after):
        return None
    n, m = len(before), len(after)
    p = 0
    while p < min(n, m) and before[p] == after[p]:
        p += 1
    q = 0
    while q < min(n, m) - p and before[n - 1 - q] == after[m - 1 - q]:
        q += 1
    d = layout.dim
    if d < p:  # the leading dims agree, so they index the same way
        return layout
    if d >= n - q:  # so do the trailing ones
        return _Layout(d - n + m, layout.width)
    # d is among the merged / split middle dims: fine when they merge into one and d is the outermost of them
    if m - q - p == 1 and d == p:
        return _Layout(p, layout.width * math.prod(before[d + 1:n - q]))
    return None


def _reduced(layout: _Layout, ndim: int, dims: Any, keepdim: bool) -> Optional[_Layout]:
    """The layout after a mean over `dims` (ints), or None when the units' dimension is reduced."""
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims):
        return None
    dims = {d % ndim for d in dims}
    if layout.dim in dims:
        return None
    return layout if keepdim else _Layout(layout.dim - sum(1 for d in dims if d < layout.dim), layout.width)


class _Graph:
    """The traced model with shapes, and the question: which of a producer node's units does nothing read?"""

    def __init__(self, model: nn.Module, example_input: Union[Tensor, Sequence[Tensor]]) -> None:
        try:
            graph = _Tracer().trace(model)
        except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError, ...
            raise ValueError(f"zero_dead_units_: torch.fx cannot trace {type(model).__name__} "
                             f"({type(exc).__name__}: {exc})") from exc
        self.module = fx.GraphModule(model, graph)
        inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                ShapeProp(self.module).propagate(*inputs)
        finally:
            for m, mode in modes.items():
                m.training = mode
        self.model = model

    def submodule(self, node: fx.Node) -> nn.Module:
        return self.model.get_submodule(node.target)

    def producers(self) -> list[tuple[fx.Node, nn.Module, str]]:
        out = []
        for node in self.module.graph.nodes:
            if node.op == "call_module":
                module = self.submodule(node)
                kind = _layer_kind(module)
                if kind is not None and _shape(node) is not None:
                    out.append((node, module, kind))
        return out

    def unread(self, node: fx.Node, kind: str, units: int) -> Tensor:
        """Bool [units]: True where nothing reads unit j of this call's output."""
        shape = _shape(node)
        dim = len(shape) - 1 if kind == "linear" else len(shape) - 3
        if dim < 0 or shape[dim] != units:
            return torch.zeros(units, dtype=torch.bool)
        result = self._follow(node, _Layout(dim, 1), units)
        return torch.zeros(units, dtype=torch.bool) if result is None else result

    # -- following the units

    def _follow(self, src: fx.Node, layout: _Layout, units: int) -> Optional[Tensor]:
        """AND over src's users of 'unit j unread'; None as soon as some user may read every unit."""
        unread = torch.ones(units, dtype=torch.bool)
        for user in src.users:
            got = self._user(user, src, layout, units)
            if got is None:
                return None
            unread &= got
        return unread

    def _user(self, user: fx.Node, src: fx.Node, layout: _Layout, units: int) -> Optional[Tensor]:
        if self._is_query(user, src):
            return torch.ones(units, dtype=torch.bool)
        if user.op not in ("call_module", "call_function", "call_method") or not _only_as_first_arg(user, src):
            return None  # the model's output, or src used in some other position (a second operand, a list...)
        shape, out_shape = _shape(src), _shape(user)
        if shape is None:
            return None
        module = self.submodule(user) if user.op == "call_module" else None
        if module is not None and _layer_kind(module) is not None:
            return self._consumer(module, _layer_kind(module), user, shape, layout, units)
        if out_shape is None:
            return None  # a tuple or non-tensor result (e.g. max_pool with return_indices)
        nxt = self._passes(user, module, shape, out_shape, layout)
        return None if nxt is None else self._follow(user, nxt, units)

    @staticmethod
    def _is_query(user: fx.Node, src: fx.Node) -> bool:
        """x.size(...), x.dim(), x.shape: read no values (src must be the object queried, nothing else)."""
        if user.op == "call_method" and user.target in _QUERY_METHODS:
            return _only_as_first_arg(user, src)
        return (user.op == "call_function" and user.target is builtins.getattr and len(user.args) == 2
                and user.args[0] is src and user.args[1] in _QUERY_ATTRIBUTES)

    def _passes(self, user: fx.Node, module: Optional[nn.Module], shape: tuple, out_shape: tuple,
                layout: _Layout) -> Optional[_Layout]:
        """The units' layout in the user's output when the user keeps them apart, else None."""
        ndim, target, op = len(shape), user.target, user.op
        if op == "call_module":
            if isinstance(module, _ELEMENTWISE_MODULES):
                return layout if out_shape == shape else None
            if isinstance(module, _BATCHNORM_MODULES):
                return layout if layout.dim == 1 and out_shape == shape else None
            for cls, n in _POOL_MODULES:
                if isinstance(module, cls):
                    if getattr(module, "return_indices", False):
                        return None
                    return layout if layout.dim < ndim - n and len(out_shape) == ndim else None
            if isinstance(module, _RESHAPE_MODULES):
                return _reshaped(layout, shape, out_shape)
            return None
        elementwise = (op == "call_function" and target in _ELEMENTWISE_FUNCTIONS) or \
                      (op == "call_method" and target in _ELEMENTWISE_METHODS)
        if elementwise:
            return layout if _no_other_tensors(user) and out_shape == shape else None
        if op == "call_function" and target in _POOL_FUNCTIONS:
            n = _POOL_FUNCTIONS[target]
            ok = _no_other_tensors(user) and layout.dim < ndim - n and len(out_shape) == ndim
            return layout if ok else None
        if (op == "call_function" and target in _RESHAPE_FUNCTIONS) or \
                (op == "call_method" and target in _RESHAPE_METHODS):
            return _reshaped(layout, shape, out_shape)  # sizes may come from graph values (x.size(0)): shapes tell
        if (op == "call_method" and target == "mean") or (op == "call_function" and target is torch.mean):
            if not _no_other_tensors(user) or "dtype" in user.kwargs:
                return None
            dims, keepdim = _arg(user, 1, "dim", None), _arg(user, 2, "keepdim", False)
            return _reduced(layout, ndim, dims, bool(keepdim)) if dims is not None else None
        return None

    @staticmethod
    def _consumer(module: nn.Module, kind: str, user: fx.Node, shape: tuple, layout: _Layout,
                  units: int) -> Optional[Tensor]:
        """Bool [units]: the consumer's weights for unit j's inputs are all zero."""
        if len(user.args) != 1 or user.kwargs:
            return None
        if isinstance(module, SharedLinear) and module.activation != "float":
            return None  # int8 activations: the per-row scale reads every input
        ndim = len(shape)
        weight = module.weight.detach()
        if kind == "linear":
            if layout.dim != ndim - 1 or weight.shape[1] != units * layout.width:
                return None
            zero = (weight == 0).all(dim=0).reshape(units, layout.width).all(dim=1)
        else:
            if layout.dim != ndim - 3 or layout.width != 1 or weight.shape[1] != units:
                return None
            zero = (weight == 0).transpose(0, 1).reshape(units, -1).all(dim=1)
        return zero.cpu()


# ----------------------------------------------------------------------------------------------- zeroing


@torch.no_grad()
def _zero_units(module: nn.Module, dead: Tensor, entry: LayerDeadUnits) -> bool:
    """Zero the bias entries and weight rows of the dead units; returns whether any weight changed."""
    device = module.bias.device if module.bias is not None else (
        module.packed.device if isinstance(module, SharedLayer) else module.weight.device)
    rows = dead.nonzero().reshape(-1).to(device)
    if module.bias is not None:
        entry.biases_zeroed += int((module.bias[rows] != 0).sum())
        module.bias[rows] = 0
    if isinstance(module, SharedLayer):
        return _zero_shared_rows(module, rows, entry)
    weight = module.weight
    changed = int((weight[rows] != 0).sum())
    if changed:
        weight[rows] = 0
        entry.weights_zeroed += changed
    return changed > 0


def _zero_entries(codebook: Tensor) -> Tensor:
    """Per codebook group: the index of an exactly-zero entry (+0.0 preferred over -0.0), or -1."""
    zero = codebook == 0
    score = zero.int() * 2 + (zero & ~torch.signbit(codebook)).int()  # +0.0: 3, -0.0: 2, other: 0
    best = score.argmax(dim=1)
    return torch.where(score.gather(1, best[:, None]).squeeze(1) > 0, best, torch.full_like(best, -1))


def _zero_shared_rows(layer: SharedLayer, rows: Tensor, entry: LayerDeadUnits) -> bool:
    weight = layer.weight.reshape(layer.weight_shape[0], -1)
    live = (weight[rows] != 0).any(dim=1)
    rows = rows[live.to(rows.device)]  # rows already all zero stay as they are
    if rows.numel() == 0:
        return False
    zero_at = _zero_entries(layer.codebook.detach())
    per_group = layer.weight_shape[0] // layer.groups
    target = zero_at[rows.to(zero_at.device) // per_group]
    can = target >= 0
    kept, rows, target = rows[~can.to(rows.device)], rows[can.to(rows.device)], target[can]
    entry.weights_kept += int((weight[kept] != 0).sum())
    if rows.numel() == 0:
        return False
    entry.weights_zeroed += int((weight[rows] != 0).sum())
    idx = layer.indices().reshape(layer.weight_shape[0], -1).clone()
    idx[rows] = target.to(idx.device, torch.uint8)[:, None]
    layer.packed.copy_(ops.pack(idx.contiguous(), layer.bits))
    return True


def zero_dead_units_(model: nn.Module, example_input: Union[Tensor, Sequence[Tensor]]) -> DeadUnitReport:
    """Zero, in place, the weight rows and biases of every unit whose output no layer reads (see the module
    docstring for what counts), repeating until nothing changes; returns what was done per layer.

    example_input: a tensor (or tuple of tensors) the model accepts, used only for shapes (e.g.
    torch.zeros(1, 1, 28, 28) for the MNIST models). The model's outputs do not change, bit for bit, for any
    input whose activations are finite. Raises ValueError when torch.fx cannot trace the model."""
    graph = _Graph(model, example_input)
    producers = graph.producers()
    by_module: dict[int, tuple[str, nn.Module, str, list[fx.Node]]] = {}
    for node, module, kind in producers:
        key = id(module)
        if key not in by_module:
            by_module[key] = (str(node.target), module, kind, [])
        by_module[key][3].append(node)
    entries = {key: LayerDeadUnits(name, kind, _units(module, kind)) for key, (name, module, kind, _) in
               by_module.items()}
    report = DeadUnitReport(layers=list(entries.values()))
    dead_so_far = {key: torch.zeros(entry.units, dtype=torch.bool) for key, entry in entries.items()}
    while True:
        report.rounds += 1
        changed = False
        for key, (name, module, kind, nodes) in by_module.items():
            units = entries[key].units
            unread = torch.ones(units, dtype=torch.bool)
            for node in nodes:  # a module called twice: unread at every call
                unread &= graph.unread(node, kind, units)
            new = unread & ~dead_so_far[key]
            if not new.any():
                continue
            dead_so_far[key] |= new
            entries[key].dead = int(dead_so_far[key].sum())
            changed |= _zero_units(module, new, entries[key])
        if not changed:
            return report


def _units(module: nn.Module, kind: str) -> int:
    return module.weight_shape[0] if isinstance(module, SharedLayer) else module.weight.shape[0]
