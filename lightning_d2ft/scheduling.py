"""The D2FT schedule: which op every (micro-batch, subnet) pair runs, solved as a bi-level multiple knapsack.

The model (SPEC section 4; choices marked *our reading* are configurable):

* Items are the (micro-batch n, subnet k) pairs of the schedulable subnets (every column except the
  always-FULL ones: stem and head). Subnet k lives on device ``placement[k]``; each device is a knapsack.
* Device d's compute capacity is ``budget`` times the all-FULL cost of its items. With declared speeds,
  capacities are proportional to speed instead (so that per-device *time* is equal), capped at all-FULL.
* An optional communication budget caps each device's communication units the same way (*our reading*:
  per device, so ranks are balanced on the wire too).
* Bi-level: the outer level picks FULL items maximising summed backward scores within the outer capacity,
  the inner level picks FORWARD_ONLY items among the rest maximising summed forward scores within what is
  left; everything else is SHORTCUT. Because each FULL item costs more than a FORWARD_ONLY one, a greedy
  outer level would take all the capacity; ``forward_mix`` (*our reading*) sets the outer capacity between
  "FULL takes everything" (0) and "as few FULL as still spends the budget" (1).
* Constraints are per device, so the problem splits into one independent knapsack pair per device.

Solvers: ``dp`` (ours: exact; items that cost the same form one class, within a class the best items are
taken first, and a dynamic program over capacity chooses how many of each class; with one class, the
usual case, that is a sort) and ``ortools`` (SCIP MIPs per device: the outer level, then the inner level
solved on the items and capacity the outer solution leaves). Baselines behind ``method=``: ``random``,
``dpruning``, ``moe``, ``full``; they spend the same number of FULL and FORWARD_ONLY items as D2FT at
that budget but ignore devices, which shows in their workload variance.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_d2ft.files import read_checked, write_checked
from lightning_d2ft.ops import CostModel, Op

__all__ = ["METHODS", "SOLVERS", "Schedule"]

SOLVERS = ("dp", "ortools")
METHODS = ("d2ft", "random", "dpruning", "moe", "full")
_FORMAT_VERSION = 1
_RESOLUTION = 1000  # costs are integers in 1/1000 of a FULL subnet, so both solvers see the same model
_MAX_DP_CELLS = 50_000_000


@dataclass
class Schedule:
    """A schedule table ``ops[micro_batch, subnet]`` with the facts needed to judge and execute it."""

    ops: Tensor  # [N, K] long, Op values
    placement: Tensor  # [K] long: device of each column, -1 for always-FULL replicated columns
    speeds: Tensor  # [D] float64, relative device speeds
    cost: CostModel = field(default_factory=CostModel)
    column_blocks: Tensor | None = None  # [K] long: block of each column (-1: none); groups wire traffic
    method: str = "d2ft"
    info: dict = field(default_factory=dict)  # budget, solver, objective, solve seconds, keys

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

    def _per_device(self, units: Tensor) -> Tensor:
        cols = self.placement[self.scheduled]
        per_col = units[:, self.scheduled].sum(0)
        return torch.zeros(self.num_devices, dtype=torch.float64).index_add_(0, cols, per_col)

    @property
    def device_loads(self) -> Tensor:
        """Compute units per device over the whole schedule."""
        return self._per_device(self.cost.compute(self.ops))

    @property
    def device_comm(self) -> Tensor:
        """Communication units per device over the whole schedule (cost-model units, per item)."""
        return self._per_device(self.cost.comm(self.ops))

    @property
    def compute_fraction(self) -> float:
        """Compute of the scheduled items relative to running all of them FULL."""
        ops = self.ops[:, self.scheduled]
        return float(self.cost.compute(ops).sum() / (ops.numel() * self.cost.full))

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
            hit = torch.zeros(ops.shape[0], n_groups, dtype=torch.float64).index_add_(1, groups, (ops >= wanted).double()) > 0
            sent += float(hit.sum())
        return sent / (2.0 * ops.shape[0] * n_groups) if n_groups else 0.0

    @property
    def device_times(self) -> Tensor:
        return self.device_loads / self.speeds

    @property
    def workload_variance(self) -> float:
        """Variance of per-device time over its mean (0 = perfectly balanced, no stragglers)."""
        t = self.device_times
        return float((t / t.mean()).var(unbiased=False)) if t.mean() > 0 else 0.0

    def op_counts(self) -> dict[str, int]:
        ops = self.ops[:, self.scheduled]
        return {op.name: int((ops == op).sum()) for op in Op}

    def summary(self) -> str:
        counts = self.op_counts()
        total = sum(counts.values())
        mix = ", ".join(f"{name} {n / total:.0%}" for name, n in counts.items())
        return (
            f"{self.method} schedule: {self.num_micro_batches} micro-batches x {int(self.scheduled.sum())} subnets "
            f"on {self.num_devices} devices | compute {self.compute_fraction:.3f}, comm {self.comm_fraction:.3f}, "
            f"wire {self.wire_fraction:.3f} of all-FULL | {mix} | workload variance {self.workload_variance:.4f}"
        )

    def column(self, micro_batch: int) -> Tensor:
        """The ops vector for one micro-batch (what ``D2FTViT.forward`` takes)."""
        return self.ops[micro_batch]

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically, with a checksum so that a truncated or edited file is detected on load."""
        payload = {
            "ops": self.ops.to(torch.int8),
            "placement": self.placement,
            "speeds": self.speeds,
            "cost": dict(self.cost.__dict__),
            "column_blocks": self.column_blocks,
            "method": self.method,
            "info": self.info,
        }
        return write_checked(path, payload, _FORMAT_VERSION)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Schedule":
        """Read a schedule; raises :class:`StaleFileError` for a corrupt, edited or outdated file."""
        payload = read_checked(path, _FORMAT_VERSION, "schedule file")
        return cls(
            ops=payload["ops"].long(),
            placement=payload["placement"],
            speeds=payload["speeds"],
            cost=CostModel(**payload["cost"]),
            column_blocks=payload["column_blocks"],
            method=payload["method"],
            info=payload["info"],
        )

    def plot(self, path: str | os.PathLike) -> Path:
        """Heatmap of ops (subnets x micro-batches) beside per-device load bars, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap

        fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [4, 1]})
        cmap = ListedColormap(["#f0f0f0", "#7fb3d5", "#1f4e79"])
        ax.imshow(self.ops.T.numpy(), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=2)
        ax.set_xlabel("micro-batch")
        ax.set_ylabel("subnet")
        ax.set_title(f"{self.method}: compute {self.compute_fraction:.2f}, comm {self.comm_fraction:.2f}")
        handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(3)]
        ax.legend(handles, [o.name for o in Op], loc="upper right", fontsize=7)
        loads = self.device_times.numpy()
        bars.bar(range(len(loads)), loads, color="#1f4e79")
        bars.set_xlabel("device")
        bars.set_title(f"time per device (var {self.workload_variance:.3f})", fontsize=9)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    # -- solving --------------------------------------------------------------------------------
    @classmethod
    def solve(
        cls,
        backward_scores: Tensor | np.ndarray,
        forward_scores: Tensor | np.ndarray,
        budget: float = 0.6,
        devices: int = 2,
        *,
        solver: str = "dp",
        method: str = "d2ft",
        comm_budget: float | None = None,
        forward_mix: float = 0.5,
        placement: Tensor | Sequence[int] | None = None,
        speeds: Sequence[float] | Tensor | None = None,
        subnet_costs: Sequence[float] | Tensor | None = None,
        always_full: str | Sequence[int] = "ends",
        column_blocks: Tensor | None = None,
        cost: CostModel | None = None,
        seed: int = 0,
        ortools_time_limit: float | None = None,
    ) -> "Schedule":
        """Solve the schedule for scores ``[micro_batches, subnets]`` (see the module docstring).

        ``placement`` gives each column's device (-1 = always FULL); by default the ``always_full`` columns
        ("ends": first and last, i.e. stem and head) are replicated and the rest are dealt round-robin.
        ``subnet_costs`` are relative FULL costs per column (default: all 1). ``ortools_time_limit`` caps
        each OR-Tools solve (seconds); a solve that is not proven optimal in time raises RuntimeError.
        """
        cost = cost or CostModel()
        back, fwd = _check_scores(backward_scores, forward_scores)
        n_mb, n_cols = back.shape
        check_choice("solver", solver, SOLVERS)
        check_choice("method", method, METHODS)
        check_fraction("budget", budget)
        if comm_budget is not None:
            check_fraction("comm_budget", comm_budget)
        if not 0.0 <= forward_mix <= 1.0:
            raise ValueError(f"forward_mix must be in [0, 1], got {forward_mix}")
        place = _resolve_placement(placement, always_full, n_cols, devices)
        if comm_budget is not None:
            check_comm_budget(comm_budget, n_mb, place, devices)
        speed = _resolve_speeds(speeds, devices)
        unit = _resolve_subnet_costs(subnet_costs, n_cols)

        start = time.perf_counter()
        ops = torch.full((n_mb, n_cols), int(Op.FULL), dtype=torch.long)
        counts = _device_counts(n_mb, place, speed, unit, cost, budget, comm_budget, forward_mix, devices)
        objective = (0.0, 0.0)
        if method == "d2ft":
            objective = [0.0, 0.0]
            for d in range(devices):
                cols = (place == d).nonzero().flatten()
                args = (back[:, cols], fwd[:, cols], unit[cols], counts[d], cost)
                if solver == "dp":
                    dev_ops, obj = _solve_device_dp(*args)
                else:
                    dev_ops, obj = _solve_device_ortools(*args, time_limit=ortools_time_limit)
                ops[:, cols] = dev_ops
                objective[0] += obj[0]
                objective[1] += obj[1]
            objective = tuple(objective)
        elif method != "full":
            n_full = sum(c.planned_full for c in counts)
            n_fo = sum(c.planned_fo for c in counts)
            baseline = {"random": _random_ops, "dpruning": _dpruning_ops, "moe": _moe_ops}[method]
            sched_cols = (place >= 0).nonzero().flatten()
            ops[:, sched_cols] = baseline(back[:, sched_cols], fwd[:, sched_cols], n_full, n_fo, seed)
        seconds = time.perf_counter() - start
        info = {
            "budget": budget, "comm_budget": comm_budget, "forward_mix": forward_mix, "solver": solver,
            "objective": objective, "solve_seconds": seconds, "capacities": [c.capacity / _RESOLUTION for c in counts],
        }
        return cls(ops=ops, placement=place, speeds=speed, cost=cost, column_blocks=column_blocks,
                   method=method, info=info)


# -- input checks ----------------------------------------------------------------------------------
def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(allowed)}")


def check_fraction(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be a fraction of the all-FULL cost in (0, 1], got {value!r}")


def check_comm_budget(comm_budget: float, num_micro_batches: int, placement: Tensor, devices: int) -> None:
    """Reject a communication budget too small for one FULL (micro-batch, subnet) pair on every device:
    such a schedule would train nothing on some device (only SHORTCUT and FORWARD_ONLY fit)."""
    smallest = min(int((placement == d).sum()) for d in range(devices)) * num_micro_batches
    least = 1.0 / max(smallest, 1)
    if comm_budget < least - 1e-12:
        raise ValueError(
            f"comm_budget={comm_budget} is below {least:.3g}, the least that lets every device train one "
            f"(micro-batch, subnet) pair FULL ({smallest} pairs on the smallest device); use comm_budget in "
            f"[{least:.3g}, 1] or drop it")


def _check_scores(backward: Tensor | np.ndarray, forward: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    out = []
    for name, s in (("backward_scores", backward), ("forward_scores", forward)):
        s = torch.as_tensor(s, dtype=torch.float64)
        if s.dim() != 2 or 0 in s.shape:
            raise ValueError(f"{name} must be a non-empty 2-D tensor [micro_batches, subnets], got {tuple(s.shape)}")
        bad = int((~torch.isfinite(s)).sum())
        if bad:
            raise ValueError(f"{name} holds {bad} NaN/inf values; recompute the scores (or drop those micro-batches)")
        if (s < 0).any():
            raise ValueError(f"{name} must be >= 0 (contribution scores are magnitudes), min is {s.min().item()}")
        out.append(s)
    if out[0].shape != out[1].shape:
        raise ValueError(f"backward_scores {tuple(out[0].shape)} and forward_scores {tuple(out[1].shape)} differ in shape")
    return out[0], out[1]


def _resolve_placement(placement, always_full, n_cols: int, devices: int) -> Tensor:
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be a positive int, got {devices!r}")
    if placement is not None:
        place = torch.as_tensor(placement, dtype=torch.long).flatten()
        if place.numel() != n_cols:
            raise ValueError(f"placement has {place.numel()} entries for {n_cols} subnets")
        if place.max() >= devices or place.min() < -1:
            raise ValueError(f"placement entries must be -1 (always FULL) or a device in [0, {devices})")
    else:
        fixed = {0, n_cols - 1} if always_full == "ends" else set(always_full)
        place = torch.full((n_cols,), -1, dtype=torch.long)
        free = [k for k in range(n_cols) if k not in fixed]
        place[free] = torch.arange(len(free)) % devices
    used = set(place[place >= 0].tolist())
    if len(used) < devices:
        raise ValueError(
            f"{devices} devices but only {int((place >= 0).sum())} schedulable subnets reach {len(used)} of them; "
            f"use at most {len(used)} devices or more subnets"
        )
    return place


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


# -- capacities ------------------------------------------------------------------------------------
@dataclass
class _DeviceBudget:
    capacity: int  # total compute, integer units
    outer_capacity: int  # compute the FULL level may use
    comm: float  # communication units allowed (inf: no communication budget)
    planned_full: int = 0  # item counts a uniform-cost device would get; baselines spend the same
    planned_fo: int = 0


def _int_costs(unit: Tensor, per_op: float) -> np.ndarray:
    return np.maximum(1, np.rint(unit.numpy() * per_op * _RESOLUTION)).astype(np.int64)


def _device_counts(n_mb, place, speed, unit, cost, budget, comm_budget, forward_mix, devices) -> list[_DeviceBudget]:
    all_full = torch.stack([unit[place == d].sum() * n_mb * cost.full for d in range(devices)])
    if torch.allclose(speed, speed[0].expand_as(speed)):
        share = budget * all_full
    else:  # equal time: capacity proportional to speed, at most all-FULL
        share = _speed_shares(budget * all_full.sum(), speed, all_full)
    ratio_fo = cost.forward_only / cost.full
    budgets = []
    for d in range(devices):
        b_d = float(share[d] / all_full[d])
        min_full = max(0.0, (b_d - ratio_fo) / (1.0 - ratio_fo)) if ratio_fo < 1 else b_d
        full_fraction = b_d - forward_mix * (b_d - min_full)
        capacity = math.floor(float(share[d]) * _RESOLUTION + 1e-6)
        outer = math.floor(full_fraction * float(all_full[d]) * _RESOLUTION + 1e-6)
        n_items = int((place == d).sum()) * n_mb
        comm = math.inf if comm_budget is None else comm_budget * n_items * cost.comm_full
        b = _DeviceBudget(capacity=capacity, outer_capacity=min(outer, capacity), comm=comm)
        full_w = int(_int_costs(torch.tensor([1.0]), cost.full)[0])
        fo_w = int(_int_costs(torch.tensor([1.0]), cost.forward_only)[0])
        b.planned_full = min(n_items, b.outer_capacity // full_w, _count_cap(comm, cost.comm_full))
        left_comm = comm - b.planned_full * cost.comm_full
        b.planned_fo = min(n_items - b.planned_full, (capacity - b.planned_full * full_w) // fo_w,
                           _count_cap(left_comm, cost.comm_forward_only))
        budgets.append(b)
    return budgets


def _speed_shares(total: Tensor, speed: Tensor, cap: Tensor) -> Tensor:
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


def _count_cap(comm_left: float, per_item: float) -> int:
    if math.isinf(comm_left) or per_item == 0:
        return 2**62
    return max(0, math.floor(comm_left / per_item + 1e-9))


# -- the dynamic program ---------------------------------------------------------------------------
def _solve_device_dp(back: Tensor, fwd: Tensor, unit: Tensor, budget: _DeviceBudget, cost: CostModel):
    """Exact bi-level solution for one device: FULL items first, then FORWARD_ONLY with what is left."""
    n_mb, n_cols = back.shape
    v = back.numpy().reshape(-1)
    f = fwd.numpy().reshape(-1)
    w_full = np.tile(_int_costs(unit, cost.full), n_mb)
    w_fo = np.tile(_int_costs(unit, cost.forward_only), n_mb)
    # FULL: ties in the backward score go to the items with the lower forward score, which leaves the
    # better ones for the inner level (an exchange argument makes this tie-break lexicographically exact).
    full = _knapsack_by_class(v, f, w_full, budget.outer_capacity, _count_cap(budget.comm, cost.comm_full))
    used = int(w_full[full].sum())
    rest = np.flatnonzero(~np.isin(np.arange(v.size), full))
    comm_left = budget.comm - full.size * cost.comm_full
    fo_local = _knapsack_by_class(f[rest], -f[rest], w_fo[rest], budget.capacity - used,
                                  _count_cap(comm_left, cost.comm_forward_only))
    fo = rest[fo_local]
    ops = np.full(v.size, int(Op.SHORTCUT), dtype=np.int64)
    ops[full] = Op.FULL
    ops[fo] = Op.FORWARD_ONLY
    return torch.from_numpy(ops.reshape(n_mb, n_cols)), (float(v[full].sum()), float(f[fo].sum()))


def _knapsack_by_class(values: np.ndarray, tiebreak: np.ndarray, weights: np.ndarray, capacity: int,
                       max_count: int) -> np.ndarray:
    """Indices of a max-value subset with total weight <= capacity and at most ``max_count`` items.

    Items of equal weight form a class and are interchangeable but for their value, so an optimal subset
    takes the best ``j_c`` items of every class c. A DP over capacity (and over the count when the count
    cap binds) picks the ``j_c``; with a single class the answer is closed-form.
    """
    if values.size == 0 or capacity <= 0 or max_count <= 0:
        return np.empty(0, dtype=np.int64)
    classes = np.unique(weights)
    g = int(np.gcd.reduce(classes))
    capacity //= g
    members, prefix, w = [], [], []
    for c in classes:
        idx = np.flatnonzero(weights == c)
        # best first: value descending, then the tie-break ascending, then index (stable)
        order = idx[np.lexsort((idx, tiebreak[idx], -values[idx]))]
        members.append(order)
        prefix.append(np.concatenate([[0.0], np.cumsum(values[order])]))
        w.append(int(c) // g)
    max_count = min(max_count, values.size)
    if len(classes) == 1:
        take = [min(len(members[0]), capacity // w[0], max_count)]
    else:
        take = _dp_counts(prefix, w, capacity, max_count if max_count < values.size else None)
    return np.concatenate([m[:j] for m, j in zip(members, take)]).astype(np.int64)


def _dp_counts(prefix: list[np.ndarray], w: list[int], capacity: int, max_count: int | None) -> list[int]:
    """How many items of each class: maximise sum of prefix[c][j_c] s.t. sum j_c*w_c <= cap (, sum j_c <= max_count).

    ``best[k, c]`` is the best value using at most c capacity and exactly k items (or any count when no count
    cap applies); on ties the larger j is kept, so capacity is filled like the closed form does.
    """
    counts = 1 if max_count is None else max_count + 1
    cells = counts * (capacity + 1) * len(w)
    if cells > _MAX_DP_CELLS:
        raise ValueError(
            f"the DP for this device needs {cells:,} cells (several cost classes and a large capacity"
            f"{' with a communication cap' if max_count is not None else ''}); use solver='ortools' or uniform subnet costs"
        )
    neg = -np.inf
    best = np.zeros((1, capacity + 1)) if max_count is None else np.full((counts, capacity + 1), neg)
    if max_count is not None:
        best[0, :] = 0.0
    choices = []
    for P, wc in zip(prefix, w):
        new = best.copy()
        choice = np.zeros(best.shape, dtype=np.int32)
        for j in range(1, min(len(P) - 1, capacity // wc) + 1):
            shift = j * wc
            cand = np.full(best.shape, neg)
            if max_count is None:
                cand[:, shift:] = best[:, : capacity + 1 - shift] + P[j]
            else:
                if j >= counts:
                    break
                cand[j:, shift:] = best[: counts - j, : capacity + 1 - shift] + P[j]
            better = cand >= new
            better &= np.isfinite(cand)
            new[better] = cand[better]
            choice[better] = j
        choices.append(choice)
        best = new
    k = 0
    if max_count is not None:  # among equal values prefer the largest count, like the closed form
        column = best[:, capacity]
        k = int(np.flatnonzero(column == column.max()).max())
    c = capacity
    take = [0] * len(w)
    for i in range(len(w) - 1, -1, -1):
        j = int(choices[i][k, c])
        take[i] = j
        c -= j * w[i]
        if max_count is not None:
            k -= j
    return take


# -- OR-Tools ----------------------------------------------------------------------------------------
def _solve_device_ortools(back: Tensor, fwd: Tensor, unit: Tensor, budget: _DeviceBudget, cost: CostModel,
                          time_limit: float | None = None):
    """The same bi-level model as two SCIP MIPs: the outer level, then the inner level on what is left."""
    from ortools.linear_solver import pywraplp

    n_mb, n_cols = back.shape
    v = back.numpy().reshape(-1)
    f = fwd.numpy().reshape(-1)
    w_full = np.tile(_int_costs(unit, cost.full), n_mb)
    w_fo = np.tile(_int_costs(unit, cost.forward_only), n_mb)
    comm_cap = None if math.isinf(budget.comm) else budget.comm
    items = range(v.size)

    def make():
        s = pywraplp.Solver.CreateSolver("SCIP")
        s.SetNumThreads(1)
        if time_limit is not None:
            s.SetTimeLimit(int(time_limit * 1000))
        return s

    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(pywraplp.MPSolverParameters.RELATIVE_MIP_GAP, 0.0)

    s1 = make()
    x = [s1.BoolVar("") for _ in items]
    s1.Add(s1.Sum([int(w_full[i]) * x[i] for i in items]) <= budget.outer_capacity)
    if comm_cap is not None:
        s1.Add(s1.Sum([cost.comm_full * x[i] for i in items]) <= comm_cap + 1e-9)
    s1.Maximize(s1.Sum([float(v[i]) * x[i] for i in items]))
    _check_status(s1.Solve(params), "outer")
    xs = np.array([xi.solution_value() > 0.5 for xi in x])

    # inner level: FORWARD_ONLY among the items left, with the compute and communication left
    rest = np.flatnonzero(~xs)
    s2 = make()
    y = [s2.BoolVar("") for _ in rest]
    s2.Add(s2.Sum([int(w_fo[i]) * yi for i, yi in zip(rest, y)]) <= budget.capacity - int(w_full[xs].sum()))
    if comm_cap is not None:
        left = comm_cap - cost.comm_full * int(xs.sum())
        s2.Add(s2.Sum([cost.comm_forward_only * yi for yi in y]) <= left + 1e-9)
    s2.Maximize(s2.Sum([float(f[i]) * yi for i, yi in zip(rest, y)]))
    _check_status(s2.Solve(params), "inner")
    ys = np.zeros(v.size, dtype=bool)
    ys[rest] = [yi.solution_value() > 0.5 for yi in y]
    ops = np.full(v.size, int(Op.SHORTCUT), dtype=np.int64)
    ops[xs] = Op.FULL
    ops[ys] = Op.FORWARD_ONLY
    return torch.from_numpy(ops.reshape(n_mb, n_cols)), (float(v[xs].sum()), float(f[ys].sum()))


def _check_status(status: int, level: str) -> None:
    from ortools.linear_solver import pywraplp

    if status != pywraplp.Solver.OPTIMAL:
        raise RuntimeError(f"OR-Tools did not prove the {level} level optimal (status {status})")


# -- baselines -------------------------------------------------------------------------------------
def _random_ops(back: Tensor, fwd: Tensor, n_full: int, n_fo: int, seed: int) -> Tensor:
    """Random assignment of the same numbers of FULL and FORWARD_ONLY items, ignoring devices."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(back.numel(), generator=gen)
    flat = torch.full((back.numel(),), int(Op.SHORTCUT), dtype=torch.long)
    flat[order[:n_full]] = Op.FULL
    flat[order[n_full : n_full + n_fo]] = Op.FORWARD_ONLY
    return flat.view(back.shape)


def _dpruning_ops(back: Tensor, fwd: Tensor, n_full: int, n_fo: int, seed: int) -> Tensor:
    """Static pruning: the same subnets for every micro-batch, best mean backward score FULL, then forward."""
    n_mb, n_cols = back.shape
    k_full = round(n_full / n_mb)
    k_fo = min(n_cols - k_full, round(n_fo / n_mb))
    full_cols = torch.argsort(back.mean(0), descending=True, stable=True)[:k_full]
    rest = torch.ones(n_cols, dtype=torch.bool)
    rest[full_cols] = False
    rest_idx = rest.nonzero().flatten()
    fo_cols = rest_idx[torch.argsort(fwd.mean(0)[rest_idx], descending=True, stable=True)[:k_fo]]
    ops = torch.full((n_mb, n_cols), int(Op.SHORTCUT), dtype=torch.long)
    ops[:, full_cols] = Op.FULL
    ops[:, fo_cols] = Op.FORWARD_ONLY
    return ops


def _moe_ops(back: Tensor, fwd: Tensor, n_full: int, n_fo: int, seed: int) -> Tensor:
    """Per-micro-batch top-k routing by score, with no per-device capacity (shows the imbalance)."""
    n_mb, n_cols = back.shape
    k_full = round(n_full / n_mb)
    k_fo = min(n_cols - k_full, round(n_fo / n_mb))
    ops = torch.full((n_mb, n_cols), int(Op.SHORTCUT), dtype=torch.long)
    full_idx = torch.topk(back, k_full, dim=1).indices
    ops.scatter_(1, full_idx, int(Op.FULL))
    masked = fwd.masked_fill(ops == Op.FULL, -math.inf)
    fo_idx = torch.topk(masked, k_fo, dim=1).indices
    ops.scatter_(1, fo_idx, int(Op.FORWARD_ONLY))
    return ops
