"""How data-parallel replicas stay together, behind one interface (as Lightning hands model averaging to
``PeriodicModelAverager``): :class:`SyncReplicas` all-reduces gradients every step (DDP);
:class:`LofiReplicas` trains replicas independently and averages their weights (lo-fi).

The strategy calls the same five hooks whatever the kind; a single replica does nothing at all.
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lightning_d2ft.parallel.collectives import named_collective, ring_allreduce_bytes

__all__ = ["LofiReplicas", "Replicas", "SyncReplicas", "make_replicas"]


class Replicas:
    """``size`` data-parallel replicas over ``group``; this base class is the one-replica case."""

    def __init__(self, group: dist.ProcessGroup | None, size: int, rank: int) -> None:
        self.group, self.size, self.rank = group, size, rank
        self.bytes_sent = 0  # gradients or weight averages this rank sent
        self.differ = False  # replicas may hold different weights now
        self._own: list[Tensor] | None = None  # this replica's weights while evaluation sees the mean

    def after_backward(self, optimizer: Optimizer) -> None:
        """Between the closure (backward) and clipping/the optimizer step."""

    def after_step(self, tensors: Iterable[Tensor]) -> None:
        """After each optimizer step."""

    def mean(self, t: Tensor) -> Tensor:
        """The mean of ``t`` over the replicas (every replica takes part)."""
        if self.size == 1:
            return t
        total = t.detach().clone()
        named_collective("data-parallel all_reduce (replica mean)", self.rank, dist.all_reduce, total,
                         group=self.group)
        self.bytes_sent += ring_allreduce_bytes(total.numel() * total.element_size(), self.size)
        return total.div_(self.size)

    def average_(self, tensors: Iterable[Tensor]) -> None:
        """Replace every replica's ``tensors`` by their mean."""
        with torch.no_grad():
            for t in tensors:
                t.copy_(self.mean(t))
        self.differ = False


    def evaluate_mean_(self, tensors: list[Tensor]) -> None:
        """Evaluation sees the replicas' mean (the model lo-fi delivers); :meth:`resume_own_` undoes it."""
        if self.differ:
            self._own = [t.detach().clone() for t in tensors]
            self.average_(tensors)

    def resume_own_(self, tensors: list[Tensor]) -> None:
        """Give each replica its own weights back, so that evaluation does not change training."""
        if self._own is None:
            return
        with torch.no_grad():
            for t, saved in zip(tensors, self._own):
                t.copy_(saved)
        self._own, self.differ = None, True


class SyncReplicas(Replicas):
    """DDP: the gradients averaged over the replicas each step, for exactly the parameters that some replica
    trained in it (a replica that did not train one contributes zeros). A parameter that no replica trained
    (a head group that ran no FULL micro-batch anywhere) keeps ``grad=None``, so the optimizer leaves it and
    its state alone, as on one replica: the replicas first agree on which parameters have a gradient (one
    small all-reduce of a flag per parameter, read on the host), then all-reduce those in one flat buffer."""

    def after_backward(self, optimizer: Optimizer) -> None:
        if self.size == 1:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        if not params:
            return
        flags = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8).to(params[0].device)
        named_collective("data-parallel all_reduce (which gradients exist)", self.rank, dist.all_reduce, flags,
                         op=dist.ReduceOp.MAX, group=self.group)
        self.bytes_sent += ring_allreduce_bytes(flags.numel(), self.size)
        trained = [p for p, f in zip(params, flags.tolist()) if f]
        for dtype in sorted({p.dtype for p in trained}, key=str):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trained if p.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in grads])
            named_collective("data-parallel all_reduce (gradients)", self.rank, dist.all_reduce, flat,
                             group=self.group)
            flat.div_(self.size)
            self.bytes_sent += ring_allreduce_bytes(flat.numel() * flat.element_size(), self.size)
            for p, part in zip((p for p in trained if p.dtype == dtype), flat.split([g.numel() for g in grads])):
                p.grad = part.view_as(p)


class LofiReplicas(Replicas):
    """lo-fi: no gradient traffic; weights averaged every ``every`` steps (if set) and when fit ends."""

    def __init__(self, group: dist.ProcessGroup | None, size: int, rank: int, every: int | None) -> None:
        super().__init__(group, size, rank)
        self.every, self.steps = every, 0

    def after_step(self, tensors: Iterable[Tensor]) -> None:
        if self.size == 1:
            return
        self.differ = True
        self.steps += 1
        if self.every and self.steps % self.every == 0:
            self.average_(tensors)


def make_replicas(kind: Literal["sync", "lofi"], group: dist.ProcessGroup | None, size: int, rank: int,
                  every: int | None = None) -> Replicas:
    return LofiReplicas(group, size, rank, every) if kind == "lofi" else SyncReplicas(group, size, rank)
