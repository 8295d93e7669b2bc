"""Baselines: same budget and interface as D2FT, what each one picks, and the registry."""

from __future__ import annotations

import pytest
import torch

from lightning_d2ft import Op, Schedule
from lightning_d2ft.schedule.baselines import BASELINES, register_baseline


def _realistic(n_mb: int, n_cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(n_cols, generator=gen).pow(3) * 10
    return (weight * torch.rand(n_mb, n_cols, generator=gen).add(0.5),
            weight * torch.rand(n_mb, n_cols, generator=gen).add(0.5))


@pytest.mark.parametrize("capacity", ["step", "epoch"])
@pytest.mark.parametrize("method", ["random", "dpruning", "moe"])
def test_baselines_spend_the_same_budget_as_d2ft(method, capacity):
    back, fwd = _realistic(64, 74)
    d2ft = Schedule.solve(back, fwd, budget=0.6, devices=4, capacity=capacity, solver="dp")
    base = Schedule.solve(back, fwd, budget=0.6, devices=4, capacity=capacity, method=method)
    assert base.method == method and base.compute_fraction == pytest.approx(d2ft.compute_fraction, abs=0.02)
    assert (base.ops[:, ~base.scheduled] == Op.FULL).all()


def test_what_each_baseline_picks():
    back, fwd = _realistic(16, 20, seed=1)
    cols = slice(1, 19)
    dpr = Schedule.solve(back, fwd, budget=0.5, devices=2, method="dpruning").ops[:, cols]
    assert (dpr == dpr[0]).all()  # static: the same subnets in every micro-batch
    moe = Schedule.solve(back, fwd, budget=0.5, devices=2, method="moe").ops[:, cols]
    k = int((moe[0] == Op.FULL).sum())
    top = torch.topk(back[:, cols], k, dim=1).indices
    assert (moe.gather(1, top) == Op.FULL).all()  # each micro-batch's top backward scores run FULL
    r1 = Schedule.solve(back, fwd, budget=0.5, devices=2, method="random", seed=1).ops
    assert torch.equal(r1, Schedule.solve(back, fwd, budget=0.5, devices=2, method="random", seed=1).ops)
    assert not torch.equal(r1, Schedule.solve(back, fwd, budget=0.5, devices=2, method="random", seed=2).ops)
    assert (Schedule.solve(back, fwd, devices=2, method="full").ops == Op.FULL).all()


def test_a_registered_baseline_is_a_method(monkeypatch):
    monkeypatch.setitem(BASELINES, "all_shortcut", None)
    register_baseline("all_shortcut", lambda b, f, n_full, n_fo, seed: torch.zeros(b.shape, dtype=torch.long))
    back, fwd = _realistic(4, 8)
    s = Schedule.solve(back, fwd, devices=2, method="all_shortcut")
    assert s.compute_fraction == 0.0 and s.method == "all_shortcut"
