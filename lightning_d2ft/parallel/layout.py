"""Where the head groups sit inside a block's tensors: the one table that kernels, sharding, scores and
LoRA read.

A subnet (block l, group g) owns a 1/G slice of four linear layers of block l: rows of ``attn.qkv`` (its
heads' q, k and v), columns of ``attn.proj``, rows of ``mlp.fc1`` and columns of ``mlp.fc2`` (and the
matching bias entries). Along the grouped dimension a tensor is laid out ``(lead, G, per_group)``:
``lead`` is 3 for timm's fused ``qkv`` (q | k | v, each holding every head in order) and 1 elsewhere.
LoRA adapters on ``qkv`` follow the same rule (``lora_A`` group-major rows, ``lora_B`` rows like ``qkv``).

That is the layout of timm's tensors, of state dicts and checkpoints. In training every group's slice is a
Parameter of its own (``<module>.weight_g<group>``, group ids global, so names do not depend on the
tensor-parallel size; see :class:`~lightning_d2ft.model.grouped.GroupedLinear`), stored so that a block's
groups concatenate along dim 0 into what its matmuls need: rows of ``qkv``/``fc1`` as they are, with
``qkv``'s q, k and v interleaved per head (``(heads, 3, head_dim)``, "head-major", so the rows of any set of
groups view as ``(heads, 3, head_dim)`` without a copy), and the columns of ``proj``/``fc2`` transposed
(``(per_group, dim)``). :func:`to_groups` and :func:`from_groups` convert between the two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["GROUPED", "GROUPED_MODULES", "GroupedDim", "from_groups", "from_joined", "group_indices", "group_param",
           "group_param_name", "grouped_dim", "per_group", "to_groups"]


@dataclass(frozen=True)
class GroupedDim:
    """How one block tensor is cut by head group: along ``dim``, laid out ``(lead, G, per_group)``."""

    dim: int
    lead: int = 1

    @property
    def transposed(self) -> bool:
        """Cut by columns (``proj``/``fc2``): a group's Parameter holds its columns transposed."""
        return self.dim == 1


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
#: the block modules cut by head group
GROUPED_MODULES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
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


_GROUP_PARAM = re.compile(r"(?:^|\.)blocks\.(\d+)\.(" + "|".join(re.escape(m) for m in GROUPED_MODULES)
                          + r")\.(weight|bias|lora_A|lora_B)_g(\d+)$")


def group_param_name(tensor: str, group: int) -> str:
    """The name of group ``group``'s Parameter of a grouped ``tensor`` ("weight", "bias", "lora_A", "lora_B")."""
    return f"{tensor}_g{group}"


def group_param(name: str) -> tuple[int, int, str] | None:
    """(block, group, timm key inside the block) of a per-group Parameter's name, e.g.
    ``net.vit.blocks.3.attn.qkv.weight_g1`` -> ``(3, 1, "attn.qkv.weight")``; None for any other name."""
    match = _GROUP_PARAM.search(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(4)), f"{match.group(2)}.{match.group(3)}"


def to_groups(t: Tensor, layout: GroupedDim, n_groups: int, heads_per_group: int = 1) -> list[Tensor]:
    """A timm-layout tensor holding ``n_groups`` groups (all of them, or a rank's narrowed share, in order) as
    one new contiguous tensor per group, in the per-group Parameters' layout (see the module docstring)."""
    if layout.transposed:
        return [c.t().contiguous() for c in t.unflatten(layout.dim, (n_groups, -1)).unbind(layout.dim)]
    if layout.lead == 1:
        return [c.clone() for c in t.unflatten(0, (n_groups, -1)).unbind(0)]
    rest = t.shape[1:]
    parts = t.unflatten(0, (layout.lead, n_groups, heads_per_group, -1)).unbind(1)  # (lead, hpg, head_dim, ...)
    return [c.transpose(0, 1).reshape(-1, *rest) for c in parts]


def from_groups(parts: Sequence[Tensor], layout: GroupedDim, heads_per_group: int = 1) -> Tensor:
    """Inverse of :func:`to_groups`: the timm-layout tensor of these groups (differentiable, so a module can
    run timm's own forward on it)."""
    return from_joined(torch.cat(list(parts), 0), layout, len(parts) * heads_per_group)


def from_joined(joined: Tensor, layout: GroupedDim, heads: int) -> Tensor:
    """The timm-layout tensor of groups whose per-group tensors are ``joined`` along dim 0 (``heads``: how many
    heads they hold): a view, except for ``qkv``'s head-major rows, which are copied into q | k | v."""
    if layout.transposed:
        return joined.t()
    if layout.lead == 1:
        return joined
    rest = joined.shape[1:]
    return joined.view(heads, layout.lead, -1, *rest).transpose(0, 1).reshape(-1, *rest)
