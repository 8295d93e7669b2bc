"""A schedule across runs: what it was solved for, the checks before a saved or resumed schedule is used,
and D2FTCallback's checkpoint state (the schedule file's keys plus the scoring time, so old files load).

A schedule records in ``info["settings"]`` the data fingerprint and settings it was solved for; a run
with other data, settings, subnets or micro-batches refuses it, naming each difference. One solved for
another world size or placement is refused from ``schedule_path`` and re-solved on resume (with a warning).
The schedule inside a checkpoint carries a SHA-256 of its contents, as the schedule file does: one edited in
the checkpoint (say to all FULL, under "budget 0.6") is refused.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_d2ft.io import StaleFileError, tensor_bytes
from lightning_d2ft.parallel.placement import Placement
from lightning_d2ft.schedule.schedule import Schedule
from lightning_d2ft.schedule.settings import ScheduleSettings

__all__ = ["check_matches", "resumable", "run_settings", "schedule_from_state", "schedule_state", "state_digest"]


def run_settings(settings: ScheduleSettings, data: str) -> dict[str, Any]:
    """What a schedule must have been solved for to be used by this run (stored in ``schedule.info``): the
    data fingerprint and the settings that decide the ops (:meth:`ScheduleSettings.identity`)."""
    return {"data": data, **settings.identity()}


def check_matches(schedule: Schedule, num_micro_batches: int, num_subnets: int, placement: Placement | None,
                  settings: dict[str, Any], source: str) -> None:
    """Refuse a schedule made for another model, data, settings or (when ``placement`` is given) world size."""
    problems = []
    if schedule.num_micro_batches != num_micro_batches:
        problems.append(f"{schedule.num_micro_batches} micro-batches, the data has {num_micro_batches}")
    if schedule.ops.shape[1] != num_subnets:
        problems.append(f"{schedule.ops.shape[1]} subnets, the model has {num_subnets}")
    elif placement is not None and (schedule.num_devices != placement.num_devices
                                    or not torch.equal(schedule.placement, placement.column_devices())):
        problems.append(f"{schedule.num_devices} devices / another placement, this run has {placement.num_devices}")
    made = schedule.info.get("settings") or {}
    for name, ours in settings.items():
        if name in made and made[name] != ours:
            what = "other data (another data set, data seed or micro-batch split)" if name == "data" \
                else f"{name}={made[name]!r}, this run has {name}={ours!r}"
            problems.append(what)
    if problems:
        raise ValueError(f"the schedule of {source} was made for another model, data, settings or world size: "
                         + "; ".join(problems) + ". Solve it again (drop schedule_path, or start fresh: "
                         "another run directory / resume=null) or run with the matching setup.")


def resumable(restored: Schedule, num_micro_batches: int, num_subnets: int, placement: Placement,
              settings: dict[str, Any]) -> Schedule | None:
    """The resumed checkpoint's schedule; None (re-solve, with a warning) on another world size or placement.
    Other data or settings are refused."""
    source = "the checkpoint being resumed"
    check_matches(restored, num_micro_batches, num_subnets, None, settings, source)
    try:
        check_matches(restored, num_micro_batches, num_subnets, placement, settings, source)
    except ValueError as err:
        rank_zero_warn(f"resuming with a freshly solved schedule: {err}")
        return None
    return restored


def schedule_state(schedule: Schedule | None, scoring_seconds: float) -> dict[str, Any]:
    """D2FTCallback's checkpoint state: the schedule file's keys, the scoring time and a SHA-256 of all of them
    ({} before planning)."""
    if schedule is None:
        return {}
    state = {**schedule.state(), "scoring_seconds": scoring_seconds}
    return {**state, "sha256": state_digest(state)}


def schedule_from_state(state: dict[str, Any]) -> tuple[Schedule | None, float]:
    """(schedule, scoring seconds) back from :func:`schedule_state`; refused (:class:`StaleFileError`) when the
    checksum does not match or the table is not a schedule. A state without a checksum (written before there
    was one) is taken as it is."""
    if not state:
        return None, 0.0
    st = dict(state)
    digest = st.pop("sha256", None)
    if digest is not None and digest != state_digest(st):
        raise StaleFileError("the schedule stored in the checkpoint being resumed was edited or is corrupt (checksum "
                             "mismatch): resume from another checkpoint, or start fresh (resume=null)")
    seconds = st.pop("scoring_seconds", 0.0)
    try:
        return Schedule.from_state(st), seconds
    except StaleFileError as err:
        raise StaleFileError(f"the schedule stored in the checkpoint being resumed: {err}") from None


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 of a schedule state: tensors by dtype, shape and bytes, containers recursively, the rest by repr."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if torch.is_tensor(value):
        h.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        h.update(tensor_bytes(value))
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):  # a tuple may come back from a checkpoint as a list
        h.update(f"L{len(value)}".encode())
        for item in value:
            _feed(h, item)
    else:
        h.update(f"V{value!r}".encode())
