"""Gradient clipping by the norm of the whole sharded model, as ``clip_grad_norm_`` on the unsharded one.

A tensor-parallel rank holds slices of the sharded weights and a full copy of the replicated ones (stem,
head, norms, shared biases). The global norm sums the shards' squares across the tensor-parallel ranks and
counts the replicated parameters once, so every rank scales its gradients by the same factor.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from lightning_d2ft.collectives import named_collective
from lightning_d2ft.partition import D2FTViT

__all__ = ["clip_grad_by_global_norm", "sharded_parameter_ids"]


def sharded_parameter_ids(net: D2FTViT, tensor_parallel_size: int) -> set[int]:
    """ids of the parameters this rank holds a slice of (none on one tensor-parallel rank)."""
    full = {k: math.prod(v) for k, v in (net.full_shapes or {}).items()}
    return {id(p) for k, p in net.vit.named_parameters()
            if tensor_parallel_size > 1 and k in full and p.numel() != full[k]}


def clip_grad_by_global_norm(optimizer: Optimizer, clip_val: float, sharded: set[int],
                             group: dist.ProcessGroup | None, rank: int, tensor_parallel_size: int) -> None:
    """Scale every gradient by ``clip_val / global norm`` (at most 1); ``sharded``: ids of sliced parameters."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    shards = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None and id(p) in sharded]
    squares = torch.stack([torch.zeros(()), *(g.detach().float().pow(2).sum().cpu() for g in shards)]).sum()
    ids = {id(g) for g in shards}
    replicated = torch.stack([torch.zeros(()), *(g.detach().float().pow(2).sum().cpu() for g in grads
                                                 if id(g) not in ids)]).sum()
    if tensor_parallel_size > 1:
        named_collective("tensor-parallel all_reduce (gradient norm)", rank, dist.all_reduce, squares, group=group)
    coef = (float(clip_val) / ((squares + replicated).sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.device, g.dtype))
