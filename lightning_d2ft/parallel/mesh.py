"""The (data-parallel x tensor-parallel) mesh of D2FTStrategy: its sizes and its process groups.

Global rank r sits at data-parallel replica ``r // tp`` and tensor-parallel rank ``r % tp``: the ranks that
share one model replica are neighbours. The world size must be a multiple of the tensor-parallel size.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

__all__ = ["check_tensor_parallel_size", "mesh_groups", "tensor_parallel_size_for"]


def check_tensor_parallel_size(value: object) -> None:
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"tensor_parallel_size must be a positive int or 'auto', got {value!r}")


def tensor_parallel_size_for(world: int, requested: int | str) -> int:
    """The tensor-parallel size on ``world`` processes ("auto": all of them), refused unless it divides them."""
    tp = world if requested == "auto" else int(requested)
    if world % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide the {world} devices (processes); use a "
                         f"divisor of {world}: {[d for d in range(1, world + 1) if world % d == 0]}")
    return tp


def mesh_groups(tp: int, dp: int, tp_rank: int, dp_rank: int, timeout: timedelta | None
                ) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """(this rank's tensor-parallel group, its data-parallel group); None where the world group (or no
    collective at all) serves. Every rank creates every group, in the same order (a torch.distributed rule)."""
    tensor_parallel = data_parallel = None
    for r in range(dp):
        group = dist.new_group(list(range(r * tp, (r + 1) * tp)), timeout=timeout) if dp > 1 else None
        if r == dp_rank:
            tensor_parallel = group if tp > 1 else None
    for t in range(tp):
        group = dist.new_group(list(range(t, tp * dp, tp)), timeout=timeout) if dp > 1 else None
        if t == tp_rank:
            data_parallel = group
    return tensor_parallel, data_parallel
