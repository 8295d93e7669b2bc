"""A tensor-parallel group's schedule, executed in one process.

What a fine-tune learns depends only on the ops each (micro-batch, subnet) runs: tensor parallelism splits
the same sums across ranks (the partial outputs and input gradients are added by the collectives), so a
schedule solved for ``devices`` tensor-parallel ranks gives the same weights whether it runs on those ranks
or in one process (up to the order of floating-point additions; ``tests/integration/
test_tensor_parallel_schedule_in_one_process.py`` checks one case). The accuracy benchmark runs every
multi-device schedule in one process this way, which is what makes D2FT and MoE differ there (on one device
with per-step capacity D2FT's knapsack is a per-micro-batch top-k).

:class:`TensorParallelSchedule` is :class:`~lightning_d2ft.D2FTCallback` solving for a round-robin placement
over ``devices`` ranks instead of the strategy's (it overrides the callback's ``_solve``, whose arguments are
``(trainer, net, sampler, placement, settings)``).
"""

from __future__ import annotations

from typing import Any

from lightning_d2ft.callback import D2FTCallback
from lightning_d2ft.parallel.placement import Placement

__all__ = ["TensorParallelSchedule"]


class TensorParallelSchedule(D2FTCallback):
    """D2FTCallback whose schedule is solved for ``devices`` tensor-parallel ranks (round-robin placement)."""

    def __init__(self, *args: Any, devices: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.devices = devices

    def _solve(self, trainer, net, sampler, placement, settings):
        if self.devices > 1:
            placement = Placement.round_robin(net.depth, net.groups_per_block, self.devices)
        return super()._solve(trainer, net, sampler, placement, settings)
