"""optim_state: per-rank optimizer state <-> a checkpoint keyed by name, two ranks simulated in one process."""

from __future__ import annotations

import copy

import torch

from lightning_d2ft.model.vit import D2FTViT
from lightning_d2ft.parallel.collectives import SparseTensorParallel
from lightning_d2ft.parallel.layout import GROUPED, to_groups
from lightning_d2ft.parallel.optim_state import full_optimizer_state, load_full_optimizer_state
from lightning_d2ft.parallel.placement import groups_of_rank, round_robin


class Holder(torch.nn.Module):
    def __init__(self, net: D2FTViT) -> None:
        super().__init__()
        self.net = net


def _ranks(make_vit, world: int = 2):
    net = D2FTViT(make_vit("tiny3"), subnets=11)  # 3 groups per block
    owner = round_robin(net.depth, net.groups_per_block, world)
    ranks = []
    for r in range(world):
        local = copy.deepcopy(net)
        local.shard_(owner, SparseTensorParallel(None, r, world))
        ranks.append(Holder(local))
    return ranks, [groups_of_rank(owner, r) for r in range(world)], Holder(net)


def _train(module, skip) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    for step in range(3):
        for name, p in module.named_parameters():  # replicated ones: the same grads on every rank
            gen = torch.Generator().manual_seed(100 * step + sum(map(ord, name)))
            p.grad = None if skip(name, step) else torch.randn(p.shape, generator=gen)
        opt.step()
    return opt


def _gathered(ranks, optimizers, groups) -> dict:
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
    return full_optimizer_state(optimizers[0], ranks[0], ranks[0].net, "net.vit.", groups, lambda p: payloads)


def _skip(name: str, step: int) -> bool:
    # block 0, group 1 never ran FULL; block 1, group 0 missed the first step
    never = name.endswith("_g1") and "blocks.0." in name
    return never or (name.endswith("_g0") and "blocks.1." in name and step == 0)


def test_every_groups_state_is_saved_under_its_name_and_resumes_on_any_tensor_parallel_size(make_vit):
    ranks, groups, whole = _ranks(make_vit)
    optimizers = [_train(module, _skip) for module in ranks]
    saved = _gathered(ranks, optimizers, groups)
    state = saved["state"]
    assert state["net.vit.blocks.0.attn.qkv.weight_g1"] == {}  # never FULL: no state, and none made up
    assert float(state["net.vit.blocks.1.mlp.fc1.weight_g0"]["step"]) == 2.0  # its own step count
    assert float(state["net.vit.blocks.1.mlp.fc1.weight_g1"]["step"]) == 3.0
    assert state["net.vit.blocks.0.attn.qkv.weight_g0"]["exp_avg"].shape == (3 * 16, 48)  # the group's own rows
    every = {n for n, _ in whole.named_parameters()}
    assert set(state) == every and set(saved["param_groups"][0]["params"]) == every
    for r, (module, opt) in enumerate(zip(ranks, optimizers)):  # the same size: each rank gets its own back
        fresh = torch.optim.AdamW(module.parameters(), lr=1e-2)
        load_full_optimizer_state(fresh, copy.deepcopy(saved), module, module.net, groups[r], r, 2)
        want, got = opt.state_dict()["state"], fresh.state_dict()["state"]
        assert want.keys() == got.keys()
        for i in want:
            for key in want[i]:
                assert torch.equal(got[i][key], want[i][key]), f"rank {r} param {i} {key}"
    # one process: every group's state, from whichever rank held it
    fresh = torch.optim.AdamW(whole.parameters(), lr=1e-2)
    load_full_optimizer_state(fresh, copy.deepcopy(saved), whole, whole.net, None, 0, 1)
    names = [n for n, _ in whole.named_parameters()]
    for i, st in fresh.state_dict()["state"].items():
        for key, value in st.items():
            assert torch.equal(value, state[names[i]][key]), (names[i], key)
    assert len(fresh.state_dict()["state"]) == sum(bool(state[n]) for n in names)


def test_a_checkpoint_from_before_per_group_parameters_loads_into_the_groups(make_vit):
    """Older checkpoints hold one state per timm tensor (full size, timm's name), with the ranks' ``step``
    scalars under ``d2ft_tp``: every group gets its rows, and its rank's step on the same tensor-parallel size."""
    ranks, groups, whole = _ranks(make_vit)
    net = whole.net
    name = "net.vit.blocks.1.attn.qkv.weight"
    exp_avg = torch.randn(3 * 48, 48)
    old = {"d2ft_by_name": True, "param_groups": [{"lr": 1e-2, "weight_decay": 0.01, "params": [name]}],
           "state": {name: {"step": torch.tensor(3.0), "exp_avg": exp_avg, "exp_avg_sq": exp_avg.abs(),
                            "d2ft_tp": {"has_state": [True, False], "scalars": {"step": [torch.tensor(3.0),
                                                                                         torch.tensor(1.0)]}}}}}
    rows = to_groups(exp_avg, GROUPED["attn.qkv.weight"], 3, 1)
    for r, module in enumerate(ranks):
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
        load_full_optimizer_state(opt, copy.deepcopy(old), module, module.net, groups[r], r, 2)
        names = [n for n, _ in module.named_parameters()]
        loaded = {names[i]: st for i, st in opt.state_dict()["state"].items()}
        if r == 1:  # its rank had no state for that tensor: its group starts fresh
            assert not loaded
            continue
        mine = [g for g in groups[r][1]]
        assert sorted(loaded) == sorted(f"{name}_g{g}" for g in mine)
        for g in mine:
            assert torch.equal(loaded[f"{name}_g{g}"]["exp_avg"], rows[g])
            assert float(loaded[f"{name}_g{g}"]["step"]) == 3.0
        assert opt.param_groups[0]["lr"] == 1e-2
    opt = torch.optim.AdamW(whole.parameters(), lr=1e-3)  # one process: every group, the first rank's step
    load_full_optimizer_state(opt, copy.deepcopy(old), whole, net, None, 0, 1)
    assert len(opt.state_dict()["state"]) == 3
