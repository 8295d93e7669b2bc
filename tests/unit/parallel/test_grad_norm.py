"""grad_norm: on one tensor-parallel rank, clipping by the global norm is torch's clip_grad_norm_."""

from __future__ import annotations

import copy

import torch

from lightning_d2ft.parallel.grad_norm import clip_grad_by_global_norm, sharded_parameter_ids


def test_one_rank_clips_like_clip_grad_norm():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    x = torch.randn(5, 4)
    for m in (model, twin):
        (m(x) ** 2).sum().backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clip_grad_by_global_norm(optimizer, 0.5, set(), None, 0, 1)
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_nothing_is_sharded_on_one_tensor_parallel_rank(make_vit):
    from lightning_d2ft import D2FTViT
    from lightning_d2ft.parallel.collectives import SparseTensorParallel
    from lightning_d2ft.parallel.placement import Placement

    net = D2FTViT(make_vit("tiny3"))
    net.shard_(Placement.round_robin(net.depth, net.groups_per_block, 1), SparseTensorParallel(None, 0, 1))
    assert sharded_parameter_ids(net, 1) == set()


def test_on_two_ranks_the_head_groups_parameters_are_the_sharded_ones(make_vit):
    from lightning_d2ft import D2FTViT
    from lightning_d2ft.parallel.collectives import SparseTensorParallel
    from lightning_d2ft.parallel.placement import Placement

    net = D2FTViT(make_vit("tiny3"))
    net.shard_(Placement.round_robin(net.depth, net.groups_per_block, 2), SparseTensorParallel(None, 1, 2))
    sharded = sharded_parameter_ids(net, 2)
    names = {n for n, p in net.vit.named_parameters() if id(p) in sharded}
    assert names and all("_g" in n for n in names)  # each lives on this rank only: its squares are summed over ranks
    assert {n for n, _ in net.vit.named_parameters()} - names >= {"blocks.0.norm1.weight", "blocks.0.attn.proj.bias",
                                                                   "head.weight"}  # replicated: counted once
