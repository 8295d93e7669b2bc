"""D2FTCallback: score, schedule, and hand every training micro-batch its column of the schedule.

Before fit (``setup``, while the model is still whole on every rank) rank 0 computes or loads the
contribution scores over all micro-batches and solves the schedule; the schedule is broadcast to every
rank. During fit, each training batch is a fixed micro-batch (see :mod:`lightning_d2ft.data`) and gets its
ops. The schedule is part of the callback's checkpoint state, so a resumed run executes the same schedule.
Everything configurable is checked when the callback is built, before any heavy work.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

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
from lightning_d2ft.scores import check_metric, compute_scores
from lightning_d2ft.strategy import D2FTStrategy

__all__ = ["D2FTCallback"]
log = logging.getLogger(__name__)


class D2FTCallback(Callback):
    """Compute scores and the schedule before fit; give each training micro-batch its ops.

    Args:
        budget: compute budget, a fraction of all-FULL in (0, 1].
        subnets: re-cut the model's D2FTViT to this many subnets (or groups per block) before fit.
        backward_score / forward_score: score metrics (see :mod:`lightning_d2ft.scores`).
        solver: "dp" or "ortools". method: "d2ft" or a baseline ("random", "dpruning", "moe", "full").
        comm_budget: optional communication budget in (0, 1]. forward_mix: see :meth:`Schedule.solve`.
        speeds: relative speed of each tensor-parallel rank (default: those of the strategy's
            ``speed_aware`` placement, else equal).
        cache_dir: where scores are cached (default ``<default_root_dir>/d2ft_cache``).
        score_every: score every k-th micro-batch only (cheaper scoring pass).
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
        solver: str = "dp",
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
        if schedule_path is not None and not Path(schedule_path).is_file():
            raise FileNotFoundError(f"schedule_path {schedule_path} is not a file: give a schedule saved by an earlier "
                                    "run (<run dir>/d2ft/schedule.pt), or drop schedule_path to solve one")
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha
        self.budget, self.subnets, self.comm_budget, self.forward_mix = budget, subnets, comm_budget, forward_mix
        self.backward_score, self.forward_score, self.solver, self.method = backward_score, forward_score, solver, method
        self.cost, self.speeds, self.cache_dir, self.score_every = cost or CostModel(), speeds, cache_dir, score_every
        self.schedule_path, self.seed, self.progress = schedule_path, seed, progress
        self.schedule: Schedule | None = None
        self.scoring_seconds = 0.0
        self._ids: list[int] = []
        self._net: D2FTViT | None = None
        self._fit_start = 0.0
        self._restored: Schedule | None = None  # the schedule of a checkpoint being resumed

    # -- before fit -----------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        net = find_d2ft(pl_module)
        if self.subnets is not None and self.subnets != net.num_subnets:
            net.regroup_(self.subnets)
        self._net = net
        sampler = self._sampler(trainer)
        # On resume the checkpoint's schedule is restored after this hook and wins when it fits this run;
        # the one solved here (scores come from the cache) serves a resume on another world size.
        schedule = None
        if trainer.is_global_zero:
            schedule = self._load_or_solve(trainer, net, sampler)
        self.schedule = trainer.strategy.broadcast(schedule, src=0)
        self.scoring_seconds = trainer.strategy.broadcast(self.scoring_seconds, src=0)
        rank_zero_info(self.schedule.summary())
        if self.lora_rank is not None and not has_lora(net):  # after scoring: scores rate the base subnets
            add_lora_(net, self.lora_rank, self.lora_alpha, seed=self.seed)

    def _sampler(self, trainer: Trainer) -> MicroBatchSampler:
        trainer.fit_loop.setup_data()  # D2FTStrategy.process_dataloader points it at this rank's replica
        return find_micro_batch_sampler(trainer.train_dataloader)

    def _devices(self, trainer: Trainer, net: D2FTViT) -> tuple[int, torch.Tensor]:
        strategy = trainer.strategy
        if isinstance(strategy, D2FTStrategy):
            return strategy.tensor_parallel_size, subnet_devices(strategy.placement_for(net))
        return 1, subnet_devices(torch.zeros(net.depth, net.groups_per_block, dtype=torch.long))

    def _load_or_solve(self, trainer: Trainer, net: D2FTViT, sampler: MicroBatchSampler) -> Schedule:
        devices, placement = self._devices(trainer, net)
        if self.schedule_path is not None:
            schedule = Schedule.load(self.schedule_path)
            self._check_matches(schedule, sampler, devices, placement)
            return schedule
        if self.comm_budget is not None:  # before the scoring pass, not after it
            check_comm_budget(self.comm_budget, sampler.num_micro_batches, placement, devices)
        if self._needs_scores():
            scores = self._scores(trainer, net, sampler)
            backward, forward, key = scores.backward, scores.forward, scores.key
        else:  # every pair FULL whatever the scores say: skip the scoring pass
            backward = forward = torch.ones(sampler.num_micro_batches, net.num_subnets)
            key = None
        schedule = Schedule.solve(
            backward, forward, budget=self.budget, devices=devices, solver=self.solver,
            method=self.method, comm_budget=self.comm_budget, forward_mix=self.forward_mix, placement=placement,
            speeds=self._speeds(trainer), column_blocks=net.subnet_blocks(), cost=self.cost, seed=self.seed,
        )
        schedule.info.update(scores_key=key, scoring_seconds=self.scoring_seconds,
                             num_subnets=net.num_subnets, micro_batch_size=sampler.micro_batch_size)
        out = Path(trainer.default_root_dir) / "d2ft"
        schedule.save(out / "schedule.pt")
        schedule.plot(out / "schedule.png")
        return schedule

    def _speeds(self, trainer: Trainer) -> Sequence[float] | None:
        """Given speeds, else those the strategy's placement declares (``speed_aware``), else equal."""
        if self.speeds is not None:
            return self.speeds
        return trainer.strategy.speeds if isinstance(trainer.strategy, D2FTStrategy) else None

    def _needs_scores(self) -> bool:
        return self.method != "full" and (self.budget < 1.0 or self.comm_budget is not None)

    def _scores(self, trainer: Trainer, net: D2FTViT, sampler: MicroBatchSampler):
        loader = trainer.train_dataloader
        batches = [loader.collate_fn([loader.dataset[i] for i in mb]) for mb in sampler.micro_batches]
        cache = self.cache_dir or Path(trainer.default_root_dir) / "d2ft_cache"
        scores = compute_scores(net, batches, self.backward_score, self.forward_score, cache_dir=cache,
                                sample_every=self.score_every, seed=self.seed, progress=self.progress)
        self.scoring_seconds = scores.seconds
        bad = (~torch.isfinite(scores.backward).all(1)) | (~torch.isfinite(scores.forward).all(1))
        if bad.any():
            ids = bad.nonzero().flatten().tolist()
            raise FloatingPointError(
                f"the scoring pass got NaN/inf scores for micro-batch(es) {ids[:10]}{' ...' if len(ids) > 10 else ''} "
                f"(non-finite inputs or loss there): fix those samples before fine-tuning")
        rank_zero_info(f"D2FT scores ({self.backward_score} / {self.forward_score}) "
                       f"{'loaded from cache' if scores.from_cache else f'computed in {scores.seconds:.1f} s'}")
        return scores

    def _check_matches(self, schedule: Schedule, sampler: MicroBatchSampler, devices: int,
                       placement: torch.Tensor) -> None:
        problems = []
        if schedule.num_micro_batches != sampler.num_micro_batches:
            problems.append(f"{schedule.num_micro_batches} micro-batches, the data has {sampler.num_micro_batches}")
        if schedule.ops.shape[1] != placement.numel():
            problems.append(f"{schedule.ops.shape[1]} subnets, the model has {placement.numel()}")
        elif schedule.num_devices != devices or not torch.equal(schedule.placement, placement):
            problems.append(f"{schedule.num_devices} devices / another placement, this run has {devices}")
        if problems:
            raise ValueError("the schedule was made for another model, data or world size: " + "; ".join(problems)
                             + ". Solve it again (drop schedule_path) or run with the matching setup.")

    # -- during fit -----------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._net = find_d2ft(pl_module)
        devices, placement = self._devices(trainer, self._net)
        sampler = self._sampler(trainer)
        if self._restored is not None:
            try:
                self._check_matches(self._restored, sampler, devices, placement)
                self.schedule = self._restored
            except ValueError as err:
                rank_zero_warn(f"resuming with a freshly solved schedule: {err}")
        if self.schedule is None:
            raise RuntimeError("D2FTCallback has no schedule: was setup() skipped?")
        self._check_matches(self.schedule, sampler, devices, placement)
        self._fit_start = time.perf_counter()
        install = getattr(trainer.strategy, "install_schedule", None)  # D2FTStrategy executes the schedule
        self._strategy_executes = install is not None
        if install is not None:
            install(self.schedule)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Resuming mid-epoch: skip the micro-batches this epoch already trained on, so that the rest of the
        epoch sees the same micro-batches (and ops) as an uninterrupted run. Lightning skips
        ``on_train_epoch_start`` in that case, so the epoch's micro-batch order is set here too."""
        loop = trainer.fit_loop
        if not loop.restarted_mid_epoch:
            return
        sampler = find_micro_batch_sampler(trainer.train_dataloader)
        # ``processed``, not ``completed``: a checkpoint saved in on_train_batch_end has the batch processed
        # but not yet marked completed (Lightning marks it when its loop resets, after this hook)
        sampler.skip = loop.epoch_loop.batch_progress.current.processed
        self._ids = sampler.micro_batch_ids(trainer.current_epoch)
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        rank_zero_info(f"D2FT: resuming epoch {trainer.current_epoch} after micro-batch {sampler.skip}")

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        sampler = find_micro_batch_sampler(trainer.train_dataloader)
        self._ids = sampler.micro_batch_ids(trainer.current_epoch)

    def micro_batch_of(self, batch_idx: int) -> int:
        """The micro-batch that training batch ``batch_idx`` of the current epoch holds (-1 if unknown)."""
        return int(self._ids[batch_idx]) if 0 <= batch_idx < len(self._ids) else -1

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not getattr(self, "_strategy_executes", False):
            self._net.scheduled_ops = self.schedule.ops[self._ids[batch_idx]]

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if getattr(self, "_strategy_executes", False):  # the strategy counts, logs and clears the ops
            return
        ops = self._net.scheduled_ops
        mine = self.schedule.placement == 0
        fraction = float(self.cost.compute(ops[mine]).sum() / (mine.sum() * self.cost.full))
        pl_module.log("d2ft/compute_fraction", fraction, on_step=True, on_epoch=True)
        self._net.scheduled_ops = None

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        seconds = time.perf_counter() - self._fit_start
        s = self.schedule
        rank_zero_info(
            f"D2FT: compute {s.compute_fraction:.3f} and predicted wire traffic {s.wire_fraction:.3f} of all-FULL; "
            f"scoring took {self.scoring_seconds:.1f} s, {self.scoring_seconds / max(seconds, 1e-9):.1%} of the "
            f"{seconds:.1f} s of training"
        )

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
