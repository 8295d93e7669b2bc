"""The bi-level knapsack behind D2FT's schedule: capacities, two exact solvers, and the check between them.

Each device is a knapsack. With ``capacity="step"`` (default) every (device, micro-batch) pair is its own
small knapsack (a *row* of items: that device's subnets for that micro-batch); with ``"epoch"`` a device is
one row of all its (micro-batch, subnet) items. The outer level picks FULL items maximising backward scores
within the outer capacity; the inner level picks FORWARD_ONLY items among the rest maximising forward
scores within what is left; the rest is SHORTCUT. A communication budget caps the item counts.

Both solvers share one prologue (:class:`Rows`: integer costs, capacities, and in step mode integer
profits) and one epilogue (ops and per-row objectives from the original float scores). In step mode the
profit of an item is its score quantised to 2^-Q of the row's largest score, times K, plus a distinct rank
(lower forward score first for FULL, lower index first for FORWARD_ONLY); K exceeds every rank sum, so
the optimum is unique up to exact profit ties and both solvers break score ties the same way.

Solvers (:data:`SOLVERS`): ``ortools`` (step: OR-Tools' dedicated knapsack solver, branch and bound, per
row and level; epoch: two SCIP MIPs per device) and ``dp`` (ours: items of equal cost form a class, the
best of a class go first, a dynamic program over capacity picks how many of each class; one class is a
sort, vectorised over rows).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from lightning_d2ft.capacity import DeviceBudget, count_cap, int_costs
from lightning_d2ft.ops import CostModel, Op

_MAX_DP_CELLS = 50_000_000
_RTOL, _ATOL = 1e-6, 1e-9


class SolverMismatchError(RuntimeError):
    """OR-Tools and the DP found different objectives for the same instance (a bug in one of them)."""


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
    """Integer profits ``round(score / row max * 2^Q) * K + rank`` that fit int64 summed over a row."""
    m = scores.shape[1]
    k = m * (m + 1) // 2 + 1
    q = min(52, 61 - k.bit_length() - m.bit_length())
    top = scores.max(axis=1, keepdims=True)
    scaled = np.divide(scores, top, out=np.zeros_like(scores), where=top > 0)
    return np.rint(scaled * 2.0**q).astype(np.int64) * k + rank


def make_rows(back: Tensor, fwd: Tensor, unit: Tensor, budget: DeviceBudget, cost: CostModel, step: bool) -> Rows:
    """One device's rows: ``back``/``fwd`` are ``[micro_batches, subnets of the device]``."""
    n_mb, n_cols = back.shape
    b, f = back.numpy(), fwd.numpy()
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


# -- the DP ------------------------------------------------------------------------------------------
def solve_dp(rows: Rows, time_limit: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact bi-level solution of every row: FULL items first, then FORWARD_ONLY with what is left."""
    if len(np.unique(rows.w_full)) == 1 and len(np.unique(rows.w_fo)) == 1:
        return _dp_one_class(rows)
    full = np.zeros(rows.back.shape, dtype=bool)
    fo = np.zeros_like(full)
    b = rows.budget
    for r in range(full.shape[0]):
        pick = knapsack_by_class(rows.value_out[r], rows.tie_out[r], rows.w_full, b.outer_capacity, rows.full_cap)
        full[r, pick] = True
        rest = np.flatnonzero(~full[r])
        used = int(rows.w_full[pick].sum())
        inner = knapsack_by_class(rows.value_in[r, rest], rows.tie_in[r, rest], rows.w_fo[rest],
                                  b.capacity - used, rows.fo_cap(pick.size))
        fo[r, rest[inner]] = True
    return full, fo


def _best_first(value: np.ndarray, tie: np.ndarray) -> np.ndarray:
    idx = np.broadcast_to(np.arange(value.shape[1]), value.shape)
    return np.lexsort((idx, tie, -value), axis=-1)


def _dp_one_class(rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """All items cost the same: every row takes its best ``k`` items, the same ``k`` in every row."""
    n_rows, m = rows.back.shape
    b, wf, wo = rows.budget, int(rows.w_full[0]), int(rows.w_fo[0])
    k_full = max(0, min(m, b.outer_capacity // wf, rows.full_cap))
    k_fo = max(0, min(m - k_full, (b.capacity - k_full * wf) // wo, rows.fo_cap(k_full)))
    full = np.zeros((n_rows, m), dtype=bool)
    np.put_along_axis(full, _best_first(rows.value_out, rows.tie_out)[:, :k_full], True, axis=1)
    fo = np.zeros_like(full)
    if k_fo:
        value_in = np.where(full, np.iinfo(np.int64).min // 2 if rows.step else -np.inf, rows.value_in)
        tie_in = np.where(full, np.inf, rows.tie_in)
        np.put_along_axis(fo, _best_first(value_in, tie_in)[:, :k_fo], True, axis=1)
    return full, fo


# -- OR-Tools ----------------------------------------------------------------------------------------
def solve_ortools(rows: Rows, time_limit: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """OR-Tools: the dedicated knapsack solver per row in step mode, SCIP MIPs in epoch mode."""
    if not rows.step:
        return _solve_scip(rows, time_limit)
    solvers = _knapsack_solvers(time_limit)
    full = np.zeros(rows.back.shape, dtype=bool)
    fo = np.zeros_like(full)
    b = rows.budget
    for r in range(full.shape[0]):
        full[r] = _ks(solvers, rows.value_out[r], rows.w_full, b.outer_capacity, rows.full_cap, "outer")
        rest = np.flatnonzero(~full[r])
        if rest.size:
            cap = b.capacity - int(rows.w_full[full[r]].sum())
            pick = _ks(solvers, rows.value_in[r, rest], rows.w_fo[rest], cap, rows.fo_cap(int(full[r].sum())), "inner")
            fo[r, rest[pick]] = True
    return full, fo


def _knapsack_solvers(time_limit: float | None) -> dict:
    from ortools.algorithms.python import knapsack_solver as ks

    out = {"small": ks.KnapsackSolver(ks.SolverType.KNAPSACK_64ITEMS_SOLVER, "d2ft"),
           "general": ks.KnapsackSolver(ks.SolverType.KNAPSACK_MULTIDIMENSION_BRANCH_AND_BOUND_SOLVER, "d2ft")}
    if time_limit is not None:
        for solver in out.values():
            solver.set_time_limit(time_limit)
    return out


def _ks(solvers: dict, profits: np.ndarray, weights: np.ndarray, capacity: int, max_count: int,
        level: str) -> np.ndarray:
    """One knapsack: weights divided by their gcd (OR-Tools' solvers are much faster on small integers);
    equal weights fold the count cap into the capacity, so the 64-item solver takes most rows."""
    n = profits.size
    if capacity <= 0 or max_count <= 0:
        return np.zeros(n, dtype=bool)
    g = int(np.gcd.reduce(weights))
    w, capacity, max_count = weights // g, capacity // g, min(max_count, n)
    if int(w.min()) == int(w.max()):
        capacity, max_count = min(capacity, max_count * int(w[0])), n
    dims, caps = [w.tolist()], [capacity]
    if max_count < n:
        dims.append([1] * n)
        caps.append(max_count)
    solver = solvers["small" if n <= 64 and len(dims) == 1 else "general"]
    solver.init(profits.tolist(), dims, caps)
    solver.solve()
    if not solver.is_solution_optimal():
        raise RuntimeError(f"OR-Tools did not prove the {level} level optimal within the time limit")
    return np.fromiter((solver.best_solution_contains(i) for i in range(n)), dtype=bool, count=n)


SOLVERS: dict[str, Callable[[Rows, float | None], tuple[np.ndarray, np.ndarray]]] = {
    "ortools": solve_ortools,
    "dp": solve_dp,
}


# -- all devices, and the check ----------------------------------------------------------------------
@dataclass
class Solution:
    ops: Tensor  # [N, K] (always-FULL columns FULL)
    objective: tuple[float, float]
    solve_seconds: float
    check_seconds: float


def solve_devices(back: Tensor, fwd: Tensor, place: Tensor, unit: Tensor, budgets: list[DeviceBudget],
                  cost: CostModel, solver: str, step: bool, validate: bool, time_limit: float | None,
                  instance: dict) -> Solution:
    """Solve every device with ``solver``; with ``validate`` the DP re-solves each device and must agree."""
    n_mb, n_cols = back.shape
    ops = np.full((n_mb, n_cols), int(Op.FULL), dtype=np.int64)
    objective = np.zeros(2)
    solve_s = check_s = 0.0
    for d, budget in enumerate(budgets):
        cols = (place == d).nonzero().flatten()
        rows = make_rows(back[:, cols], fwd[:, cols], unit[cols], budget, cost, step)
        t = time.perf_counter()
        found, obj = epilogue(rows, *SOLVERS[solver](rows, time_limit))
        solve_s += time.perf_counter() - t
        if validate and solver != "dp":
            t = time.perf_counter()
            _, ref = epilogue(rows, *solve_dp(rows))
            _compare(obj, ref, d, step, solver, instance)
            check_s += time.perf_counter() - t
        ops[:, cols.numpy()] = found.reshape(n_mb, cols.numel())
        objective += obj.sum(0)
    ops = torch.from_numpy(ops)
    return Solution(ops, (float(objective[0]), float(objective[1])), solve_s, check_s)


def _compare(found: np.ndarray, ref: np.ndarray, device: int, step: bool, solver: str, instance: dict) -> None:
    bad = ~np.isclose(found, ref, rtol=_RTOL, atol=_ATOL).all(axis=1)
    if not bad.any():
        return
    r = int(np.flatnonzero(bad)[0])
    where = f"micro-batch {r}" if step else "all micro-batches (capacity='epoch')"
    path = Path(tempfile.gettempdir()) / f"d2ft_solver_mismatch_{os.getpid()}_{time.time_ns()}.pt"
    torch.save(instance, path)
    raise SolverMismatchError(
        f"{solver} and the DP disagree on device {device}, {where}: FULL-level objective {found[r, 0]!r} vs "
        f"{ref[r, 0]!r} (DP), FORWARD_ONLY-level objective {found[r, 1]!r} vs {ref[r, 1]!r} (DP). The instance "
        f"is saved to {path} (torch.load it; Schedule.solve(**instance) reproduces it): please attach it to a "
        f"bug report. validate=False skips this check; solver='dp' uses the DP alone."
    )


# -- the DP over cost classes -------------------------------------------------------------------------
def knapsack_by_class(values: np.ndarray, tiebreak: np.ndarray, weights: np.ndarray, capacity: int,
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
        order = idx[np.lexsort((idx, tiebreak[idx], -values[idx]))]  # value desc, tie-break asc, index
        members.append(order)
        prefix.append(np.concatenate([np.zeros(1, dtype=values.dtype), np.cumsum(values[order])]))
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
    cap applies); on ties the larger j is kept, so capacity is filled like the closed form does. Integer
    profits stay integers (exact); float scores use -inf for "unreachable".
    """
    counts = 1 if max_count is None else max_count + 1
    cells = counts * (capacity + 1) * len(w)
    if cells > _MAX_DP_CELLS:
        raise ValueError(
            f"the DP for this device needs {cells:,} cells (several cost classes and a large capacity"
            f"{' with a communication cap' if max_count is not None else ''}); use uniform subnet costs or "
            f"capacity='step'"
        )
    dtype = prefix[0].dtype
    neg = np.iinfo(np.int64).min // 4 if dtype.kind == "i" else -np.inf
    best = np.zeros((1, capacity + 1), dtype=dtype) if max_count is None else np.full((counts, capacity + 1), neg,
                                                                                       dtype=dtype)
    best[0, :] = 0
    choices = []
    for P, wc in zip(prefix, w):
        new = best.copy()
        choice = np.zeros(best.shape, dtype=np.int32)
        for j in range(1, min(len(P) - 1, capacity // wc) + 1):
            shift = j * wc
            cand = np.full(best.shape, neg, dtype=dtype)
            if max_count is None:
                cand[:, shift:] = best[:, : capacity + 1 - shift] + P[j]
            else:
                if j >= counts:
                    break
                cand[j:, shift:] = best[: counts - j, : capacity + 1 - shift] + P[j]
            better = (cand >= new) & (cand > neg / 2)
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


# -- SCIP, for capacity="epoch" ------------------------------------------------------------------------
def _solve_scip(rows: Rows, time_limit: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The epoch row as two SCIP MIPs: the outer level, then the inner level on what is left."""
    full = np.zeros(rows.back.shape, dtype=bool)
    fo = np.zeros_like(full)
    b = rows.budget
    for r in range(full.shape[0]):
        full[r] = _mip(rows.back[r], rows.w_full, b.outer_capacity, rows.full_cap, time_limit, "outer")
        rest = np.flatnonzero(~full[r])
        cap = b.capacity - int(rows.w_full[full[r]].sum())
        fo[r, rest] = _mip(rows.fwd[r, rest], rows.w_fo[rest], cap, rows.fo_cap(int(full[r].sum())), time_limit,
                           "inner")
    return full, fo


def _mip(values: np.ndarray, weights: np.ndarray, capacity: int, max_count: int, time_limit: float | None,
         level: str) -> np.ndarray:
    from ortools.linear_solver import pywraplp

    if values.size == 0 or capacity <= 0 or max_count <= 0:
        return np.zeros(values.size, dtype=bool)
    s = pywraplp.Solver.CreateSolver("SCIP")
    s.SetNumThreads(1)
    if time_limit is not None:
        s.SetTimeLimit(int(time_limit * 1000))
    x = [s.BoolVar("") for _ in range(values.size)]
    s.Add(s.Sum([int(w) * xi for w, xi in zip(weights, x)]) <= capacity)
    if max_count < values.size:
        s.Add(s.Sum(x) <= max_count)
    s.Maximize(s.Sum([float(v) * xi for v, xi in zip(values, x)]))
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(pywraplp.MPSolverParameters.RELATIVE_MIP_GAP, 0.0)
    if s.Solve(params) != pywraplp.Solver.OPTIMAL:
        raise RuntimeError(f"OR-Tools did not prove the {level} level optimal (SCIP, capacity='epoch')")
    return np.array([xi.solution_value() > 0.5 for xi in x])
