"""D2FTCallback plans: it scores the micro-batches, solves the schedule and hands it to the strategy.

``setup`` (model still whole) re-cuts the subnets and adds LoRA adapters, so the optimizer is built for
them. Scoring waits until the strategy has placed and sharded the model (``on_fit_start``, or
``on_train_start`` if a Lightning version calls that first): it runs on the training device, streams the
micro-batches that will actually be trained through the training loader's dataset, splits them between
data-parallel replicas (a tensor-parallel group scores together) and gathers the tables once. Rank 0
solves and broadcasts; then ``trainer.strategy.install_schedule(schedule)`` executes it. The schedule is
part of the callback's checkpoint state and records the data fingerprint and settings it was solved for,
so a resumed run executes the same schedule and a schedule made for other data or settings is refused.
Everything configurable is checked when the callback is built, before any heavy work.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_d2ft.data.micro_batches import MicroBatchSampler, find_micro_batch_sampler
from lightning_d2ft.model.lora import add_lora_, check_lora, has_lora
from lightning_d2ft.model.vit import D2FTViT, find_d2ft
from lightning_d2ft.ops import CostModel
from lightning_d2ft.parallel.placement import Placement, check_speeds
from lightning_d2ft.schedule.problem import ScheduleProblem
from lightning_d2ft.schedule.resume import check_matches, resumable, run_settings, schedule_from_state, schedule_state
from lightning_d2ft.schedule.schedule import Schedule
from lightning_d2ft.schedule.settings import ScheduleSettings
from lightning_d2ft.scoring.scores import (
    Scores,
    cache_key,
    check_cache_dir,
    check_finite_losses,
    data_fingerprint,
    grad_stats,
    load_cached,
    save_cached,
    score_tables,
    weights_digest,
)
from lightning_d2ft.scoring.scoring_pass import micro_batches_to_train, score_shared
from lightning_d2ft.strategy.step_guard import sigterm_stops_at_once
from lightning_d2ft.strategy.strategy import D2FTStrategy

__all__ = ["D2FTCallback"]
log = logging.getLogger(__name__)


class D2FTCallback(Callback):
    """Score the micro-batches, solve the schedule and hand it to the strategy, once the model is placed.

    Args:
        settings: a :class:`~lightning_d2ft.schedule.settings.ScheduleSettings`, or its fields as keyword
            arguments: ``budget``, ``comm_budget``, ``backward_score``, ``forward_score``, ``solver``, ``method``,
            ``forward_mix``, ``score_every``, ``capacity``, ``validate`` (see there; the rest at their defaults).
        subnets: re-cut the model's D2FTViT to this many subnets (or groups per block) before fit.
        cost: the :class:`~lightning_d2ft.ops.CostModel` of the ops (default: FORWARD_ONLY 0.4 of FULL).
        speeds: relative speed of each tensor-parallel rank (default: those of the strategy's
            :class:`~lightning_d2ft.parallel.placement.Placement`, e.g. from ``speed_aware``, else equal).
        cache_dir: where scores are cached (default ``<default_root_dir>/d2ft_cache``).
        schedule_path: use this saved schedule instead of solving (checked against the run: model, data,
            settings and world size).
        seed: for the random score and baselines, and the data fingerprint's sample.
        progress: a progress bar over the scoring pass.
        lora_rank / lora_alpha: D2FT-LoRA: add a LoRA adapter per subnet on its ``qkv`` slice in ``setup``
            and freeze the rest but the classifier head (see :mod:`lightning_d2ft.model.lora`); the scoring pass
            still rates the base subnets.
        data_key: names the training data for the score cache and the schedule's data check (default: a
            fingerprint of the micro-batch index lists and a seeded sample of the data set).
    """

    def __init__(
        self,
        settings: ScheduleSettings | None = None,
        *,
        subnets: int | None = None,
        cost: CostModel | None = None,
        speeds: Sequence[float] | None = None,
        cache_dir: str | Path | None = None,
        schedule_path: str | Path | None = None,
        seed: int = 0,
        progress: bool = True,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        data_key: str | None = None,
        **fields: Any,
    ) -> None:
        self.settings = ScheduleSettings.build(settings, **fields)  # validates every field, naming it
        check_lora(lora_rank, lora_alpha, rank_optional=True)
        if speeds is not None:
            check_speeds(speeds)
        if schedule_path is not None and not Path(schedule_path).is_file():
            raise FileNotFoundError(f"schedule_path {schedule_path} is not a file: give a schedule saved by an earlier "
                                    "run (<run dir>/d2ft/schedule.pt), or drop schedule_path to solve one")
        self.lora_rank, self.lora_alpha, self.subnets = lora_rank, lora_alpha, subnets
        self.cost, self.speeds, self.cache_dir = cost or CostModel(), speeds, cache_dir
        self.schedule_path, self.seed, self.progress, self.data_key = schedule_path, seed, progress, data_key
        self.schedule: Schedule | None = None
        self.scoring_seconds = 0.0
        self.scored_micro_batches = 0
        self._weights: str | None = None  # digest of the weights as setup saw them (the score cache key)
        self._planned = False
        self._batch_seconds, self._batches, self._t0 = 0.0, 0, 0.0
        self._restored: Schedule | None = None  # the schedule of a checkpoint being resumed

    # -- before fit: the model is still whole --------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _d2ft_strategy(trainer)  # refuses a multi-process strategy that is not D2FTStrategy
        net = find_d2ft(pl_module)
        if self.subnets is not None and self.subnets != net.num_subnets:
            net.regroup_(self.subnets)
        self._planned = False
        if trainer.is_global_zero and self.schedule_path is None and self._needs_scores():
            self._weights = weights_digest(net)  # before LoRA and sharding: the base model's weights
        if self.lora_rank is not None and not has_lora(net):  # before the optimizer is built
            add_lora_(net, self.lora_rank, self.lora_alpha, seed=self.seed)

    # -- planning: once the strategy has placed and sharded the model --------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with sigterm_stops_at_once():  # no step to finish together yet: the scoring pass stops at once
            self._plan(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with sigterm_stops_at_once():  # a no-op when on_fit_start planned already; training starts: placed
            self._plan(trainer, placed=True)

    def _plan(self, trainer: Trainer, placed: bool = False) -> None:
        """Score, solve (or restore / load) and install the schedule, once the strategy has placed and sharded
        the model; whichever of on_fit_start / on_train_start comes first with the model placed does it."""
        net = find_d2ft(trainer.lightning_module)
        strategy = _d2ft_strategy(trainer)
        placement = strategy.placement  # the one Placement, resolved when the strategy sharded the model
        placed = placement is not None and (placed or next(net.parameters()).device == strategy.root_device)
        if self._planned or not placed:
            return
        if self.speeds is not None:  # the callback's speeds win over those the placement declares
            placement = placement.with_speeds(self.speeds)
        trainer.fit_loop.setup_data()  # D2FTStrategy.process_dataloader points the sampler at this replica
        sampler = find_micro_batch_sampler(trainer.train_dataloader)
        data = self.data_key or data_fingerprint(trainer.train_dataloader.dataset, sampler.micro_batches, self.seed)
        settings, n_mb = run_settings(self.settings, data), sampler.num_micro_batches
        restored, self._restored = self._restored, None
        self.schedule = resumable(restored, n_mb, net.num_subnets, placement, settings) if restored else None
        if self.schedule is None and self.schedule_path is not None:
            self.schedule = Schedule.load(self.schedule_path)
            check_matches(self.schedule, n_mb, net.num_subnets, placement, settings, "schedule_path")
        if self.schedule is None:
            self.schedule = self._solve(trainer, net, sampler, placement, settings)
        rank_zero_info(self.schedule.summary())
        strategy.install_schedule(self.schedule)  # the strategy executes it: ops per batch, bytes, logging
        _log_schedule_metrics(trainer, self.schedule)
        self._planned = True

    def _solve(self, trainer: Trainer, net: D2FTViT, sampler: MicroBatchSampler, placement: Placement,
               settings: dict[str, Any]) -> Schedule:
        # everything but the scores is resolved and checked now, before the scoring pass
        problem = ScheduleProblem.build(self.settings, sampler.num_micro_batches, net.num_subnets, placement,
                                        column_blocks=net.subnet_blocks(), cost=self.cost)
        scores = self._scores(trainer, net, sampler, settings["data"]) if self._needs_scores() else None

        def solve() -> Schedule:
            ones = torch.ones(sampler.num_micro_batches, net.num_subnets)  # all FULL: no scoring pass needed
            schedule = Schedule.from_problem(problem, scores.backward if scores else ones,
                                             scores.forward if scores else ones, seed=self.seed)
            schedule.info["settings"].update(settings)  # the run's identity, the data fingerprint included
            schedule.info.update(scores_key=scores.key if scores else None, scoring_seconds=self.scoring_seconds,
                                 scored_micro_batches=self.scored_micro_batches, num_subnets=net.num_subnets,
                                 micro_batch_size=sampler.micro_batch_size)
            out = Path(trainer.default_root_dir) / "d2ft"
            schedule.save(out / "schedule.pt")
            schedule.plot(out / "schedule.png")
            return schedule

        return _on_rank_zero(trainer, solve)

    def _needs_scores(self) -> bool:
        s = self.settings
        return s.method != "full" and (s.budget < 1.0 or s.comm_budget is not None)

    def _scores(self, trainer: Trainer, net: D2FTViT, sampler: MicroBatchSampler, data: str) -> Scores:
        """Load the scores from the cache (rank 0) or score the micro-batches that will run, on every rank."""
        cache = Path(self.cache_dir or Path(trainer.default_root_dir) / "d2ft_cache")
        check_cache_dir(cache)  # every rank, before any work: a read-only dir fails here, not after the pass
        start = time.perf_counter()
        total = sampler.num_micro_batches
        ids = micro_batches_to_train(trainer, sampler)[:: self.settings.score_every]
        metrics = (self.settings.backward_score, self.settings.forward_score)
        key = cache_key(self._weights or "", data, *metrics, ids, total, self.seed) if self._weights else None
        cached = trainer.strategy.broadcast(load_cached(cache, key, shape=(total, net.num_subnets))
                                            if key and trainer.is_global_zero else None, src=0)
        if cached is not None:
            self.scoring_seconds, self.scored_micro_batches = 0.0, 0
            rank_zero_info(f"D2FT scores ({metrics[0]} / {metrics[1]}) loaded from the cache")
            return cached
        stats = grad_stats(metrics)
        replica, replicas, tp_rank = _replica_of(trainer)
        sums, losses, weights = score_shared(
            net, trainer.train_dataloader, sampler.micro_batches, ids, stats, torch.nn.functional.cross_entropy,
            replica=replica, replicas=replicas, count_replicated=tp_rank == 0,
            progress=self.progress and trainer.is_global_zero)  # one bar, not one per rank
        if stats:
            check_finite_losses(losses, ids)  # the gathered losses: every rank raises together
        backward, forward = score_tables(sums, stats, weights, ids, total, *metrics, self.seed)
        self.scoring_seconds = trainer.strategy.broadcast(time.perf_counter() - start, src=0)
        self.scored_micro_batches = len(ids) if stats else 0
        scores = Scores(backward, forward, *metrics, seconds=self.scoring_seconds, key=key or "",
                        scored=self.scored_micro_batches)
        if trainer.is_global_zero and key:
            save_cached(cache, scores)
        rank_zero_info(f"D2FT scores ({metrics[0]} / {metrics[1]}) computed in "
                       f"{self.scoring_seconds:.1f} s over {self.scored_micro_batches} of {total} micro-batches")
        return scores

    # -- during fit: timing for the summary ------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batch_seconds += time.perf_counter() - self._t0
        self._batches += 1

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank_zero_info(self.cost_summary(trainer))

    def cost_summary(self, trainer: Trainer) -> str:
        """What the schedule saves and what scoring cost, against one full training epoch (estimated from the
        mean time of the batches trained) rather than a possibly shortened fit; no wire figure on one device."""
        s = self.schedule
        line = f"D2FT: compute {s.compute_fraction:.3f} of all-FULL"
        if s.num_devices > 1:
            line += f", predicted wire traffic {s.wire_fraction:.3f} of all-FULL"
        if self.scored_micro_batches == 0:
            return line + "; no scoring pass (scores from the cache, or none needed)"
        sampler = find_micro_batch_sampler(trainer.train_dataloader)
        per_epoch = sampler.num_micro_batches // sampler.num_replicas
        epoch = self._batch_seconds / max(self._batches, 1) * per_epoch
        return (line + f"; scoring {self.scored_micro_batches} micro-batches took {self.scoring_seconds:.1f} s, "
                f"{self.scoring_seconds / max(epoch, 1e-9):.2f}x one training epoch (~{epoch:.1f} s: {per_epoch} "
                f"batches at the {self._batches} trained batches' mean)")

    # -- checkpoint state -----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return schedule_state(self.schedule, self.scoring_seconds)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restored, seconds = schedule_from_state(state_dict)
        if restored is not None:
            self._restored, self.scoring_seconds = restored, seconds


def _log_schedule_metrics(trainer: Trainer, schedule: Schedule) -> None:
    """The schedule's figures (per-step and per-epoch balance, solve and check time) to every logger, once."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics({f"d2ft/schedule/{k}": float(v) for k, v in schedule.metrics().items()}, step=0)


def _d2ft_strategy(trainer: Trainer) -> D2FTStrategy:
    """The trainer's D2FTStrategy; any other strategy is refused, naming the fix (the strategy executes the
    schedule, and one process gets the same checkpoint and NaN guarantees as several)."""
    strategy = trainer.strategy
    if isinstance(strategy, D2FTStrategy):
        return strategy
    hint = ("it would shard nothing and every replica would train the same micro-batches"
            if trainer.world_size > 1 else "D2FTStrategy executes the schedule, also on one device")
    raise ValueError(
        f"D2FTCallback needs D2FTStrategy, got {type(strategy).__name__} on {trainer.world_size} process(es) "
        f"({hint}): use Trainer(strategy=D2FTStrategy(...)) or strategy='d2ft'")


def _replica_of(trainer: Trainer) -> tuple[int, int, int]:
    """(data-parallel replica, replicas, tensor-parallel rank) of this process."""
    strategy = _d2ft_strategy(trainer)
    return strategy.data_parallel_rank, strategy.data_parallel_size, strategy.tensor_parallel_rank


def _on_rank_zero(trainer: Trainer, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and broadcast its result, or its error, which every rank then raises (so no rank
    waits for a broadcast that never comes and the user sees the real error)."""
    result, error = None, None
    if trainer.is_global_zero:
        try:
            result = fn()
        except Exception as err:
            error = err
    result, error = trainer.strategy.broadcast((result, error), src=0)
    if error is not None:
        raise error
    return result
