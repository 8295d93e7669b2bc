"""Capacities of the knapsack rows (lightning_d2ft.schedule.capacity): how the budget is split between the levels."""

from __future__ import annotations

import pytest
import torch

from lightning_d2ft import Op, Schedule


def _scores(seed: int, n_mb: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n_mb, n, generator=gen), torch.rand(n_mb, n, generator=gen)


def _shares(s: Schedule) -> tuple[float, float]:
    ops = s.ops[:, s.scheduled]
    return float((ops == Op.FULL).float().mean()), float((ops == Op.FORWARD_ONLY).float().mean())


@pytest.mark.parametrize("devices", [2, 3])
@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0])
def test_forward_mix_splits_a_binding_communication_budget(devices, mix):
    """At compute budget 1.0 and comm budget 0.5 the comm budget binds. Each subnet its own block here: a FULL
    pair sends 2 messages and FORWARD_ONLY 1, so FORWARD_ONLY alone could spend it: mix 0 gives FULL half of
    the pairs, mix 1 none beyond one per device and step, mix 0.5 a quarter with FORWARD_ONLY on half.
    (Measured on compute alone, every mix gave FULL half of the pairs and FORWARD_ONLY none.)"""
    back, fwd = _scores(0, 6, 2 + 48)
    s = Schedule.solve(back, fwd, budget=1.0, comm_budget=0.5, devices=devices, forward_mix=mix, solver="dp")
    full, fo = _shares(s)
    assert s.comm_fraction <= 0.5 + 1e-9
    want_full = max(0.5 - mix * 0.5, devices / 48)
    assert full == pytest.approx(want_full, abs=1 / 48 + 1e-6)
    assert fo == pytest.approx((0.5 - full) / 0.5, abs=2 / 48 + 1e-6)


def test_the_comm_floor_still_gives_every_device_a_full_pair_each_step():
    back, fwd = _scores(1, 5, 2 + 24)
    s = Schedule.solve(back, fwd, budget=1.0, comm_budget=1 / 12, devices=2, forward_mix=0.5, solver="dp")
    full = s.ops[:, s.scheduled] == Op.FULL
    owner = s.placement[s.scheduled]
    for d in range(2):
        assert full[:, owner == d].sum(1).tolist() == [1] * 5


def test_without_a_comm_budget_the_compute_split_is_unchanged():
    back, fwd = _scores(2, 4, 2 + 60)
    full, fo = _shares(Schedule.solve(back, fwd, budget=0.6, devices=1, forward_mix=0.5, solver="dp"))
    share = 0.6 - 0.5 * (0.6 - (0.6 - 0.4) / 0.6)  # halfway to the fewest FULL that still spends 0.6
    assert full == pytest.approx(share, abs=1 / 60 + 1e-6)
    assert full + 0.4 * fo == pytest.approx(0.6, abs=0.4 / 60 + 1e-6)
