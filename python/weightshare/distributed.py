"""Compression across processes (torch.distributed): the collective steps ws.compress and gather_stats take when
given a process group.

Every rank brings its own shard of the calibration data and the same model. The statistics pass runs on each
shard and its float64 sums are added across ranks, so every rank holds the statistics of the union of the shards
(equal to one process over all the data up to the order of float64 additions); measured losses are likewise the
mean over the union. The per-layer fits (codebook and assignment, the expensive part on large models) are spread
over the ranks, each computing the layers it owns, and sent to every rank, so all ranks take the same decisions
and return the same compressed model. Held-out metrics (eval_fn) are computed on every rank and rank 0's value is
used, so a rank-local evaluation cannot split the search.

Failures: a step that raises on some ranks makes every rank raise (the others a RuntimeError naming the failing
ranks) instead of leaving them waiting in the next collective.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


class Group:
    """The collectives of one process group, or the trivial ones of a single process (process_group None).
    Build it with as_group."""

    def __init__(self, process_group: Any = None, caller: str = "compress") -> None:
        self.caller = caller
        self.pg = None
        self.size, self.rank = 1, 0
        if process_group is None:
            return
        if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"weightshare.{caller}: process_group must be a torch.distributed.ProcessGroup (e.g. "
                            f"torch.distributed.group.WORLD) or None, got {type(process_group).__name__}")
        if not dist.is_initialized():
            raise RuntimeError(f"weightshare.{caller}: process_group was given but torch.distributed is not "
                               f"initialised (call torch.distributed.init_process_group first)")
        self.pg = process_group
        self.size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        # NCCL moves CUDA tensors only, on the group's bound device (init_process_group(device_id=...)) or else the
        # current one (torch.cuda.set_device(local_rank), as torchrun scripts do); gloo (and the others) CPU tensors
        self.device = torch.device("cpu")
        if dist.get_backend(process_group) == "nccl":
            bound = getattr(process_group, "bound_device_id", None)
            self.device = bound if bound is not None else torch.device("cuda", torch.cuda.current_device())

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.pg, group_rank)

    def together(self, step: Callable[[], T]) -> T:
        """step() on every rank; if it raised on any rank, every rank raises (its own exception where it failed)."""
        if not self.distributed:
            return step()
        error: Optional[BaseException] = None
        result = None
        try:
            result = step()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have been told
            error = e
        failed = torch.zeros(self.size, dtype=torch.float64, device=self.device)
        failed[self.rank] = 1.0 if error is not None else 0.0
        dist.all_reduce(failed, group=self.pg)
        if error is not None:
            raise error
        bad = [r for r in range(self.size) if failed[r] > 0]
        if bad:
            raise RuntimeError(f"weightshare.{self.caller}: failed on rank(s) {bad} of the process group (their "
                               f"exception says why); this rank stopped with them")
        return result  # type: ignore[return-value]

    def sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Element-wise sums over the ranks, in float64, in one collective (returned in each input's device)."""
        if not self.distributed:
            return [t.to(torch.float64) for t in tensors]
        flat = torch.cat([t.detach().to(self.device, torch.float64).reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.pg)
        out, at = [], 0
        for t in tensors:
            out.append(flat[at:at + t.numel()].reshape(t.shape).to(t.device))
            at += t.numel()
        return out

    def gather(self, t: Tensor) -> list[Tensor]:
        """Every rank's tensor (the same shape on all), in rank order, as float64 on t's device."""
        if not self.distributed:
            return [t.to(torch.float64)]
        parts = [torch.empty(t.shape, dtype=torch.float64, device=self.device) for _ in range(self.size)]
        dist.all_gather(parts, t.detach().to(self.device, torch.float64).contiguous(), group=self.pg)
        return [p.to(t.device) for p in parts]

    def rank0(self, value: Optional[float]) -> Optional[float]:
        """Rank 0's value on every rank (None stays None when rank 0's is None)."""
        if not self.distributed:
            return value
        t = torch.tensor([0.0 if value is None else 1.0, 0.0 if value is None else float(value)],
                         dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=self._global(0), group=self.pg)
        return float(t[1]) if t[0] > 0 else None

    def broadcast_(self, t: Tensor, owner: int) -> Tensor:
        """t (filled in on `owner`, any shape on the others) sent from the owner to every rank, in place."""
        if not self.distributed:
            return t
        buf = t if t.device == self.device else t.to(self.device)
        dist.broadcast(buf, src=self._global(owner), group=self.pg)
        if buf is not t:
            t.copy_(buf)
        return t

    def owners(self, costs: Sequence[float]) -> list[int]:
        """A rank for each job: the costliest first, each to the least loaded rank (ties: the lower job index,
        the lower rank), the same on every rank."""
        load = [0.0] * self.size
        owner = [0] * len(costs)
        for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            r = min(range(self.size), key=lambda r: (load[r], r))
            owner[j] = r
            load[r] += costs[j]
        return owner


def as_group(process_group: Any, caller: str) -> Group:
    """A Group for the process_group argument of a public function (None: one process; a Group passes through)."""
    return process_group if isinstance(process_group, Group) else Group(process_group, caller)


def compute_spread(group: Group, keys: Sequence[Hashable], costs: Sequence[float], compute: Callable[[Any], T],
                   send: Callable[[Optional[T], int, int], T]) -> dict[Hashable, T]:
    """compute(key) for every key, each on one rank (Group.owners by cost), the results on every rank.

    send(result or None, owner, index) moves one result from its owner to every rank (the owner passes its
    result, the others None) and returns it; it is called for the keys in order on every rank."""
    if not group.distributed:
        return {k: compute(k) for k in keys}
    owner = group.owners(costs)
    mine = group.together(lambda: {i: compute(k) for i, k in enumerate(keys) if owner[i] == group.rank})
    return {k: send(mine.get(i), owner[i], i) for i, k in enumerate(keys)}
