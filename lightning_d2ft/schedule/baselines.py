"""Baseline schedules on the same budget and interface as D2FT (``Schedule.solve(method=...)``).

Each baseline spends the same numbers of FULL and FORWARD_ONLY (micro-batch, subnet) items as D2FT would
at that budget (for uniform subnet costs), but ignores devices, which shows in its balance figures:

* ``random``: the FULL and FORWARD_ONLY items are drawn uniformly at random over all pairs (seeded).
* ``dpruning``: static pruning; the same subnets in every micro-batch: the best mean backward scores FULL,
  then the best mean forward scores FORWARD_ONLY, the rest SHORTCUT.
* ``moe``: per-micro-batch top-k routing: each micro-batch's top backward scores FULL, then its top forward
  scores FORWARD_ONLY, with no per-device capacity.
* ``full``: every pair FULL (plain fine-tuning); it needs no scores.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from lightning_d2ft.ops import Op

Baseline = Callable[[Tensor, Tensor, int, int, int], Tensor]


def random_ops(back: Tensor, fwd: Tensor, n_full: int, n_fo: int, seed: int) -> Tensor:
    """Random assignment of the same numbers of FULL and FORWARD_ONLY items, ignoring devices."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(back.numel(), generator=gen)
    flat = torch.full((back.numel(),), int(Op.SHORTCUT), dtype=torch.long)
    flat[order[:n_full]] = Op.FULL
    flat[order[n_full : n_full + n_fo]] = Op.FORWARD_ONLY
    return flat.view(back.shape)


def _per_row(n_mb: int, n_cols: int, n_full: int, n_fo: int) -> tuple[int, int]:
    k_full = min(n_cols, round(n_full / n_mb))
    return k_full, min(n_cols - k_full, round(n_fo / n_mb))


def dpruning_ops(back: Tensor, fwd: Tensor, n_full: int, n_fo: int, seed: int) -> Tensor:
    """Static pruning: the same subnets for every micro-batch, best mean backward score FULL, then forward."""
    n_mb, n_cols = back.shape
    k_full, k_fo = _per_row(n_mb, n_cols, n_full, n_fo)
    full_cols = torch.argsort(back.mean(0), descending=True, stable=True)[:k_full]
    rest = torch.ones(n_cols, dtype=torch.bool)
    rest[full_cols] = False
    rest_idx = rest.nonzero().flatten()
    fo_cols = rest_idx[torch.argsort(fwd.mean(0)[rest_idx], descending=True, stable=True)[:k_fo]]
    ops = torch.full((n_mb, n_cols), int(Op.SHORTCUT), dtype=torch.long)
    ops[:, full_cols] = Op.FULL
    ops[:, fo_cols] = Op.FORWARD_ONLY
    return ops


def moe_ops(back: Tensor, fwd: Tensor, n_full: int, n_fo: int, seed: int) -> Tensor:
    """Per-micro-batch top-k routing by score, with no per-device capacity (shows the imbalance)."""
    n_mb, n_cols = back.shape
    k_full, k_fo = _per_row(n_mb, n_cols, n_full, n_fo)
    ops = torch.full((n_mb, n_cols), int(Op.SHORTCUT), dtype=torch.long)
    ops.scatter_(1, torch.topk(back, k_full, dim=1).indices, int(Op.FULL))
    masked = fwd.masked_fill(ops == Op.FULL, -math.inf)
    ops.scatter_(1, torch.topk(masked, k_fo, dim=1).indices, int(Op.FORWARD_ONLY))
    return ops


def full_ops(back: Tensor, fwd: Tensor, n_full: int, n_fo: int, seed: int) -> Tensor:
    return torch.full(back.shape, int(Op.FULL), dtype=torch.long)


BASELINES: dict[str, Baseline] = {"random": random_ops, "dpruning": dpruning_ops, "moe": moe_ops, "full": full_ops}


def register_baseline(name: str, fn: Baseline) -> None:
    """Add a method for ``Schedule.solve(method=name)``: ``fn(back, fwd, n_full, n_fo, seed) -> ops``."""
    BASELINES[name] = fn
