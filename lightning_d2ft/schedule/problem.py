"""One schedule problem: everything but the scores, resolved and checked once.

:class:`ScheduleProblem` holds the settings, each ops column's device, the devices' speeds, the subnets'
costs and every device's capacities. It is built (and so validated: the communication budget against the
placement, the speeds, the costs) before any scores exist, so ``D2FTCallback`` refuses a bad setup before
its scoring pass; :meth:`ScheduleProblem.solve` then turns scores into ops (:mod:`.knapsack` for D2FT,
:mod:`.baselines` for the others). ``Schedule.solve`` is the same two steps in one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_d2ft.ops import CostModel, Op
from lightning_d2ft.parallel.placement import Placement, check_speeds, round_robin
from lightning_d2ft.schedule.baselines import BASELINES
from lightning_d2ft.schedule.capacity import RESOLUTION, DeviceBudget, device_budgets, int_costs
from lightning_d2ft.schedule.knapsack import solve_devices
from lightning_d2ft.schedule.settings import ScheduleSettings
from lightning_d2ft.schedule.wire import WireLayout, message_caps

__all__ = ["ScheduleProblem", "check_scores"]

ColumnPlacement = Placement | Tensor | Sequence[int] | None


@dataclass(frozen=True)
class ScheduleProblem:
    """A schedule to solve for ``num_micro_batches`` x ``num_subnets`` scores (see :meth:`build`)."""

    settings: ScheduleSettings
    num_micro_batches: int
    place: Tensor  # [K] device of each ops column, -1: always FULL
    speeds: Tensor  # [D] float64
    unit: Tensor  # [K] relative FULL cost of each column
    cost: CostModel
    budgets: tuple[DeviceBudget, ...]
    column_blocks: Tensor | None = None

    @property
    def num_devices(self) -> int:
        return self.speeds.numel()

    @property
    def step(self) -> bool:
        return self.settings.capacity == "step"

    @classmethod
    def build(cls, settings: ScheduleSettings, num_micro_batches: int, num_subnets: int,
              placement: ColumnPlacement = None, *, devices: int | None = None,
              speeds: Sequence[float] | Tensor | None = None, subnet_costs: Sequence[float] | Tensor | None = None,
              always_full: str | Sequence[int] = "ends", column_blocks: Tensor | None = None,
              cost: CostModel | None = None) -> ScheduleProblem:
        """Resolve and check everything but the scores.

        ``placement``: a :class:`Placement` (or its owner table ``[depth, G]``), whose column devices and
        speeds are used; or each column's device (-1 = always FULL); by default the ``always_full`` columns
        ("ends": stem and head) are replicated and the rest dealt round-robin over ``devices`` (default 2).
        ``speeds`` (one per device) win over the placement's. ``subnet_costs``: relative FULL cost per column
        (default all 1).
        """
        cost = cost or CostModel()
        place, devices, placement_speeds = _column_devices(placement, always_full, num_subnets, devices)
        if column_blocks is not None:
            column_blocks = torch.as_tensor(column_blocks, dtype=torch.long).flatten()
            if column_blocks.numel() != num_subnets:
                raise ValueError(f"column_blocks has {column_blocks.numel()} entries for {num_subnets} subnets")
        layout = WireLayout(place, column_blocks, devices)
        messages = slots = None
        if settings.comm_budget is not None:  # step mode only (ScheduleSettings refuses it with "epoch")
            check_comm_budget(settings.comm_budget, layout)
            messages = message_caps(layout, settings.comm_budget)
            slots = [2 * int(layout.owners[:, d].sum()) for d in range(devices)]
        speed = torch.tensor(check_speeds(speeds if speeds is not None else placement_speeds or [1.0] * devices,
                                          devices), dtype=torch.float64)
        unit = _subnet_costs(subnet_costs, num_subnets)
        rows = 1 if settings.capacity == "step" else num_micro_batches
        floor = settings.full_floor if settings.capacity == "epoch" else None
        budgets = device_budgets(rows, place, speed, unit, cost, settings.budget, messages, slots,
                                 settings.forward_mix, floor)
        return cls(settings, num_micro_batches, place, speed, unit, cost, tuple(budgets), column_blocks)

    @property
    def wire_layout(self) -> WireLayout:
        return WireLayout(self.place, self.column_blocks, self.num_devices)

    def devices_without_full(self) -> list[int]:
        """The devices whose capacity (per micro-batch in step mode) buys not one FULL subnet: the compute the FULL
        level may use is below their cheapest subnet's FULL cost, or their message cap below the two messages of
        one FULL block. Nothing on them would ever be trained."""
        starved = []
        for d, b in enumerate(self.budgets):
            cheapest = int(int_costs(self.unit[self.place == d], self.cost.full).min())
            if b.outer_capacity < cheapest or (b.outer_messages is not None and b.outer_messages < 2):
                starved.append(d)
        return starved

    def solve(self, backward_scores: Tensor | np.ndarray, forward_scores: Tensor | np.ndarray, seed: int = 0,
              ortools_time_limit: float | None = None) -> tuple[Tensor, dict]:
        """``(ops [N, K], info)`` for these scores. ``ortools_time_limit`` caps each OR-Tools solve (seconds);
        one not proven optimal in time raises RuntimeError."""
        back, fwd = check_scores(backward_scores, forward_scores)
        if back.shape != (self.num_micro_batches, self.place.numel()):
            raise ValueError(f"the scores are {tuple(back.shape)} but the problem was built for "
                             f"[{self.num_micro_batches}, {self.place.numel()}] (micro-batches, subnets)")
        s = self.settings
        info = {"settings": s.as_dict(), "objective": (0.0, 0.0), "solve_seconds": 0.0, "check_seconds": 0.0,
                "capacities": [b.capacity / RESOLUTION for b in self.budgets]}
        if s.method != "d2ft":
            return self._baseline_ops(back, fwd, seed), info
        instance = dict(backward_scores=back, forward_scores=fwd, placement=self.place, speeds=self.speeds,
                        subnet_costs=self.unit, cost=self.cost, **s.as_dict())
        layout = self.wire_layout
        group = np.full(self.place.numel(), -1, dtype=np.int64)
        group[layout.columns.numpy()] = layout.block_of.numpy()
        sol = solve_devices(back, fwd, self.place, self.unit, list(self.budgets), self.cost, s.solver, self.step,
                            s.validate, ortools_time_limit, instance, column_group=group)
        info.update(objective=sol.objective, solve_seconds=sol.solve_seconds, check_seconds=sol.check_seconds)
        return sol.ops, info

    def _baseline_ops(self, back: Tensor, fwd: Tensor, seed: int) -> Tensor:
        """A baseline's ops. Each spends what D2FT's schedule of the same problem spends (solved here with the
        DP): the ``*_fo`` ablations its numbers of FULL and FORWARD_ONLY items, the train-or-skip baselines as
        many FULL items as its compute buys (rounded down: within one item per micro-batch)."""
        baseline = BASELINES[self.settings.method]
        cols = (self.place >= 0).nonzero().flatten()
        ops = torch.full(back.shape, int(Op.FULL), dtype=torch.long)
        n_full = n_fo = 0
        if baseline.needs_counts:
            d2ft_settings = replace(self.settings, method="d2ft", solver="dp", validate=False)
            d2ft = replace(self, settings=d2ft_settings).solve(back, fwd)[0][:, cols]
            n_full, n_fo = int((d2ft == Op.FULL).sum()), int((d2ft == Op.FORWARD_ONLY).sum())
            if baseline.train_or_skip:  # FORWARD_ONLY's compute buys FULL items instead
                n_full = min(d2ft.numel(), math.floor(float(self.cost.compute(d2ft).sum()) / self.cost.full + 1e-9))
                n_fo = 0
        ops[:, cols] = baseline(back[:, cols], fwd[:, cols], n_full, n_fo, seed, self.settings)
        return ops


def check_comm_budget(comm_budget: float, layout: WireLayout) -> None:
    """Reject a communication budget too small for one FULL (micro-batch, subnet) pair per device and step:
    below that floor a device could only run FORWARD_ONLY, and no gradient would reach its subnets. A FULL
    subnet sends both messages of its (device, block); a device may send ``comm_budget`` x its share of the
    all-FULL wire (:mod:`.wire`)."""
    if layout.world < 2:
        raise ValueError(f"comm_budget={comm_budget} bounds the bytes on the tensor-parallel wire, and on one device "
                         "nothing is sent: drop comm_budget, or solve for 2 or more devices (the schedule of a "
                         "tensor-parallel group runs in one process too: only its ops decide the accuracy)")
    shares = layout.rank_shares().sum(1)
    fewest = float(shares.min()) if shares.numel() else 0.0
    floor = 1.0 / fewest if fewest > 0 else 1.0
    if comm_budget < floor - 1e-9:
        tail = f"use comm_budget in [{floor:.3g}, 1] or drop it" if floor <= 1 else (
            f"no comm_budget allows that on this layout ({layout.world} ranks, {layout.num_blocks} blocks: an "
            "all-FULL block is one all_reduce, a partly active one an all_to_all from each active rank): drop it")
        raise ValueError(
            f"comm_budget={comm_budget} is below {floor:.3g}, the least that lets every device train one "
            f"(micro-batch, subnet) pair FULL per micro-batch (a FULL subnet sends its block's forward and "
            f"backward messages; the smallest device may send {fewest:.3g} x 2 message(s) per step all FULL); "
            + tail)


# -- input checks ----------------------------------------------------------------------------------
def check_scores(backward: Tensor | np.ndarray, forward: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    """Both score tables as float64 CPU tensors, refused unless 2-D, equal in shape, finite and >= 0."""
    out = []
    for name, s in (("backward_scores", backward), ("forward_scores", forward)):
        a = np.asarray(s.detach().cpu() if isinstance(s, Tensor) else s, dtype=np.float64)  # numpy: cheap checks
        if a.ndim != 2 or 0 in a.shape:
            raise ValueError(f"{name} must be a non-empty 2-D tensor [micro_batches, subnets], got {tuple(a.shape)}")
        bad = int(a.size - np.isfinite(a).sum())
        if bad:
            raise ValueError(f"{name} holds {bad} NaN/inf values; recompute the scores (or drop those micro-batches)")
        if a.min() < 0:
            raise ValueError(f"{name} must be >= 0 (contribution scores are magnitudes), min is {a.min()}")
        out.append(torch.from_numpy(np.ascontiguousarray(a)))
    if out[0].shape != out[1].shape:
        raise ValueError(f"backward_scores {tuple(out[0].shape)} and forward_scores {tuple(out[1].shape)} differ "
                         "in shape")
    return out[0], out[1]


def _column_devices(placement: ColumnPlacement, always_full: str | Sequence[int], n_cols: int,
                    devices: int | None) -> tuple[Tensor, int, tuple | None]:
    """The device of every ops column (-1: always FULL), the device count, and the placement's speeds."""
    if devices is not None and (isinstance(devices, bool) or not isinstance(devices, int) or devices < 1):
        raise ValueError(f"devices must be a positive int, got {devices!r}")
    if isinstance(placement, Placement) or (placement is not None and torch.as_tensor(placement).dim() == 2):
        resolved = Placement.from_any(placement)
        if devices is not None and devices != resolved.num_devices:
            raise ValueError(f"devices={devices} but the placement has {resolved.num_devices} ranks; drop devices")
        place = resolved.column_devices()
        if place.numel() != n_cols:
            raise ValueError(f"the placement covers {place.numel()} subnets (stem, {resolved.depth} blocks x "
                             f"{resolved.groups_per_block} groups, head) but the scores have {n_cols}")
        return place, resolved.num_devices, resolved.speeds
    if placement is not None:
        place = torch.as_tensor(placement, dtype=torch.long).flatten()
        devices = devices if devices is not None else max(int(place.max()) + 1, 1)
        if place.numel() != n_cols:
            raise ValueError(f"placement has {place.numel()} entries for {n_cols} subnets")
        if place.max() >= devices or place.min() < -1:
            raise ValueError(f"placement entries must be -1 (always FULL) or a device in [0, {devices})")
    else:
        devices = 2 if devices is None else devices
        fixed = {0, n_cols - 1} if always_full == "ends" else set(always_full)
        place = torch.full((n_cols,), -1, dtype=torch.long)
        free = [k for k in range(n_cols) if k not in fixed]
        if devices > len(free):
            raise ValueError(f"{devices} devices but only {len(free)} schedulable subnets; use at most "
                             f"{len(free)} devices or more subnets")
        place[free] = round_robin(1, len(free), devices).flatten()
    used = set(place[place >= 0].tolist())
    if len(used) < devices:
        raise ValueError(
            f"{devices} devices but only {int((place >= 0).sum())} schedulable subnets reach {len(used)} of them; "
            f"use at most {len(used)} devices or more subnets"
        )
    return place, devices, None


def _subnet_costs(subnet_costs: Sequence[float] | Tensor | None, n_cols: int) -> Tensor:
    if subnet_costs is None:
        return torch.ones(n_cols, dtype=torch.float64)
    unit = torch.as_tensor(subnet_costs, dtype=torch.float64).flatten()
    if unit.numel() != n_cols or not torch.isfinite(unit).all() or (unit <= 0).any():
        raise ValueError(f"subnet_costs must be {n_cols} positive numbers, got shape {tuple(unit.shape)}")
    return unit
