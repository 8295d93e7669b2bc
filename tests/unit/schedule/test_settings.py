"""ScheduleSettings: defaults, errors that name the field and the allowed values, and solve's arguments."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lightning_d2ft import Schedule
from lightning_d2ft.schedule.settings import ScheduleSettings


def test_defaults_are_ortools_per_step_and_validated():
    s = ScheduleSettings()
    assert (s.solver, s.capacity, s.validate, s.method, s.budget) == ("ortools", "step", True, "d2ft", 0.6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.budget = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("field, value, message", [
    ("budget", 0.0, r"budget must be a fraction of the all-FULL cost in \(0, 1\], got 0.0"),
    ("budget", True, r"budget must be .* got True"),
    ("comm_budget", 1.5, r"comm_budget must be .* in \(0, 1\], got 1.5"),
    ("solver", "cplex", r"unknown solver 'cplex'; choose one of \['dp', 'ortools'\]"),
    ("method", "greedy", r"unknown method 'greedy'; choose one of \['d2ft', 'random', 'dpruning', 'moe', "
                         r"'random_fo', 'dpruning_fo', 'moe_fo', 'full'\]"),
    ("full_floor", 1.5, r"full_floor must be a number \(0, 1\], got 1.5"),
    ("moe_capacity_factor", 0.9, r"moe_capacity_factor must be a number >= 1, got 0.9"),
    ("capacity", "batch", r"unknown capacity 'batch'; choose one of \['step', 'epoch'\]"),
    ("forward_mix", 1.5, r"forward_mix must be a number in \[0, 1\], got 1.5"),
    ("forward_mix", "abc", r"forward_mix must be a number in \[0, 1\], got 'abc'"),
    ("score_every", 0, r"score_every must be an int >= 1, got 0"),
    ("validate", "yes", r"validate must be true or false, got 'yes'"),
    ("backward_score", "loss", r"backward"),
    ("forward_score", "loss", r"forward"),
])
def test_bad_values_name_the_field_and_the_allowed_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        ScheduleSettings(**{field: value})


def test_schedule_solve_takes_the_settings_whole_or_their_fields_and_records_them():
    rng = np.random.default_rng(0)
    back, fwd = torch.from_numpy(rng.uniform(0, 1, (6, 10))), torch.from_numpy(rng.uniform(0, 1, (6, 10)))
    cfg = ScheduleSettings(budget=0.5, capacity="epoch", solver="dp", forward_mix=0.2)
    s = Schedule.solve(back, fwd, cfg, devices=2)
    assert s.settings == cfg and s.info["settings"]["budget"] == 0.5
    by_fields = Schedule.solve(back, fwd, devices=2, budget=0.5, capacity="epoch", solver="dp", forward_mix=0.2)
    assert torch.equal(by_fields.ops, s.ops) and by_fields.settings == cfg
    with pytest.raises(ValueError, match="not both"):
        Schedule.solve(back, fwd, cfg, devices=2, budget=0.4)


def test_identity_leaves_out_only_what_does_not_change_the_ops():
    assert set(ScheduleSettings().identity()) == set(ScheduleSettings.names()) - {"solver", "validate"}
