"""Placement of head groups on tensor-parallel ranks: round-robin, and speed/memory-aware for unequal ranks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_d2ft.parallel.placement import DeviceSpec, group_counts, groups_of_rank, layout, round_robin, speed_aware


def _makespan(counts, devices) -> float:
    return max(c / d.speed for c, d in zip(counts, devices))


def _brute_force(depth, g, devices, bytes_per_group) -> float | None:
    """The best makespan over every split of the groups that keeps one group per rank and block."""
    tp, best = len(devices), None
    room = [math.inf if math.isinf(d.memory) else d.memory // bytes_per_group for d in devices]
    for counts in itertools.product(range(depth, depth * (g - tp + 1) + 1), repeat=tp):
        if sum(counts) == depth * g and all(c <= r for c, r in zip(counts, room)):
            m = _makespan(counts, devices)
            best = m if best is None else min(best, m)
    return best


@st.composite
def _rank_mixes(draw):
    depth, g = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    tp = draw(st.integers(1, g))
    devices = [DeviceSpec(speed=draw(st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 4.0])),
                          memory=draw(st.sampled_from([math.inf, 2.0, 3.0, 5.0, 8.0])))
               for _ in range(tp)]
    return depth, g, devices


@settings(max_examples=150, deadline=None)
@given(_rank_mixes())
def test_counts_are_optimal_respect_memory_or_refuse_naming_the_shortfall(case):
    depth, g, devices = case
    best = _brute_force(depth, g, devices, bytes_per_group=1.0)
    if best is None:
        with pytest.raises(ValueError, match=r"short by \d+\.\d MiB"):
            group_counts(depth, g, devices, bytes_per_group=1.0)
        return
    counts = group_counts(depth, g, devices, bytes_per_group=1.0)
    assert sum(counts) == depth * g
    assert all(c <= d.memory for c, d in zip(counts, devices))  # 1 byte per group
    assert _makespan(counts, devices) == pytest.approx(best)  # the slowest rank is as fast as it can be
    owner = layout(depth, g, counts)
    for rank, c in enumerate(counts):
        held = groups_of_rank(owner, rank)
        assert all(held) and sum(map(len, held)) == c  # a group of every block, counts[rank] in all


def test_equal_ranks_get_the_round_robin_counts_and_a_twice_faster_rank_twice_the_groups():
    equal = speed_aware([1.0, 1.0])(12, 6, 2)
    assert [int((equal == r).sum()) for r in range(2)] == [int((round_robin(12, 6, 2) == r).sum()) for r in range(2)]
    fast = speed_aware([2.0, 1.0])(12, 6, 2)
    assert [int((fast == r).sum()) for r in range(2)] == [48, 24]  # predicted step times 24 and 24


def test_memory_shortfall_names_the_rank():
    with pytest.raises(ValueError, match=r"rank 1 has memory for 5 head groups but must hold at least 12 .* "
                                         r"short by 7\.0 MiB"):
        speed_aware([1.0, 1.0], memory=[math.inf, 5 * 2**20], bytes_per_group=2**20)(12, 6, 2)
    with pytest.raises(ValueError, match=r"memory for 40 of the 72 head groups: short by 32\.0 MiB in all"):
        speed_aware([1.0, 1.0], memory=[20 * 2**20, 20 * 2**20], bytes_per_group=2**20)(12, 6, 2)


def test_bad_device_specs_and_world_sizes_are_refused():
    with pytest.raises(ValueError, match="speed must be a positive"):
        DeviceSpec(speed=0.0)
    with pytest.raises(ValueError, match="one memory per rank"):
        speed_aware([1.0, 2.0], memory=[1.0])
    with pytest.raises(ValueError, match="describes 2 ranks but the tensor-parallel size is 4"):
        speed_aware([1.0, 2.0])(12, 6, 4)
    with pytest.raises(ValueError, match="tensor-parallel size 3 is larger than the 2 head groups per block"):
        group_counts(4, 2, [DeviceSpec()] * 3)


def test_every_placement_argument_resolves_to_one_validated_placement():
    from lightning_d2ft.parallel.placement import Placement, resolve_placement

    rr = resolve_placement(None, 3, 4, 2)
    assert torch.equal(rr.owner, round_robin(3, 4, 2)) and rr.speeds == (1.0, 1.0)
    fast = resolve_placement(speed_aware([2.0, 1.0]), 12, 6, 2)  # speed_aware declares its speeds
    assert fast.speeds == (2.0, 1.0) and [sum(map(len, fast.groups_of(r))) for r in range(2)] == [48, 24]
    table = [[1, 0, 0, 1]] * 3
    assert torch.equal(resolve_placement(table, 3, 4, 2).owner, torch.tensor(table))
    assert torch.equal(resolve_placement(torch.tensor(table).flatten(), 3, 4, 2).owner, torch.tensor(table))
    assert torch.equal(resolve_placement(lambda d, g, w: round_robin(d, g, w).flip(1), 3, 4, 2).owner,
                       round_robin(3, 4, 2).flip(1))
    given_one = Placement(torch.tensor(table), speeds=(1.0, 3.0))
    assert resolve_placement(given_one, 3, 4, 2) is given_one  # kept as it is
    assert given_one.with_speeds([2.0, 1.0]).speeds == (2.0, 1.0)


def test_a_placement_argument_that_does_not_fit_is_refused_naming_the_problem():
    from lightning_d2ft import D2FTStrategy
    from lightning_d2ft.parallel.placement import resolve_placement

    with pytest.raises(ValueError, match=r"placement must be None \(round robin\), an owner table"):
        D2FTStrategy(placement="fast")
    with pytest.raises(ValueError, match=r"owner table \[3, 4\].*got shape \(2, 4\)"):
        resolve_placement(torch.zeros(2, 4, dtype=torch.long), 3, 4, 2)
    with pytest.raises(ValueError, match=r"uses ranks 0 .. 0 but the tensor-parallel size is 2"):
        resolve_placement(torch.zeros(3, 4, dtype=torch.long), 3, 4, 2)
    with pytest.raises(ValueError, match=r"rank 1 holds no head group of block\(s\) \[2\]"):
        resolve_placement(torch.tensor([[0, 1, 0, 0]] * 2 + [[0, 0, 0, 0]]), 3, 4, 2)
    with pytest.raises(ValueError, match="describes 2 ranks but the tensor-parallel size is 3"):
        resolve_placement(speed_aware([2.0, 1.0]), 3, 4, 3)


# -- the frozen Placement ---------------------------------------------------------------------------
def test_placement_round_robin_answers_groups_columns_and_speeds():
    from lightning_d2ft.parallel.placement import Placement, subnet_devices

    p = Placement.round_robin(3, 4, 2)
    assert p.num_devices == 2 and p.speeds == (1.0, 1.0) and (p.depth, p.groups_per_block) == (3, 4)
    assert torch.equal(p.owner, round_robin(3, 4, 2))
    assert p.groups_of(1) == groups_of_rank(p.owner, 1) == [[1, 3]] * 3
    cols = p.column_devices()
    assert cols.tolist() == [-1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, -1]
    assert torch.equal(cols, subnet_devices(p.owner))
    fast = Placement(speed_aware([2.0, 1.0])(12, 6, 2), speeds=(2.0, 1.0))
    assert [sum(map(len, fast.groups_of(r))) for r in range(2)] == [48, 24]
    with pytest.raises(AttributeError):
        p.speeds = (2.0, 1.0)  # type: ignore[misc]


def test_placement_validates_itself():
    from lightning_d2ft.parallel.placement import Placement

    with pytest.raises(ValueError, match=r"rank 1 holds no head group of block\(s\) \[1\]"):
        Placement(torch.tensor([[0, 1], [0, 0]]))
    with pytest.raises(ValueError, match=r"speeds must be 2 positive finite numbers"):
        Placement(torch.tensor([[0, 1]]), speeds=(1.0,))
    with pytest.raises(ValueError, match=r"speeds must be 2 positive finite numbers"):
        Placement(torch.tensor([[0, 1]]), speeds=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"integer tensor \[depth, groups_per_block\]"):
        Placement(torch.zeros(4))
    with pytest.raises(ValueError, match="ranks are 0"):
        Placement(torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        Placement.round_robin(1, 2, 2).groups_of(2)
    with pytest.raises(ValueError, match="larger than the 2 head groups per block"):
        Placement.round_robin(1, 2, 3)
