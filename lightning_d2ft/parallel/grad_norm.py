"""Gradient clipping by the norm of the whole sharded model, as ``clip_grad_norm_`` on the unsharded one.

A tensor-parallel rank holds its own head groups' Parameters and a full copy of the replicated ones (stem,
head, norms, shared biases). The global norm sums the shards' squares across the tensor-parallel ranks and
counts the replicated parameters once, so every rank scales its gradients by the same factor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from lightning_d2ft.parallel.collectives import named_collective
from lightning_d2ft.parallel.layout import group_param

if TYPE_CHECKING:  # the model sits above this layer: types only
    from lightning_d2ft.model.vit import D2FTViT

__all__ = ["clip_grad_by_global_norm", "sharded_parameter_ids"]


def sharded_parameter_ids(net: D2FTViT, tensor_parallel_size: int) -> set[int]:
    """ids of the parameters only this rank holds: its head groups' own Parameters (none on one
    tensor-parallel rank, where every parameter is this rank's alone anyway)."""
    if tensor_parallel_size <= 1:
        return set()
    return {id(p) for k, p in net.vit.named_parameters() if group_param(k) is not None}


def clip_grad_by_global_norm(optimizer: Optimizer, clip_val: float, sharded: set[int],
                             group: dist.ProcessGroup | None, rank: int, tensor_parallel_size: int) -> None:
    """Scale every gradient by ``clip_val / global norm`` (at most 1), as ``clip_grad_norm_`` does; ``sharded``:
    ids of sliced parameters. Everything stays on the gradients' device: no host sync (one per parameter,
    before, when the squares went through the CPU)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    with_grad = [p for p in params if p.grad is not None]
    device = with_grad[0].grad.device if with_grad else params[0].device
    shard_squares = _sum_of_squares([p.grad for p in with_grad if id(p) in sharded], device)
    if tensor_parallel_size > 1:  # every rank joins, with or without gradients
        named_collective("tensor-parallel all_reduce (gradient norm)", rank, dist.all_reduce, shard_squares,
                         group=group)
    replicated = _sum_of_squares([p.grad for p in with_grad if id(p) not in sharded], device)
    if with_grad:
        torch.nn.utils.clip_grads_with_norm_(with_grad, clip_val, (shard_squares + replicated).sqrt())


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of the squared entries of ``grads`` (float32, on ``device``), from torch's foreach norm."""
    if not grads:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(grads, 2.0).float().to(device).pow(2)
