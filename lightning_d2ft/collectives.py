"""Tensor-parallel collectives that send nothing for silent ranks, and count every byte they send.

A block's partial outputs are summed across the tensor-parallel ranks (forward), and the input gradients
of its FULL subnets are summed in backward. Which ranks have something to send is known from the shared
schedule on every rank, so all ranks enter the same collective:

* every rank active: one ``all_reduce``;
* some ranks active: ``all_to_all_single`` with zero split sizes for the silent ranks (gloo and NCCL
  accept uneven and zero splits), so a silent rank really puts zero bytes on the wire;
* no rank active: no collective at all (the schedule skipped the whole block, or its backward).

Sums are taken in rank order on every rank, so replicated parameters stay bitwise identical across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["CommStats", "SparseTensorParallel"]


@dataclass
class CommStats:
    """Bytes this rank sent, per kind of message, since the last :meth:`reset`."""

    forward_bytes: int = 0
    backward_bytes: int = 0
    collectives: int = 0
    history: list[int] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.forward_bytes + self.backward_bytes

    def reset(self) -> None:
        self.forward_bytes = self.backward_bytes = self.collectives = 0


class SparseTensorParallel:
    """The f/g operators of tensor parallelism over ``group``, skipping silent ranks (see module docstring)."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world: int) -> None:
        self.group = group
        self.rank = rank
        self.world = world
        self.stats = CommStats()

    # -- the two operators D2FTViT calls --------------------------------------------------------
    def reduce_partial(self, partial: Tensor | None, like: Tensor, active: Sequence[bool]) -> Tensor:
        """Sum of all ranks' partial outputs. ``like`` is the branch input (shape, dtype, and the autograd
        edge that makes a rank without local FULL subnets still join the backward collective)."""
        own = partial if partial is not None else torch.zeros_like(like)
        # ``like`` requires grad on every rank or on none (it is replicated), so the backward collective of
        # copy_to_ranks runs everywhere or nowhere; the partial's own gradient needs no communication, and it
        # may require grad alone (a frozen model below with trainable adapters here)
        if like.requires_grad or own.requires_grad:
            return _ReducePartial.apply(own, like, self, tuple(active))
        return self.sum_across(own.detach(), active, "forward")

    def copy_to_ranks(self, h: Tensor, active: Sequence[bool]) -> Tensor:
        """Identity forward; backward sums the input gradients of the ranks in ``active``."""
        return _CopyToRanks.apply(h, self, tuple(active))

    # -- the collective itself ------------------------------------------------------------------
    def sum_across(self, tensor: Tensor, active: Sequence[bool], kind: str) -> Tensor:
        """Sum ``tensor`` over the ranks flagged in ``active`` (the others contribute zero and send nothing)."""
        n_active = sum(active)
        if self.world == 1 or n_active == 0:
            return tensor
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        self.stats.collectives += 1
        if n_active == self.world:
            out = tensor.clone()
            dist.all_reduce(out, group=self.group)
            sent = nbytes * 2 * (self.world - 1) // self.world  # ring all-reduce
        else:
            out, sent = self._sparse_sum(tensor, active)
        if kind == "forward":
            self.stats.forward_bytes += sent
        else:
            self.stats.backward_bytes += sent
        return out

    def _sparse_sum(self, tensor: Tensor, active: Sequence[bool]) -> tuple[Tensor, int]:
        """Active ranks send their tensor to every other rank; everyone sums in rank order."""
        n = tensor.numel()
        me_active = active[self.rank]
        send_splits = [n if (me_active and r != self.rank) else 0 for r in range(self.world)]
        recv_splits = [n if (active[r] and r != self.rank) else 0 for r in range(self.world)]
        flat = tensor.reshape(-1)
        send = flat.repeat(sum(1 for s in send_splits if s)) if me_active else flat.new_empty(0)
        recv = flat.new_empty(sum(recv_splits))
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group)
        pieces = iter(recv.split([s for s in recv_splits if s]))
        out = None
        for r in range(self.world):
            if not active[r]:
                continue
            part = flat if r == self.rank else next(pieces)
            out = part.clone() if out is None else out + part
        return out.view_as(tensor), sum(send_splits) * tensor.element_size()


class _ReducePartial(torch.autograd.Function):
    """Forward: sum of partials across ranks. Backward: identity for the partial, zero for ``like``."""

    @staticmethod
    def forward(ctx, partial: Tensor, like: Tensor, comm: SparseTensorParallel, active: tuple[bool, ...]) -> Tensor:
        ctx.partial_needs_grad = partial.requires_grad
        return comm.sum_across(partial.detach(), active, "forward")

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad if ctx.partial_needs_grad else None), torch.zeros_like(grad), None, None


class _CopyToRanks(torch.autograd.Function):
    """Forward: identity. Backward: sum of the input gradients over the ranks with FULL subnets."""

    @staticmethod
    def forward(ctx, h: Tensor, comm: SparseTensorParallel, active: tuple[bool, ...]) -> Tensor:
        ctx.comm, ctx.active = comm, active
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.comm.sum_across(grad, ctx.active, "backward"), None, None
