"""Tensor-parallel sharding of model weights by head group: full <-> local state dicts, and a rank's
narrowed copy of a timm ViT. Where each group sits is read from :mod:`lightning_d2ft.parallel.layout`."""

from __future__ import annotations

import copy
from typing import Sequence

from torch import Tensor, nn

from lightning_d2ft.parallel.layout import group_indices, grouped_dim

__all__ = ["shard_index", "shard_state_dict", "shard_vit", "unshard_state_dict"]


def shard_index(key: str, full_shape: Sequence[int], groups_per_block: int,
                groups: list[list[int]]) -> tuple[int, Tensor] | None:
    """(dim, indices) that cut ``key``'s full tensor down to the groups a rank owns; None if replicated."""
    found = grouped_dim(key)
    if found is None:
        return None
    block, layout = found
    return layout.dim, group_indices(full_shape[layout.dim], layout, groups_per_block, groups[block])


def shard_state_dict(full: dict[str, Tensor], groups_per_block: int, groups: list[list[int]]) -> dict[str, Tensor]:
    """Cut a full (timm-layout) state dict down to one rank's head groups."""
    out = {}
    for key, value in full.items():
        cut = shard_index(key, value.shape, groups_per_block, groups)
        out[key] = value if cut is None else value.index_select(cut[0], cut[1].to(value.device))
    return out


def unshard_state_dict(shapes: dict[str, Sequence[int]], groups_per_block: int,
                       shards: list[tuple[list[list[int]], dict[str, Tensor]]]) -> dict[str, Tensor]:
    """Assemble full tensors of ``shapes`` from per-rank shards ``[(groups, state_dict), ...]``.

    Replicated tensors are taken from the first shard (they are identical on every rank).
    """
    full: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        first = shards[0][1][key]
        if shard_index(key, shape, groups_per_block, shards[0][0]) is None:
            full[key] = first.detach().clone()
            continue
        out = first.new_zeros(tuple(shape))
        for groups, sd in shards:
            dim, idx = shard_index(key, shape, groups_per_block, groups)
            out.index_copy_(dim, idx.to(out.device), sd[key].detach())
        full[key] = out
    return full


def shard_vit(vit: nn.Module, groups_per_block: int, groups: list[list[int]]) -> nn.Module:
    """A copy of ``vit`` whose block l keeps only head groups ``groups[l]`` (for one tensor-parallel rank).

    The result is still a timm VisionTransformer (narrowed ``qkv``/``proj``/``fc1``/``fc2``, fewer heads),
    so :class:`~lightning_d2ft.model.vit.D2FTViT` runs it as it is. The linear modules keep their class
    (a LoRA ``qkv`` stays one); their grouped parameters are replaced by the rank's slices.
    """
    if len(groups) != len(vit.blocks) or any(not owned for owned in groups):
        raise ValueError("every rank must own at least one head group of every block")
    sharded = shard_state_dict(vit.state_dict(), groups_per_block, groups)
    local = copy.deepcopy(vit)
    for l, (blk, owned) in enumerate(zip(local.blocks, groups)):
        attn, mlp = blk.attn, blk.mlp
        for module, path in ((attn.qkv, "attn.qkv"), (attn.proj, "attn.proj"), (mlp.fc1, "mlp.fc1"),
                             (mlp.fc2, "mlp.fc2")):
            for pname, p in list(module.named_parameters(recurse=False)):
                value = sharded[f"blocks.{l}.{path}.{pname}"]
                setattr(module, pname, nn.Parameter(value.detach().clone(), requires_grad=p.requires_grad))
            module.out_features, module.in_features = module.weight.shape
        attn.num_heads = attn.num_heads // groups_per_block * len(owned)
        attn.attn_dim = attn.num_heads * attn.head_dim
    return local
