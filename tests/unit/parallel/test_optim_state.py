"""optim_state: full <-> per-rank optimizer state, with two ranks simulated in one process."""

from __future__ import annotations

import copy

import torch

from lightning_d2ft.model.vit import D2FTViT
from lightning_d2ft.parallel.collectives import SparseTensorParallel
from lightning_d2ft.parallel.optim_state import full_optimizer_state, load_full_optimizer_state
from lightning_d2ft.parallel.placement import groups_of_rank, round_robin


class Holder(torch.nn.Module):
    def __init__(self, net: D2FTViT) -> None:
        super().__init__()
        self.net = net


def _ranks(make_vit):
    net = D2FTViT(make_vit("tiny3"), subnets=11)  # 3 groups per block
    owner = round_robin(net.depth, net.groups_per_block, 2)
    ranks = []
    for r in range(2):
        local = copy.deepcopy(net)
        local.shard_(owner, SparseTensorParallel(None, r, 2))
        ranks.append(Holder(local))
    return ranks, [groups_of_rank(owner, r) for r in range(2)]


def test_a_shard_without_state_saves_and_both_ranks_resume_exactly(make_vit):
    """Rank 1 has had no step for block 0's qkv (no FULL group there): saving used to fail with KeyError;
    now each rank gets back exactly what it had, ``step`` and missing state included."""
    ranks, groups = _ranks(make_vit)
    optimizers = []
    for r, module in enumerate(ranks):
        opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
        for step in range(3):  # rank 1: no step ever for block 0's qkv, one fewer for block 1's fc1
            for i, (name, p) in enumerate(module.named_parameters()):  # replicated ones: the same grads
                skip = r == 1 and ("blocks.0.attn.qkv" in name or ("blocks.1.mlp.fc1" in name and step == 0))
                gen = torch.Generator().manual_seed(100 * step + i)
                p.grad = None if skip else torch.randn(p.shape, generator=gen)
            opt.step()
        optimizers.append(opt)
    payloads = []

    class Captured(Exception):
        pass

    def capture(payload):  # what each rank would send to the all_gather
        payloads.append(payload)
        raise Captured

    for module, opt in zip(ranks, optimizers):
        try:
            full_optimizer_state(opt, module, module.net, "net.vit.", groups, capture)
        except Captured:
            pass
    saved = full_optimizer_state(optimizers[0], ranks[0], ranks[0].net, "net.vit.", groups, lambda p: payloads)
    qkv = saved["state"]["net.vit.blocks.0.attn.qkv.weight"]
    assert qkv["exp_avg"].shape == (3 * 48, 48)  # full size
    assert qkv["d2ft_tp"]["has_state"] == [True, False]
    fc1 = saved["state"]["net.vit.blocks.1.mlp.fc1.weight"]["d2ft_tp"]["scalars"]["step"]
    assert [float(s) for s in fc1] == [3.0, 2.0]
    for r, (module, opt) in enumerate(zip(ranks, optimizers)):
        fresh = torch.optim.AdamW(module.parameters(), lr=1e-2)
        load_full_optimizer_state(fresh, copy.deepcopy(saved), module, module.net, groups[r], r, 2)
        want, got = opt.state_dict()["state"], fresh.state_dict()["state"]
        assert want.keys() == got.keys()
        for i in want:
            for key in want[i]:
                torch.testing.assert_close(got[i][key], want[i][key], msg=f"rank {r} param {i} {key}")
