"""Old import path: the schedule now lives in :mod:`.schedule` (data, metrics, files), :mod:`.knapsack`
(solvers), :mod:`.capacity`, :mod:`.baselines` and :mod:`.settings` (checks). Kept so old imports work."""

from lightning_d2ft.knapsack import SolverMismatchError
from lightning_d2ft.schedule import Schedule
from lightning_d2ft.settings import (CAPACITIES, METHODS, SOLVERS, ScheduleSettings, check_choice, check_comm_budget,
                                     check_fraction)

__all__ = ["CAPACITIES", "METHODS", "SOLVERS", "Schedule", "ScheduleSettings", "SolverMismatchError", "check_choice",
           "check_comm_budget", "check_fraction"]
