"""Baselines: train or skip on D2FT's compute (their ``_fo`` ablations on D2FT's item counts), what each one
picks, MoE's capacity routing, and the registry."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_d2ft import Op, Schedule
from lightning_d2ft.schedule.baselines import BASELINES, register_baseline, route_top_k

TRAIN_OR_SKIP = ("random", "dpruning", "moe")


def _realistic(n_mb: int, n_cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(n_cols, generator=gen).pow(3) * 10
    return (weight * torch.rand(n_mb, n_cols, generator=gen).add(0.5),
            weight * torch.rand(n_mb, n_cols, generator=gen).add(0.5))


def _blocks(depth: int, groups: int) -> torch.Tensor:
    return torch.cat([torch.tensor([-1]), torch.arange(depth).repeat_interleave(groups), torch.tensor([-1])])


@pytest.mark.parametrize("kw", [dict(budget=0.6, devices=1), dict(budget=0.4, devices=4),
                                dict(budget=0.6, devices=2, capacity="epoch"),
                                dict(budget=1.0, devices=2, comm_budget=0.5, column_blocks=_blocks(12, 6))],
                         ids=["0.6-1dev", "0.4-4dev", "epoch", "comm"])
@pytest.mark.parametrize("method", TRAIN_OR_SKIP)
def test_train_or_skip_baselines_run_no_forward_only_and_spend_d2fts_compute_within_one_item_per_row(method, kw):
    back, fwd = _realistic(40, 74)
    d2ft = Schedule.solve(back, fwd, solver="dp", **kw)
    base = Schedule.solve(back, fwd, method=method, **kw)
    ops = base.ops[:, base.scheduled]
    assert base.method == method and not (ops == Op.FORWARD_ONLY).any()
    assert (base.ops[:, ~base.scheduled] == Op.FULL).all()
    spent = float(d2ft.cost.compute(d2ft.ops[:, d2ft.scheduled]).sum())  # D2FT's compute, in FULL items
    n_full = int((ops == Op.FULL).sum())
    assert spent - base.num_micro_batches <= n_full <= spent + 1e-9  # within one item per micro-batch
    assert base.compute_fraction > d2ft.op_counts()["FULL"] / ops.numel()  # FORWARD_ONLY's compute buys FULL


@pytest.mark.parametrize("capacity", ["step", "epoch"])
@pytest.mark.parametrize("method", ["random_fo", "dpruning_fo", "moe_fo"])
def test_the_fo_ablations_spend_d2fts_full_and_forward_only_counts(method, capacity):
    back, fwd = _realistic(64, 74)
    d2ft = Schedule.solve(back, fwd, budget=0.6, devices=4, capacity=capacity, solver="dp")
    base = Schedule.solve(back, fwd, budget=0.6, devices=4, capacity=capacity, method=method)
    assert base.method == method and base.compute_fraction == pytest.approx(d2ft.compute_fraction, abs=0.02)
    counts, want = base.op_counts(), d2ft.op_counts()
    for op in ("FULL", "FORWARD_ONLY"):
        assert abs(counts[op] - want[op]) <= base.num_micro_batches
    assert (base.ops[:, ~base.scheduled] == Op.FULL).all()


def test_what_each_baseline_picks():
    back, fwd = _realistic(16, 20, seed=1)
    cols = slice(1, 19)
    for name in ("dpruning", "dpruning_fo"):
        dpr = Schedule.solve(back, fwd, budget=0.5, devices=2, method=name).ops[:, cols]
        assert (dpr == dpr[0]).all()  # static: the same subnets in every micro-batch
    top_mean = torch.topk(back[:, cols].mean(0), int((dpr[0] == Op.FULL).sum())).indices
    assert (dpr[:, top_mean] == Op.FULL).all()
    moe = Schedule.solve(back, fwd, budget=0.5, devices=2, method="moe_fo").ops[:, cols]
    k = int((moe[0] == Op.FULL).sum())
    top = torch.topk(back[:, cols], k, dim=1).indices
    assert (moe.gather(1, top) == Op.FULL).all()  # moe_fo: each micro-batch's top backward scores run FULL
    r1 = Schedule.solve(back, fwd, budget=0.5, devices=2, method="random", seed=1).ops
    assert torch.equal(r1, Schedule.solve(back, fwd, budget=0.5, devices=2, method="random", seed=1).ops)
    assert not torch.equal(r1, Schedule.solve(back, fwd, budget=0.5, devices=2, method="random", seed=2).ops)
    assert (Schedule.solve(back, fwd, devices=2, method="full").ops == Op.FULL).all()


def test_moe_routes_each_micro_batch_to_its_top_forward_scores_where_capacity_allows():
    back, fwd = _realistic(30, 2 + 24, seed=2)
    ample = Schedule.solve(back, fwd, budget=0.5, devices=1, method="moe", moe_capacity_factor=1e6)
    full = ample.ops[:, 1:-1] == Op.FULL
    k = int(full[0].sum())
    assert (full.sum(1) == k).all()
    top = torch.topk(fwd[:, 1:-1], k, dim=1).indices  # by the forward (data-dependent) score
    assert full.gather(1, top).all()
    routed = Schedule.solve(back, fwd, budget=0.5, devices=1, method="moe")  # capacity factor 1.25
    full = routed.ops[:, 1:-1] == Op.FULL
    assert (full.sum(1) == k).all()  # drop-free: every micro-batch still gets k subnets
    cap = math.ceil(1.25 * 30 * k / 24)
    assert int(full.sum(0).max()) <= cap < int((ample.ops[:, 1:-1] == Op.FULL).sum(0).max())
    # on one device with per-step capacity D2FT is its own top-k, not MoE's (different score, capacity, tier)
    d2ft = Schedule.solve(back, fwd, budget=0.5, devices=1, solver="dp")
    assert not torch.equal(d2ft.ops, routed.ops)


def test_route_top_k_is_the_best_assignment_within_capacity():
    from scipy.optimize import linprog

    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(12, 6, generator=gen).numpy()
    scores[:, 0] += 5  # everyone wants column 0
    routed = route_top_k(scores, 2, 5)
    assert (routed.sum(1) == 2).all() and (routed.sum(0) <= 5).all() and routed[:, 0].sum() == 5
    # the transport polytope is integral: its LP optimum is the best assignment
    n, m = scores.shape
    rows = [[1.0 if j // m == i else 0.0 for j in range(n * m)] for i in range(n)]
    cols = [[1.0 if j % m == c else 0.0 for j in range(n * m)] for c in range(m)]
    lp = linprog(-scores.reshape(-1), A_ub=cols, b_ub=[5] * m, A_eq=rows, b_eq=[2] * n, bounds=(0, 1))
    assert float((scores * routed).sum()) == pytest.approx(-lp.fun, rel=1e-7)  # 2^-30 quantisation
    with pytest.raises(ValueError, match="cannot route"):
        route_top_k(scores, 3, 5)


def test_a_registered_baseline_is_a_method(monkeypatch):
    monkeypatch.setitem(BASELINES, "all_shortcut", None)
    register_baseline("all_shortcut", lambda b, f, n_full, n_fo, seed: torch.zeros(b.shape, dtype=torch.long))
    back, fwd = _realistic(4, 8)
    s = Schedule.solve(back, fwd, devices=2, method="all_shortcut")
    assert s.compute_fraction == 0.0 and s.method == "all_shortcut"
    seen = {}
    monkeypatch.setitem(BASELINES, "spy", None)
    register_baseline("spy", lambda b, f, n_full, n_fo, seed: seen.update(n=(n_full, n_fo)) or torch.zeros(
        b.shape, dtype=torch.long), train_or_skip=True)
    Schedule.solve(back, fwd, devices=2, method="spy")
    assert seen["n"][1] == 0 and seen["n"][0] > 0  # train or skip: FULL items only
