"""Tensor-parallel collectives that send nothing for silent ranks, and count every byte they send.

A block's partial outputs are summed across the tensor-parallel ranks (forward), and the input gradients
of its FULL subnets are summed in backward. Which ranks have something to send is known from the shared
schedule on every rank, so all ranks enter the same collective:

* every rank active: one ``all_reduce``;
* some ranks active: ``all_to_all_single`` with zero split sizes for the silent ranks (gloo and NCCL
  accept uneven and zero splits), so a silent rank really puts zero bytes on the wire;
* no rank active: no collective at all (the schedule skipped the whole block, or its backward).

Sums are taken in rank order on every rank, so replicated parameters stay bitwise identical across ranks.

Every collective runs through :func:`named_collective`: a peer that moved on or died turns gloo's timeout
or "Connection closed by peer" into a :class:`CollectiveError` naming the op, the group and this rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["CollectiveError", "CommStats", "SparseTensorParallel", "named_collective", "ring_allreduce_bytes"]


class CollectiveError(RuntimeError):
    """A collective failed: a peer timed out, moved on to another op, or died."""


def ring_allreduce_bytes(nbytes: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``nbytes`` over ``world`` ranks (the one formula)."""
    return nbytes * 2 * (world - 1) // world if world > 1 else 0


def named_collective(name: str, rank: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` (a torch.distributed collective); a failure names it and ``rank`` instead of gloo's
    bare timeout or "Connection closed by peer"."""
    try:
        return fn(*args, **kwargs)
    except CollectiveError:
        raise
    except RuntimeError as err:  # gloo/NCCL raise RuntimeError (DistBackendError is one) on timeout and peer loss
        raise CollectiveError(
            f"collective '{name}' failed on rank {rank}: a peer timed out, took another code path, or died "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__}). The other rank's own error, if "
            f"any, is the cause; a hang is bounded by D2FTStrategy(timeout=...)") from err


@dataclass
class CommStats:
    """Bytes this rank sent, per kind of message, since the last :meth:`reset`."""

    forward_bytes: int = 0
    backward_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.forward_bytes + self.backward_bytes

    def reset(self) -> None:
        self.forward_bytes = self.backward_bytes = 0


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
        own = partial if partial is not None else torch.zeros_like(like, dtype=_partial_dtype(like))
        # Whether the sum requires grad must be the same on every rank: downstream, the next block's
        # copy_to_ranks runs a backward collective only where its input requires grad. The partial alone
        # may require grad on some ranks only (trainable LoRA adapters in this rank's FULL groups, a frozen
        # trunk below), so the shared fact "grad is enabled here" decides (the kernels enable grad in a
        # branch exactly when some rank runs a FULL group in it, which every rank knows from the schedule).
        if torch.is_grad_enabled():
            if not own.requires_grad:
                own = own.detach().requires_grad_()
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
        if n_active == self.world:
            out = tensor.clone()
            named_collective(f"tensor-parallel all_reduce ({kind})", self.rank, dist.all_reduce, out, group=self.group)
            sent = ring_allreduce_bytes(nbytes, self.world)
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
        named_collective("tensor-parallel all_to_all (sparse sum)", self.rank, dist.all_to_all_single,
                         recv, send, recv_splits, send_splits, group=self.group)
        pieces = iter(recv.split([s for s in recv_splits if s]))
        out = None
        for r in range(self.world):
            if not active[r]:
                continue
            part = flat if r == self.rank else next(pieces)
            out = part.clone() if out is None else out + part
        return out.view_as(tensor), sum(send_splits) * tensor.element_size()


def _partial_dtype(like: Tensor) -> torch.dtype:
    """The dtype the ranks with a partial produce: the autocast dtype under mixed precision (a rank without
    a partial must put the same bytes on the wire, or the others read garbage)."""
    device = like.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return like.dtype


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
