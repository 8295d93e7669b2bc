"""The schedule's settings in one validated object, shared by the callback, the app and ``Schedule.solve``.

Every check names the field and the values it allows, and runs before any scoring or solving.
"""

from __future__ import annotations

import math
from dataclasses import InitVar, asdict, dataclass, fields
from typing import Any, Mapping, Sequence

from torch import Tensor

SOLVERS = ("dp", "ortools")  # order kept: messages list them as before
METHODS = ("d2ft", "random", "dpruning", "moe", "full")
CAPACITIES = ("step", "epoch")

__all__ = ["CAPACITIES", "METHODS", "SOLVERS", "ScheduleSettings", "check_choice", "check_comm_budget",
           "check_fraction"]


def allowed_methods() -> tuple[str, ...]:
    """"d2ft" and every registered baseline (``lightning_d2ft.schedule.baselines.register_baseline``)."""
    from lightning_d2ft.schedule.baselines import BASELINES

    return ("d2ft", *BASELINES)


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(allowed)}")


def check_fraction(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be a fraction of the all-FULL cost in (0, 1], got {value!r}")


def check_comm_budget(comm_budget: float, num_micro_batches: int, placement: Tensor, devices: int,
                      capacity: str = "step") -> None:
    """Reject a communication budget too small for one FULL (micro-batch, subnet) pair on every device:
    below that floor a device could only run FORWARD_ONLY, and no gradient would reach its subnets.

    With ``capacity="step"`` the budget holds per (device, micro-batch), so the floor is per step;
    with ``"epoch"`` it holds over all micro-batches of a device.
    """
    check_choice("capacity", capacity, CAPACITIES)
    rows = 1 if capacity == "step" else num_micro_batches
    fewest = min(int((placement == d).sum()) for d in range(devices)) * rows
    floor = 1.0 / fewest if fewest else 1.0
    if comm_budget < floor - 1e-12:
        raise ValueError(
            f"comm_budget={comm_budget} is below {floor:.3g}, the least that lets every device train one "
            f"(micro-batch, subnet) pair FULL{' per micro-batch' if capacity == 'step' else ''} ({fewest} pairs on "
            f"the smallest device{' per step' if capacity == 'step' else ''}); use comm_budget in [{floor:.3g}, 1] "
            f"or drop it")


@dataclass(frozen=True)
class ScheduleSettings:
    """What the schedule is asked to do; see :meth:`lightning_d2ft.Schedule.solve` for each field.

    ``capacity="step"`` (default) gives every (device, micro-batch) its own capacity, so every lockstep
    step is balanced and no micro-batch goes without FULL work unless the budget forces it; ``"epoch"``
    pools a device's capacity over all micro-batches. ``validate`` re-solves every OR-Tools solve with the
    DP and raises if the objectives differ.

    ``where`` (not a field) prefixes the names in error messages, e.g. ``"schedule."`` for the app's config.
    """

    budget: float = 0.6
    comm_budget: float | None = None
    backward_score: str = "weight_magnitude"
    forward_score: str = "fisher"
    solver: str = "ortools"
    method: str = "d2ft"
    forward_mix: float = 0.5
    score_every: int = 1
    capacity: str = "step"
    validate: bool = True
    where: InitVar[str] = ""

    def __post_init__(self, where: str) -> None:
        check_fraction(f"{where}budget", self.budget)
        if self.comm_budget is not None:
            check_fraction(f"{where}comm_budget", self.comm_budget)
        check_choice(f"{where}solver", self.solver, SOLVERS)
        check_choice(f"{where}method", self.method, allowed_methods())
        check_choice(f"{where}capacity", self.capacity, CAPACITIES)
        check_forward_mix(self.forward_mix, f"{where}forward_mix")
        if isinstance(self.score_every, bool) or not isinstance(self.score_every, int) or self.score_every < 1:
            raise ValueError(f"{where}score_every must be an int >= 1, got {self.score_every!r}")
        if not isinstance(self.validate, bool):
            raise ValueError(f"{where}validate must be true or false, got {self.validate!r}")
        from lightning_d2ft.scoring.scores import check_metric  # lazy: scores imports the model

        for name, role in (("backward_score", "backward"), ("forward_score", "forward")):
            try:
                check_metric(role, getattr(self, name))
            except ValueError as err:
                raise ValueError(f"{where}{name}: {err}") from None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "") -> ScheduleSettings:
        """The settings among ``values`` (a config section may hold more keys), validated; errors name each
        field as ``where + name`` (``where="schedule."`` for the app's ``schedule.budget``)."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values}, where=where)

    def solve_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``Schedule.solve`` these settings fix."""
        return dict(budget=self.budget, comm_budget=self.comm_budget, solver=self.solver, method=self.method,
                    forward_mix=self.forward_mix, capacity=self.capacity, validate=self.validate)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_forward_mix(value: float, name: str = "forward_mix") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0) \
            or math.isnan(value):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
