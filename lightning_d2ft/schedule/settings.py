"""The schedule's settings in one validated object: the one place for their fields, defaults and checks.

``D2FTCallback(settings=...)`` or its keyword arguments, ``Schedule.solve(..., settings)`` or its keyword
arguments, and the app's ``schedule`` config group (whose dataclass is generated from these fields) all
build one :class:`ScheduleSettings` and pass it whole. Every check names the field and the values it allows,
and runs before any scoring or solving.
"""

from __future__ import annotations

import math
from dataclasses import InitVar, asdict, dataclass, fields
from typing import Any, Mapping

__all__ = ["CAPACITIES", "ScheduleSettings", "allowed_methods", "allowed_solvers", "check_choice", "check_fraction"]

CAPACITIES = ("step", "epoch")
#: fields that do not change which ops a schedule holds (the solvers agree; validation only checks)
_NOT_IDENTITY = ("solver", "validate")


def allowed_methods() -> tuple[str, ...]:
    """"d2ft" and every registered baseline (``lightning_d2ft.schedule.baselines.register_baseline``)."""
    from lightning_d2ft.schedule.baselines import BASELINES  # lazy, as below: the app's --help loads no torch

    return ("d2ft", *BASELINES)


def allowed_solvers() -> tuple[str, ...]:
    """The solvers of ``lightning_d2ft.schedule.knapsack.SOLVERS``, the one registry."""
    from lightning_d2ft.schedule.knapsack import SOLVERS

    return tuple(SOLVERS)


def check_choice(name: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(allowed)}")


def check_fraction(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be a fraction of the all-FULL cost in (0, 1], got {value!r}")


@dataclass(frozen=True)
class ScheduleSettings:
    """What the schedule is asked to do.

    Args:
        budget: compute, a fraction of all-FULL in (0, 1].
        comm_budget: communication, a fraction of the all-FULL bytes on the tensor-parallel wire in (0, 1], or
            None (no limit); it bounds the bytes the collectives really send (:mod:`lightning_d2ft.schedule.wire`),
            per (device, micro-batch): ``capacity="step"`` only.
        backward_score / forward_score: score metrics deciding FULL / FORWARD_ONLY
            (:data:`lightning_d2ft.scoring.scores.METRICS`).
        solver: "ortools" (checked by the DP on every solve when ``validate``) or "dp" (the DP alone).
        method: "d2ft" or a baseline (:mod:`lightning_d2ft.schedule.baselines`): the train-or-skip "random",
            "dpruning", "moe", their ``*_fo`` ablations with D2FT's FORWARD_ONLY share, "full", or a registered one.
        forward_mix: share of the budget kept for FORWARD_ONLY, in [0, 1] (0: FULL may take it all; 1: the
            fewest FULL that still let FORWARD_ONLY spend the budget).
        score_every: score every k-th micro-batch only (a cheaper scoring pass).
        capacity: "step" (default) gives every (device, micro-batch) its own capacity, so every lockstep step
            is balanced and no micro-batch goes without FULL work unless the budget forces it; "epoch" is the
            paper's: one capacity per device over the whole (micro-batch x subnet) table, after a floor of FULL
            work that every (device, micro-batch) keeps (``full_floor``), so no micro-batch is starved.
        full_floor: with ``capacity="epoch"``, the share of its per-step FULL capacity that every (device,
            micro-batch) keeps (at least one FULL subnet where the step share holds one), in (0, 1]; the rest is
            pooled over the epoch. 1 leaves only the FORWARD_ONLY level pooled.
        moe_capacity_factor: ``moe`` routing's per-subnet capacity, as a multiple (>= 1) of a subnet's fair
            share of the routed micro-batches (MoE routers' capacity factor).
        validate: after OR-Tools, the DP re-solves every instance and the objectives must agree.

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
    full_floor: float = 0.5
    moe_capacity_factor: float = 1.25
    validate: bool = True
    where: InitVar[str] = ""

    def __post_init__(self, where: str) -> None:
        check_fraction(f"{where}budget", self.budget)
        if self.comm_budget is not None:
            check_fraction(f"{where}comm_budget", self.comm_budget)
        check_choice(f"{where}solver", self.solver, allowed_solvers())
        check_choice(f"{where}method", self.method, allowed_methods())
        check_choice(f"{where}capacity", self.capacity, CAPACITIES)
        if isinstance(self.forward_mix, bool) or not isinstance(self.forward_mix, (int, float)) \
                or not (0.0 <= self.forward_mix <= 1.0) or math.isnan(self.forward_mix):
            raise ValueError(f"{where}forward_mix must be a number in [0, 1], got {self.forward_mix!r}")
        if isinstance(self.score_every, bool) or not isinstance(self.score_every, int) or self.score_every < 1:
            raise ValueError(f"{where}score_every must be an int >= 1, got {self.score_every!r}")
        for name, low, closed in (("full_floor", 0.0, False), ("moe_capacity_factor", 1.0, True)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                    or not (value >= low if closed else value > low) or (name == "full_floor" and value > 1):
                allowed = "(0, 1]" if name == "full_floor" else ">= 1"
                raise ValueError(f"{where}{name} must be a number {allowed}, got {value!r}")
        if self.comm_budget is not None and self.capacity == "epoch":
            raise ValueError(f"{where}comm_budget bounds the bytes of every step (per device and micro-batch); it "
                             f"cannot be combined with {where}capacity='epoch': use capacity='step' or drop "
                             "comm_budget")
        if not isinstance(self.validate, bool):
            raise ValueError(f"{where}validate must be true or false, got {self.validate!r}")
        from lightning_d2ft.scoring.scores import check_metric  # lazy: scoring imports the model (and timm)

        for name, role in (("backward_score", "backward"), ("forward_score", "forward")):
            try:
                check_metric(role, getattr(self, name))
            except ValueError as err:
                raise ValueError(f"{where}{name}: {err}") from None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def build(cls, settings: ScheduleSettings | None = None, where: str = "", **given: Any) -> ScheduleSettings:
        """``settings`` as they are, or settings built from the fields ``given`` (the rest at their defaults);
        not both. An unknown field is refused, naming the fields there are."""
        unknown = sorted(set(given) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown schedule setting {', '.join(unknown)}; the settings are {list(cls.names())}")
        if settings is None:
            return cls(**given, where=where)
        if not isinstance(settings, ScheduleSettings):
            raise TypeError(f"settings must be a ScheduleSettings, got {type(settings).__name__}")
        if given:
            raise ValueError(f"give settings=ScheduleSettings(...) or its fields ({', '.join(sorted(given))}), "
                             "not both")
        return settings

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "") -> ScheduleSettings:
        """The settings among ``values`` (a config section may hold more keys), validated; errors name each
        field as ``where + name`` (``where="schedule."`` for the app's ``schedule.budget``)."""
        return cls(**{name: values[name] for name in cls.names() if name in values}, where=where)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that decide which ops a schedule holds: a schedule solved for other values of any of
        them must not be reused (``solver`` and ``validate`` are left out: the solvers agree)."""
        return {k: v for k, v in self.as_dict().items() if k not in _NOT_IDENTITY}
