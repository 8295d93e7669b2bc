"""D2FTStrategy: tensor-parallel D2FT in Lightning, on a (data-parallel x tensor-parallel) mesh.

It is a :class:`~lightning.pytorch.strategies.DDPStrategy` for everything about processes (launchers,
cluster environments, ``torchrun``/SLURM, process groups, barrier, broadcast), but instead of wrapping the
model in DistributedDataParallel it shards the model's :class:`D2FTViT` over the tensor-parallel ranks: each
rank keeps only its own subnets' weights (and so only their optimizer state). Blocks sum their partial
outputs across ranks with :class:`SparseTensorParallel`, which sends nothing for silent ranks and counts
bytes. With several data-parallel replicas, gradients are all-reduced across replicas once per optimizer
step (every local parameter; one that got no gradient in this replica contributes zeros). No graph search
for unused parameters is needed: the schedule decides which gradients exist.

Checkpoints hold the whole unsharded model (plain timm keys under the module's prefix) and unsharded
optimizer state keyed by parameter name, so a run resumes on the same or a different world size.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from datetime import timedelta
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, TorchCheckpointIO
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import _destroy_dist_connection
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_d2ft.collectives import CommStats, SparseTensorParallel
from lightning_d2ft.data import MicroBatchSampler
from lightning_d2ft.files import atomic_write
from lightning_d2ft.lora import match_lora_
from lightning_d2ft.partition import D2FTViT, find_d2ft, shard_state_dict, unshard_state_dict
from lightning_d2ft.placement import groups_of_rank, round_robin

__all__ = ["AtomicCheckpointIO", "D2FTStrategy"]
log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file and rename: a crash mid-save leaves the previous checkpoint intact.
    A checkpoint whose weights hold NaN/inf is refused: it would overwrite the last good one."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        import io

        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise FloatingPointError(f"refusing to write checkpoint {path}: NaN/inf in {bad[:5]}"
                                     f"{' and more' if len(bad) > 5 else ''}; the previous checkpoint is kept")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, buffer.getvalue())


class _WholeModelSpawnLauncher(_MultiProcessingLauncher):
    """Lightning's spawn launcher, but it sends the main process the whole model, not rank 0's shard,
    and each worker destroys its process group before it exits."""

    @override
    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        try:
            super()._wrapping_function(*args, **kwargs)
        except SIGTERMException as stop:
            # a SystemExit with code 0: the worker would look finished and the main process would wait
            # for its results forever; report the stop as the failure it is
            raise RuntimeError("fit stopped by SIGTERM; resume from the last checkpoint") from stop
        # a gloo group left to interpreter finalization can abort the worker (SIGABRT, "terminate called
        # without an active exception"); Lightning destroys groups at exit only for NCCL
        _destroy_dist_connection()

    @override
    def _collect_rank_zero_results(self, trainer: Any, results: Any) -> _WorkerOutput | None:
        callback = trainer.checkpoint_callback
        best_model_path = getattr(callback, "best_model_path", None) if callback else None
        state_dict = self._strategy.lightning_module_state_dict()  # a collective: every rank takes part
        if self._strategy.local_rank != 0:
            return None
        weights_path = None
        if trainer.state.fn == TrainerFn.FITTING:
            import tempfile

            weights_path = os.path.join(tempfile.mkdtemp(), ".temp.ckpt")
            self._strategy.checkpoint_io.save_checkpoint(state_dict, weights_path)
        return _WorkerOutput(best_model_path, weights_path, trainer.state, results, self.get_extra_results(trainer))

    @override
    def _recover_results_in_main_process(self, worker_output: _WorkerOutput, trainer: Any) -> None:
        if worker_output.weights_path is not None:  # Lightning loads non-strictly: adapters would be dropped
            state = self._strategy.checkpoint_io.load_checkpoint(worker_output.weights_path)
            match_lora_(find_d2ft(trainer.lightning_module), state)
        super()._recover_results_in_main_process(worker_output, trainer)


class D2FTStrategy(DDPStrategy):
    """Shard a D2FTViT over tensor-parallel ranks and execute the D2FT schedule.

    Args:
        tensor_parallel_size: ranks that share one model replica ("auto": all ranks). The world size must
            be a multiple of it; the quotient is the number of data-parallel replicas.
        placement: ``owner[block, group]`` rank of every head group, or a callable
            ``(depth, groups_per_block, tensor_parallel_size) -> owner``; default round-robin.
        on_nonfinite: what a NaN/inf input or loss does: "raise" (stop, naming the step and micro-batch;
            nothing from that step is applied or saved) or "skip" (drop that micro-batch's update, warn,
            count it in ``skipped_steps``). All ranks agree (one tiny all-reduce per step); the same
            all-reduce spreads a SIGTERM that reached any rank, and every rank stops after that step.
        data_parallel: how data-parallel replicas (world size / tensor_parallel_size of them) stay together:
            "sync" all-reduces gradients every step (DDP); "lofi" trains them independently, with no
            gradient communication, and averages their weights once when fit ends (lo-fi), or every
            ``lofi_average_every_n_steps`` optimizer steps as well. Validation and checkpoints see the
            average of the replicas at that moment without changing them (a resumed lo-fi run restarts
            every replica from the checkpoint's average).
        The remaining arguments are DDPStrategy's (launcher, backend, timeout, ...).
    """

    strategy_name = "d2ft"

    def __init__(
        self,
        tensor_parallel_size: int | Literal["auto"] = "auto",
        placement: Tensor | Callable[[int, int, int], Tensor] | None = None,
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
    ) -> None:
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io or AtomicCheckpointIO(), precision_plugin=precision_plugin,
            process_group_backend=process_group_backend, timeout=timeout, start_method=start_method,
        )
        if tensor_parallel_size != "auto" and (not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1):
            raise ValueError(f"tensor_parallel_size must be a positive int or 'auto', got {tensor_parallel_size!r}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if data_parallel not in ("sync", "lofi"):
            raise ValueError(f"data_parallel must be 'sync' (all-reduce gradients every step) or 'lofi' "
                             f"(independent replicas, weights averaged at the end), got {data_parallel!r}")
        if lofi_average_every_n_steps is not None and (data_parallel != "lofi" or lofi_average_every_n_steps < 1):
            raise ValueError(f"lofi_average_every_n_steps must be a positive int and needs data_parallel='lofi', "
                             f"got {lofi_average_every_n_steps!r} with data_parallel={data_parallel!r}")
        self.data_parallel, self.lofi_every = data_parallel, lofi_average_every_n_steps
        self._lofi_steps = 0
        self._replicas_differ = False  # lo-fi: a step since the last average (replicas start identical)
        self._own_weights: list[Tensor] | None = None  # lo-fi: a replica's weights while validation sees the mean
        self.on_nonfinite = on_nonfinite
        self.skipped_steps: list[dict[str, int]] = []
        self._sigterm_seen = False
        self._tp_size_arg = tensor_parallel_size
        self._placement_arg = placement
        self.tp: SparseTensorParallel | None = None
        self._dp_group: dist.ProcessGroup | None = None
        self.dp_bytes = 0  # bytes this rank sent for data-parallel sync (gradients, or lo-fi weight averages)
        self.placement: Tensor | None = None  # owner[block, group], once the model is sharded

    # -- mesh -----------------------------------------------------------------------------------
    @property
    def tensor_parallel_size(self) -> int:
        world = self.world_size
        tp = world if self._tp_size_arg == "auto" else self._tp_size_arg
        if world % tp:
            raise ValueError(f"world size {world} is not a multiple of tensor_parallel_size={tp}; use a divisor "
                             f"of {world}: {[d for d in range(1, world + 1) if world % d == 0]}")
        return tp

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.tensor_parallel_size

    @property
    def tensor_parallel_rank(self) -> int:
        return self.global_rank % self.tensor_parallel_size

    @property
    def data_parallel_rank(self) -> int:
        return self.global_rank // self.tensor_parallel_size

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if self._start_method != "popen":
            self._launcher = _WholeModelSpawnLauncher(self, start_method=self._start_method)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Point a MicroBatchSampler at this rank's data-parallel replica before Lightning measures the
        loader (the epoch length, and so when validation runs, depend on it)."""
        sampler = getattr(dataloader, "sampler", None)
        if isinstance(sampler, MicroBatchSampler):
            sampler.set_replicas(self.data_parallel_size, self.data_parallel_rank)
        return super().process_dataloader(dataloader)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # every tensor-parallel rank of a replica must see the same micro-batches
        return {"num_replicas": self.data_parallel_size, "rank": self.data_parallel_rank}

    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        atexit.register(_destroy_dist_connection)  # see _WholeModelSpawnLauncher._wrapping_function
        tp, dp = self.tensor_parallel_size, self.data_parallel_size
        tp_group = None
        # every rank creates every group, in the same order (a torch.distributed rule)
        for r in range(dp):
            group = dist.new_group(list(range(r * tp, (r + 1) * tp))) if dp > 1 else None
            if r == self.data_parallel_rank:
                tp_group = group
        for t in range(tp):
            group = dist.new_group(list(range(t, tp * dp, tp))) if dp > 1 else None
            if t == self.tensor_parallel_rank:
                self._dp_group = group
        self.tp = SparseTensorParallel(tp_group, self.tensor_parallel_rank, tp)

    @property
    def comm_stats(self) -> CommStats:
        return self.tp.stats if self.tp is not None else CommStats()

    # -- model ----------------------------------------------------------------------------------
    @override
    def configure_ddp(self) -> None:
        """Shard instead of wrapping in DistributedDataParallel."""
        net = find_d2ft(self.lightning_module)
        if net.tp is None:
            net.shard_(self._resolve_placement(net), self.tp)
        self.placement = net.group_owner.cpu()

    def _resolve_placement(self, net: D2FTViT) -> Tensor:
        tp = self.tensor_parallel_size
        if self._placement_arg is None:
            return round_robin(net.depth, net.groups_per_block, tp)
        owner = self._placement_arg(net.depth, net.groups_per_block, tp) if callable(self._placement_arg) \
            else torch.as_tensor(self._placement_arg)
        owner = owner.long().view(net.depth, net.groups_per_block)
        for rank in range(tp):
            if any(not g for g in groups_of_rank(owner, rank)):
                raise ValueError(f"placement gives rank {rank} no head group in some block; every rank needs "
                                 f"at least one group of every block")
        return owner

    @property
    def speeds(self) -> list[float] | None:
        """Relative tensor-parallel rank speeds if the placement declares them (``speed_aware``), else None."""
        return getattr(self._placement_arg, "speeds", None)

    def placement_for(self, net: D2FTViT) -> Tensor:
        """The placement this strategy will use for ``net`` (before or after sharding)."""
        return net.group_owner.cpu() if net.tp is not None else self._resolve_placement(net)

    # -- per-step agreement: non-finite data and SIGTERM ------------------------------------------
    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self._sigterm_seen = False
        if self.world_size > 1 and threading.current_thread() is threading.main_thread():
            # Lightning's SIGTERM handler broadcasts from inside the handler: when only some ranks get the
            # signal, the others are inside a tensor-parallel collective and every rank hangs. Ours only
            # notes it; the next step's flag all-reduce tells every rank (Lightning restores its handlers
            # at teardown).
            signal.signal(signal.SIGTERM, self._note_sigterm)

    def _note_sigterm(self, signum: int, frame: Any) -> None:
        log.warning(f"[rank {self.global_rank}] received SIGTERM: every rank stops after this step")
        self._sigterm_seen = True

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().training_step(*args, **kwargs)
        batch = args[0] if args else kwargs.get("batch")
        batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx", -1)
        loss = out["loss"] if isinstance(out, dict) else out
        what, sigterm = self._agree(batch, loss)
        trainer = self.lightning_module.trainer
        if sigterm:  # Lightning's next-batch broadcast then stops every rank together (SIGTERMException)
            trainer._signal_connector.received_sigterm = True
        if not what:
            return out
        where = {"global_step": trainer.global_step, "epoch": trainer.current_epoch, "batch_idx": batch_idx,
                 "micro_batch": _micro_batch_of(trainer, batch_idx)}
        message = (f"non-finite {what} at global step {where['global_step']} (epoch {where['epoch']}, batch "
                   f"{batch_idx}, micro-batch {where['micro_batch']})")
        if self.on_nonfinite == "skip":
            self.skipped_steps.append(where)
            log.warning(f"{message}: skipped (on_nonfinite='skip')")
            return None  # Lightning runs no backward and the optimizer sees no gradient
        raise FloatingPointError(f"{message}. Nothing from this step was applied or saved; the last checkpoint "
                                 "is intact. Fix the data, or pass D2FTStrategy(on_nonfinite='skip').")

    def _agree(self, batch: Any, loss: Any) -> tuple[str, bool]:
        """('input' | 'loss' | '', any rank got SIGTERM), the same on every rank (one 2-int all-reduce),
        so that all raise, skip or stop together."""
        from lightning.fabric.utilities.apply_func import apply_to_collection

        flags = [False]
        apply_to_collection(batch, Tensor, lambda t: flags.__setitem__(
            0, flags[0] or (t.is_floating_point() and not bool(torch.isfinite(t).all()))))
        bad_loss = torch.is_tensor(loss) and not bool(torch.isfinite(loss).all())
        code = torch.tensor([2 if flags[0] else (1 if bad_loss else 0), int(self._sigterm_seen)])
        if self.world_size > 1 and dist.is_initialized():
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return {0: "", 1: "loss", 2: "input"}[int(code[0])], bool(code[1])

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        def closure_then_sync() -> Any:
            out = closure()
            self._sync_data_parallel_grads(optimizer)
            return out

        out = super().optimizer_step(optimizer, closure_then_sync, model, **kwargs)
        if self.data_parallel == "lofi" and self.data_parallel_size > 1:
            self._replicas_differ = True
            self._lofi_steps += 1
            if self.lofi_every and self._lofi_steps % self.lofi_every == 0:
                self._average_replicas_()
        return out

    # -- lo-fi: independent replicas, weights averaged -------------------------------------------
    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        if self._replicas_differ:
            self._average_replicas_()

    @override
    def on_validation_start(self) -> None:
        """lo-fi: evaluate the replicas' mean (the model lo-fi delivers), then give each replica its own
        weights back, so that evaluation does not change training."""
        super().on_validation_start()
        if self._replicas_differ:
            self._own_weights = [t.detach().clone() for t in self._replica_tensors()]
            self._average_replicas_()

    @override
    def on_validation_end(self) -> None:
        super().on_validation_end()
        own = self._own_weights
        if own is not None:
            with torch.no_grad():
                for t, saved in zip(self._replica_tensors(), own):
                    t.copy_(saved)
            self._own_weights = None
            self._replicas_differ = True

    def _replica_tensors(self) -> list[Tensor]:
        module = self.lightning_module
        return [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]

    def _average_replicas_(self) -> None:
        """Replace every replica's weights by their mean (one all-reduce per tensor, bytes counted)."""
        with torch.no_grad():
            for t in self._replica_tensors():
                t.copy_(self._replica_mean(t))
        self._replicas_differ = False

    def _replica_mean(self, t: Tensor) -> Tensor:
        if self.data_parallel_size == 1:
            return t
        total = t.detach().clone()
        dist.all_reduce(total, group=self._dp_group)
        n = self.data_parallel_size
        self.dp_bytes += total.numel() * total.element_size() * 2 * (n - 1) // n
        return total.div_(n)

    def _sync_data_parallel_grads(self, optimizer: Optimizer) -> None:
        if self.data_parallel_size == 1 or self.data_parallel == "lofi":
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=self._dp_group)
                p.grad.div_(self.data_parallel_size)
                n = self.data_parallel_size
                self.dp_bytes += p.grad.numel() * p.grad.element_size() * 2 * (n - 1) // n

    # -- checkpoints: whole model in, whole model out -------------------------------------------
    def _gather_shards(self, local: dict[str, Tensor]) -> list[tuple[list[list[int]], dict[str, Tensor]]]:
        shards: list[Any] = [None] * self.tensor_parallel_size
        payload = {k: v.detach().cpu() for k, v in local.items()}
        dist.all_gather_object(shards, payload, group=self.tp.group)
        return [(groups_of_rank(self.placement, r), sd) for r, sd in enumerate(shards)]

    def _full_shapes(self, net: D2FTViT, prefix: str) -> dict[str, torch.Size]:
        return {prefix + k: v for k, v in net.full_shapes.items()}

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        module = self.lightning_module
        net = find_d2ft(module)
        state = module.state_dict()
        if self._replicas_differ:  # the lo-fi model is the replicas' mean (every rank takes part)
            state = {k: self._replica_mean(v) if v.is_floating_point() else v for k, v in state.items()}
        if net.tp is None or self.tensor_parallel_size == 1:
            return state
        prefix = _prefix_of(module, net)
        vit_keys = {k for k in state if k.startswith(prefix)}
        shards = self._gather_shards({k: state[k] for k in vit_keys})
        full = unshard_state_dict(self._full_shapes(net, prefix), net.groups_per_block, shards)
        return {**{k: v for k, v in state.items() if k not in vit_keys}, **full}

    @override
    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        net = find_d2ft(module)
        state = checkpoint["state_dict"]
        match_lora_(net, state)
        if net.tp is not None and self.tensor_parallel_size > 1:
            state = self._shard_full(state, net)
        module.load_state_dict(state, strict=strict)

    def _shard_full(self, state: dict[str, Tensor], net: D2FTViT) -> dict[str, Tensor]:
        groups = groups_of_rank(self.placement, self.tensor_parallel_rank)
        return shard_state_dict(state, net.groups_per_block, groups)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """Optimizer state with full-size tensors keyed by parameter name: independent of the world size."""
        module = self.lightning_module
        net = find_d2ft(module)
        names = {id(p): n for n, p in module.named_parameters()}
        sd = optimizer.state_dict()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        by_name = {names[id(p)]: sd["state"].get(i, {}) for i, p in enumerate(params)}
        if net.tp is not None and self.tensor_parallel_size > 1:
            by_name = self._unshard_optimizer_state(by_name, net, _prefix_of(module, net))
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in pg["params"]]}
                  for g, pg in zip(sd["param_groups"], optimizer.param_groups)]
        return {"d2ft_by_name": True, "state": by_name, "param_groups": groups}

    def _unshard_optimizer_state(self, by_name: dict, net: D2FTViT, prefix: str) -> dict:
        shapes = self._full_shapes(net, prefix)
        keys = sorted({k for st in by_name.values() for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0})
        out = {name: dict(st) for name, st in by_name.items()}
        for key in keys:  # e.g. exp_avg, exp_avg_sq: shaped like their parameter
            local = {n: st[key] for n, st in by_name.items() if key in st and n in shapes}
            shards = self._gather_shards(local)
            full = unshard_state_dict({n: shapes[n] for n in local}, net.groups_per_block, shards)
            for n, v in full.items():
                out[n][key] = v
        return out

    @override
    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        module = self.lightning_module
        net = find_d2ft(module)
        names = {id(p): n for n, p in module.named_parameters()}
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"]):
            if not saved.get("d2ft_by_name"):
                optimizer.load_state_dict(saved)
                continue
            params = [p for group in optimizer.param_groups for p in group["params"]]
            state = {}
            groups = groups_of_rank(self.placement, self.tensor_parallel_rank) if net.tp is not None else None
            for i, p in enumerate(params):
                st = dict(saved["state"].get(names[id(p)], {}))
                if groups is not None and self.tensor_parallel_size > 1:
                    st = {k: (shard_state_dict({names[id(p)]: v}, net.groups_per_block, groups)[names[id(p)]]
                              if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in st.items()}
                if st:
                    state[i] = st
            index, param_groups = 0, []
            for g, pg in zip(saved["param_groups"], optimizer.param_groups):
                param_groups.append({**g, "params": list(range(index, index + len(pg["params"])))})
                index += len(pg["params"])
            optimizer.load_state_dict({"state": state, "param_groups": param_groups})

    # -- registry -------------------------------------------------------------------------------
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("d2ft", cls, description="Distributed Dynamic Fine-Tuning (tensor-parallel D2FT)")
        strategy_registry.register("d2ft_spawn", cls, description="D2FT with spawned processes", start_method="spawn")


def _micro_batch_of(trainer: Any, batch_idx: int) -> int:
    """The micro-batch id a training batch index maps to (-1 without a D2FTCallback)."""
    from lightning_d2ft.callback import D2FTCallback  # the callback module imports this one

    for cb in trainer.callbacks:
        if isinstance(cb, D2FTCallback):
            return cb.micro_batch_of(batch_idx)
    return -1


def _prefix_of(module: torch.nn.Module, net: D2FTViT) -> str:
    for name, m in module.named_modules():
        if m is net:
            return f"{name}.vit." if name else "vit."
    raise RuntimeError("D2FTViT not found in the module")


def _register() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    if "d2ft" not in StrategyRegistry:
        D2FTStrategy.register_strategies(StrategyRegistry)


_register()
