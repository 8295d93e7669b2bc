"""Checkpoints of a sharded model hold the whole model: plain timm keys under the module's prefix, and
optimizer state keyed by parameter name with full-size tensors, so a run resumes on the same or another
world size. Every rank takes part in writing (the shards are gathered), rank 0 writes the file, atomically.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO
from torch.optim import Optimizer
from typing_extensions import override

from lightning_d2ft.io import atomic_write
from lightning_d2ft.model.lora import match_lora_
from lightning_d2ft.model.vit import D2FTViT, find_d2ft
from lightning_d2ft.parallel.collectives import named_collective
from lightning_d2ft.parallel.optim_state import full_optimizer_state, load_full_optimizer_state
from lightning_d2ft.parallel.sharding import shard_state_dict, unshard_state_dict

__all__ = ["AtomicCheckpointIO", "FullCheckpoints"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file and rename: a crash mid-save leaves the previous checkpoint intact.
    A checkpoint whose weights hold NaN/inf is refused: it would overwrite the last good one."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise FloatingPointError(f"refusing to write checkpoint {path}: NaN/inf in {bad[:5]}"
                                     f"{' and more' if len(bad) > 5 else ''}; the previous checkpoint is kept")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, buffer.getvalue())


class FullCheckpoints:
    """The checkpoint half of D2FTStrategy (a mixin before DDPStrategy): gathers shards into the whole model
    and optimizer state, and cuts a whole checkpoint down to this rank's shard on load. Before a state is
    gathered it settles a deferred non-finite check (``GuardedSteps._settle_deferred_check``)."""

    # -- checkpoints: whole model in, whole model out -------------------------------------------
    def _gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.tensor_parallel_size
        named_collective("tensor-parallel all_gather_object (checkpoint shards)", self.global_rank,
                         dist.all_gather_object, out, obj, group=self.tp.group)
        return out

    def _rank_groups(self) -> list[list[list[int]]]:
        return [self.placement.groups_of(r) for r in range(self.tensor_parallel_size)]

    def _is_sharded(self, net: D2FTViT) -> bool:
        return net.tp is not None and self.tensor_parallel_size > 1

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        self._settle_deferred_check()  # a step found non-finite late raises before any checkpoint holds it
        module = self.lightning_module
        net = find_d2ft(module)
        state = module.state_dict()
        if self.replicas.differ:  # the lo-fi model is the replicas' mean (every rank takes part)
            state = {k: self.replicas.mean(v) if v.is_floating_point() else v for k, v in state.items()}
        if not self._is_sharded(net):
            return state
        prefix = _prefix_of(module, net)
        vit_keys = {k for k in state if k.startswith(prefix)}
        shards = self._gather({k: state[k].detach().cpu() for k in vit_keys})
        shapes = {prefix + k: v for k, v in net.full_shapes.items()}
        full = unshard_state_dict(shapes, net.groups_per_block, list(zip(self._rank_groups(), shards)))
        return {**{k: v for k, v in state.items() if k not in vit_keys}, **full}

    @override
    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        net = find_d2ft(module)
        state = checkpoint["state_dict"]
        match_lora_(net, state)
        if self._is_sharded(net):
            state = shard_state_dict(state, net.groups_per_block, self.placement.groups_of(self.tensor_parallel_rank))
        module.load_state_dict(state, strict=strict)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """Optimizer state with full-size tensors keyed by parameter name: independent of the world size."""
        module = self.lightning_module
        net = find_d2ft(module)
        groups = self._rank_groups() if self._is_sharded(net) else None
        return full_optimizer_state(optimizer, module, net, _prefix_of(module, net), groups, self._gather)

    @override
    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        module = self.lightning_module
        net = find_d2ft(module)
        groups = self.placement.groups_of(self.tensor_parallel_rank) if self._is_sharded(net) else None
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"]):
            load_full_optimizer_state(optimizer, saved, module, net, groups, self.tensor_parallel_rank,
                                      self.tensor_parallel_size)


def _prefix_of(module: torch.nn.Module, net: D2FTViT) -> str:
    for name, m in module.named_modules():
        if m is net:
            return f"{name}.vit." if name else "vit."
    raise RuntimeError("D2FTViT not found in the module")


