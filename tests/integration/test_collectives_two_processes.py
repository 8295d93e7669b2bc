"""Tensor-parallel execution over 2 gloo processes equals the unsharded model; bytes match the schedule."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_d2ft import D2FTViT, Op, Schedule
from lightning_d2ft.parallel.collectives import SparseTensorParallel
from lightning_d2ft.parallel.placement import groups_of_rank, round_robin, subnet_devices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ops_table(net: D2FTViT, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ops = torch.randint(0, 3, (n, net.num_subnets), generator=gen)
    ops[:, 0] = ops[:, -1] = Op.FULL
    ops[0, net.block_slice(3)] = Op.SHORTCUT  # a whole block skipped on every rank
    ops[1, net.block_slice(4)] = Op.FORWARD_ONLY  # a whole block without backward
    return ops


def _worker(rank: int, world: int, port: int, out: dict, vit: torch.nn.Module) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net = D2FTViT(vit, subnets=26)  # the same weights on every rank: the test sends the model
    owner = round_robin(net.depth, net.groups_per_block, world)
    groups = groups_of_rank(owner, rank)
    local = net
    local.shard_(owner, SparseTensorParallel(None, rank, world))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    results = []
    for ops in _ops_table(net, 3, seed=1):
        local.zero_grad(set_to_none=True)
        local.tp.stats.reset()
        y = local(x, ops)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        grads = {k: p.grad for k, p in local.vit.named_parameters()}  # a head group's Parameters: on its rank only
        results.append((y.detach(), groups, grads, local.tp.stats.total_bytes))
    out[rank] = results
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_tensor_parallel_matches_single_process_and_counts_bytes(make_vit):
    world = 2
    vit = make_vit("vit_s16")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), out, vit), nprocs=world, join=True)
        out = dict(out)
    net = D2FTViT(vit, subnets=26)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    owner = round_robin(net.depth, net.groups_per_block, world)
    table = _ops_table(net, 3, seed=1)
    for i, ops in enumerate(table):
        net.zero_grad(set_to_none=True)
        y = net(x, ops)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        ref = {k: p.grad for k, p in vit.named_parameters()}
        for rank in range(world):
            torch.testing.assert_close(out[rank][i][0], y.detach(), atol=1e-5, rtol=1e-5)
        for k, g in ref.items():  # every Parameter lives on one rank (a head group's) or on both (replicated)
            holders = [r for r in range(world) if k in out[r][i][2]]
            assert holders, k
            for r in holders:
                got = out[r][i][2][k]
                assert (got is None) == (g is None), (k, r)  # a group that ran no FULL has no gradient at all
                if g is not None:
                    torch.testing.assert_close(got, g, atol=1e-5, rtol=1e-4, msg=k)
        # both ranks hold identical gradients of the replicated parameters
        for k in ("blocks.0.norm1.weight", "head.weight", "patch_embed.proj.weight"):
            a, b = out[0][i][2][k], out[1][i][2][k]
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), k

    # bytes: one message per (block branch, rank) in forward if any local subnet runs, in backward if any is FULL
    sched = Schedule(ops=table, placement=subnet_devices(owner), speeds=torch.ones(world),
                     column_blocks=net.subnet_blocks())
    tokens = vit.patch_embed.num_patches + 1
    message = 3 * tokens * 384 * 4  # batch x tokens x width x fp32: one partial sum of a branch
    all_full = 2 * 2 * net.depth * message * len(table)  # fwd + bwd, attention + MLP, per rank (world 2)
    for rank in range(world):
        sent = sum(r[3] for r in out[rank])
        assert sent < all_full
    sent_total = sum(r[3] for rank in range(world) for r in out[rank])
    assert sent_total / (world * all_full) == pytest.approx(sched.wire_fraction, rel=1e-6)
