"""Tensor-parallel sharding of model weights by head group: full <-> local state dicts (timm's layout, a rank's
groups narrowed), and keeping a rank's groups of a grouped ViT in place. Where each group sits is read from
:mod:`lightning_d2ft.parallel.layout`."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from torch import Tensor, nn

from lightning_d2ft.parallel.layout import GROUPED_MODULES, group_indices, grouped_dim

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


@runtime_checkable
class HoldsGroups(Protocol):
    """A block module cut by head group (:class:`~lightning_d2ft.model.grouped.GroupedLinear`)."""

    def keep_groups_(self, groups: Sequence[int]) -> None:
        """Keep only these head groups' Parameters (global ids, in this order)."""


def shard_vit(vit: nn.Module, groups_per_block: int, groups: list[list[int]]) -> nn.Module:
    """Keep only head groups ``groups[l]`` of every block l of ``vit`` (in place, for one tensor-parallel rank;
    returns ``vit``). The blocks' grouped modules (one Parameter per head group) drop the other groups'
    Parameters, so the rank holds only its own weights, and only their optimizer state; nothing is copied.
    """
    if len(groups) != len(vit.blocks) or any(not owned for owned in groups):
        raise ValueError("every rank must own at least one head group of every block")
    for blk, owned in zip(vit.blocks, groups):
        for key in GROUPED_MODULES:
            module = blk.get_submodule(key)
            if not isinstance(module, HoldsGroups) or getattr(module, "num_groups", None) != groups_per_block:
                raise TypeError(f"{key} is a {type(module).__name__}, not cut into {groups_per_block} head groups: "
                                "wrap the ViT in D2FTViT first (it cuts the blocks into one Parameter per group)")
            module.keep_groups_(owned)
    return vit
