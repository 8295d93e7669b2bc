"""The wire model: the bytes the tensor-parallel collectives really send for a schedule, and each rank's share.

For every (micro-batch, block) the ranks sum their partial outputs of both residual branches (attention and
MLP) in forward, and the input gradients of both in backward
(:class:`lightning_d2ft.parallel.collectives.SparseTensorParallel`). A rank takes part in a block's forward
sum when any of its head groups there runs (FULL or FORWARD_ONLY), and in its backward sum when any is FULL;
its groups of one block share those messages. With ``A`` ranks active out of a tensor-parallel group of
``W``, one such sum puts on the wire, over all ranks and in units of ``(W - 1)`` x the message's bytes:

* 0 when ``A = 0`` (no collective at all);
* 2 when ``A = W`` (a ring ``all_reduce``: ``2 (W - 1) / W`` message bytes per rank);
* ``A`` otherwise (``all_to_all_single``: each active rank sends its message to the ``W - 1`` others).

All messages are the same size (micro-batch x tokens x width), so a schedule's wire fraction is the sum of
these units over every (micro-batch, block, direction), over the same sum for all FULL.

**The communication budget** bounds that fraction. It is a constraint per (rank, block): rank r pays one
*message* (``(W - 1)`` message bytes, what it sends when not every rank is active) for every (block,
direction) it is active in, and may pay at most ``comm_budget`` x its share of the all-FULL units. Since
``units(A) <= A`` (and equal for ``W = 2``), the summed messages bound the real bytes from above, so the
per-rank caps, which add up to ``comm_budget`` x all-FULL, bound the wire: exactly tight on 2 ranks; for
``W > 2`` with every rank holding part of a block the all-FULL ``all_reduce`` costs 2 units for ``W``
active ranks, so a rank's share is ``2 / W`` message per (block, direction) and the cap is conservative by up
to ``W / 2`` (the sparse ``all_to_all`` of a partly active block costs ``A`` units, more than the ring).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_d2ft.ops import Op

__all__ = ["WireLayout", "message_caps", "wire_fraction", "wire_units"]


class WireLayout:
    """Which (rank, block) message group every scheduled column belongs to, for one placement."""

    def __init__(self, placement: Tensor, column_blocks: Tensor | None, world: int) -> None:
        self.world = world
        self.placement = placement
        cols = placement >= 0
        self.columns = cols.nonzero().flatten()
        blocks = column_blocks if column_blocks is not None else torch.arange(placement.numel())
        blocks = torch.as_tensor(blocks, dtype=torch.long)
        # a column without a block (-1) other than the replicated stem/head is its own block
        if blocks.numel():
            blocks = torch.where(blocks >= 0, blocks, torch.arange(blocks.numel()) + int(blocks.max()) + 1)
        block_ids, self.block_of = torch.unique(blocks[cols], return_inverse=True)  # [S] block of each column
        self.num_blocks = block_ids.numel()
        self.rank_of = placement[cols]  # [S]
        self.owners = torch.zeros(self.num_blocks, world, dtype=torch.bool)  # ranks holding part of a block
        if self.columns.numel():
            self.owners[self.block_of, self.rank_of] = True

    def active(self, ops: Tensor, wanted: Op) -> Tensor:
        """``[N, blocks, W]`` bool: rank active in each (micro-batch, block) (op >= ``wanted``)."""
        runs = (ops[:, self.columns] >= wanted).to(torch.float64)
        flat = self.block_of * self.world + self.rank_of
        hit = torch.zeros(ops.shape[0], self.num_blocks * self.world, dtype=torch.float64).index_add_(1, flat, runs)
        return (hit > 0).view(ops.shape[0], self.num_blocks, self.world)

    def units(self, active: Tensor) -> Tensor:
        """Wire units of one sum per entry of ``active [..., W]`` (see the module docstring)."""
        count = active.sum(-1).to(torch.float64)
        if self.world == 1:  # one rank: no collective at all
            return torch.zeros_like(count)
        return torch.where(count == self.world, torch.full_like(count, 2.0), count)

    def all_full_units(self) -> Tensor:
        """``[blocks]`` units of one all-FULL sum of each block (every owner active)."""
        return self.units(self.owners)

    def rank_shares(self) -> Tensor:
        """``[W, blocks]`` each rank's share of a block's all-FULL units (0 where it holds no part of it)."""
        n_owners = self.owners.sum(-1).clamp_min(1).to(torch.float64)
        return (self.all_full_units() / n_owners).unsqueeze(0) * self.owners.T.to(torch.float64)


def wire_units(ops: Tensor, layout: WireLayout) -> tuple[float, float]:
    """(units sent, units of the same micro-batches all FULL), forward and backward sums over both branches."""
    sent = 0.0
    for wanted in (Op.FORWARD_ONLY, Op.FULL):  # forward partial sums, then backward input gradients
        sent += float(layout.units(layout.active(ops, wanted)).sum())
    return sent, 2.0 * ops.shape[0] * float(layout.all_full_units().sum())


def wire_fraction(ops: Tensor, layout: WireLayout) -> float:
    """Bytes on the wire relative to all FULL (0.0 where nothing would be sent, e.g. one device)."""
    sent, full = wire_units(ops, layout)
    return sent / full if full > 0 else 0.0


def message_caps(layout: WireLayout, comm_budget: float, rows: int = 1) -> list[int]:
    """Per rank, the messages it may send per ``rows`` micro-batches: ``comm_budget`` x its share of the
    all-FULL units, over both directions (one message = one (block, direction) it is active in)."""
    shares = layout.rank_shares().sum(1) * 2 * rows
    return [math.floor(comm_budget * float(s) + 1e-9) for s in shares]
