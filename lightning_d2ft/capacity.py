"""Knapsack capacities: what each device may spend per row (one micro-batch, or the whole epoch).

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

from lightning_d2ft.ops import CostModel

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
    ratio_fo = cost.forward_only / cost.full
    full_w = int(int_costs(torch.tensor([1.0]), cost.full)[0])
    fo_w = int(int_costs(torch.tensor([1.0]), cost.forward_only)[0])
    budgets = []
    for d in range(devices):
        b_d = float(share[d] / all_full[d])
        min_full = max(0.0, (b_d - ratio_fo) / (1.0 - ratio_fo)) if ratio_fo < 1 else b_d
        full_fraction = b_d - forward_mix * (b_d - min_full)
        capacity = math.floor(float(share[d]) * RESOLUTION + 1e-6)
        outer = math.floor(full_fraction * float(all_full[d]) * RESOLUTION + 1e-6)
        n_items = int((place == d).sum()) * rows
        comm = math.inf if comm_budget is None else comm_budget * n_items * cost.comm_full
        b = DeviceBudget(capacity=capacity, outer_capacity=min(outer, capacity), comm=comm)
        b.planned_full = min(n_items, b.outer_capacity // full_w, count_cap(comm, cost.comm_full))
        b.planned_fo = min(n_items - b.planned_full, (capacity - b.planned_full * full_w) // fo_w,
                           count_cap(comm - b.planned_full * cost.comm_full, cost.comm_forward_only))
        budgets.append(b)
    return budgets


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
