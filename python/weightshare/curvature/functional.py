"""The loss as a pure function of the chosen parameters, so that autograd and torch.func can differentiate it
without touching the model.

Every routine evaluates the model through torch.func.functional_call with detached stand-ins for its
parameters: the model's tensors, their requires_grad flags and their .grad fields are never modified, and the
parameters that are not differentiated are detached so that no autograd graph is recorded for them.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from weightshare.curvature.traced import TracedForward, named_tensors, trace

LossFn = Callable[[Tensor, Any], Tensor]


class FunctionalLoss:
    """`loss_fn(model(x), y)` as a function of a dict of the differentiated parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, params: Mapping[str, Tensor], caller: str) -> None:
        if not callable(loss_fn):
            raise TypeError(f"weightshare.curvature.{caller}: loss_fn must be callable, got "
                            f"{type(loss_fn).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.params = dict(params)
        self.caller = caller
        differentiated = {id(p) for p in self.params.values()}
        # Aliases of a differentiated (tied) weight are left out: functional_call(tie_weights=True) ties them to
        # the stand-in we pass, and would reject a second, different value for them.
        self._frozen = {n: p.detach() for n, p in model.named_parameters() if id(p) not in differentiated}

    def primals(self) -> dict[str, Tensor]:
        """Detached copies (views) of the differentiated parameters: the point at which derivatives are taken."""
        return {n: p.detach() for n, p in self.params.items()}

    def leaves(self) -> dict[str, Tensor]:
        """Fresh autograd leaves for the differentiated parameters (for torch.autograd based products)."""
        return {n: p.detach().requires_grad_(True) for n, p in self.params.items()}

    def outputs(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        out = functional_call(self.model, {**self._frozen, **params}, (x,))
        if not isinstance(out, Tensor):
            raise TypeError(f"weightshare.curvature.{self.caller}: model(x) must return a tensor, got "
                            f"{type(out).__name__}")
        return out

    def loss_of_outputs(self, out: Tensor, y: Any) -> Tensor:
        loss = self.loss_fn(out, y)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"weightshare.curvature.{self.caller}: loss_fn must return a scalar tensor "
                             f"(use reduction='mean' or 'sum'), got {shape}")
        return loss

    def loss(self, params: Mapping[str, Tensor], x: Tensor, y: Any) -> Tensor:
        return self.loss_of_outputs(self.outputs(params, x), y)

    def traced(self, x: Tensor) -> Optional["TracedForward"]:
        """The model's forward on inputs like x as traced ATen ops (traced.py), or None where it cannot be traced."""
        return trace(self.model, x)

    def traced_values(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every parameter and buffer by every name it has (tied weights included): `params` for the
        differentiated ones, detached tensors for the rest; what TracedForward.primal takes."""
        differentiated = {id(p): params[n] for n, p in self.params.items()}
        return {n: differentiated.get(id(t), t.detach()) for n, t in named_tensors(self.model)}

    def traced_directions(self, v: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A direction over the differentiated parameters, by every name each of them has."""
        by_id = {id(p): v[n] for n, p in self.params.items()}
        return {n: by_id[id(t)] for n, t in self.model.named_parameters(remove_duplicate=False) if id(t) in by_id}

    def zeros_for_unused(self, derivs: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
        """Derivatives of parameters the loss does not depend on are zero, not None."""
        return {n: (torch.zeros_like(p) if derivs.get(n) is None else derivs[n]) for n, p in self.params.items()}
