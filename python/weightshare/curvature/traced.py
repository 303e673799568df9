"""The network's forward pass as a list of ATen ops, run once for the primal values and once more for the
tangents (Pearlmutter's R-forward, rules in tangents.py): J v for the curvature products without torch.func.

Why trace: a Gauss-Newton product through torch.func.jvp runs the forward twice (once for the autograd graph J^T
needs, once inside jvp for J v) and every op through functorch's wrappers. With the ops in hand, the primal pass
records the graph for J^T and keeps its intermediates, and the tangent pass reuses them: one forward, one
tangent pass, one backward; for Hutchinson (many v on one batch) the forward is not repeated at all.

The forward is traced with make_fx (concrete shapes, ATen ops) over functionalize (no in-place ops left, so a
kept intermediate is never overwritten later) with every parameter and buffer as an input, so a trace stays
valid when their values change; it is cached per model and input signature. Models that cannot be traced this
way (data-dependent Python control flow, non-tensor outputs, mutations that survive functionalisation, such as
BatchNorm's running statistics in training mode) get None from `trace` and the callers keep the torch.func path.
"""
from __future__ import annotations

import operator
import weakref
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.fx import Node
from torch.fx.node import map_arg

from weightshare.curvature.tangents import RULES, ZERO_TANGENT_OPS, fallback

_MAX_TRACES_PER_MODEL = 8
_cache: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class TracedForward:
    """model(x) as ATen ops; `inputs` are the placeholders' names: parameters and buffers, then "x"."""

    def __init__(self, graph: torch.fx.Graph, inputs: list[str]) -> None:
        self.nodes = [n for n in graph.nodes if n.op != "placeholder" and n.op != "output"]
        self.placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        output = next(n for n in graph.nodes if n.op == "output").args[0]
        self.output = output[0] if isinstance(output, (list, tuple)) else output  # make_fx returns a list
        self.inputs = inputs

    def primal(self, values: Mapping[str, Tensor], x: Tensor) -> dict[Node, Any]:
        """Every node's value for parameters/buffers `values` (by name) and input x; autograd records as usual."""
        env: dict[Node, Any] = {}
        for node, name in zip(self.placeholders, self.inputs):
            env[node] = x if name == "x" else values[name]
        for node in self.nodes:
            args, kwargs = map_arg((node.args, node.kwargs), env.__getitem__)
            env[node] = node.target(*args, **kwargs)
        return env

    def result(self, env: Mapping[Node, Any]) -> Tensor:
        return env[self.output]

    def tangent(self, env: Mapping[Node, Any], directions: Mapping[str, Tensor]) -> Optional[Tensor]:
        """J v at the output for the directions of the named inputs (absent names: no tangent); None if zero.
        Records an autograd graph when grad mode is on (for the exact Hessian product), else runs without one."""
        tangents: dict[Node, Any] = {}
        for node, name in zip(self.placeholders, self.inputs):
            tangents[node] = directions.get(name)
        for node in self.nodes:
            targs = _tangent_args(node.args, tangents)
            if node.target is operator.getitem:
                t = targs[0]
                tangents[node] = None if t is None else t[node.args[1]]
                continue
            if node.target in ZERO_TANGENT_OPS or not _any_tangent(targs):
                tangents[node] = None
                continue
            args, kwargs = map_arg((node.args, node.kwargs), env.__getitem__)
            rule = RULES.get(node.target)
            out = env[node]
            tangents[node] = rule(args, kwargs, targs, out) if rule is not None else fallback(
                node.target, args, kwargs, targs, out)
        return tangents[self.output]


def _tangent_args(args: tuple, tangents: Mapping[Node, Any]) -> tuple:
    """The tangents of an op's args: a node's tangent, a list of them for a list of nodes, None for constants."""
    return tuple(tangents[a] if isinstance(a, Node)
                 else [tangents[u] if isinstance(u, Node) else None for u in a] if isinstance(a, (list, tuple))
                 else None for a in args)


def _any_tangent(targs: Any) -> bool:
    for t in targs:
        if isinstance(t, Tensor):
            return True
        if isinstance(t, (list, tuple)) and any(isinstance(u, Tensor) for u in t):
            return True
    return False


def _signature(model: nn.Module, x: Tensor) -> tuple:
    """What a trace depends on besides tensor values: the module tree, parameter and buffer metadata, the input's,
    and the training flags (dropout and batch norm trace differently)."""
    modules = tuple((name, type(m), m.training) for name, m in model.named_modules())
    tensors = tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in named_tensors(model))
    return modules, tensors, (tuple(x.shape), x.dtype, x.device)


def named_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Parameters then buffers, each under every name it has: the traced forward's inputs, in order."""
    return list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))


def trace(model: nn.Module, x: Tensor) -> Optional[TracedForward]:
    """The traced forward of `model` on inputs shaped like `x` (cached), or None when it cannot be traced."""
    if not isinstance(x, Tensor):
        return None
    per_model = _cache.setdefault(model, {})
    key = _signature(model, x)
    if key in per_model:
        return per_model[key]
    traced = _trace_uncached(model, x)
    if len(per_model) >= _MAX_TRACES_PER_MODEL:
        per_model.pop(next(iter(per_model)))
    per_model[key] = traced
    return traced


def _trace_uncached(model: nn.Module, x: Tensor) -> Optional[TracedForward]:
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.func import functional_call, functionalize

    names = [name for name, _ in named_tensors(model)]

    def forward(tensors: list[Tensor], inp: Tensor) -> Tensor:
        out = functional_call(model, dict(zip(names, tensors)), (inp,), tie_weights=False)
        if not isinstance(out, Tensor):
            raise TypeError("model output is not a tensor")
        return out

    values = [t.detach() for _, t in named_tensors(model)]
    try:
        with torch.no_grad():
            gm = make_fx(functionalize(forward, remove="mutations"), tracing_mode="fake")(values, x.detach())
    except Exception:  # untraceable Python: the caller keeps the generic path
        return None
    graph = gm.graph
    for node in graph.nodes:
        if node.op == "get_attr":  # a tensor created at trace time (a constant): fine, read it once
            continue
        if node.op == "call_function" and node.target is not operator.getitem:
            schema = getattr(node.target, "_schema", None)
            if schema is None or schema.is_mutable:
                return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output").args[0]
    if len(placeholders) != len(names) + 1 or (isinstance(output, (list, tuple)) and len(output) != 1):
        return None
    for node in graph.nodes:  # get_attr nodes read the traced module's constant tensors: make them plain calls
        if node.op == "get_attr":
            node.op, node.target, node.args = "call_function", _constant(getattr(gm, node.target)), ()
    return TracedForward(graph, names + ["x"])


def _constant(value: Tensor):
    def read() -> Tensor:
        return value
    return read
