"""Which tensor-parallel rank holds which subnet.

The default deals the head groups of every block round-robin over the ranks, so each rank holds the
same number of subnets and (when the rank count divides G) the same number in every block. A placement
is a LongTensor ``owner[depth, G]``; flattened block-major it lines up with the block subnets of an ops
vector (columns ``1 .. depth*G``). On ranks of unequal speed or memory, ``speed_aware`` gives each rank
head groups in proportion to its speed, within its memory, so that every rank's step takes as long.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor


def check_speeds(speeds: Sequence[float] | Tensor, count: int | None = None, name: str = "speeds") -> list[float]:
    """Relative device speeds (2.0 = twice as fast) as floats: positive and finite, ``count`` of them (one per
    tensor-parallel rank) when given. The one speeds check of the package."""
    values = torch.as_tensor(speeds, dtype=torch.float64).flatten().tolist() if speeds is not None else None
    if not values or (count is not None and len(values) != count) \
            or not all(math.isfinite(v) and v > 0 for v in values):
        got = list(speeds) if speeds is not None and not isinstance(speeds, (int, float)) else speeds
        if count == 1:
            raise ValueError(f"{name} must be a positive finite number, got {got[0] if got else got!r}")
        many = f"{count} " if count is not None else ""
        raise ValueError(f"{name} must be {many}positive finite numbers, one per tensor-parallel rank, got {got!r}")
    return values


def check_ranks_fit(world: int, groups_per_block: int) -> None:
    """Every rank must hold at least one head group of every block (a rank without part of a block could not
    join its collectives): at least 1 and at most ``groups_per_block`` ranks."""
    if world < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {world}")
    if world > groups_per_block:
        raise ValueError(
            f"tensor-parallel size {world} is larger than the {groups_per_block} head groups per block, so some "
            f"rank would hold no part of a block; use at most {groups_per_block} ranks or more subnets"
        )


def round_robin(depth: int, groups_per_block: int, world: int) -> Tensor:  # the one round-robin rule
    """``owner[l, g] = (l*G + g) % world``: every rank holds at least one group of every block."""
    check_ranks_fit(world, groups_per_block)
    return (torch.arange(depth * groups_per_block) % world).view(depth, groups_per_block)


def groups_of_rank(owner: Tensor, rank: int) -> list[list[int]]:
    """For every block, the head groups ``rank`` holds (in ascending order)."""
    return [[g for g, o in enumerate(row.tolist()) if o == rank] for row in owner]


def subnet_devices(owner: Tensor) -> Tensor:
    """Device of every ops-vector column: -1 for the replicated stem and head, the owner for block subnets."""
    return torch.cat([torch.tensor([-1]), owner.reshape(-1), torch.tensor([-1])])


@dataclass(frozen=True, eq=False)
class Placement:
    """Where every head group lives, resolved once and shared by strategy, model and schedule.

    ``owner[l, g]`` is the tensor-parallel rank holding head group g of block l; ``speeds`` are the ranks'
    relative speeds (default: all 1). It validates itself: ranks are ``0 .. num_devices-1`` and every rank
    holds at least one group of every block (a rank without part of a block could not join its all-reduce).
    """

    owner: Tensor
    speeds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        owner = torch.as_tensor(self.owner)
        if owner.dim() != 2 or owner.numel() == 0 or owner.dtype.is_floating_point:
            raise ValueError(f"Placement.owner must be an integer tensor [depth, groups_per_block], got "
                             f"shape {tuple(owner.shape)} and dtype {owner.dtype}")
        owner = owner.to(torch.long).clone()
        tp = int(owner.max()) + 1
        if int(owner.min()) < 0:
            raise ValueError(f"Placement.owner holds rank {int(owner.min())}; ranks are 0 .. {tp - 1}")
        for rank in range(tp):
            missing = [l for l, row in enumerate(owner) if not bool((row == rank).any())]
            if missing:
                raise ValueError(f"Placement: rank {rank} holds no head group of block(s) {missing}; every rank "
                                 f"needs one group of every block (use at most {owner.shape[1]} ranks)")
        speeds = tuple(check_speeds(self.speeds, tp, "Placement.speeds")) if self.speeds else (1.0,) * tp
        object.__setattr__(self, "owner", owner)
        object.__setattr__(self, "speeds", speeds)

    @classmethod
    def round_robin(cls, depth: int, groups_per_block: int, tp: int,
                    speeds: Sequence[float] | None = None) -> Placement:
        return cls(round_robin(depth, groups_per_block, tp), tuple(speeds or ()))

    @classmethod
    def from_any(cls, placement: Placement | Tensor, speeds: Sequence[float] | None = None) -> Placement:
        """A Placement as is, or one built from an owner table ``[depth, G]``."""
        if isinstance(placement, Placement):
            return placement
        return cls(torch.as_tensor(placement), tuple(speeds or ()))

    @property
    def num_devices(self) -> int:
        return len(self.speeds)

    @property
    def depth(self) -> int:
        return self.owner.shape[0]

    @property
    def groups_per_block(self) -> int:
        return self.owner.shape[1]

    def with_speeds(self, speeds: Sequence[float]) -> Placement:
        """The same owner table with other rank speeds (validated)."""
        return Placement(self.owner, tuple(speeds))

    def groups_of(self, rank: int) -> list[list[int]]:
        """For every block, the head groups ``rank`` holds (ascending)."""
        if not 0 <= rank < self.num_devices:
            raise ValueError(f"rank must be in [0, {self.num_devices}), got {rank}")
        return groups_of_rank(self.owner, rank)

    def column_devices(self) -> Tensor:
        """Device of every ops-vector column ``[num_subnets]``: -1 for the stem and head (always FULL)."""
        return subnet_devices(self.owner)


# -- what D2FTStrategy(placement=...) takes --------------------------------------------------------
def resolve_placement(arg: PlacementArg, depth: int, groups_per_block: int, tp: int) -> Placement:
    """The one Placement for ``depth`` blocks x ``groups_per_block`` head groups on ``tp`` ranks, from what
    ``D2FTStrategy(placement=...)`` was given: None (round robin), an owner table ``[depth, G]``, a callable
    ``(depth, G, tp) -> owner``, a :func:`speed_aware` result (which also sets the speeds) or a Placement."""
    check_placement_arg(arg)
    if arg is None:
        return Placement.round_robin(depth, groups_per_block, tp)
    if isinstance(arg, Placement):
        placement = arg
    else:
        owner = torch.as_tensor(arg(depth, groups_per_block, tp) if callable(arg) else arg)
        if owner.numel() != depth * groups_per_block:
            raise ValueError(f"placement must be an owner table [{depth}, {groups_per_block}] (the rank of every "
                             f"head group), got shape {tuple(owner.shape)}")
        speeds = arg.speeds if isinstance(arg, SpeedAwarePlacement) else ()
        placement = Placement(owner.reshape(depth, groups_per_block), tuple(speeds))
    if (placement.depth, placement.groups_per_block) != (depth, groups_per_block):
        raise ValueError(f"the placement is [{placement.depth}, {placement.groups_per_block}] but the model has "
                         f"{depth} blocks x {groups_per_block} head groups")
    if placement.num_devices != tp:
        raise ValueError(f"the placement uses ranks 0 .. {placement.num_devices - 1} but the tensor-parallel size is "
                         f"{tp}; every rank needs one head group of every block")
    return placement


def check_placement_arg(arg: object) -> None:
    """Refuse, naming the forms allowed, a ``placement=`` that is none of them (before any process starts)."""
    if arg is None or isinstance(arg, (Placement, torch.Tensor)) or callable(arg):
        return
    try:
        torch.as_tensor(arg, dtype=torch.long)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"placement must be None (round robin), an owner table [depth, groups_per_block], a callable "
                         f"(depth, groups_per_block, tensor_parallel_size) -> owner, speed_aware(...) or a "
                         f"Placement; got {arg!r}") from None


# -- heterogeneous ranks ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSpec:
    """One tensor-parallel rank: relative ``speed`` (2.0 = twice as fast) and the ``memory`` (bytes) it may
    spend on the head groups it holds (weights, gradients, optimizer state, activations)."""

    speed: float = 1.0
    memory: float = math.inf

    def __post_init__(self) -> None:
        check_speeds([self.speed], 1, "DeviceSpec.speed")
        if not self.memory > 0:
            raise ValueError(f"DeviceSpec.memory must be positive bytes (or inf), got {self.memory!r}")


def group_counts(depth: int, groups_per_block: int, devices: Sequence[DeviceSpec],
                 bytes_per_group: float = 0.0) -> list[int]:
    """Head groups per rank that minimise the slowest rank's predicted step time (groups / speed), with every
    rank holding at least one group of every block and no more groups than its memory allows.

    Every group costs the same in D2FT: the stem always trains, so backpropagation always reaches the input
    and a group's cost does not depend on its block's ``dist_from_output``. With identical units, handing
    them out one by one to the rank that would finish earliest is optimal (the makespan is the n-th smallest
    of the ranks' increasing completion times).
    """
    tp, units = len(devices), depth * groups_per_block
    if tp < 1:
        raise ValueError("give at least one DeviceSpec")
    check_ranks_fit(tp, groups_per_block)
    room = [units if bytes_per_group <= 0 or math.isinf(d.memory) else int(d.memory // bytes_per_group)
            for d in devices]
    for rank, r in enumerate(room):
        if r < depth:
            raise ValueError(f"rank {rank} has memory for {r} head groups but must hold at least {depth} (one per "
                             f"block): short by {(depth - r) * bytes_per_group / 2**20:.1f} MiB")
    if sum(room) < units:
        raise ValueError(f"the {tp} ranks have memory for {sum(room)} of the {units} head groups: short by "
                         f"{(units - sum(room)) * bytes_per_group / 2**20:.1f} MiB in all")
    most = depth * (groups_per_block - tp + 1)  # every other rank keeps one group of every block
    counts = [depth] * tp
    for _ in range(units - depth * tp):
        open_ranks = [r for r in range(tp) if counts[r] < min(room[r], most)]
        best = min(open_ranks, key=lambda r: ((counts[r] + 1) / devices[r].speed, r))
        counts[best] += 1
    return counts


def layout(depth: int, groups_per_block: int, counts: Sequence[int]) -> Tensor:
    """``owner[depth, G]`` with ``counts[r]`` groups on rank r: one group of every block each, the rest dealt
    block by block so that a rank's extra groups spread over the blocks."""
    tp = len(counts)
    extra = [r for r in range(tp) for _ in range(counts[r] - depth)]
    if len(extra) != depth * (groups_per_block - tp) or min(counts) < depth:
        raise ValueError(f"counts {list(counts)} do not fill {depth} blocks x {groups_per_block} groups "
                         f"with at least one group per rank and block")
    owner = torch.empty(depth, groups_per_block, dtype=torch.long)
    owner[:, :tp] = torch.arange(tp)
    for i, rank in enumerate(extra):  # slot-major: extra slot k of every block before slot k + 1
        owner[i % depth, tp + i // depth] = rank
    return owner


@dataclass(frozen=True)
class SpeedAwarePlacement:
    """A placement for ``D2FTStrategy(placement=...)`` on ranks of unequal speed and memory: each rank holds
    head groups in proportion to its speed (memory permitting), so predicted step times are equal.
    ``D2FTCallback`` reads ``speeds`` from it to set the knapsack capacities the same way."""

    devices: tuple[DeviceSpec, ...]
    bytes_per_group: float = 0.0

    @property
    def speeds(self) -> list[float]:
        return [d.speed for d in self.devices]

    def __call__(self, depth: int, groups_per_block: int, world: int) -> Tensor:
        if world != len(self.devices):
            raise ValueError(f"the placement describes {len(self.devices)} ranks but the tensor-parallel size is "
                             f"{world}; give one DeviceSpec per tensor-parallel rank")
        return layout(depth, groups_per_block, group_counts(depth, groups_per_block, self.devices,
                                                            self.bytes_per_group))


def speed_aware(speeds: Sequence[float], memory: Sequence[float] | None = None,
                bytes_per_group: float = 0.0) -> SpeedAwarePlacement:
    """``speed_aware([2.0, 1.0])``: rank 0 twice as fast; ``memory`` in bytes per rank, with the bytes one
    head group needs there (``bytes_per_group``)."""
    memory = memory if memory is not None else [math.inf] * len(speeds)
    if len(memory) != len(speeds):
        raise ValueError(f"give one memory per rank: {len(speeds)} speeds, {len(memory)} memories")
    return SpeedAwarePlacement(tuple(DeviceSpec(float(s), float(m)) for s, m in zip(speeds, memory)),
                               bytes_per_group)


PlacementArg = Placement | Tensor | Sequence[Sequence[int]] | Callable[[int, int, int], Tensor] | None
