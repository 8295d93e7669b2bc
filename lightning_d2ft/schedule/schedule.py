"""The D2FT schedule: which op every (micro-batch, subnet) pair runs, and the facts to judge it by.

``Schedule.solve`` builds one as a bi-level multiple knapsack (SPEC section 4; see :mod:`.knapsack` for
the model and the solvers, :mod:`.capacity` for capacities, :mod:`.baselines` for ``method=``). Items are
the (micro-batch, subnet) pairs of the schedulable subnets (every column but the always-FULL stem and
head); subnet k lives on device ``placement[k]``. Tensor-parallel ranks run in lockstep, so by default
every (device, micro-batch) has its own capacity (``capacity="step"``): every step is balanced and no
micro-batch goes without FULL work unless the budget is too small for one FULL subnet per device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_d2ft.io import StaleFileError, read_checked, write_checked
from lightning_d2ft.ops import CostModel, Op
from lightning_d2ft.parallel.placement import Placement, round_robin
from lightning_d2ft.schedule.baselines import BASELINES
from lightning_d2ft.schedule.capacity import RESOLUTION, device_budgets
from lightning_d2ft.schedule.knapsack import solve_devices
from lightning_d2ft.schedule.settings import METHODS, SOLVERS, ScheduleSettings, check_comm_budget

__all__ = ["METHODS", "SOLVERS", "Schedule"]

_FORMAT_VERSION = 2  # 2: info gained capacity, validate, check_seconds; capacity="step" is the default


@dataclass
class Schedule:
    """A schedule table ``ops[micro_batch, subnet]`` with the facts needed to judge and execute it."""

    ops: Tensor  # [N, K] long, Op values
    placement: Tensor  # [K] long: device of each column, -1 for always-FULL replicated columns
    speeds: Tensor  # [D] float64, relative device speeds
    cost: CostModel = field(default_factory=CostModel)
    column_blocks: Tensor | None = None  # [K] long: block of each column (-1: none); groups wire traffic
    method: str = "d2ft"
    info: dict = field(default_factory=dict)  # settings, objective, solve and check seconds, capacities

    # -- derived facts --------------------------------------------------------------------------
    @property
    def num_micro_batches(self) -> int:
        return self.ops.shape[0]

    @property
    def num_devices(self) -> int:
        return self.speeds.numel()

    @property
    def scheduled(self) -> Tensor:
        """Mask of the columns the knapsack decides (not the always-FULL ones)."""
        return self.placement >= 0

    @property
    def step_loads(self) -> Tensor:
        """Compute units per micro-batch and device ``[N, D]`` (what each lockstep step asks of each rank)."""
        units = self.cost.compute(self.ops[:, self.scheduled])
        cols = self.placement[self.scheduled]
        return torch.zeros(self.num_micro_batches, self.num_devices, dtype=torch.float64).index_add_(1, cols, units)

    @property
    def device_loads(self) -> Tensor:
        """Compute units per device over the whole schedule."""
        return self.step_loads.sum(0)

    @property
    def compute_fraction(self) -> float:
        """Compute of the scheduled items relative to running all of them FULL."""
        ops = self.ops[:, self.scheduled]
        return float(self.cost.compute(ops).sum() / (ops.numel() * self.cost.full))

    @property
    def micro_batch_compute_fractions(self) -> Tensor:
        """:attr:`compute_fraction` of each micro-batch's row ``[N]`` (float64)."""
        ops = self.ops[:, self.scheduled]
        return self.cost.compute(ops).sum(1) / (ops.shape[1] * self.cost.full)

    @property
    def comm_fraction(self) -> float:
        """Communication units of the scheduled items relative to all FULL (SPEC's per-item cost model)."""
        ops = self.ops[:, self.scheduled]
        return float(self.cost.comm(ops).sum() / (ops.numel() * self.cost.comm_full))

    @property
    def wire_fraction(self) -> float:
        """Predicted bytes on the wire relative to all FULL for tensor-parallel execution.

        A rank sends one forward partial sum per (micro-batch, block) if any of its subnets there runs, and
        one backward input gradient if any runs FULL; the subnets of a rank in a block share those messages.
        """
        blocks = self.column_blocks if self.column_blocks is not None else torch.arange(self.ops.shape[1])
        cols = self.scheduled
        key = blocks[cols] * self.num_devices + self.placement[cols]
        groups = torch.unique(key, return_inverse=True)[1]
        n_groups = int(groups.max()) + 1 if groups.numel() else 0
        ops = self.ops[:, cols]
        sent = 0.0
        for wanted in (Op.FORWARD_ONLY, Op.FULL):  # forward partial sum, then backward input gradient
            runs = (ops >= wanted).double()
            hit = torch.zeros(ops.shape[0], n_groups, dtype=torch.float64).index_add_(1, groups, runs) > 0
            sent += float(hit.sum())
        return sent / (2.0 * ops.shape[0] * n_groups) if n_groups else 0.0

    @property
    def device_times(self) -> Tensor:
        return self.device_loads / self.speeds

    @property
    def workload_variance(self) -> float:
        """Variance of per-device time over the epoch, over its mean (0 = balanced over the epoch)."""
        t = self.device_times
        return float((t / t.mean()).var(unbiased=False)) if t.mean() > 0 else 0.0

    @property
    def step_imbalance(self) -> Tensor:
        """Per micro-batch, the slowest rank's time over the mean rank time ``[N]`` (1 = balanced step)."""
        t = self.step_loads / self.speeds
        mean = t.mean(1)
        return torch.where(mean > 0, t.max(1).values / mean.clamp_min(1e-300), torch.ones_like(mean))

    @property
    def lockstep_fraction(self) -> float:
        """Summed per-step slowest-rank time relative to the same for all FULL: what lockstep ranks wait."""
        cols = self.placement[self.scheduled]
        full = torch.zeros(self.num_devices, dtype=torch.float64).index_add_(
            0, cols, torch.full((cols.numel(),), self.cost.full, dtype=torch.float64)) / self.speeds
        if full.max() <= 0:
            return 0.0
        t = self.step_loads / self.speeds
        return float(t.max(1).values.sum() / (self.num_micro_batches * full.max()))

    @property
    def distinct_patterns(self) -> int:
        """Distinct rows of ``ops``. Each costs one CUDA-graph capture on a GPU. With real data nearly every
        micro-batch gets its own row (19 of 20 on the bundled digits), so this grows with the data set."""
        return int(torch.unique(self.ops, dim=0).shape[0])

    def op_counts(self) -> dict[str, int]:
        ops = self.ops[:, self.scheduled]
        return {op.name: int((ops == op).sum()) for op in Op}

    def metrics(self) -> dict[str, float]:
        """The figures for results.json and logging (plain floats)."""
        imbalance = self.step_imbalance
        starved = int(((self.ops[:, self.scheduled] == Op.FULL).sum(1) == 0).sum())
        return {
            "compute_fraction": self.compute_fraction, "comm_fraction": self.comm_fraction,
            "wire_fraction": self.wire_fraction, "workload_variance": self.workload_variance,
            "step_max_over_mean": float(imbalance.mean()), "step_max_over_mean_worst": float(imbalance.max()),
            "lockstep_fraction": self.lockstep_fraction, "micro_batches_without_full": starved,
            "distinct_patterns": self.distinct_patterns,
            "solve_seconds": float(self.info.get("solve_seconds", 0.0)),
            "check_seconds": float(self.info.get("check_seconds", 0.0)),
        }

    def summary(self) -> str:
        counts = self.op_counts()
        total = sum(counts.values())
        mix = ", ".join(f"{name} {n / total:.0%}" for name, n in counts.items())
        m = self.metrics()
        return (
            f"{self.method} schedule: {self.num_micro_batches} micro-batches x {self.ops.shape[1]} subnets "
            f"({int(self.scheduled.sum())} scheduled; {int((~self.scheduled).sum())} always FULL: stem and head) "
            f"on {self.num_devices} devices | compute {m['compute_fraction']:.3f}, comm {m['comm_fraction']:.3f}, "
            f"wire {m['wire_fraction']:.3f} of all-FULL | {mix} | per step: max/mean load "
            f"{m['step_max_over_mean']:.3f} (worst {m['step_max_over_mean_worst']:.3f}), lockstep time "
            f"{m['lockstep_fraction']:.3f} of all-FULL | epoch workload variance {m['workload_variance']:.4f} | "
            f"{m['micro_batches_without_full']} micro-batches without FULL | "
            f"{m['distinct_patterns']} distinct op patterns | solve {m['solve_seconds']:.3f} s, "
            f"check {m['check_seconds']:.3f} s"
        )

    # -- persistence ----------------------------------------------------------------------------
    def state(self) -> dict:
        """The plain dict a schedule file and D2FTCallback's checkpoint state hold (keys kept across versions)."""
        return {"ops": self.ops.to(torch.int8), "placement": self.placement, "speeds": self.speeds,
                "cost": dict(self.cost.__dict__), "column_blocks": self.column_blocks, "method": self.method,
                "info": self.info}

    @classmethod
    def from_state(cls, state: dict) -> Schedule:
        """The schedule of :meth:`state`; a table that is not a schedule (ops outside {0, 1, 2}, columns and
        placement of different lengths, devices without a speed) is refused: :class:`StaleFileError`."""
        _check_state(state)
        return cls(ops=state["ops"].long(), placement=state["placement"], speeds=state["speeds"],
                   cost=CostModel(**state["cost"]), column_blocks=state["column_blocks"], method=state["method"],
                   info=state["info"])

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically, with a checksum so that a truncated or edited file is detected on load."""
        return write_checked(path, self.state(), _FORMAT_VERSION)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schedule:
        """Read a schedule; raises :class:`StaleFileError` for a corrupt, edited or outdated file."""
        state = read_checked(path, _FORMAT_VERSION, "schedule file")
        try:
            return cls.from_state(state)
        except StaleFileError as err:
            raise StaleFileError(f"schedule file {path}: {err}") from None

    def plot(self, path: str | os.PathLike) -> Path:
        """Ops heatmap, per-step loads per device, and per-device epoch times, as a PNG."""
        from lightning_d2ft.schedule.plot import plot_schedule

        return plot_schedule(self, path)

    # -- solving --------------------------------------------------------------------------------
    @classmethod
    def solve(
        cls,
        backward_scores: Tensor | np.ndarray,
        forward_scores: Tensor | np.ndarray,
        budget: float = 0.6,
        devices: int | None = None,
        *,
        solver: str = "ortools",
        method: str = "d2ft",
        comm_budget: float | None = None,
        forward_mix: float = 0.5,
        placement: Placement | Tensor | Sequence[int] | None = None,
        speeds: Sequence[float] | Tensor | None = None,
        subnet_costs: Sequence[float] | Tensor | None = None,
        always_full: str | Sequence[int] = "ends",
        column_blocks: Tensor | None = None,
        cost: CostModel | None = None,
        seed: int = 0,
        ortools_time_limit: float | None = None,
        capacity: str = "step",
        validate: bool = True,
    ) -> Schedule:
        """Solve the schedule for scores ``[micro_batches, subnets]`` (see :mod:`lightning_d2ft.schedule.knapsack`).

        ``placement``: a :class:`Placement` (or its owner table ``[depth, G]``), whose column devices and
        speeds are used; or each column's device (-1 = always FULL); by default the ``always_full`` columns
        ("ends": stem and head) are replicated and the rest dealt round-robin over ``devices`` (default 2).
        ``subnet_costs``: relative FULL cost per column (default all 1). ``capacity``: "step" (per device and
        micro-batch) or "epoch" (per device). ``validate``: after OR-Tools, the DP solves the same instance
        and the objectives must agree (``SolverMismatchError`` otherwise). ``ortools_time_limit`` caps each
        OR-Tools solve (seconds); one not proven optimal in time raises RuntimeError.
        """
        cost = cost or CostModel()
        back, fwd = _check_scores(backward_scores, forward_scores)
        n_mb, n_cols = back.shape
        ScheduleSettings(budget=budget, comm_budget=comm_budget, solver=solver, method=method,  # validates them
                         forward_mix=forward_mix, capacity=capacity, validate=validate)
        place, devices, placement_speeds = _column_devices(placement, always_full, n_cols, devices)
        if comm_budget is not None:
            check_comm_budget(comm_budget, n_mb, place, devices, capacity)
        speed = _resolve_speeds(speeds if speeds is not None else placement_speeds, devices)
        unit = _resolve_subnet_costs(subnet_costs, n_cols)
        step = capacity == "step"
        budgets = device_budgets(1 if step else n_mb, place, speed, unit, cost, budget, comm_budget, forward_mix)
        info = {"budget": budget, "comm_budget": comm_budget, "forward_mix": forward_mix, "solver": solver,
                "capacity": capacity, "validate": validate, "objective": (0.0, 0.0), "solve_seconds": 0.0,
                "check_seconds": 0.0, "capacities": [b.capacity / RESOLUTION for b in budgets]}
        if method == "d2ft":
            instance = dict(backward_scores=back, forward_scores=fwd, budget=budget, devices=devices, solver=solver,
                            comm_budget=comm_budget, forward_mix=forward_mix, placement=place, speeds=speed,
                            subnet_costs=unit, cost=cost, capacity=capacity)
            sol = solve_devices(back, fwd, place, unit, budgets, cost, solver, step, validate,
                                ortools_time_limit, instance)
            ops = sol.ops
            info.update(objective=sol.objective, solve_seconds=sol.solve_seconds, check_seconds=sol.check_seconds)
        else:
            ops = _baseline_ops(method, back, fwd, place, budgets, n_mb if step else 1, seed)
        return cls(ops=ops, placement=place, speeds=speed, cost=cost, column_blocks=column_blocks,
                   method=method, info=info)


def _baseline_ops(method: str, back: Tensor, fwd: Tensor, place: Tensor, budgets: list, rows: int,
                  seed: int) -> Tensor:
    """A baseline's ops, spending the FULL and FORWARD_ONLY counts D2FT's capacities plan for."""
    n_full = sum(b.planned_full for b in budgets) * rows
    n_fo = sum(b.planned_fo for b in budgets) * rows
    ops = torch.full(back.shape, int(Op.FULL), dtype=torch.long)
    cols = (place >= 0).nonzero().flatten()
    ops[:, cols] = BASELINES[method](back[:, cols], fwd[:, cols], n_full, n_fo, seed)
    return ops


# -- input checks ----------------------------------------------------------------------------------
def _check_state(state: dict) -> None:
    """A loaded schedule must be one: ops a 2-D table of Op values, one placement entry per column (a device
    in [0, D) or -1), D positive finite speeds."""
    ops, place, speeds = state.get("ops"), state.get("placement"), state.get("speeds")
    if not all(torch.is_tensor(t) for t in (ops, place, speeds)) or ops.dim() != 2 or ops.dtype.is_floating_point:
        raise StaleFileError("it holds no ops table of integers [micro_batches, subnets] with placement and speeds")
    bad = ~torch.isin(ops.long(), torch.tensor([int(op) for op in Op]))
    if bad.any():
        where = bad.nonzero()[0].tolist()
        raise StaleFileError(f"its ops hold {int(bad.sum())} value(s) outside {{0, 1, 2}} (SHORTCUT, FORWARD_ONLY, "
                             f"FULL), e.g. {int(ops[where[0], where[1]])} at micro-batch {where[0]}, subnet {where[1]}")
    devices = speeds.numel()
    if place.numel() != ops.shape[1] or devices < 1 or (place >= devices).any() or (place < -1).any():
        raise StaleFileError(f"its placement ({place.numel()} entries, devices {sorted(set(place.tolist()))}) does "
                             f"not fit its {ops.shape[1]} subnet columns on {devices} device(s)")
    if not (torch.isfinite(speeds).all() and (speeds > 0).all()):
        raise StaleFileError(f"its device speeds {speeds.tolist()} are not positive finite numbers")


def _check_scores(backward: Tensor | np.ndarray, forward: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
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
        raise ValueError(f"backward_scores {tuple(out[0].shape)} and forward_scores {tuple(out[1].shape)} differ in "
                         "shape")
    return out[0], out[1]


def _column_devices(placement, always_full, n_cols: int, devices: int | None) -> tuple[Tensor, int, tuple | None]:
    """The device of every ops column (-1: always FULL), the device count, and the placement's speeds."""
    if devices is not None and (isinstance(devices, bool) or not isinstance(devices, int) or devices < 1):
        raise ValueError(f"devices must be a positive int, got {devices!r}")
    speeds = None
    if isinstance(placement, Placement) or (placement is not None and torch.as_tensor(placement).dim() == 2):
        resolved = Placement.from_any(placement)
        if devices is not None and devices != resolved.num_devices:
            raise ValueError(f"devices={devices} but the placement has {resolved.num_devices} ranks; drop devices")
        place, devices, speeds = resolved.column_devices(), resolved.num_devices, resolved.speeds
        if place.numel() != n_cols:
            raise ValueError(f"the placement covers {place.numel()} subnets (stem, {resolved.depth} blocks x "
                             f"{resolved.groups_per_block} groups, head) but the scores have {n_cols}")
        return place, devices, speeds
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
    return place, devices, speeds


def _resolve_speeds(speeds, devices: int) -> Tensor:
    if speeds is None:
        return torch.ones(devices, dtype=torch.float64)
    speed = torch.as_tensor(speeds, dtype=torch.float64).flatten()
    if speed.numel() != devices or not torch.isfinite(speed).all() or (speed <= 0).any():
        raise ValueError(f"speeds must be {devices} positive numbers (one per device), got {speed.tolist()}")
    return speed


def _resolve_subnet_costs(subnet_costs, n_cols: int) -> Tensor:
    if subnet_costs is None:
        return torch.ones(n_cols, dtype=torch.float64)
    unit = torch.as_tensor(subnet_costs, dtype=torch.float64).flatten()
    if unit.numel() != n_cols or not torch.isfinite(unit).all() or (unit <= 0).any():
        raise ValueError(f"subnet_costs must be {n_cols} positive numbers, got shape {tuple(unit.shape)}")
    return unit
