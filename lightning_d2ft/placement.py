"""Which tensor-parallel rank holds which subnet.

The default deals the head groups of every block round-robin over the ranks, so each rank holds the
same number of subnets and (when the rank count divides G) the same number in every block. A placement
is a LongTensor ``owner[depth, G]``; flattened block-major it lines up with the block subnets of an ops
vector (columns ``1 .. depth*G``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def round_robin(depth: int, groups_per_block: int, world: int) -> Tensor:
    """``owner[l, g] = (l*G + g) % world``: every rank holds at least one group of every block."""
    if world < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {world}")
    if world > groups_per_block:
        raise ValueError(
            f"tensor-parallel size {world} is larger than the {groups_per_block} head groups per block, so some "
            f"rank would hold no part of a block; use at most {groups_per_block} ranks or more subnets"
        )
    return (torch.arange(depth * groups_per_block) % world).view(depth, groups_per_block)


def groups_of_rank(owner: Tensor, rank: int) -> list[list[int]]:
    """For every block, the head groups ``rank`` holds (in ascending order)."""
    return [[g for g, o in enumerate(row.tolist()) if o == rank] for row in owner]


def subnet_devices(owner: Tensor) -> Tensor:
    """Device of every ops-vector column: -1 for the replicated stem and head, the owner for block subnets."""
    return torch.cat([torch.tensor([-1]), owner.reshape(-1), torch.tensor([-1])])
