"""schedule_state: the callback's checkpoint state keeps the schedule file's keys; the match checks name
every difference; a resumed schedule for another world size is re-solved, for other settings refused."""

from __future__ import annotations

import pytest
import torch

from lightning_d2ft import Schedule
from lightning_d2ft.parallel.placement import Placement
from lightning_d2ft.schedule.resume import check_matches, resumable, run_settings, schedule_from_state, schedule_state
from lightning_d2ft.schedule.settings import ScheduleSettings

OLD_KEYS = {"ops", "placement", "speeds", "cost", "column_blocks", "method", "info", "scoring_seconds"}


def _schedule(devices: int = 1, budget: float = 0.6) -> tuple[Schedule, Placement]:
    placement = Placement.round_robin(2, 3, devices)
    s = Schedule.solve(torch.ones(4, 8), torch.ones(4, 8), budget=budget, placement=placement, solver="dp")
    s.info["settings"] = run_settings(ScheduleSettings(budget=budget), "data-a")
    return s, placement


def test_the_checkpoint_state_keeps_the_keys_old_checkpoints_hold():
    s, _ = _schedule()
    state = schedule_state(s, 1.5)
    assert set(state) == OLD_KEYS and set(s.state()) == OLD_KEYS - {"scoring_seconds"}
    assert state["ops"].dtype == torch.int8
    old = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}  # as an older version wrote it
    back, seconds = schedule_from_state(old)
    assert seconds == 1.5 and torch.equal(back.ops, s.ops) and back.ops.dtype == torch.long
    assert torch.equal(back.placement, s.placement) and back.cost == s.cost and back.info == s.info
    assert schedule_state(None, 0.0) == {} and schedule_from_state({}) == (None, 0.0)


def test_a_schedule_for_other_settings_or_another_world_size_is_refused_naming_each_difference():
    s, one = _schedule()
    settings = run_settings(ScheduleSettings(budget=0.6), "data-a")
    check_matches(s, 4, 8, one, settings, "here")  # the matching run
    with pytest.raises(ValueError, match=r"4 micro-batches, the data has 3; 8 subnets, the model has 6"):
        check_matches(s, 3, 6, one, settings, "here")
    with pytest.raises(ValueError, match=r"budget=0.6, this run has budget=0.8"):
        check_matches(s, 4, 8, one, run_settings(ScheduleSettings(budget=0.8), "data-a"), "here")
    with pytest.raises(ValueError, match=r"other data \(another data set"):
        check_matches(s, 4, 8, one, run_settings(ScheduleSettings(budget=0.6), "data-b"), "here")
    two = Placement.round_robin(2, 3, 2)
    with pytest.raises(ValueError, match=r"of here .*1 devices / another placement, this run has 2"):
        check_matches(s, 4, 8, two, settings, "here")


def test_a_resumed_schedule_is_re_solved_on_another_world_size_and_refused_for_other_settings():
    s, one = _schedule()
    settings = run_settings(ScheduleSettings(budget=0.6), "data-a")
    assert resumable(s, 4, 8, one, settings) is s
    with pytest.warns(UserWarning, match="resuming with a freshly solved schedule"):
        assert resumable(s, 4, 8, Placement.round_robin(2, 3, 2), settings) is None
    with pytest.raises(ValueError, match="checkpoint being resumed"):
        resumable(s, 4, 8, one, run_settings(ScheduleSettings(budget=0.4), "data-a"))
