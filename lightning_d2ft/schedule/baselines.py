"""Baseline schedules on the same budget and interface as D2FT (``Schedule.solve(method=...)``).

The baselines are the paper's peers as their own literature defines them: they **train or skip** (FULL or
SHORTCUT; a pruned head or an unrouted expert does not run at all, and the FORWARD_ONLY tier is D2FT's own
idea). Each gets as many FULL (micro-batch, subnet) items as D2FT's schedule of the same problem spends in
compute (rounded down, so within one item per micro-batch), and ignores devices, which shows in its balance
figures:

* ``random``: the FULL items drawn uniformly at random over all pairs (seeded).
* ``dpruning``: static head pruning for the whole run: the same subnets FULL in every micro-batch, those
  with the best mean backward score.
* ``moe``: per-micro-batch top-k routing by the data-dependent (forward) score, under a per-subnet capacity
  as MoE routers use it: a subnet takes at most ``moe_capacity_factor`` (default 1.25) x its fair share of
  the routed micro-batches. Routing is drop-free: where a subnet is full the micro-batch goes to its next
  best subnet with room, the assignment maximising the summed routed score (a balanced assignment, solved as
  a min-cost flow; where no capacity binds it is each micro-batch's top-k).
* ``full``: every pair FULL (plain fine-tuning); it needs no scores.

The ``*_fo`` variants (``random_fo``, ``dpruning_fo``, ``moe_fo``) are ablations that also get D2FT's
FORWARD_ONLY share: the same numbers of FULL and FORWARD_ONLY items as D2FT (``moe_fo``: each micro-batch's
top backward scores FULL, then its top forward scores FORWARD_ONLY, no capacity; ``dpruning_fo``: the best
mean backward scores FULL and the best mean forward scores FORWARD_ONLY in every micro-batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import Tensor

from lightning_d2ft.ops import Op

if TYPE_CHECKING:
    from lightning_d2ft.schedule.settings import ScheduleSettings

__all__ = ["BASELINES", "Baseline", "register_baseline"]

#: ``fn(back, fwd, n_full, n_fo, seed) -> ops`` over the scheduled columns
BaselineFn = Callable[[Tensor, Tensor, int, int, int], Tensor]


@dataclass(frozen=True)
class Baseline:
    """A method other than D2FT: ``fn`` gets the scores of the scheduled columns and the item counts to spend
    (``n_fo`` is 0 for a train-or-skip method), and returns their ops."""

    fn: Callable[..., Tensor]
    train_or_skip: bool = False  # spend D2FT's compute on FULL items only
    needs_counts: bool = True  # False: the counts are not needed (no D2FT solve first)
    uses_settings: bool = False  # ``fn`` also takes the ScheduleSettings (keyword ``settings``)

    def __call__(self, back: Tensor, fwd: Tensor, n_full: int, n_fo: int, seed: int,
                 settings: ScheduleSettings | None = None) -> Tensor:
        if self.uses_settings:
            return self.fn(back, fwd, n_full, n_fo, seed, settings=settings)
        return self.fn(back, fwd, n_full, n_fo, seed)


def random_ops(back: Tensor, fwd: Tensor, n_full: int, n_fo: int, seed: int) -> Tensor:
    """Random assignment of ``n_full`` FULL and ``n_fo`` FORWARD_ONLY items over all pairs, ignoring devices."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(back.numel(), generator=gen)
    flat = torch.full((back.numel(),), int(Op.SHORTCUT), dtype=torch.long)
    flat[order[:n_full]] = Op.FULL
    flat[order[n_full : n_full + n_fo]] = Op.FORWARD_ONLY
    return flat.view(back.shape)


def _per_row(n_mb: int, n_cols: int, n_full: int, n_fo: int) -> tuple[int, int]:
    """Items per micro-batch, rounded down (so within one item per micro-batch of the totals)."""
    k_full = min(n_cols, n_full // n_mb)
    return k_full, min(n_cols - k_full, n_fo // n_mb)


def _per_row_fo(n_mb: int, n_cols: int, n_full: int, n_fo: int) -> tuple[int, int]:
    """The ``*_fo`` ablations' rounding (to nearest), as before the train-or-skip baselines existed."""
    k_full = min(n_cols, round(n_full / n_mb))
    return k_full, min(n_cols - k_full, round(n_fo / n_mb))


def _static(back: Tensor, fwd: Tensor, k_full: int, k_fo: int) -> Tensor:
    n_mb, n_cols = back.shape
    full_cols = torch.argsort(back.mean(0), descending=True, stable=True)[:k_full]
    rest = torch.ones(n_cols, dtype=torch.bool)
    rest[full_cols] = False
    rest_idx = rest.nonzero().flatten()
    fo_cols = rest_idx[torch.argsort(fwd.mean(0)[rest_idx], descending=True, stable=True)[:k_fo]]
    ops = torch.full((n_mb, n_cols), int(Op.SHORTCUT), dtype=torch.long)
    ops[:, full_cols] = Op.FULL
    ops[:, fo_cols] = Op.FORWARD_ONLY
    return ops


def dpruning_ops(back: Tensor, fwd: Tensor, n_full: int, n_fo: int, seed: int) -> Tensor:
    """Static pruning: the same subnets FULL in every micro-batch (best mean backward score), the rest skipped."""
    return _static(back, fwd, _per_row(*back.shape, n_full, 0)[0], 0)


def dpruning_fo_ops(back: Tensor, fwd: Tensor, n_full: int, n_fo: int, seed: int) -> Tensor:
    """Static pruning with D2FT's FORWARD_ONLY share: best mean backward scores FULL, then best mean forward."""
    return _static(back, fwd, *_per_row_fo(*back.shape, n_full, n_fo))


def moe_fo_ops(back: Tensor, fwd: Tensor, n_full: int, n_fo: int, seed: int) -> Tensor:
    """Per-micro-batch top-k by backward score FULL, then top-k by forward score FORWARD_ONLY; no capacity."""
    n_mb, n_cols = back.shape
    k_full, k_fo = _per_row_fo(n_mb, n_cols, n_full, n_fo)
    ops = torch.full((n_mb, n_cols), int(Op.SHORTCUT), dtype=torch.long)
    ops.scatter_(1, torch.topk(back, k_full, dim=1).indices, int(Op.FULL))
    masked = fwd.masked_fill(ops == Op.FULL, -math.inf)
    ops.scatter_(1, torch.topk(masked, k_fo, dim=1).indices, int(Op.FORWARD_ONLY))
    return ops


def moe_ops(back: Tensor, fwd: Tensor, n_full: int, n_fo: int, seed: int,
            settings: ScheduleSettings | None = None) -> Tensor:
    """Top-k routing of every micro-batch by its forward score, at most ``moe_capacity_factor`` x the fair
    share of micro-batches per subnet, drop-free (see the module docstring); the routed pairs run FULL."""
    n_mb, n_cols = fwd.shape
    k = _per_row(n_mb, n_cols, n_full, 0)[0]
    factor = 1.25 if settings is None else settings.moe_capacity_factor
    ops = torch.full((n_mb, n_cols), int(Op.SHORTCUT), dtype=torch.long)
    if k == 0:
        return ops
    capacity = min(n_mb, math.ceil(factor * n_mb * k / n_cols - 1e-9))
    routed = route_top_k(fwd.numpy(), k, capacity)
    ops[torch.from_numpy(routed)] = Op.FULL
    return ops


def route_top_k(scores: np.ndarray, k: int, capacity: int) -> np.ndarray:
    """``[N, M]`` bool: every row routed to exactly ``k`` columns, no column taking more than ``capacity``
    rows, maximising the summed score (a min-cost flow over integer scores, 2^30 levels of the largest); where
    no column would exceed ``capacity`` that is every row's top-k. Needs ``k * N <= capacity * M``."""
    from ortools.graph.python import min_cost_flow

    n, m = scores.shape
    if k * n > capacity * m:
        raise ValueError(f"cannot route {n} micro-batches to {k} subnets each with {capacity} per subnet")
    top = float(scores.max()) if scores.size else 0.0
    gain = np.rint(scores / top * 2**30).astype(np.int64) if top > 0 else np.zeros((n, m), dtype=np.int64)
    source, sink = n + m, n + m + 1
    rows = np.repeat(np.arange(n), m)
    cols = np.tile(np.arange(m), n) + n
    starts = np.concatenate([np.full(n, source), rows, np.arange(m) + n])
    ends = np.concatenate([np.arange(n), cols, np.full(m, sink)])
    caps = np.concatenate([np.full(n, k), np.ones(n * m, dtype=np.int64), np.full(m, capacity)])
    costs = np.concatenate([np.zeros(n, dtype=np.int64), -gain.reshape(-1), np.zeros(m, dtype=np.int64)])
    flow = min_cost_flow.SimpleMinCostFlow()
    arcs = flow.add_arcs_with_capacity_and_unit_cost(starts, ends, caps, costs)
    supplies = np.zeros(n + m + 2, dtype=np.int64)
    supplies[source], supplies[sink] = k * n, -k * n
    flow.set_nodes_supplies(np.arange(n + m + 2), supplies)
    if flow.solve() != flow.OPTIMAL:
        raise RuntimeError("the MoE routing (a min-cost flow) found no optimal assignment")
    used = flow.flows(arcs)[n : n + n * m]
    return (used > 0).reshape(n, m)


def full_ops(back: Tensor, fwd: Tensor, n_full: int, n_fo: int, seed: int) -> Tensor:
    return torch.full(back.shape, int(Op.FULL), dtype=torch.long)


BASELINES: dict[str, Baseline] = {
    "random": Baseline(random_ops, train_or_skip=True),
    "dpruning": Baseline(dpruning_ops, train_or_skip=True),
    "moe": Baseline(moe_ops, train_or_skip=True, uses_settings=True),
    "random_fo": Baseline(random_ops),
    "dpruning_fo": Baseline(dpruning_fo_ops),
    "moe_fo": Baseline(moe_fo_ops),
    "full": Baseline(full_ops, needs_counts=False),
}


def register_baseline(name: str, fn: BaselineFn | Baseline, train_or_skip: bool = False, **kw: Any) -> None:
    """Add a method for ``Schedule.solve(method=name)``: ``fn(back, fwd, n_full, n_fo, seed) -> ops`` gets the
    scheduled columns' scores and D2FT's numbers of FULL and FORWARD_ONLY items (``train_or_skip=True``: as many
    FULL items as D2FT's compute buys, ``n_fo`` 0), or a :class:`Baseline`."""
    BASELINES[name] = fn if isinstance(fn, Baseline) else Baseline(fn, train_or_skip=train_or_skip, **kw)
