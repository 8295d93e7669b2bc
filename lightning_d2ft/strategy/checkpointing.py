"""Checkpoints of a sharded model hold the whole model: plain timm keys under the module's prefix, and
optimizer state keyed by parameter name with full-size tensors, so a run resumes on the same or another
world size. Every rank takes part in writing (the shards are gathered), rank 0 writes the file, atomically.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
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
from lightning_d2ft.parallel.placement import Placement
from lightning_d2ft.parallel.replicas import Replicas
from lightning_d2ft.parallel.sharding import shard_state_dict, unshard_state_dict

__all__ = ["AtomicCheckpointIO", "ShardedCheckpoints"]


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


@dataclass(frozen=True)
class ShardedCheckpoints:
    """Whole-model checkpoints of one tensor-parallel rank's shard: gathered on save (every rank of the
    tensor-parallel group takes part), cut down to this rank's head groups on load. ``placement`` None or
    ``tp_size`` 1: nothing is sharded, states pass through."""

    placement: Placement | None
    tp_rank: int
    tp_size: int
    global_rank: int
    group: dist.ProcessGroup | None

    def _sharded(self, net: D2FTViT) -> bool:
        return net.tp is not None and self.tp_size > 1

    def _gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.tp_size
        named_collective("tensor-parallel all_gather_object (checkpoint shards)", self.global_rank,
                         dist.all_gather_object, out, obj, group=self.group)
        return out

    def _rank_groups(self) -> list[list[list[int]]]:
        return [self.placement.groups_of(r) for r in range(self.tp_size)]

    def model_state(self, module: torch.nn.Module, replicas: Replicas) -> dict[str, Any]:
        """The whole model's state dict (plain timm keys under the module's prefix); a lo-fi model is the mean
        of its replicas (every replica takes part)."""
        net = find_d2ft(module)
        state = module.state_dict()
        if replicas.differ:
            state = {k: replicas.mean(v) if v.is_floating_point() else v for k, v in state.items()}
        if not self._sharded(net):
            return state
        prefix = _prefix_of(module, net)
        vit_keys = {k for k in state if k.startswith(prefix)}
        shards = self._gather({k: state[k].detach().cpu() for k in vit_keys})
        shapes = {prefix + k: v for k, v in net.full_shapes.items()}
        full = unshard_state_dict(shapes, net.groups_per_block, list(zip(self._rank_groups(), shards)))
        return {**{k: v for k, v in state.items() if k not in vit_keys}, **full}

    def load_model_state(self, module: torch.nn.Module, state: dict[str, Any], strict: bool = True) -> None:
        """Load a whole-model state dict into this rank's shard (LoRA adapters added first if it has them)."""
        net = find_d2ft(module)
        match_lora_(net, state)
        if self._sharded(net):
            state = shard_state_dict(state, net.groups_per_block, self.placement.groups_of(self.tp_rank))
        module.load_state_dict(state, strict=strict)

    def optimizer_state(self, optimizer: Optimizer, module: torch.nn.Module) -> dict[str, Any]:
        """Optimizer state with full-size tensors keyed by parameter name: independent of the world size."""
        net = find_d2ft(module)
        groups = self._rank_groups() if self._sharded(net) else None
        return full_optimizer_state(optimizer, module, net, _prefix_of(module, net), groups, self._gather)

    def load_optimizer_states(self, optimizers: list[Optimizer], saved: list[dict[str, Any]],
                              module: torch.nn.Module) -> None:
        net = find_d2ft(module)
        groups = self.placement.groups_of(self.tp_rank) if self._sharded(net) else None
        for optimizer, state in zip(optimizers, saved):
            load_full_optimizer_state(optimizer, state, module, net, groups, self.tp_rank, self.tp_size)


def _prefix_of(module: torch.nn.Module, net: D2FTViT) -> str:
    for name, m in module.named_modules():
        if m is net:
            return f"{name}.vit." if name else "vit."
    raise RuntimeError("D2FTViT not found in the module")


