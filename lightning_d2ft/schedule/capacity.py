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
    """One device's limits for one row (a micro-batch in step mode, all micro-batches in epoch mode)."""

    capacity: int  # total compute, integer units
    outer_capacity: int  # compute the FULL level may use
    comm: float  # communication units allowed (inf: no communication budget)
    planned_full: int = 0  # item counts a uniform-cost device would get; baselines spend the same
    planned_fo: int = 0


def int_costs(unit: Tensor, per_op: float) -> np.ndarray:
    return np.maximum(1, np.rint(unit.numpy() * per_op * RESOLUTION)).astype(np.int64)


def count_cap(comm_left: float, per_item: float) -> int:
    if math.isinf(comm_left) or per_item == 0:
        return 2**62
    return max(0, math.floor(comm_left / per_item + 1e-9))


def device_budgets(rows: int, place: Tensor, speed: Tensor, unit: Tensor, cost: CostModel, budget: float,
                   comm_budget: float | None, forward_mix: float) -> list[DeviceBudget]:
    """Budgets of every device for a row of ``rows`` micro-batches (1 in step mode)."""
    devices = speed.numel()
    all_full = torch.stack([unit[place == d].sum() * rows * cost.full for d in range(devices)])
    if torch.allclose(speed, speed[0].expand_as(speed)):
        share = budget * all_full
    else:  # equal time: capacity proportional to speed, at most all-FULL
        share = speed_shares(budget * all_full.sum(), speed, all_full)
    full_w = int(int_costs(torch.tensor([1.0]), cost.full)[0])
    fo_w = int(int_costs(torch.tensor([1.0]), cost.forward_only)[0])
    budgets = []
    for d in range(devices):
        b_d = float(share[d] / all_full[d])
        full_fraction = _full_fraction(b_d, comm_budget, cost, forward_mix)
        capacity = math.floor(float(share[d]) * RESOLUTION + 1e-6)
        outer = math.floor(full_fraction * float(all_full[d]) * RESOLUTION + 1e-6)
        if comm_budget is not None and comm_budget < b_d:  # check_comm_budget's floor promises one FULL pair
            outer = max(outer, min(full_w, capacity))
        n_items = int((place == d).sum()) * rows
        comm = math.inf if comm_budget is None else comm_budget * n_items * cost.comm_full
        b = DeviceBudget(capacity=capacity, outer_capacity=min(outer, capacity), comm=comm)
        b.planned_full = min(n_items, b.outer_capacity // full_w, count_cap(comm, cost.comm_full))
        b.planned_fo = min(n_items - b.planned_full, (capacity - b.planned_full * full_w) // fo_w,
                           count_cap(comm - b.planned_full * cost.comm_full, cost.comm_forward_only))
        budgets.append(b)
    return budgets


def _full_fraction(budget: float, comm_budget: float | None, cost: CostModel, forward_mix: float) -> float:
    """Share of the items the FULL level may take: ``forward_mix`` of the way from "FULL takes all the budget
    allows" to "the fewest FULL with which FORWARD_ONLY still spends the budget", measured on whichever budget
    binds an all-FULL schedule. (Measured on compute alone, a binding comm budget gave FULL every pair it
    allowed and FORWARD_ONLY none: at comm 0.5, half of all subnets SHORTCUT in every step, 11 points below
    full fine-tuning on Fashion-MNIST.)"""
    comm = math.inf if comm_budget is None else comm_budget
    if comm < budget:  # communication binds: FULL pays comm_full, FORWARD_ONLY comm_forward_only
        top, ratio = comm, cost.comm_forward_only / cost.comm_full
    else:
        top, ratio = budget, cost.forward_only / cost.full
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

    @property
    def full_cap(self) -> int:
        return count_cap(self.budget.comm, self.cost.comm_full)

    def fo_cap(self, n_full: int) -> int:
        return count_cap(self.budget.comm - n_full * self.cost.comm_full, self.cost.comm_forward_only)


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
              step: bool) -> Rows:
    """One device's rows: ``back``/``fwd`` are ``[micro_batches, subnets of the device]``."""
    n_mb, n_cols = back.shape
    b, f = np.ascontiguousarray(back), np.ascontiguousarray(fwd)
    w_full, w_fo = int_costs(unit, cost.full), int_costs(unit, cost.forward_only)
    if not step:  # one row of all (micro-batch, subnet) items
        b, f = b.reshape(1, -1), f.reshape(1, -1)
        w_full, w_fo = np.tile(w_full, n_mb), np.tile(w_fo, n_mb)
        # FULL ties go to lower forward scores, which leaves the better ones for the inner level
        return Rows(b, f, b, f, f, -f, w_full, w_fo, budget, cost, step)
    m = n_cols
    by_fwd = np.argsort(f, axis=1, kind="stable")  # lower forward score (then lower index) ranks higher
    rank_out = np.empty_like(by_fwd)
    np.put_along_axis(rank_out, by_fwd, np.arange(m, 0, -1)[None, :].repeat(n_mb, 0), axis=1)
    rank_in = np.arange(m, 0, -1)[None, :].repeat(n_mb, 0)  # lower index ranks higher
    zeros = np.zeros((n_mb, m))
    return Rows(b, f, _profits(b, rank_out), zeros, _profits(f, rank_in), zeros, w_full, w_fo, budget, cost, step)


def epilogue(rows: Rows, full: np.ndarray, fo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ops ``[R, m]`` and per-row objectives ``[R, 2]`` (summed float scores of FULL and FORWARD_ONLY)."""
    ops = np.full(full.shape, int(Op.SHORTCUT), dtype=np.int64)
    ops[fo] = Op.FORWARD_ONLY
    ops[full] = Op.FULL
    objective = np.stack([(rows.back * full).sum(1), (rows.fwd * fo).sum(1)], axis=1)
    return ops, objective
