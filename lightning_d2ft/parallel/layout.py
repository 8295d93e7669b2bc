"""Where the head groups sit inside a block's tensors: the one table that kernels, sharding, scores and
LoRA read.

A subnet (block l, group g) owns a 1/G slice of four linear layers of block l: rows of ``attn.qkv`` (its
heads' q, k and v), columns of ``attn.proj``, rows of ``mlp.fc1`` and columns of ``mlp.fc2`` (and the
matching bias entries). Along the grouped dimension a tensor is laid out ``(lead, G, per_group)``:
``lead`` is 3 for timm's fused ``qkv`` (q | k | v, each holding every head in order) and 1 elsewhere.
LoRA adapters on ``qkv`` follow the same rule (``lora_A`` group-major rows, ``lora_B`` rows like ``qkv``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["GROUPED", "GroupedDim", "group_indices", "grouped_dim", "per_group"]


@dataclass(frozen=True)
class GroupedDim:
    """How one block tensor is cut by head group: along ``dim``, laid out ``(lead, G, per_group)``."""

    dim: int
    lead: int = 1


#: key suffix inside a block -> how it is cut by head group; every other tensor is shared by the groups
GROUPED: dict[str, GroupedDim] = {
    "attn.qkv.weight": GroupedDim(0, 3),
    "attn.qkv.bias": GroupedDim(0, 3),
    "attn.proj.weight": GroupedDim(1),
    "mlp.fc1.weight": GroupedDim(0),
    "mlp.fc1.bias": GroupedDim(0),
    "mlp.fc2.weight": GroupedDim(1),
    "attn.qkv.lora_A": GroupedDim(0),
    "attn.qkv.lora_B": GroupedDim(0, 3),
}
_BLOCK_KEY = re.compile(r"(?:^|\.)blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in GROUPED) + r")$")


def grouped_dim(key: str) -> tuple[int, GroupedDim] | None:
    """(block, GroupedDim) for a state-dict key of a grouped block tensor; None for a shared tensor."""
    match = _BLOCK_KEY.search(key)
    if match is None:
        return None
    return int(match.group(1)), GROUPED[match.group(2)]


def group_indices(size: int, layout: GroupedDim, groups_per_block: int, groups: Sequence[int]) -> Tensor:
    """Indices along the grouped dim (of length ``size``) of the head groups ``groups``, in layout order."""
    per = size // (layout.lead * groups_per_block)
    if per * layout.lead * groups_per_block != size:
        raise ValueError(f"a grouped dim of {size} does not split into {layout.lead} x {groups_per_block} groups")
    idx = torch.arange(size).view(layout.lead, groups_per_block, per)[:, list(groups)]
    return idx.reshape(-1)


def per_group(tensor: Tensor, layout: GroupedDim, groups_per_block: int) -> Tensor:
    """``tensor``'s elements arranged ``[G, -1]`` by head group (row g holds every element of group g)."""
    t = tensor.unflatten(layout.dim, (layout.lead, groups_per_block, -1))
    return t.movedim(layout.dim + 1, 0).reshape(groups_per_block, -1)
