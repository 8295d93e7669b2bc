"""collectives: the one ring formula, named failures, and the LoRA "needs grad" agreement (1 rank)."""

from __future__ import annotations

import pytest
import torch

from lightning_d2ft.parallel.collectives import (
    CollectiveError,
    CommStats,
    SparseTensorParallel,
    named_collective,
    ring_allreduce_bytes,
)


def test_ring_allreduce_bytes_is_2_n_minus_1_over_n():
    assert ring_allreduce_bytes(1000, 1) == 0
    assert ring_allreduce_bytes(1000, 2) == 1000
    assert ring_allreduce_bytes(1200, 4) == 1800


def test_a_failed_collective_names_the_op_and_the_rank():
    def closed(*args, **kwargs):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")

    with pytest.raises(CollectiveError, match=r"collective 'tensor-parallel all_reduce \(forward\)' failed on rank 1"):
        named_collective("tensor-parallel all_reduce (forward)", 1, closed)
    assert named_collective("x", 0, lambda a: a + 1, 1) == 2  # success passes the result through


def test_reduce_output_requires_grad_whenever_grad_is_enabled_even_with_nothing_local():
    """The fix for the D2FT-LoRA deadlock: whether the reduced sum requires grad may not depend on this
    rank's own partial (a rank without FULL adapters has none), or the next block's backward collective
    would run on some ranks only."""
    comm = SparseTensorParallel(None, 0, 1)
    like = torch.zeros(2, 3)  # a frozen trunk: no grad
    with torch.enable_grad():
        assert comm.reduce_partial(None, like, [False]).requires_grad
        assert comm.reduce_partial(torch.ones(2, 3), like, [True]).requires_grad
    with torch.no_grad():
        assert not comm.reduce_partial(None, like, [False]).requires_grad


def test_comm_stats_reset():
    stats = CommStats(forward_bytes=3, backward_bytes=4)
    assert stats.total_bytes == 7
    stats.reset()
    assert stats.total_bytes == 0
