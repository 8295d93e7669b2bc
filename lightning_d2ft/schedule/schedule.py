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
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_d2ft.io import StaleFileError, read_checked, write_checked
from lightning_d2ft.ops import CostModel, Op
from lightning_d2ft.schedule.problem import ColumnPlacement, ScheduleProblem, check_scores
from lightning_d2ft.schedule.settings import ScheduleSettings
from lightning_d2ft.schedule.wire import WireLayout, wire_fraction

__all__ = ["Schedule"]

# 2: info gained capacity, validate, check_seconds; capacity="step" is the default. Since then info["settings"]
# holds every ScheduleSettings field (files that hold only some still load: see ``Schedule.settings``)
_FORMAT_VERSION = 2


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
    def wire_layout(self) -> WireLayout:
        return WireLayout(self.placement, self.column_blocks, self.num_devices)

    @property
    def wire_fraction(self) -> float:
        """Bytes the tensor-parallel collectives put on the wire, relative to all FULL (:mod:`.wire`: a rank
        sends a block's forward partial sum when any of its groups there runs, its backward input gradient
        when any is FULL; 0.0 on one device, where nothing is sent). ``comm_budget`` bounds it."""
        return wire_fraction(self.ops, self.wire_layout)

    @property
    def comm_fraction(self) -> float:
        """The schedule's one communication figure: :attr:`wire_fraction` (the per-item cost model that used to
        be reported beside it promised savings the wire never saw)."""
        return self.wire_fraction

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
        """Distinct rows of ``ops``: with data-dependent scores it grows with the data set. CUDA graphs are keyed
        per block by its FULL and active group counts instead (:func:`lightning_d2ft.model.cuda_graphs.block_keys`),
        which the model bounds."""
        return int(torch.unique(self.ops, dim=0).shape[0])

    def op_counts(self) -> dict[str, int]:
        ops = self.ops[:, self.scheduled]
        return {op.name: int((ops == op).sum()) for op in Op}

    # -- dynamics: is the FULL set really dynamic? ------------------------------------------------
    @property
    def ever_full(self) -> Tensor:
        """``[K]`` bool: scheduled columns FULL in at least one micro-batch (always-FULL columns: True)."""
        return (self.ops == Op.FULL).any(0) | ~self.scheduled

    @property
    def never_full_columns(self) -> Tensor:
        """Scheduled columns FULL in no micro-batch: subnets this schedule never trains."""
        return (~self.ever_full).nonzero().flatten()

    @property
    def distinct_full_sets(self) -> int:
        """Distinct FULL sets over the micro-batches (1: the same subnets train in every step)."""
        full = self.ops[:, self.scheduled] == Op.FULL
        return int(torch.unique(full, dim=0).shape[0]) if full.numel() else min(1, self.num_micro_batches)

    def ever_full_per_block(self) -> dict[int, tuple[int, int]]:
        """Per block (where ``column_blocks`` is known): (scheduled subnets ever FULL, scheduled subnets)."""
        if self.column_blocks is None:
            return {}
        blocks = torch.as_tensor(self.column_blocks)
        out = {}
        for b in sorted(set(blocks[self.scheduled].tolist())):
            if b < 0:
                continue
            cols = (blocks == b) & self.scheduled
            out[int(b)] = (int(self.ever_full[cols].sum()), int(cols.sum()))
        return out

    def metrics(self) -> dict[str, float]:
        """The figures for results.json and logging (plain floats). The wire fraction only with more than one
        device (one device sends nothing); ``ever_full_block_<l>``: subnets of block l FULL at least once."""
        imbalance = self.step_imbalance
        starved = int(((self.ops[:, self.scheduled] == Op.FULL).sum(1) == 0).sum())
        out = {"compute_fraction": self.compute_fraction}
        if self.num_devices > 1:
            out["wire_fraction"] = self.wire_fraction
        out.update({
            "workload_variance": self.workload_variance,
            "step_max_over_mean": float(imbalance.mean()), "step_max_over_mean_worst": float(imbalance.max()),
            "lockstep_fraction": self.lockstep_fraction, "micro_batches_without_full": starved,
            "distinct_patterns": self.distinct_patterns,
            "never_full_subnets": int(self.never_full_columns.numel()), "distinct_full_sets": self.distinct_full_sets,
            **{f"ever_full_block_{b}": n for b, (n, _) in self.ever_full_per_block().items()},
            "solve_seconds": float(self.info.get("solve_seconds", 0.0)),
            "check_seconds": float(self.info.get("check_seconds", 0.0)),
        })
        return out

    def dynamics_line(self) -> str:
        """How dynamic the FULL set is, in words: never-FULL subnets, distinct FULL sets, per block."""
        n_sched = int(self.scheduled.sum())
        line = (f"FULL dynamics: {int(self.never_full_columns.numel())} of {n_sched} scheduled subnets never FULL, "
                f"{_count(self.distinct_full_sets, 'distinct FULL set')} over "
                f"{_count(self.num_micro_batches, 'micro-batch')}")
        per_block = self.ever_full_per_block()
        if per_block:
            line += "; ever FULL per block " + " ".join(f"{n}/{k}" for n, k in per_block.values())
            dead = [b for b, (n, _) in per_block.items() if n == 0]
            if dead:
                line += f" (block(s) {dead} never trained)"
        return line

    def summary(self) -> str:
        counts = self.op_counts()
        total = sum(counts.values())
        mix = ", ".join(f"{name} {n / total:.0%}" for name, n in counts.items())
        m = self.metrics()
        wire = f", wire {m['wire_fraction']:.3f}" if "wire_fraction" in m else ""
        return (
            f"{self.method} schedule: {_count(self.num_micro_batches, 'micro-batch')} x "
            f"{_count(self.ops.shape[1], 'subnet')} "
            f"({int(self.scheduled.sum())} scheduled; {int((~self.scheduled).sum())} always FULL: stem and head) "
            f"on {_count(self.num_devices, 'device')} | compute {m['compute_fraction']:.3f}{wire} of all-FULL | "
            f"{mix} | per step: max/mean load "
            f"{m['step_max_over_mean']:.3f} (worst {m['step_max_over_mean_worst']:.3f}), lockstep time "
            f"{m['lockstep_fraction']:.3f} of all-FULL | epoch workload variance {m['workload_variance']:.4f} | "
            f"{_count(m['micro_batches_without_full'], 'micro-batch')} without FULL | {self.dynamics_line()} | "
            f"{_count(m['distinct_patterns'], 'distinct op pattern')} | solve {m['solve_seconds']:.3f} s, "
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
    @property
    def settings(self) -> ScheduleSettings:
        """The settings this schedule was solved for (a file written before they were stored whole gives the
        ones it recorded, the others at their defaults)."""
        info = self.info
        return ScheduleSettings.from_mapping({**info, **(info.get("settings") or {}), "method": self.method})

    @classmethod
    def solve(
        cls,
        backward_scores: Tensor | np.ndarray,
        forward_scores: Tensor | np.ndarray,
        settings: ScheduleSettings | None = None,
        placement: ColumnPlacement = None,
        *,
        devices: int | None = None,
        speeds: Sequence[float] | Tensor | None = None,
        subnet_costs: Sequence[float] | Tensor | None = None,
        always_full: str | Sequence[int] = "ends",
        column_blocks: Tensor | None = None,
        cost: CostModel | None = None,
        seed: int = 0,
        ortools_time_limit: float | None = None,
        **fields: Any,
    ) -> Schedule:
        """Solve the schedule for scores ``[micro_batches, subnets]`` (see :mod:`lightning_d2ft.schedule.knapsack`).

        ``settings``: a :class:`ScheduleSettings`, or its fields as keyword arguments (``budget=0.6,
        solver="dp"``, ...; the others at their defaults), not both. ``placement`` and the keyword arguments
        after it: see :meth:`ScheduleProblem.build` (by default 2 devices, round robin). ``seed`` drives the
        random baselines; ``ortools_time_limit`` caps each OR-Tools solve (seconds).
        """
        settings = ScheduleSettings.build(settings, **fields)
        back, fwd = check_scores(backward_scores, forward_scores)
        problem = ScheduleProblem.build(settings, back.shape[0], back.shape[1], placement, devices=devices,
                                        speeds=speeds, subnet_costs=subnet_costs, always_full=always_full,
                                        column_blocks=column_blocks, cost=cost)
        return cls.from_problem(problem, back, fwd, seed, ortools_time_limit)

    @classmethod
    def from_problem(cls, problem: ScheduleProblem, backward_scores: Tensor | np.ndarray,
                     forward_scores: Tensor | np.ndarray, seed: int = 0,
                     ortools_time_limit: float | None = None) -> Schedule:
        """The schedule of a problem built (and checked) before the scores existed (``D2FTCallback`` does)."""
        ops, info = problem.solve(backward_scores, forward_scores, seed, ortools_time_limit)
        return cls(ops=ops, placement=problem.place, speeds=problem.speeds, cost=problem.cost,
                   column_blocks=problem.column_blocks, method=problem.settings.method, info=info)


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


def _count(n: int, noun: str) -> str:
    """``1 device``, ``2 devices``, ``1 micro-batch``, ``3 micro-batches``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('ch') else 's'}"
