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

import logging
import os
from datetime import timedelta
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, TorchCheckpointIO
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_d2ft.collectives import CommStats, SparseTensorParallel
from lightning_d2ft.files import atomic_write
from lightning_d2ft.partition import D2FTViT, find_d2ft, shard_state_dict, unshard_state_dict
from lightning_d2ft.placement import groups_of_rank, round_robin

__all__ = ["AtomicCheckpointIO", "D2FTStrategy"]
log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file and rename: a crash mid-save leaves the previous checkpoint intact."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        import io

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, buffer.getvalue())


class _WholeModelSpawnLauncher(_MultiProcessingLauncher):
    """Lightning's spawn launcher, but it sends the main process the whole model, not rank 0's shard."""

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


class D2FTStrategy(DDPStrategy):
    """Shard a D2FTViT over tensor-parallel ranks and execute the D2FT schedule.

    Args:
        tensor_parallel_size: ranks that share one model replica ("auto": all ranks). The world size must
            be a multiple of it; the quotient is the number of data-parallel replicas.
        placement: ``owner[block, group]`` rank of every head group, or a callable
            ``(depth, groups_per_block, tensor_parallel_size) -> owner``; default round-robin.
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
    ) -> None:
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io or AtomicCheckpointIO(), precision_plugin=precision_plugin,
            process_group_backend=process_group_backend, timeout=timeout, start_method=start_method,
        )
        if tensor_parallel_size != "auto" and (not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1):
            raise ValueError(f"tensor_parallel_size must be a positive int or 'auto', got {tensor_parallel_size!r}")
        self._tp_size_arg = tensor_parallel_size
        self._placement_arg = placement
        self.tp: SparseTensorParallel | None = None
        self._dp_group: dist.ProcessGroup | None = None
        self.dp_bytes = 0  # bytes this rank sent for data-parallel gradient sync
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

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # every tensor-parallel rank of a replica must see the same micro-batches
        return {"num_replicas": self.data_parallel_size, "rank": self.data_parallel_rank}

    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
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

    def placement_for(self, net: D2FTViT) -> Tensor:
        """The placement this strategy will use for ``net`` (before or after sharding)."""
        return net.group_owner.cpu() if net.tp is not None else self._resolve_placement(net)

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        def closure_then_sync() -> Any:
            out = closure()
            self._sync_data_parallel_grads(optimizer)
            return out

        return super().optimizer_step(optimizer, closure_then_sync, model, **kwargs)

    def _sync_data_parallel_grads(self, optimizer: Optimizer) -> None:
        if self.data_parallel_size == 1:
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
