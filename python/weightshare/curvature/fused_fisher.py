"""The empirical Fisher diagonal through ws.ops.sq_grad_accum: no per-sample gradients in memory.

A Linear/Conv weight's per-sample gradient is (output gradient)^T (input), summed over positions (sequence
tokens, conv output pixels via the unfolded input). One forward pass records every layer's input and output,
one backward pass gives the output gradients of the sum of per-sample losses (the loss function applied to each
sample's output, batched with vmap over the outputs only), and sq_grad_accum turns each layer's (input, output
gradient) into its summed squared per-sample gradients. Same definition as FisherPass (the vmap reference);
used by gather_stats whenever every statistic is the weight of a plain Linear, Conv1d or Conv2d (groups 1, zero
padding) used once, in eval mode."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightshare import ops
from weightshare.curvature.accumulators import WeightedMean
from weightshare.curvature.functional import FunctionalLoss


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return (module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
                and type(module).forward in (nn.Conv1d.forward, nn.Conv2d.forward))
    return False


def fused_modules(model: nn.Module, params: dict[str, Tensor]) -> Optional[dict[str, nn.Module]]:
    """{param name: module} when every parameter is the weight of a supported module used once, else None."""
    if model.training:
        return None
    by_weight = {}
    for prefix, m in model.named_modules():
        w = m._parameters.get("weight") if isinstance(m, nn.Module) else None
        if w is not None:
            if id(w) in by_weight:
                return None  # a tied weight: its gradient sums over several uses
            by_weight[id(w)] = (prefix, m)
    out = {}
    for name, p in params.items():
        hit = by_weight.get(id(p))
        if hit is None or not _supported(hit[1]) or name != (f"{hit[0]}.weight" if hit[0] else "weight"):
            return None
        out[name] = hit[1]
    return out


def _as_sequences(module: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """(inputs [N, T, I], output gradients [N, T, O]) whose per-sample products are the weight gradients."""
    n = x.shape[0]
    if isinstance(module, nn.Linear):
        return x.reshape(n, -1, x.shape[-1]), g.reshape(n, -1, g.shape[-1])
    if isinstance(module, nn.Conv1d):
        x, g = x.unsqueeze(-2), g.unsqueeze(-2)
        k, s, p, d = (1, module.kernel_size[0]), (1, module.stride[0]), (0, module.padding[0]), (1, module.dilation[0])
    else:
        k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # [N, C*kh*kw, L]
    return cols.transpose(1, 2), g.reshape(n, g.shape[1], -1).transpose(1, 2)


class FusedFisherPass:
    """Drop-in for FisherPass (same add_batch/result) when fused_modules() accepts the model."""

    def __init__(self, f: FunctionalLoss, modules: dict[str, nn.Module]) -> None:
        self.f = f
        self.modules = modules
        self._mean = WeightedMean()

    def add_batch(self, x: Tensor, y: Any) -> None:
        if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != x.shape[0]:
            raise ValueError(f"weightshare.curvature.{self.f.caller}: per-sample gradients need y with the batch "
                             f"size {x.shape[0]} as leading dimension")
        seen: dict[str, tuple[Tensor, Tensor]] = {}
        hooks = []
        for name, m in self.modules.items():
            def hook(mod, inputs, output, name=name):
                seen[name] = (inputs[0].detach(), output)
            hooks.append(m.register_forward_hook(hook))
        try:
            with torch.enable_grad():
                out = self.f.model(x.detach().requires_grad_())
                per_sample = torch.func.vmap(lambda o, t: self.f.loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y)
                names = list(seen)
                grads = torch.autograd.grad(per_sample.sum(), [seen[n][1] for n in names], allow_unused=True)
        finally:
            for h in hooks:
                h.remove()
        sums = {}
        for name, g in zip(names, grads):
            w = self.f.params[name]
            if g is None:
                sums[name] = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
                continue
            xs, gs = _as_sequences(self.modules[name], seen[name][0], g)
            sums[name] = ops.sq_grad_accum(xs.contiguous(), gs.contiguous()).reshape(w.shape).to(torch.float64)
        for name in self.f.params:  # a module the forward pass never reached
            sums.setdefault(name, torch.zeros(self.f.params[name].shape, dtype=torch.float64))
        self._mean.add_sum(sums, weight=float(x.shape[0]))

    def reduce_(self, group) -> None:  # as FisherPass.reduce_
        self._mean.reduce_(group, self.f.params)

    def result(self) -> dict[str, Tensor]:
        return self._mean.mean(self.f.params)
