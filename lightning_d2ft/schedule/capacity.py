"""The knapsack instance both solvers read: capacities per row (one micro-batch, or the whole epoch) and
the shared prologue (:class:`Rows`, integer costs and profits) and epilogue (ops and objectives).

Capacity is ``budget`` times the all-FULL cost of the device's items; with declared speeds it is
proportional to speed instead (so that per-device *time* is equal), capped at all-FULL and water-filled.
``forward_mix`` sets the FULL level's share between "FULL takes everything" (0) and "as few FULL as still
spends the budget" (1). Costs are integers in 1/1000 of a FULL subnet, so both solvers see one model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_d2ft.ops import CostModel, Op

RESOLUTION = 1000


@dataclass
class DeviceBudget:
    """One device's limits for one row (a micro-batch in step mode, all micro-batches in epoch mode).

    Communication is counted in *messages* (:mod:`lightning_d2ft.schedule.wire`): a (block, direction) the
    device is active in, whichever number of its groups there run. A FULL group opens both directions of its
    block, a FORWARD_ONLY group only the forward one; groups of a block already open cost nothing more.
    """

    capacity: int  # total compute, integer units
    outer_capacity: int  # compute the FULL level may use
    messages: int | None = None  # messages allowed (None: no communication budget)
    outer_messages: int | None = None  # messages the FULL level may use (2 per block it opens)
    floor_capacity: int = 0  # capacity="epoch": compute every (device, micro-batch) keeps for FULL first


def int_costs(unit: Tensor, per_op: float) -> np.ndarray:
    return np.maximum(1, np.rint(unit.numpy() * per_op * RESOLUTION)).astype(np.int64)


def count_cap(messages: int | None, per_item: int) -> int:
    """How many items of ``per_item`` messages each fit in ``messages`` (no cap: 2^62)."""
    if messages is None:
        return 2**62
    return max(0, messages // per_item)


def device_budgets(rows: int, place: Tensor, speed: Tensor, unit: Tensor, cost: CostModel, budget: float,
                   messages: list[int] | None, slots: list[int] | None, forward_mix: float,
                   full_floor: float | None = None) -> list[DeviceBudget]:
    """Budgets of every device for a row of ``rows`` micro-batches (1 in step mode).

    ``messages``: each device's message cap for the row (None: no communication budget); ``slots``: the
    messages each device would send all FULL (2 per block it holds part of, per micro-batch of the row).
    ``full_floor`` (epoch mode): every (device, micro-batch) keeps that fraction of its per-step FULL share,
    and at least one FULL subnet where that share holds one, as the floor of FULL work that no pooling can
    take away.
    """
    devices = speed.numel()
    all_full = torch.stack([unit[place == d].sum() * rows * cost.full for d in range(devices)])
    if torch.allclose(speed, speed[0].expand_as(speed)):
        share = budget * all_full
    else:  # equal time: capacity proportional to speed, at most all-FULL
        share = speed_shares(budget * all_full.sum(), speed, all_full)
    budgets = []
    for d in range(devices):
        b_d = float(share[d] / all_full[d])
        capacity = math.floor(float(share[d]) * RESOLUTION + 1e-6)
        w_min = int(int_costs(unit[place == d], cost.full).min())
        msgs = None if messages is None else messages[d]
        comm = None if msgs is None else msgs / max(slots[d], 1)  # the device's effective comm fraction
        if comm is not None and comm < b_d:  # communication binds: forward_mix splits the messages
            outer = capacity
            outer_msgs = math.floor(_full_fraction(comm, 0.5, forward_mix) * slots[d] + 1e-6)
            outer_msgs = max(outer_msgs, min(2, msgs))  # check_comm_budget's floor promises one FULL block
        else:
            outer = math.floor(_full_fraction(b_d, cost.forward_only / cost.full, forward_mix) * float(all_full[d])
                               * RESOLUTION + 1e-6)
            outer_msgs = msgs
        b = DeviceBudget(capacity=capacity, outer_capacity=min(outer, capacity), messages=msgs,
                         outer_messages=outer_msgs)
        if full_floor is not None:
            step_outer = b.outer_capacity / rows  # this device's FULL share of one micro-batch
            b.floor_capacity = max(math.floor(full_floor * step_outer + 1e-6), w_min if step_outer >= w_min else 0)
        budgets.append(b)
    return budgets


def _full_fraction(top: float, ratio: float, forward_mix: float) -> float:
    """Share of the binding budget ``top`` the FULL level may take: ``forward_mix`` of the way from "FULL
    takes all of it" to "the fewest FULL with which FORWARD_ONLY, at ``ratio`` of FULL's cost, still spends
    it". On communication ``ratio`` is 0.5 (a FORWARD_ONLY block sends the forward message only). (Measured
    on compute alone, a binding comm budget gave FULL every pair it allowed and FORWARD_ONLY none: at comm
    0.5, half of all subnets SHORTCUT in every step, 11 points below full fine-tuning on Fashion-MNIST.)"""
    min_full = max(0.0, (top - ratio) / (1.0 - ratio)) if ratio < 1 else top
    return top - forward_mix * (top - min_full)


def speed_shares(total: Tensor, speed: Tensor, cap: Tensor) -> Tensor:
    """``total`` split in proportion to ``speed`` with no device above its ``cap``; what a capped device cannot
    take goes to the others, again by speed (so budget 1.0 is all FULL whatever the speeds)."""
    share = torch.zeros_like(cap)
    free = torch.ones_like(cap, dtype=torch.bool)
    remaining = total
    while free.any():
        if remaining >= cap[free].sum() * (1 - 1e-12):  # everything left fits: the free devices run all of it
            share[free] = cap[free]
            break
        want = remaining * speed * free / (speed * free).sum()
        over = free & (want > cap)
        if not over.any():
            share[free] = want[free]
            break
        share[over] = cap[over]
        remaining = remaining - cap[over].sum()
        free &= ~over
    return share


# -- the shared prologue -----------------------------------------------------------------------------
@dataclass
class Rows:
    """Independent knapsack rows of one device, with the same items' costs and limits in every row."""

    back: np.ndarray  # [R, m] float scores
    fwd: np.ndarray
    value_out: np.ndarray  # [R, m] what the outer level maximises (int64 profits in step mode, else floats)
    tie_out: np.ndarray  # [R, m] ascending tie-break among equal value_out
    value_in: np.ndarray
    tie_in: np.ndarray
    w_full: np.ndarray  # [m] int costs
    w_fo: np.ndarray
    budget: DeviceBudget
    cost: CostModel
    step: bool  # one row per micro-batch (integer profits) or one row for the epoch (float scores)
    group: np.ndarray | None = None  # [m] message group (block) of every item; None: one item per group
    fixed: np.ndarray | None = None  # [R, m] items FULL before the outer level (capacity="epoch"'s floor)

    @property
    def grouped(self) -> bool:
        """A message cap with several items sharing a (device, block) group: the grouped solvers' model."""
        return self.budget.messages is not None and self.group is not None \
            and len(np.unique(self.group)) < self.group.size

    @property
    def full_cap(self) -> int:
        """FULL items the messages allow when every item is its own group (a FULL item sends 2 messages)."""
        return count_cap(self.budget.outer_messages, 2)

    def fo_cap(self, n_full: int) -> int:
        """FORWARD_ONLY items the messages left allow when every item is its own group (1 message each)."""
        return count_cap(None if self.budget.messages is None else self.budget.messages - 2 * n_full, 1)

    def outer_left(self, r: int) -> tuple[np.ndarray, int, int]:
        """Row ``r``'s items still free for the outer level, its compute and its item count cap left."""
        if self.fixed is None:
            return np.ones(self.back.shape[1], dtype=bool), self.budget.outer_capacity, self.full_cap
        fixed = self.fixed[r]
        return ~fixed, self.budget.outer_capacity - int(self.w_full[fixed].sum()), self.full_cap - int(fixed.sum())


def _profits(scores: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Integer profits ``round(score / row max * 2^Q) * K + rank`` whose row sum stays below 2^53, so that
    OR-Tools' bounds (doubles) and the DP (int64) both compute it exactly."""
    m = scores.shape[1]
    k = m * (m + 1) // 2 + 1
    q = max(8, 52 - k.bit_length() - m.bit_length())
    top = scores.max(axis=1, keepdims=True)
    scaled = np.divide(scores, top, out=np.zeros_like(scores), where=top > 0)
    return np.rint(scaled * 2.0**q).astype(np.int64) * k + rank


def make_rows(back: np.ndarray, fwd: np.ndarray, unit: Tensor, budget: DeviceBudget, cost: CostModel,
              step: bool, group: np.ndarray | None = None, fixed: np.ndarray | None = None) -> Rows:
    """One device's rows: ``back``/``fwd`` are ``[micro_batches, subnets of the device]``; ``group`` the
    message group of each subnet (step mode); ``fixed`` ``[micro_batches, subnets]`` FULL before the outer
    level (epoch mode's floor)."""
    n_mb, n_cols = back.shape
    b, f = np.ascontiguousarray(back), np.ascontiguousarray(fwd)
    w_full, w_fo = int_costs(unit, cost.full), int_costs(unit, cost.forward_only)
    if not step:  # one row of all (micro-batch, subnet) items
        b, f = b.reshape(1, -1), f.reshape(1, -1)
        w_full, w_fo = np.tile(w_full, n_mb), np.tile(w_fo, n_mb)
        # FULL ties go to lower forward scores, which leaves the better ones for the inner level
        return Rows(b, f, b, f, f, -f, w_full, w_fo, budget, cost, step,
                    fixed=None if fixed is None else fixed.reshape(1, -1))
    m = n_cols
    by_fwd = np.argsort(f, axis=1, kind="stable")  # lower forward score (then lower index) ranks higher
    rank_out = np.empty_like(by_fwd)
    np.put_along_axis(rank_out, by_fwd, np.arange(m, 0, -1)[None, :].repeat(n_mb, 0), axis=1)
    rank_in = np.arange(m, 0, -1)[None, :].repeat(n_mb, 0)  # lower index ranks higher
    zeros = np.zeros((n_mb, m))
    return Rows(b, f, _profits(b, rank_out), zeros, _profits(f, rank_in), zeros, w_full, w_fo, budget, cost, step,
                group=group, fixed=fixed)


def epilogue(rows: Rows, full: np.ndarray, fo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ops ``[R, m]`` and per-row objectives ``[R, 2]`` (summed float scores of FULL and FORWARD_ONLY)."""
    ops = np.full(full.shape, int(Op.SHORTCUT), dtype=np.int64)
    ops[fo] = Op.FORWARD_ONLY
    ops[full] = Op.FULL
    objective = np.stack([(rows.back * full).sum(1), (rows.fwd * fo).sum(1)], axis=1)
    return ops, objective
