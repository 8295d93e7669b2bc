"""D2FTStrategy: tensor-parallel D2FT in Lightning, on a (data-parallel x tensor-parallel) mesh.

It is a :class:`~lightning.pytorch.strategies.DDPStrategy` for everything about processes (launchers,
cluster environments, ``torchrun``/SLURM, process groups, barrier, broadcast), but instead of wrapping the
model in DistributedDataParallel it shards the model's :class:`D2FTViT` over the tensor-parallel ranks: each
rank keeps only its own subnets' weights (and so only their optimizer state). Blocks sum their partial
outputs across ranks with :class:`SparseTensorParallel`, which sends nothing for silent ranks and counts
bytes. With several data-parallel replicas, gradients are all-reduced across replicas once per optimizer
step: the replicas agree on which parameters have a gradient (a head group FULL in any replica's
micro-batch) and average only those; the others stay without one, so no optimizer moves them. No graph
search for unused parameters is needed: the schedule decides which gradients exist.

Checkpoints hold the whole unsharded model (plain timm keys under the module's prefix) and unsharded
optimizer state keyed by parameter name, so a run resumes on the same or a different world size.

Every Lightning hook the strategy touches is in this file, and each hands its work to one composed object
or function: the :class:`ScheduleRunner` (ops per batch, logging), :class:`ShardedCheckpoints` (gather on
save, cut on load), the :class:`StepGuard` (non-finite data, SIGTERM), the :class:`Replicas` (data-parallel
sync or lo-fi averaging) and :func:`clip_grad_by_global_norm`. No mixin of ours is in its MRO.
"""

from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import _destroy_dist_connection
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_d2ft.data.micro_batches import MicroBatchSampler, with_micro_batches
from lightning_d2ft.model.optimizers import check_optimizer
from lightning_d2ft.model.vit import find_d2ft
from lightning_d2ft.parallel.collectives import CommStats, SparseTensorParallel
from lightning_d2ft.parallel.grad_norm import clip_grad_by_global_norm, sharded_parameter_ids
from lightning_d2ft.parallel.mesh import check_tensor_parallel_size, mesh_groups, tensor_parallel_size_for
from lightning_d2ft.parallel.placement import Placement, PlacementArg, check_placement_arg, resolve_placement
from lightning_d2ft.parallel.replicas import Replicas, make_replicas
from lightning_d2ft.strategy.checkpointing import AtomicCheckpointIO, ShardedCheckpoints
from lightning_d2ft.strategy.launchers import _WholeModelSpawnLauncher, sigterm_exit
from lightning_d2ft.strategy.schedule_runner import ScheduleRunner
from lightning_d2ft.strategy.step_guard import StepGuard

if TYPE_CHECKING:
    from lightning_d2ft.schedule.schedule import Schedule

__all__ = ["AtomicCheckpointIO", "D2FTStrategy"]
log = logging.getLogger(__name__)


class D2FTStrategy(DDPStrategy):
    """Shard a D2FTViT over tensor-parallel ranks and execute the D2FT schedule.

    Args:
        tensor_parallel_size: ranks that share one model replica ("auto": all ranks). The world size must
            be a multiple of it; the quotient is the number of data-parallel replicas.
        placement: ``owner[block, group]`` rank of every head group, a callable
            ``(depth, groups_per_block, tensor_parallel_size) -> owner``, ``speed_aware(...)`` (which also
            declares the ranks' speeds) or a :class:`Placement`; default round-robin. It is resolved once,
            when the model is sharded, into the one :class:`Placement` that ``strategy.placement``, the model
            and the callback share.
        on_nonfinite: what a NaN/inf input or loss does: "raise" (stop, naming the step and micro-batch;
            nothing from that step is applied or saved) or "skip" (drop that micro-batch's update, warn,
            count it in ``skipped_steps``). All ranks agree (one tiny all-reduce per step); the same
            all-reduce spreads a SIGTERM that reached any rank, and every rank stops after that step.
        defer_nonfinite_check: read each step's flags at the next step instead of at once (None: on CUDA with
            "raise"). Read at once they cost a host sync per step that idles the GPU. Deferred, a non-finite
            step still raises before any checkpoint, validation or the end of fit sees it, but its update
            has been applied in memory (the run stops; resume from the last checkpoint). Not with "skip".
        data_parallel: how data-parallel replicas (world size / tensor_parallel_size of them) stay together:
            "sync" all-reduces gradients every step (DDP); "lofi" trains them independently, with no
            gradient communication, and averages their weights once when fit ends (lo-fi), or every
            ``lofi_average_every_n_steps`` optimizer steps as well. Validation and checkpoints see the
            average of the replicas at that moment without changing them (a resumed lo-fi run restarts
            every replica from the checkpoint's average).
        use_micro_batch_sampler: swap a plain training sampler (sequential, random, distributed) for a
            :class:`MicroBatchSampler` of the same batch size (logged), as Lightning injects
            DistributedSampler; False leaves the loader alone (it must then yield fixed micro-batches).
        timeout: how long any collective waits for a peer before it fails, naming the op and the rank.
        sigterm_grace_s: after SIGTERM, a rank that has not stopped within this many seconds (stuck in a
            collective whose peer hung) exits with status 143.
        cuda_graphs: replay each block's training forward+backward as CUDA graphs, one pair per (block, FULL
            groups, active groups) captured on first use, whatever the data (see
            :mod:`lightning_d2ft.model.cuda_graphs`): None (default) on a CUDA device without tensor
            parallelism, False never. Host launch overhead otherwise bounds a ViT-S step on a GPU.
        The remaining arguments are DDPStrategy's (launcher, backend, ...).
    """
    strategy_name = "d2ft"

    def __init__(
        self,
        tensor_parallel_size: int | Literal["auto"] = "auto",
        placement: PlacementArg = None,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        on_nonfinite: Literal["raise", "skip"] = "raise",
        data_parallel: Literal["sync", "lofi"] = "sync",
        lofi_average_every_n_steps: int | None = None,
        use_micro_batch_sampler: bool = True,
        sigterm_grace_s: float = 60.0,
        cuda_graphs: bool | None = None,
        defer_nonfinite_check: bool | None = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io or AtomicCheckpointIO(), precision_plugin=precision_plugin,
            process_group_backend=process_group_backend, timeout=timeout, start_method=start_method,
        )
        check_tensor_parallel_size(tensor_parallel_size)
        check_placement_arg(placement)
        if data_parallel not in ("sync", "lofi"):
            raise ValueError(f"data_parallel must be 'sync' (all-reduce gradients every step) or 'lofi' "
                             f"(independent replicas, weights averaged at the end), got {data_parallel!r}")
        if lofi_average_every_n_steps is not None and (data_parallel != "lofi" or lofi_average_every_n_steps < 1):
            raise ValueError(f"lofi_average_every_n_steps must be a positive int and needs data_parallel='lofi', "
                             f"got {lofi_average_every_n_steps!r} with data_parallel={data_parallel!r}")
        if cuda_graphs not in (None, True, False):
            raise ValueError(f"cuda_graphs must be None (on for CUDA without tensor parallelism), True or False, "
                             f"got {cuda_graphs!r}")
        self._tp_size_arg, self._placement_arg = tensor_parallel_size, placement
        if parallel_devices is not None:
            self._check_tp_divides(len(parallel_devices))
        self.data_parallel, self.lofi_every = data_parallel, lofi_average_every_n_steps
        self.use_micro_batch_sampler, self.cuda_graphs = use_micro_batch_sampler, cuda_graphs
        # the composed parts: each Lightning hook below hands its work to one of them
        self.runner = ScheduleRunner()
        self.guard = StepGuard(grace_s=sigterm_grace_s, on_nonfinite=on_nonfinite, defer=defer_nonfinite_check)
        self.replicas: Replicas = Replicas(None, 1, 0)
        self.tp: SparseTensorParallel | None = None
        self.tensor_parallel_group: dist.ProcessGroup | None = None
        self.data_parallel_group: dist.ProcessGroup | None = None
        self._sharded_ids: set[int] = set()

    # -- the mesh ---------------------------------------------------------------------------------
    def _check_tp_divides(self, world: int) -> int:
        return tensor_parallel_size_for(world, self._tp_size_arg)

    @property
    def tensor_parallel_size(self) -> int:
        return self._check_tp_divides(self.world_size)

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.tensor_parallel_size

    @property
    def tensor_parallel_rank(self) -> int:
        return self.global_rank % self.tensor_parallel_size

    @property
    def data_parallel_rank(self) -> int:
        return self.global_rank // self.tensor_parallel_size

    @property
    def placement(self) -> Placement | None:
        """Which rank holds which head group (owner table, speeds, column devices): the one :class:`Placement`
        resolved when the model was sharded, stored on the model; None before."""
        module = self.lightning_module
        return find_d2ft(module).placement if module is not None else None

    # -- what the parts expose --------------------------------------------------------------------
    @property
    def schedule(self) -> Schedule | None:
        """The schedule being executed (None: every subnet runs FULL)."""
        return self.runner.schedule

    def install_schedule(self, schedule: Schedule) -> None:
        """From now on every training batch runs its micro-batch's row of ``schedule`` (D2FTCallback calls it)."""
        self.runner.install(schedule)

    def micro_batch_of(self, batch_idx: int) -> int:
        """The micro-batch id training batch ``batch_idx`` of the current epoch holds (-1 if unknown)."""
        return self.runner.micro_batch_of(self.lightning_module.trainer, batch_idx)

    @property
    def skipped_steps(self) -> list[dict[str, int]]:
        """Where each step skipped for non-finite data was (``on_nonfinite="skip"``)."""
        return self.guard.skipped_steps

    @property
    def comm_stats(self) -> CommStats:
        """Bytes this rank sent through the tensor-parallel collectives."""
        return self.tp.stats if self.tp is not None else CommStats()

    @property
    def dp_bytes(self) -> int:
        """Bytes this rank sent for data-parallel sync (gradients, or lo-fi weight averages)."""
        return self.replicas.bytes_sent

    # -- processes and data ---------------------------------------------------------------------
    @override
    def _configure_launcher(self) -> None:
        # refuse a bad size here, before any process starts (the accelerator connector knows the devices)
        self._check_tp_divides(self.num_nodes * len(self.parallel_devices or [None]))
        super()._configure_launcher()
        if self._start_method != "popen":
            self._launcher = _WholeModelSpawnLauncher(self, start_method=self._start_method)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # every tensor-parallel rank of a replica must see the same micro-batches
        return {"num_replicas": self.data_parallel_size, "rank": self.data_parallel_rank}

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """The training loader gets fixed micro-batches (a plain sampler is swapped for a MicroBatchSampler,
        as Lightning injects DistributedSampler), pointed at this rank's data-parallel replica before
        Lightning measures the loader (the epoch length, and so when validation runs, depend on it)."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.state.stage == RunningStage.TRAINING and self.use_micro_batch_sampler:
            dataloader = with_micro_batches(dataloader, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
        sampler = getattr(dataloader, "sampler", None)
        if isinstance(sampler, MicroBatchSampler):
            sampler.set_replicas(self.data_parallel_size, self.data_parallel_rank)
        return super().process_dataloader(dataloader)

    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        atexit.register(_destroy_dist_connection)  # see launchers._WholeModelSpawnLauncher
        tp, dp = self.tensor_parallel_size, self.data_parallel_size
        self.tensor_parallel_group, self.data_parallel_group = mesh_groups(
            tp, dp, self.tensor_parallel_rank, self.data_parallel_rank, self._timeout)
        group = self.tensor_parallel_group if dp > 1 else None  # None: the world group
        self.tp = SparseTensorParallel(group, self.tensor_parallel_rank, tp)
        self.replicas = make_replicas(self.data_parallel, self.data_parallel_group, dp, self.data_parallel_rank,
                                      self.lofi_every)

    # -- the model --------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Any) -> None:
        """DDPStrategy.setup, except that outside fit a sharded model is not overwritten by rank 0's shard
        (Lightning broadcasts every tensor of rank 0 to make replicas equal, which shards are not)."""
        net = find_d2ft(self.model) if self.model is not None else None
        if trainer.state.fn != TrainerFn.FITTING and net is not None and net.tp is not None:
            self.accelerator.setup(trainer)
            self.precision_plugin.convert_module(self.model)
            self.model_to_device()
            self.setup_precision_plugin()
            return
        super().setup(trainer)
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_global_norm
        for optimizer in self.optimizers:  # only FULL subnets may learn: refuse or warn about one that moves others
            check_optimizer(optimizer)

    @override
    def configure_ddp(self) -> None:
        """Shard instead of wrapping in DistributedDataParallel; rank 0's whole model first goes to every
        rank, so that every rank starts from the same weights with or without ``seed_everything``."""
        net = find_d2ft(self.lightning_module)
        if net.tp is None:
            if self.world_size > 1:
                _sync_module_states(self.model)
            net.shard_(resolve_placement(self._placement_arg, net.depth, net.groups_per_block,
                                         self.tensor_parallel_size), self.tp)
        self._sharded_ids = sharded_parameter_ids(net, self.tensor_parallel_size)
        graphs = self.cuda_graphs is not False and self.root_device.type == "cuda" and self.tensor_parallel_size == 1
        if self.cuda_graphs and not graphs:
            rank_zero_warn("cuda_graphs=True needs a CUDA device and tensor_parallel_size 1; running eagerly")
        net.use_cuda_graphs(graphs)

    def _clip_grad_by_global_norm(self, optimizer: Optimizer, clip_val: float) -> None:
        """clip_grad_norm_ over the whole sharded model (see :mod:`lightning_d2ft.parallel.grad_norm`)."""
        clip_grad_by_global_norm(optimizer, clip_val, self._sharded_ids, self.tp.group if self.tp is not None else None,
                                 self.global_rank, self.tensor_parallel_size)

    # -- training: the runner sets each batch's ops, the guard checks each step ----------------------
    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        trainer = self.lightning_module.trainer
        if self.runner.schedule is None:
            _warn_no_schedule()
        self.runner.resume_mid_epoch(trainer)
        self.guard.discard()
        if self.world_size > 1:
            self.guard.install_sigterm_handler(self.global_rank)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.runner.start_batch(self.lightning_module, batch_idx)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Lightning's step, then the step guard: every rank agrees on non-finite data and SIGTERM."""
        out = super().training_step(*args, **kwargs)
        batch = args[0] if args else kwargs.get("batch")
        batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx", -1)
        loss = out["loss"] if isinstance(out, dict) else out
        skip, sigterm = self.guard.check(batch, loss, self._where(batch_idx), self.world_size, self.global_rank)
        self._note_sigterm(sigterm)
        # not None (Lightning refuses that on several processes): a zero loss outside the model, so the
        # backward runs no collective on any rank and adds no gradient (the optimizer skips None grads)
        return torch.zeros((), requires_grad=True) if skip else out

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        out = super().backward(closure_loss, optimizer, *args, **kwargs)
        self.runner.log_bytes(self.lightning_module, self.comm_stats.total_bytes + self.dp_bytes)
        return out

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        def closure_then_sync() -> Any:
            out = closure()
            self.replicas.after_backward(optimizer)
            return out

        out = super().optimizer_step(optimizer, closure_then_sync, model, **kwargs)
        self.replicas.after_step(_lazy(self._replica_tensors))  # walked only when replicas average
        return out

    @override
    def on_train_end(self) -> None:
        self._settle_deferred_check()
        super().on_train_end()
        self.runner.stop(self.lightning_module)
        graphs = find_d2ft(self.lightning_module).graphs
        if graphs is not None and (graphs.captures or graphs.failure):
            rank_zero_info(graphs.summary())  # the capture time is the first epochs' one-off cost
        if self.replicas.differ:  # lo-fi: the replicas' mean is the model
            self.replicas.average_(self._replica_tensors())

    @override
    def teardown(self) -> None:
        self.guard.stop_watchdog()
        self.guard.discard()
        super().teardown()

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        module = self.lightning_module
        if module is not None and module._trainer is not None:
            sigterm_exit(exception, module.trainer)

    def _where(self, batch_idx: int) -> dict[str, int]:
        trainer = self.lightning_module.trainer
        return {"global_step": trainer.global_step, "epoch": trainer.current_epoch, "batch_idx": batch_idx,
                "micro_batch": self.micro_batch_of(batch_idx)}

    def _note_sigterm(self, sigterm: bool) -> None:
        """Lightning's next-batch broadcast then stops every rank together (SIGTERMException)."""
        if sigterm:
            self.lightning_module.trainer._signal_connector.received_sigterm = True

    def _settle_deferred_check(self) -> None:
        """A step found non-finite a step late raises before any checkpoint, validation or the end of fit."""
        self._note_sigterm(self.guard.settle_deferred())

    # -- evaluation sees the lo-fi replicas' mean ------------------------------------------------------
    @override
    def on_validation_start(self) -> None:
        self._settle_deferred_check()
        super().on_validation_start()
        self.replicas.evaluate_mean_(self._replica_tensors())

    @override
    def on_validation_end(self) -> None:
        super().on_validation_end()
        self.replicas.resume_own_(self._replica_tensors())

    def _replica_tensors(self) -> list[Tensor]:
        module = self.lightning_module
        return [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]

    # -- checkpoints: the whole model in, the whole model out ---------------------------------------
    def _checkpoints(self) -> ShardedCheckpoints:
        return ShardedCheckpoints(self.placement, self.tensor_parallel_rank, self.tensor_parallel_size,
                                  self.global_rank, self.tp.group if self.tp is not None else None)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        self._settle_deferred_check()  # a step found non-finite late raises before any checkpoint holds it
        return self._checkpoints().model_state(self.lightning_module, self.replicas)

    @override
    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        self._checkpoints().load_model_state(self.lightning_module, checkpoint["state_dict"], strict)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """Optimizer state with full-size tensors keyed by parameter name: independent of the world size."""
        return self._checkpoints().optimizer_state(optimizer, self.lightning_module)

    @override
    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self._checkpoints().load_optimizer_states(self.optimizers, checkpoint["optimizer_states"],
                                                  self.lightning_module)

    # -- registry -------------------------------------------------------------------------------
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("d2ft", cls, description="Distributed Dynamic Fine-Tuning (tensor-parallel D2FT)")
        strategy_registry.register("d2ft_spawn", cls, description="D2FT with spawned processes", start_method="spawn")


def _lazy(tensors: Callable[[], list[Tensor]]) -> Iterator[Tensor]:
    yield from tensors()


def _warn_no_schedule() -> None:
    """Once per process: a fit with no schedule installed is plain fine-tuning, every subnet FULL."""
    rank_zero_warn("D2FT: no schedule was installed, so every subnet runs FULL (plain fine-tuning, no savings). "
                   "Add the planner: Trainer(..., callbacks=[D2FTCallback(budget=0.6)]).", category=UserWarning)


def _register() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    if "d2ft" not in StrategyRegistry:
        D2FTStrategy.register_strategies(StrategyRegistry)


_register()
