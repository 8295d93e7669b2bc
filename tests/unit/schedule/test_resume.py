"""schedule_state: the callback's checkpoint state keeps the schedule file's keys; the match checks name
every difference; a resumed schedule for another world size is re-solved, for other settings refused."""

from __future__ import annotations

import pytest
import torch

from lightning_d2ft import Schedule
from lightning_d2ft.io import StaleFileError, write_checked
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
    assert set(state) == OLD_KEYS | {"sha256"} and set(s.state()) == OLD_KEYS - {"scoring_seconds"}
    assert state["ops"].dtype == torch.int8
    # as an older version wrote it: no checksum
    old = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items() if k != "sha256"}
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


# -- issue 29: a schedule that was edited -----------------------------------------------------------------------
def test_the_schedule_inside_a_checkpoint_is_checksummed_like_the_file():
    """An edit to all FULL trained at compute 1.0 under "budget 0.6"."""
    s, _ = _schedule()
    state = schedule_state(s, 1.5)
    back, _ = schedule_from_state(state)  # through a checkpoint round trip too
    assert torch.equal(back.ops, s.ops)
    edited = {**state, "ops": torch.full_like(state["ops"], 2)}
    with pytest.raises(StaleFileError, match="schedule stored in the checkpoint being resumed was edited"):
        schedule_from_state(edited)


@pytest.mark.parametrize("value", [7, -1])
def test_ops_outside_the_three_operations_are_refused_naming_the_file(tmp_path, value):
    """Ops of 7 gave a raw IndexError, ops of -1 were costed as FULL, in a file whose checksum was redone."""
    s, _ = _schedule()
    state = s.state()
    state["ops"][2, 3] = value
    path = write_checked(tmp_path / "schedule.pt", state, 2)  # edited, and the checksum recomputed
    with pytest.raises(StaleFileError, match=rf"schedule file {path}: its ops hold 1 value\(s\) outside \{{0, 1, 2\}}"
                                             rf".*e\.g\. {value} at micro-batch 2, subnet 3"):
        Schedule.load(path)
    with pytest.raises(StaleFileError, match="checkpoint being resumed: its ops hold"):
        schedule_from_state({**state, "scoring_seconds": 0.0})  # an older checkpoint: no checksum, still checked
    short = s.state()
    short["placement"] = short["placement"][:-1]
    with pytest.raises(StaleFileError, match="placement .* does not fit its 8 subnet columns"):
        Schedule.from_state(short)
