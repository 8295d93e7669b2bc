"""The bi-level knapsack behind D2FT's schedule: two exact solvers, and the check between them.

Each device is a knapsack. With ``capacity="step"`` (default) every (device, micro-batch) pair is its own
small knapsack (a *row*: that device's subnets for that micro-batch); with ``"epoch"`` a device is one row
of all its (micro-batch, subnet) items, after a floor of FULL work that every (device, micro-batch) keeps
(a step-mode knapsack per micro-batch: no micro-batch is starved). The outer level picks FULL items
maximising backward scores within the outer capacity; the inner level picks FORWARD_ONLY items among the
rest maximising forward scores within what is left; the rest is SHORTCUT. A communication budget (step
mode) caps the *messages* of a (device, micro-batch) on the wire model of :mod:`.wire`: a FULL item opens
both messages of its (device, block) group, a FORWARD_ONLY item the forward one where no FULL did, and the
items of an open group send nothing more. Where every group holds one item (no blocks given) that is a cap
on the item counts; where groups hold several, both levels are a knapsack over groups.

Both solvers share one prologue (:class:`Rows`) and one epilogue (ops, and per-row objectives summed from
the float scores). In step mode an item's profit is its score quantised to 2^-Q of the row's largest score
(Q = 36 for 36 subnets) times K, plus a distinct rank (lower forward score first for FULL, lower index
first for FORWARD_ONLY), K above every rank sum: both solvers maximise the same integers and so break
score ties the same way. In epoch mode SCIP sees the float scores, and a second solve breaks FULL ties the
DP's way (among the best FULL sets, the most items, then the lowest forward-score sum). SCIP may still
return another FULL set within its optimality tolerance (measured: 2.6e-8 of the objective lower, on a row
of exact ties: the default weight_magnitude score is the same for every micro-batch), and the inner
objective depends on which FULL set was taken, so in epoch mode the check compares the FULL objectives
(relative 1e-6) and then the FORWARD_ONLY objective that the DP reaches on OR-Tools' own FULL set.

Solvers (:data:`SOLVERS`): ``ortools`` (step: OR-Tools' dedicated knapsack solver per row and level, the
64-item solver or branch and bound, or CP-SAT per row and level where a comm budget groups items by block;
epoch: two SCIP MIPs per device) and ``dp`` (ours: items of equal cost form a class, the best of a class go
first, a DP over capacity picks how many of each class; one class is a top-k, vectorised over rows; grouped
items: a DP over the groups with state (capacity, groups opened), vectorised over rows).
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from lightning_d2ft.ops import CostModel, Op
from lightning_d2ft.schedule.capacity import DeviceBudget, Rows, epilogue, make_rows

_MAX_DP_CELLS = 50_000_000
_RTOL, _ATOL = 1e-6, 1e-9


class SolverMismatchError(RuntimeError):
    """OR-Tools and the DP found different objectives for the same instance (a bug in one of them)."""


# -- the DP ------------------------------------------------------------------------------------------
def solve_dp(rows: Rows, time_limit: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact bi-level solution of every row: FULL items first, then FORWARD_ONLY with what is left."""
    if rows.grouped:
        return _dp_grouped(rows)
    if len(np.unique(rows.w_full)) == 1 and len(np.unique(rows.w_fo)) == 1:
        return _dp_one_class(rows)
    full = np.zeros(rows.back.shape, dtype=bool) if rows.fixed is None else rows.fixed.copy()
    fo = np.zeros_like(full)
    b = rows.budget
    for r in range(full.shape[0]):
        avail, cap, count = rows.outer_left(r)
        free = np.flatnonzero(avail)
        pick = knapsack_by_class(rows.value_out[r, free], rows.tie_out[r, free], rows.w_full[free], cap, count)
        full[r, free[pick]] = True
        rest = np.flatnonzero(~full[r])
        used = int(rows.w_full[full[r]].sum())
        inner = knapsack_by_class(rows.value_in[r, rest], rows.tie_in[r, rest], rows.w_fo[rest],
                                  b.capacity - used, rows.fo_cap(int(full[r].sum())))
        fo[r, rest[inner]] = True
    return full, fo


def dp_inner(rows: Rows, full: np.ndarray) -> np.ndarray:
    """The DP's FORWARD_ONLY level for a given FULL set ``full`` (items not grouped by messages)."""
    fo = np.zeros_like(full)
    for r in range(full.shape[0]):
        rest = np.flatnonzero(~full[r])
        used = int(rows.w_full[full[r]].sum())
        inner = knapsack_by_class(rows.value_in[r, rest], rows.tie_in[r, rest], rows.w_fo[rest],
                                  rows.budget.capacity - used, rows.fo_cap(int(full[r].sum())))
        fo[r, rest[inner]] = True
    return fo


def _best_first(value: np.ndarray, tie: np.ndarray, k: int, distinct: bool) -> np.ndarray:
    """The ``k`` best items of every row: value descending, then tie-break ascending, then index."""
    if distinct:  # integer profits are distinct within a row: the top-k set needs no full sort
        return np.argpartition(-value, k - 1, axis=1)[:, :k] if k < value.shape[1] else \
            np.broadcast_to(np.arange(value.shape[1]), value.shape)
    idx = np.broadcast_to(np.arange(value.shape[1]), value.shape)
    return np.lexsort((idx, tie, -value), axis=-1)[:, :k]


def _dp_one_class(rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """All items cost the same: every row takes its best ``k`` items, the same ``k`` in every row (items
    ``fixed`` FULL count towards it: epoch mode, one row)."""
    n_rows, m = rows.back.shape
    b, wf, wo = rows.budget, int(rows.w_full[0]), int(rows.w_fo[0])
    k_full = max(0, min(m, b.outer_capacity // wf, rows.full_cap))
    low = np.iinfo(np.int64).min // 2 if rows.step else -np.inf
    full = np.zeros((n_rows, m), dtype=bool)
    value_out, tie_out, k_new = rows.value_out, rows.tie_out, k_full
    if rows.fixed is not None:  # one row (epoch): the floor's items first, the best others after them
        full |= rows.fixed
        k_new = max(0, k_full - int(rows.fixed.sum(1).max()))
        value_out, tie_out = np.where(rows.fixed, low, value_out), np.where(rows.fixed, np.inf, tie_out)
        k_full = max(k_full, int(rows.fixed.sum(1).max()))
    if k_new:
        np.put_along_axis(full, _best_first(value_out, tie_out, k_new, rows.step), True, axis=1)
    k_fo = max(0, min(m - k_full, (b.capacity - k_full * wf) // wo, rows.fo_cap(k_full)))
    fo = np.zeros_like(full)
    if k_fo:
        value_in = np.where(full, low, rows.value_in)
        tie_in = np.where(full, np.inf, rows.tie_in)
        np.put_along_axis(fo, _best_first(value_in, tie_in, k_fo, rows.step), True, axis=1)
    return full, fo


# -- the DP over (device, block) message groups ---------------------------------------------------------
_NEG = -(2**53)  # an unavailable item's profit: above every row's profit sum, so a choice holding one loses
_DP_CELLS_PER_CHUNK = 4_000_000
_MAX_GROUP_OPTIONS = 4096


def _dp_grouped(rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Step mode under a message cap with several items per (device, block): both levels by
    :func:`group_knapsack` (FULL opens a block's two messages; FORWARD_ONLY opens the forward one where no
    FULL did)."""
    b, group = rows.budget, rows.group
    n_rows, m = rows.back.shape
    n_groups = int(group.max()) + 1
    everything = np.ones((n_rows, m), dtype=bool)
    no_free = np.zeros((n_rows, n_groups), dtype=bool)
    full = group_knapsack(rows.value_out, rows.w_full, group, everything, no_free,
                          np.full(n_rows, b.outer_capacity), np.full(n_rows, b.outer_messages // 2))
    opened = np.stack([full[:, group == gid].any(1) for gid in range(n_groups)], axis=1)
    used = (full * rows.w_full).sum(1)
    fo = group_knapsack(rows.value_in, rows.w_fo, group, ~full, opened, b.capacity - used,
                        b.messages - 2 * opened.sum(1))
    return full, fo


def group_knapsack(values: np.ndarray, weights: np.ndarray, group: np.ndarray, avail: np.ndarray,
                   free: np.ndarray, capacity: np.ndarray, max_groups: np.ndarray) -> np.ndarray:
    """Per row, a max-value subset of the ``avail`` items with weight <= ``capacity[r]`` that opens at most
    ``max_groups[r]`` of the groups not ``free[r]`` (a group is open when any of its items is taken).

    Items of one group and one weight are interchangeable but for their value, so a group's choices are how
    many of each weight class it takes (the best ones); a DP over the groups with state (capacity, groups
    opened) picks them, vectorised over the rows. ``values`` are int64 profits (exact sums).
    """
    n_rows, m = values.shape
    out = np.zeros((n_rows, m), dtype=bool)
    capacity, max_groups = np.maximum(np.asarray(capacity), 0), np.maximum(np.asarray(max_groups), 0)
    if m == 0 or not avail.any():
        return out
    g = int(np.gcd.reduce(weights))
    w = weights // g
    cap = capacity // g
    n_groups = int(group.max()) + 1
    c_max, k_max = int(min(cap.max(), w.sum())), int(min(max_groups.max(), n_groups))
    cells = (c_max + 1) * (k_max + 1)
    chunk = max(1, _DP_CELLS_PER_CHUNK // cells)
    for start in range(0, n_rows, chunk):
        sl = slice(start, min(n_rows, start + chunk))
        out[sl] = _group_dp_rows(np.where(avail[sl], values[sl], _NEG), w, group, free[sl],
                                 np.minimum(cap[sl], c_max), np.minimum(max_groups[sl], k_max), c_max, k_max)
    return out & avail


def _group_options(values: np.ndarray, w: np.ndarray, members: np.ndarray):
    """A group's choices: (weight, [R] value, per-class (items in best-first order [R, n_c], count))."""
    classes = np.unique(w[members])
    per_class = []
    for c in classes:
        idx = members[w[members] == c]
        order = idx[np.argsort(-values[:, idx], axis=1, kind="stable")]  # value desc, then index
        prefix = np.concatenate([np.zeros((values.shape[0], 1), dtype=np.int64),
                                 np.cumsum(np.take_along_axis(values, order, axis=1), axis=1)], axis=1)
        per_class.append((int(c), order, prefix))
    n_options = math.prod(order.shape[1] + 1 for _, order, _ in per_class)
    if n_options > _MAX_GROUP_OPTIONS:
        raise ValueError(f"a (device, block) group holds {members.size} subnets of {len(per_class)} different costs "
                         f"({n_options:,} choices); under a comm budget use uniform subnet costs or fewer groups")
    options = []
    for counts in itertools.product(*(range(order.shape[1] + 1) for _, order, _ in per_class)):
        if any(counts):
            weight = sum(j * c for j, (c, _, _) in zip(counts, per_class))
            value = sum(prefix[:, j] for j, (_, _, prefix) in zip(counts, per_class))
            options.append((weight, value, counts))
    return per_class, options


def _group_dp_rows(values: np.ndarray, w: np.ndarray, group: np.ndarray, free: np.ndarray, cap: np.ndarray,
                   kcap: np.ndarray, c_max: int, k_max: int) -> np.ndarray:
    n_rows, m = values.shape
    best = np.zeros((n_rows, c_max + 1, k_max + 1), dtype=np.int64)  # best value, weight <= c, groups <= k
    plans, choices = [], []
    for gid in range(int(group.max()) + 1):
        members = np.flatnonzero(group == gid)
        if members.size == 0:
            plans.append(None)
            choices.append(None)
            continue
        per_class, options = _group_options(values, w, members)
        new = best.copy()
        choice = np.zeros(best.shape, dtype=np.int16)
        charged = ~free[:, gid]
        for o, (weight, value, _) in enumerate(options, start=1):
            if weight > c_max:
                continue
            cand = np.full(best.shape, _NEG, dtype=np.int64)
            shifted = best[:, : c_max + 1 - weight, :] + value[:, None, None]
            cand[:, weight:, :] = np.where(charged[:, None, None], _NEG, shifted)
            if k_max:
                cand[charged, weight:, 1:] = shifted[charged, :, :k_max]
            better = cand > new
            new = np.where(better, cand, new)
            choice[better] = o
        best = new
        plans.append((per_class, options, charged))
        choices.append(choice)
    rows = np.arange(n_rows)
    c, k = cap.astype(np.int64).copy(), kcap.astype(np.int64).copy()
    out = np.zeros((n_rows, m), dtype=bool)
    for gid in range(len(plans) - 1, -1, -1):
        if plans[gid] is None:
            continue
        per_class, options, charged = plans[gid]
        o = choices[gid][rows, c, k].astype(np.int64)
        took = o > 0
        weights = np.array([0] + [opt[0] for opt in options])
        counts = np.array([[0] * len(per_class)] + [list(opt[2]) for opt in options])
        for ci, (_, order, _) in enumerate(per_class):
            j = counts[o, ci]
            mark = np.arange(order.shape[1])[None, :] < j[:, None]
            out[rows[:, None].repeat(order.shape[1], 1)[mark], order[mark]] = True
        c -= weights[o]
        k -= (took & charged).astype(np.int64)
    return out


# -- OR-Tools ----------------------------------------------------------------------------------------
def solve_ortools(rows: Rows, time_limit: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """OR-Tools: the dedicated knapsack solver per row in step mode (CP-SAT where a message cap groups the
    items by block), SCIP MIPs in epoch mode."""
    if not rows.step:
        return _solve_scip(rows, time_limit)
    if rows.grouped:
        return _solve_cpsat_grouped(rows, time_limit)
    solvers = _knapsack_solvers(time_limit)
    full = np.zeros(rows.back.shape, dtype=bool)
    fo = np.zeros_like(full)
    b, m = rows.budget, full.shape[1]
    out_profits, in_profits = rows.value_out.tolist(), rows.value_in.tolist()  # one conversion, not per row
    uniform = len(np.unique(rows.w_full)) == 1 and len(np.unique(rows.w_fo)) == 1
    for r in range(full.shape[0]):
        if uniform:  # equal weights: the count caps fold into one capacity in items
            k = min(b.outer_capacity // int(rows.w_full[0]), rows.full_cap)
            full[r] = _solve_one(solvers, out_profits[r], [1] * m, [k], "outer")
        else:
            full[r] = _ks(solvers, out_profits[r], rows.w_full, b.outer_capacity, rows.full_cap, "outer")
        rest = np.flatnonzero(~full[r])
        if rest.size:
            n_full, profits = int(full[r].sum()), [in_profits[r][i] for i in rest]
            cap = b.capacity - int(rows.w_full[full[r]].sum())
            if uniform:
                k = min(cap // int(rows.w_fo[0]), rows.fo_cap(n_full))
                pick = _solve_one(solvers, profits, [1] * rest.size, [k], "inner")
            else:
                pick = _ks(solvers, profits, rows.w_fo[rest], cap, rows.fo_cap(n_full), "inner")
            fo[r, rest[pick]] = True
    return full, fo


def _solve_cpsat_grouped(rows: Rows, time_limit: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Step mode under a message cap with items grouped by block: two CP-SAT models per row (x_i <= y_block,
    at most the messages' worth of open blocks), integer profits as the DP's, so the optima are the same."""
    b, group = rows.budget, rows.group
    full = np.zeros(rows.back.shape, dtype=bool)
    fo = np.zeros_like(full)
    for r in range(full.shape[0]):
        full[r] = _cpsat(rows.value_out[r], rows.w_full, group, np.ones(group.size, dtype=bool), set(),
                         b.outer_capacity, b.outer_messages // 2, time_limit, "outer")
        opened = set(group[full[r]].tolist())
        used = int(rows.w_full[full[r]].sum())
        fo[r] = _cpsat(rows.value_in[r], rows.w_fo, group, ~full[r], opened, b.capacity - used,
                       b.messages - 2 * len(opened), time_limit, "inner")
    return full, fo


def _cpsat(values: np.ndarray, weights: np.ndarray, group: np.ndarray, avail: np.ndarray, free: set[int],
           capacity: int, max_groups: int, time_limit: float | None, level: str) -> np.ndarray:
    from ortools.sat.python import cp_model

    out = np.zeros(values.size, dtype=bool)
    items = np.flatnonzero(avail)
    if items.size == 0 or capacity <= 0:
        return out
    model = cp_model.CpModel()
    x = {int(i): model.NewBoolVar(f"x{i}") for i in items}
    y = {}
    for i in items:
        gid = int(group[i])
        if gid not in free:
            if gid not in y:
                y[gid] = model.NewBoolVar(f"y{gid}")
            model.AddImplication(x[int(i)], y[gid])
    model.Add(sum(int(weights[i]) * x[int(i)] for i in items) <= int(capacity))
    if y:
        model.Add(sum(y.values()) <= max(0, int(max_groups)))
    model.Maximize(sum(int(values[i]) * x[int(i)] for i in items))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    if time_limit is not None:
        solver.parameters.max_time_in_seconds = float(time_limit)
    if solver.Solve(model) != cp_model.OPTIMAL:
        raise RuntimeError(f"OR-Tools did not prove the {level} level optimal (CP-SAT, comm budget by block)")
    for i in items:
        out[i] = bool(solver.Value(x[int(i)]))
    return out


def _knapsack_solvers(time_limit: float | None) -> dict:
    from ortools.algorithms.python import knapsack_solver as ks

    out = {"small": ks.KnapsackSolver(ks.SolverType.KNAPSACK_64ITEMS_SOLVER, "d2ft"),
           "general": ks.KnapsackSolver(ks.SolverType.KNAPSACK_MULTIDIMENSION_BRANCH_AND_BOUND_SOLVER, "d2ft")}
    if time_limit is not None:
        for solver in out.values():
            solver.set_time_limit(time_limit)
    return out


def _ks(solvers: dict, profits: list[int], weights: np.ndarray, capacity: int, max_count: int,
        level: str) -> np.ndarray:
    """One knapsack with a count cap: weights divided by their gcd (OR-Tools' solvers are much faster on
    small integers), the count cap as a second dimension only where it can bind."""
    n = len(profits)
    g = int(np.gcd.reduce(weights))
    dims, caps = [(weights // g).tolist()], [capacity // g]
    if max_count < n:
        dims.append([1] * n)
        caps.append(max_count)
    return _solve_one(solvers, profits, dims[0], caps, level, dims[1:])


def _solve_one(solvers: dict, profits: list[int], weights: list[int], caps: list[int], level: str,
               more: list[list[int]] = ()) -> np.ndarray:
    n = len(profits)
    if min(caps) <= 0:
        return np.zeros(n, dtype=bool)
    solver = solvers["small" if n <= 64 and not more else "general"]
    solver.init(profits, [weights, *more], caps)
    solver.solve()
    if not solver.is_solution_optimal():
        raise RuntimeError(f"OR-Tools did not prove the {level} level optimal within the time limit")
    return np.fromiter((solver.best_solution_contains(i) for i in range(n)), dtype=bool, count=n)


#: the solvers by name (``ScheduleSettings.solver`` takes these): a new solver is a function plus one line
SOLVERS: dict[str, Callable[[Rows, float | None], tuple[np.ndarray, np.ndarray]]] = {
    "dp": solve_dp,
    "ortools": solve_ortools,
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
                  instance: dict, column_group: np.ndarray | None = None) -> Solution:
    """Solve every device with ``solver``; with ``validate`` the DP re-solves each device and must agree.

    ``column_group``: each column's message group (its block; the messages of a device's groups in one block
    are shared). In epoch mode a device's ``floor_capacity`` is first given to FULL in every micro-batch (a
    step-mode knapsack per micro-batch), and the pooled capacity is solved beside it.
    """
    n_mb, n_cols = back.shape
    back_np, fwd_np, place_np = back.numpy(), fwd.numpy(), place.numpy()
    ops = np.full((n_mb, n_cols), int(Op.FULL), dtype=np.int64)
    objective = np.zeros(2)
    solve_s = check_s = 0.0
    for d, budget in enumerate(budgets):
        cols = np.flatnonzero(place_np == d)
        group = None if column_group is None else np.unique(column_group[cols], return_inverse=True)[1].reshape(-1)
        fixed = None
        t = time.perf_counter()  # the shared prologue counts as solve time
        if not step and budget.floor_capacity > 0:
            floor = DeviceBudget(capacity=budget.floor_capacity, outer_capacity=budget.floor_capacity)
            floor_rows = make_rows(back_np[:, cols], fwd_np[:, cols], unit[cols], floor, cost, True)
            fixed, _ = SOLVERS[solver](floor_rows, time_limit)
            solve_s += time.perf_counter() - t
            if validate and solver != "dp":
                t = time.perf_counter()
                ref, _ = solve_dp(floor_rows)
                _compare(np.stack([(floor_rows.back * fixed).sum(1), np.zeros(n_mb)], 1),
                         np.stack([(floor_rows.back * ref).sum(1), np.zeros(n_mb)], 1), d, True, solver, instance)
                check_s += time.perf_counter() - t
            t = time.perf_counter()
        rows = make_rows(back_np[:, cols], fwd_np[:, cols], unit[cols], budget, cost, step, group, fixed)
        full, fo = SOLVERS[solver](rows, time_limit)
        found, obj = epilogue(rows, full, fo)
        solve_s += time.perf_counter() - t
        if validate and solver != "dp":
            t = time.perf_counter()
            _, ref = epilogue(rows, *solve_dp(rows))
            if not step:  # SCIP may return another FULL set within its tolerance: check the inner level on its own
                _, given = epilogue(rows, full, dp_inner(rows, full))
                ref = np.stack([ref[:, 0], given[:, 1]], axis=1)
            _compare(obj, ref, d, step, solver, instance)
            check_s += time.perf_counter() - t
        ops[:, cols] = found.reshape(n_mb, cols.size)
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
        f"is saved to {path} (torch.load(path, weights_only=False) gives the keyword arguments of Schedule.solve "
        f"that reproduce it): please attach it to a "
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
    """The epoch row as two SCIP MIPs: the outer level (beside the floor's ``fixed`` items), then the inner
    level on what is left."""
    full = np.zeros(rows.back.shape, dtype=bool) if rows.fixed is None else rows.fixed.copy()
    fo = np.zeros_like(full)
    b = rows.budget
    for r in range(full.shape[0]):
        # ties among the FULL sets go to lower forward scores, as the DP breaks them (the default score,
        # weight_magnitude, is the same for every micro-batch: the epoch row is full of exact ties)
        avail, cap, count = rows.outer_left(r)
        free = np.flatnonzero(avail)
        full[r, free] = _mip(rows.back[r, free], rows.w_full[free], cap, count, time_limit, "outer",
                             tie=rows.tie_out[r, free])
        rest = np.flatnonzero(~full[r])
        cap = b.capacity - int(rows.w_full[full[r]].sum())
        fo[r, rest] = _mip(rows.fwd[r, rest], rows.w_fo[rest], cap, rows.fo_cap(int(full[r].sum())), time_limit,
                           "inner")
    return full, fo


def _mip(values: np.ndarray, weights: np.ndarray, capacity: int, max_count: int, time_limit: float | None,
         level: str, tie: np.ndarray | None = None) -> np.ndarray:
    """0/1 knapsack by SCIP: the best ``values`` within ``capacity`` and ``max_count`` items; with ``tie``,
    a second solve keeps that best value and takes, among the sets that reach it, the most items and then
    the lowest ``tie`` sum (the DP's order)."""
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
    value = s.Sum([float(v) * xi for v, xi in zip(values, x)])
    s.Maximize(value)
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(pywraplp.MPSolverParameters.RELATIVE_MIP_GAP, 0.0)
    if s.Solve(params) != pywraplp.Solver.OPTIMAL:
        raise RuntimeError(f"OR-Tools did not prove the {level} level optimal (SCIP, capacity='epoch')")
    if tie is not None:
        best = s.Objective().Value()
        s.Add(value >= best - 1e-9 * max(1.0, abs(best)))  # float sums: keep every set that ties the best
        # as the DP: the most items first (zero-valued ones too), then the lowest tie sum
        per_item = float(np.abs(tie).sum()) + 1.0
        s.Maximize(s.Sum([(per_item - float(t)) * xi for t, xi in zip(tie, x)]))
        if s.Solve(params) != pywraplp.Solver.OPTIMAL:
            raise RuntimeError(f"OR-Tools did not prove the {level} level's tie-break optimal "
                               "(SCIP, capacity='epoch')")
    return np.array([xi.solution_value() > 0.5 for xi in x])
