"""comm_budget bounds the real bytes: a schedule solved under a communication budget, executed tensor-parallel
over 2 gloo processes, puts exactly the predicted bytes on the wire, within the budget of the all-FULL bytes.
(With the per-item cost model the knapsack used before, a rank's groups of one block shared their messages
and the wire was far above the budget.)"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_d2ft import D2FTViT, Op, Schedule
from lightning_d2ft.parallel.collectives import SparseTensorParallel, ring_allreduce_bytes
from lightning_d2ft.parallel.placement import Placement
from lightning_d2ft.schedule.wire import wire_units

SUBNETS = 74  # ViT-S's finest cut: 3 head groups of every block on each of the 2 ranks
N_MB = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict, vit: torch.nn.Module, tables: list[torch.Tensor]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net = D2FTViT(vit, subnets=SUBNETS)
    net.shard_(Placement.round_robin(net.depth, net.groups_per_block, world), SparseTensorParallel(None, rank, world))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    sent = []
    for table in tables:
        net.tp.stats.reset()
        for ops in table:  # one training step per micro-batch's row
            net.zero_grad(set_to_none=True)
            net(x, ops).square().mean().backward()
        sent.append(net.tp.stats.total_bytes)
    out[rank] = sent
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_bytes_counted_on_two_processes_match_the_prediction_and_stay_within_the_comm_budget(make_vit):
    world = 2
    vit = make_vit("vit_s16")
    net = D2FTViT(vit, subnets=SUBNETS)
    placement = Placement.round_robin(net.depth, net.groups_per_block, world)
    gen = torch.Generator().manual_seed(0)
    weight = torch.rand(SUBNETS, generator=gen) * 10
    back, fwd = weight * torch.rand(N_MB, SUBNETS, generator=gen), torch.rand(N_MB, SUBNETS, generator=gen)
    sched = Schedule.solve(back, fwd, placement=placement, column_blocks=net.subnet_blocks(), budget=1.0,
                           comm_budget=0.5, solver="dp")
    assert (sched.ops[:, sched.scheduled] == Op.FORWARD_ONLY).any()  # the budget made some blocks forward-only
    all_full = torch.full_like(sched.ops, int(Op.FULL))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), out, vit, [sched.ops, all_full]), nprocs=world, join=True)
        out = dict(out)
    measured = [out[0][i] + out[1][i] for i in range(2)]  # bytes over both ranks: the schedule, all FULL
    message = 2 * (vit.patch_embed.num_patches + 1) * vit.embed_dim * 4  # batch x tokens x width x fp32
    per_unit = (world - 1) * message * 2  # a (block, direction) sum of both branches, attention and MLP
    assert ring_allreduce_bytes(message, world) * world == 2 * (world - 1) * message  # 2 units: the all_reduce
    layout = sched.wire_layout
    predicted, predicted_full = wire_units(sched.ops, layout)
    assert measured[0] == predicted * per_unit  # exactly the bytes the wire model predicts
    assert measured[1] == predicted_full * per_unit
    assert measured[0] / measured[1] == pytest.approx(sched.wire_fraction, abs=1e-12)
    assert measured[0] <= 0.5 * measured[1]  # comm_budget bounds the real bytes
    assert sched.compute_fraction > 0.4  # and the budget still trains: FULL blocks and forward-only blocks
