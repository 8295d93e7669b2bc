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

import copy
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_d2ft.data import MicroBatchSampler, find_micro_batch_sampler
from lightning_d2ft.lora import add_lora_, check_lora, has_lora
from lightning_d2ft.ops import CostModel
from lightning_d2ft.partition import D2FTViT, find_d2ft
from lightning_d2ft.placement import subnet_devices
from lightning_d2ft.scheduling import METHODS, SOLVERS, Schedule, check_choice, check_comm_budget, check_fraction
from lightning_d2ft.scores import (
    Scores, cache_key, check_cache_dir, check_finite_losses, check_metric, data_fingerprint, grad_stats,
    load_cached, save_cached, score_tables, weights_digest,
)
from lightning_d2ft.scoring_pass import score_shared
from lightning_d2ft.strategy import D2FTStrategy

__all__ = ["D2FTCallback"]
log = logging.getLogger(__name__)


class D2FTCallback(Callback):
    """Compute scores and the schedule before fit; give each training micro-batch its ops.

    Args:
        budget: compute budget, a fraction of all-FULL in (0, 1].
        subnets: re-cut the model's D2FTViT to this many subnets (or groups per block) before fit.
        backward_score / forward_score: score metrics (see :mod:`lightning_d2ft.scores`).
        solver: "ortools" (default) or "dp". method: "d2ft" or a baseline ("random", "dpruning", "moe", "full").
        comm_budget: optional communication budget in (0, 1]. forward_mix: see :meth:`Schedule.solve`.
        speeds: relative speed of each tensor-parallel rank (default: those of the strategy's
            ``speed_aware`` placement, else equal).
        cache_dir: where scores are cached (default ``<default_root_dir>/d2ft_cache``).
        score_every: score every k-th micro-batch only (cheaper scoring pass).
        data_key: names the training data for the score cache and the schedule's data check (default: a
            fingerprint of the micro-batch index lists and a seeded sample of the data set).
        schedule_path: use this saved schedule instead of solving (checked against the run).
        lora_rank / lora_alpha: D2FT-LoRA: after scoring, add a LoRA adapter per subnet on its ``qkv``
            slice and freeze the rest but the classifier head (see :mod:`lightning_d2ft.lora`).
    """

    def __init__(
        self,
        budget: float = 0.6,
        subnets: int | None = None,
        backward_score: str = "weight_magnitude",
        forward_score: str = "fisher",
        solver: str = "ortools",
        method: str = "d2ft",
        comm_budget: float | None = None,
        forward_mix: float = 0.5,
        cost: CostModel | None = None,
        speeds: Sequence[float] | None = None,
        cache_dir: str | Path | None = None,
        score_every: int = 1,
        schedule_path: str | Path | None = None,
        seed: int = 0,
        progress: bool = True,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        data_key: str | None = None,
    ) -> None:
        check_fraction("budget", budget)
        if comm_budget is not None:
            check_fraction("comm_budget", comm_budget)
        check_metric("backward", backward_score)
        check_metric("forward", forward_score)
        check_choice("solver", solver, SOLVERS)
        check_choice("method", method, METHODS)
        if not 0.0 <= forward_mix <= 1.0:
            raise ValueError(f"forward_mix must be in [0, 1], got {forward_mix}")
        if score_every < 1:
            raise ValueError(f"score_every must be >= 1, got {score_every}")
        check_lora(lora_rank, lora_alpha, rank_optional=True)
        _check_speeds(speeds)
        if schedule_path is not None and not Path(schedule_path).is_file():
            raise FileNotFoundError(f"schedule_path {schedule_path} is not a file: give a schedule saved by an earlier "
                                    "run (<run dir>/d2ft/schedule.pt), or drop schedule_path to solve one")
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha
        self.budget, self.subnets, self.comm_budget, self.forward_mix = budget, subnets, comm_budget, forward_mix
        self.backward_score, self.forward_score, self.solver, self.method = backward_score, forward_score, solver, method
        self.cost, self.speeds, self.cache_dir, self.score_every = cost or CostModel(), speeds, cache_dir, score_every
        self.schedule_path, self.seed, self.progress, self.data_key = schedule_path, seed, progress, data_key
        self.schedule: Schedule | None = None
        self.scoring_seconds = 0.0
        self.scored_micro_batches = 0
        self._net: D2FTViT | None = None
        self._weights: str | None = None  # digest of the weights as setup saw them (the score cache key)
        self._planned = False
        self._fallback = False  # the strategy has no install_schedule: ops set per batch here (see below)
        self._ids: list[int] = []
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
        self._net, self._planned = net, False
        if trainer.is_global_zero and self.schedule_path is None and self._needs_scores():
            self._weights = weights_digest(net)  # before LoRA and sharding: the base model's weights
        if self.lora_rank is not None and not has_lora(net):  # before the optimizer is built
            add_lora_(net, self.lora_rank, self.lora_alpha, seed=self.seed)

    # -- planning: once the strategy has placed and sharded the model --------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._plan(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._plan(trainer)  # a no-op when on_fit_start planned already
        if self._fallback:
            self._fallback_resume(trainer)

    def _plan(self, trainer: Trainer) -> None:
        net = find_d2ft(trainer.lightning_module)
        strategy = _d2ft_strategy(trainer)
        placed = next(net.parameters()).device == trainer.strategy.root_device and (
            strategy is None or strategy.tensor_parallel_size == 1 or net.tp is not None)
        if self._planned or not placed:
            return
        self._net = net
        trainer.fit_loop.setup_data()  # D2FTStrategy.process_dataloader points the sampler at this replica
        sampler = find_micro_batch_sampler(trainer.train_dataloader)
        devices, placement = self._devices(trainer, net)
        data = self.data_key or data_fingerprint(trainer.train_dataloader.dataset, sampler.micro_batches, self.seed)
        self.schedule = self._restored_schedule(sampler, devices, placement, data)
        if self.schedule is None and self.schedule_path is not None:
            self.schedule = Schedule.load(self.schedule_path)
            self._check_matches(self.schedule, sampler, devices, placement, data, "schedule_path")
        if self.schedule is None:
            self.schedule = self._solve(trainer, net, sampler, devices, placement, data)
        rank_zero_info(self.schedule.summary())
        install = getattr(trainer.strategy, "install_schedule", None)
        self._fallback = install is None
        if install is not None:
            install(self.schedule)
        self._planned = True

    def _restored_schedule(self, sampler: MicroBatchSampler, devices: int, placement: torch.Tensor,
                           data: str) -> Schedule | None:
        """The resumed checkpoint's schedule; re-solved on another world size, refused for other data/settings."""
        restored, self._restored = self._restored, None
        if restored is None:
            return None
        self._check_matches(restored, sampler, None, None, data, "the checkpoint being resumed")
        try:
            self._check_matches(restored, sampler, devices, placement, data, "the checkpoint being resumed")
        except ValueError as err:
            rank_zero_warn(f"resuming with a freshly solved schedule: {err}")
            return None
        return restored

    def _devices(self, trainer: Trainer, net: D2FTViT) -> tuple[int, torch.Tensor]:
        strategy = _d2ft_strategy(trainer)
        if strategy is not None:
            return strategy.tensor_parallel_size, subnet_devices(strategy.placement_for(net))
        return 1, subnet_devices(torch.zeros(net.depth, net.groups_per_block, dtype=torch.long))

    def _settings(self, data: str) -> dict[str, Any]:
        return {"data": data, "budget": self.budget, "comm_budget": self.comm_budget, "method": self.method,
                "backward_score": self.backward_score, "forward_score": self.forward_score}

    def _solve(self, trainer: Trainer, net: D2FTViT, sampler: MicroBatchSampler, devices: int,
               placement: torch.Tensor, data: str) -> Schedule:
        if self.comm_budget is not None:  # before the scoring pass, not after it
            check_comm_budget(self.comm_budget, sampler.num_micro_batches, placement, devices)
        scores = self._scores(trainer, net, sampler, data) if self._needs_scores() else None

        def solve() -> Schedule:
            n = sampler.num_micro_batches
            ones = torch.ones(n, net.num_subnets)  # every pair FULL whatever the scores say: no scoring pass
            schedule = Schedule.solve(
                scores.backward if scores else ones, scores.forward if scores else ones, budget=self.budget,
                devices=devices, solver=self.solver, method=self.method, comm_budget=self.comm_budget,
                forward_mix=self.forward_mix, placement=placement, speeds=self._speeds(trainer),
                column_blocks=net.subnet_blocks(), cost=self.cost, seed=self.seed)
            schedule.info.update(scores_key=scores.key if scores else None, scoring_seconds=self.scoring_seconds,
                                 scored_micro_batches=self.scored_micro_batches, num_subnets=net.num_subnets,
                                 micro_batch_size=sampler.micro_batch_size, settings=self._settings(data))
            out = Path(trainer.default_root_dir) / "d2ft"
            schedule.save(out / "schedule.pt")
            schedule.plot(out / "schedule.png")
            return schedule

        return _on_rank_zero(trainer, solve)

    def _speeds(self, trainer: Trainer) -> Sequence[float] | None:
        """Given speeds, else those the strategy's placement declares (``speed_aware``), else equal."""
        strategy = _d2ft_strategy(trainer)
        return self.speeds if self.speeds is not None else (strategy.speeds if strategy is not None else None)

    def _needs_scores(self) -> bool:
        return self.method != "full" and (self.budget < 1.0 or self.comm_budget is not None)

    def _scores(self, trainer: Trainer, net: D2FTViT, sampler: MicroBatchSampler, data: str) -> Scores:
        """Load the scores from the cache (rank 0) or score the micro-batches that will run, on every rank."""
        cache = Path(self.cache_dir or Path(trainer.default_root_dir) / "d2ft_cache")
        check_cache_dir(cache)  # every rank, before any work: a read-only dir fails here, not after the pass
        start = time.perf_counter()
        total = sampler.num_micro_batches
        ids = micro_batches_to_train(trainer, sampler)[:: self.score_every]
        metrics = (self.backward_score, self.forward_score)
        key = cache_key(self._weights or "", data, *metrics, ids, total, self.seed) if self._weights else None
        cached = trainer.strategy.broadcast(load_cached(cache, key) if key and trainer.is_global_zero else None, src=0)
        if cached is not None:
            self.scoring_seconds, self.scored_micro_batches = 0.0, 0
            rank_zero_info(f"D2FT scores ({self.backward_score} / {self.forward_score}) loaded from the cache")
            return cached
        stats = grad_stats(metrics)
        replica, replicas, tp_rank = _replica_of(trainer)
        sums, losses, weights = score_shared(
            net, trainer.train_dataloader, sampler.micro_batches, ids, stats, torch.nn.functional.cross_entropy,
            replica=replica, replicas=replicas, count_replicated=tp_rank == 0, progress=self.progress)
        if stats:
            check_finite_losses(losses, ids)  # the gathered losses: every rank raises together
        backward, forward = score_tables(sums, stats, weights, ids, total, *metrics, self.seed)
        self.scoring_seconds = trainer.strategy.broadcast(time.perf_counter() - start, src=0)
        self.scored_micro_batches = len(ids) if stats else 0
        scores = Scores(backward, forward, *metrics, seconds=self.scoring_seconds, key=key or "",
                        scored=self.scored_micro_batches)
        if trainer.is_global_zero and key:
            save_cached(cache, scores)
        rank_zero_info(f"D2FT scores ({self.backward_score} / {self.forward_score}) computed in "
                       f"{self.scoring_seconds:.1f} s over {self.scored_micro_batches} of {total} micro-batches")
        return scores

    def _check_matches(self, schedule: Schedule, sampler: MicroBatchSampler, devices: int | None,
                       placement: torch.Tensor | None, data: str, source: str) -> None:
        """Refuse a schedule made for another model, data, settings or (when given) world size."""
        problems = []
        if schedule.num_micro_batches != sampler.num_micro_batches:
            problems.append(f"{schedule.num_micro_batches} micro-batches, the data has {sampler.num_micro_batches}")
        if schedule.ops.shape[1] != self._net.num_subnets:
            problems.append(f"{schedule.ops.shape[1]} subnets, the model has {self._net.num_subnets}")
        elif placement is not None and (schedule.num_devices != devices or not torch.equal(schedule.placement,
                                                                                          placement)):
            problems.append(f"{schedule.num_devices} devices / another placement, this run has {devices}")
        made = schedule.info.get("settings") or {}
        for name, ours in self._settings(data).items():
            if name in made and made[name] != ours:
                what = "other data (another data set, data seed or micro-batch split)" if name == "data" \
                    else f"{name}={made[name]!r}, this run has {name}={ours!r}"
                problems.append(what)
        if problems:
            raise ValueError(f"the schedule of {source} was made for another model, data, settings or world size: "
                             + "; ".join(problems) + ". Solve it again (drop schedule_path, or start fresh: "
                             "another run directory / resume=null) or run with the matching setup.")

    # -- during fit: timing for the summary; ops per batch only while the strategy cannot install them ----
    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fallback:
            self._ids = find_micro_batch_sampler(trainer.train_dataloader).micro_batch_ids(trainer.current_epoch)

    def micro_batch_of(self, batch_idx: int) -> int:
        """The micro-batch that training batch ``batch_idx`` of the current epoch holds (-1 if unknown)."""
        return int(self._ids[batch_idx]) if 0 <= batch_idx < len(self._ids) else -1

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()
        if self._fallback:  # TODO(lead): remove once D2FTStrategy.install_schedule is merged
            self._net.scheduled_ops = self.schedule.ops[self._ids[batch_idx]]
            strategy = _d2ft_strategy(trainer)
            if strategy is not None:
                strategy.comm_stats.reset()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batch_seconds += time.perf_counter() - self._t0
        self._batches += 1
        if self._fallback:  # TODO(lead): remove with the fallback (the strategy logs these itself)
            strategy = _d2ft_strategy(trainer)
            rank = strategy.tensor_parallel_rank if strategy is not None else 0
            mine = self.schedule.placement == rank
            ops = self._net.scheduled_ops
            pl_module.log("d2ft/compute_fraction", float(self.cost.compute(ops[mine]).sum() / (mine.sum() * self.cost.full)),
                          on_step=True, on_epoch=True)
            if strategy is not None:
                pl_module.log("d2ft/bytes_sent", float(strategy.comm_stats.total_bytes), on_step=True, on_epoch=True,
                              reduce_fx="sum")
            self._net.scheduled_ops = None

    def _fallback_resume(self, trainer: Trainer) -> None:
        """Resuming mid-epoch without the strategy's own handling: skip the micro-batches this epoch already
        trained on (Lightning skips ``on_train_epoch_start`` then, so the epoch's order is set here too)."""
        loop = trainer.fit_loop
        if not loop.restarted_mid_epoch:
            return
        sampler = find_micro_batch_sampler(trainer.train_dataloader)
        sampler.skip = loop.epoch_loop.batch_progress.current.processed
        self._ids = sampler.micro_batch_ids(trainer.current_epoch)
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        rank_zero_info(f"D2FT: resuming epoch {trainer.current_epoch} after micro-batch {sampler.skip}")

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
        if self.schedule is None:
            return {}
        s = self.schedule
        return {"ops": s.ops.to(torch.int8), "placement": s.placement, "speeds": s.speeds, "cost": dict(s.cost.__dict__),
                "column_blocks": s.column_blocks, "method": s.method, "info": s.info,
                "scoring_seconds": self.scoring_seconds}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        st = dict(state_dict)
        self.scoring_seconds = st.pop("scoring_seconds", 0.0)
        self._restored = Schedule(ops=st["ops"].long(), placement=st["placement"], speeds=st["speeds"],
                                  cost=CostModel(**st["cost"]), column_blocks=st["column_blocks"],
                                  method=st["method"], info=st["info"])


def _d2ft_strategy(trainer: Trainer) -> D2FTStrategy | None:
    """The trainer's D2FTStrategy, None on one process with another strategy; refuses the rest."""
    strategy = trainer.strategy
    if isinstance(strategy, D2FTStrategy):
        return strategy
    if trainer.world_size > 1:
        raise ValueError(
            f"D2FTCallback needs D2FTStrategy when training on more than one process, got "
            f"{type(strategy).__name__} on {trainer.world_size} processes (it would shard nothing and every replica "
            "would train the same micro-batches): use Trainer(strategy=D2FTStrategy(...)) or strategy='d2ft'")
    return None


def _replica_of(trainer: Trainer) -> tuple[int, int, int]:
    """(data-parallel replica, replicas, tensor-parallel rank) of this process."""
    strategy = _d2ft_strategy(trainer)
    if strategy is None:
        return 0, 1, 0
    return strategy.data_parallel_rank, strategy.data_parallel_size, strategy.tensor_parallel_rank


def _on_rank_zero(trainer: Trainer, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and broadcast its result, or its error, which every rank then raises (so no rank
    waits for a broadcast that never comes and the user sees the real error)."""
    result, error = None, None
    if trainer.is_global_zero:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised on every rank just below
            error = err
    result, error = trainer.strategy.broadcast((result, error), src=0)
    if error is not None:
        raise error
    return result


def _check_speeds(speeds: Sequence[float] | None) -> None:
    if speeds is None:
        return
    values = list(speeds)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
                         for v in values):
        raise ValueError(f"speeds must be positive finite numbers, one per tensor-parallel rank, got {values!r}")


def micro_batches_to_train(trainer: Trainer, sampler: MicroBatchSampler) -> list[int]:
    """The micro-batches (over every data-parallel replica) that this fit will train, in id order: all of them
    unless ``limit_train_batches``, ``max_steps`` or ``max_epochs`` stop it short of covering them."""
    count, replicas = sampler.num_micro_batches, sampler.num_replicas
    per_epoch = trainer.num_training_batches
    per_epoch = count // replicas if math.isinf(per_epoch) else int(per_epoch)
    batches_left = trainer.max_steps * trainer.accumulate_grad_batches if trainer.max_steps >= 0 else math.inf
    epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else 1000
    views = []
    for r in range(replicas):
        view = copy.copy(sampler)
        view.set_replicas(replicas, r)
        views.append(view)
    needed: set[int] = set()
    for epoch in range(trainer.current_epoch, max(epochs, trainer.current_epoch + 1)):
        take = int(min(per_epoch, batches_left))
        for view in views:
            needed.update(view.micro_batch_ids(epoch)[:take])
        batches_left -= take
        if batches_left <= 0 or len(needed) == count or not sampler.shuffle:
            break
    return sorted(needed)
