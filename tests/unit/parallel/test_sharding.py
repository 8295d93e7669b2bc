"""Sharding by head group: full <-> per-rank state dicts round-trip exactly; a rank keeps only its groups'
Parameters, in place, and its state dict is its share of timm's tensors."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_d2ft import D2FTViT
from lightning_d2ft.model.lora import add_lora_
from lightning_d2ft.parallel.placement import groups_of_rank, round_robin
from lightning_d2ft.parallel.sharding import shard_index, shard_state_dict, shard_vit, unshard_state_dict


def _round_trip(vit, G: int, world: int = 2) -> None:
    owner = round_robin(len(vit.blocks), G, world)
    shards = [(groups_of_rank(owner, r), shard_vit(copy.deepcopy(vit), G, groups_of_rank(owner, r)).state_dict())
              for r in range(world)]
    shapes = {k: v.shape for k, v in vit.state_dict().items()}
    rebuilt = unshard_state_dict(shapes, G, shards)
    for k, v in vit.state_dict().items():
        torch.testing.assert_close(rebuilt[k], v, atol=0, rtol=0)


def test_shard_and_unshard_round_trip(make_vit):
    vit = make_vit("vit_s16")
    net = D2FTViT(vit, subnets=26)
    _round_trip(vit, net.groups_per_block)
    with pytest.raises(ValueError, match="larger than the 2 head groups"):
        round_robin(12, 2, 4)


def test_lora_adapters_shard_and_keep_their_module(make_vit):
    net = D2FTViT(make_vit("tiny3"))
    add_lora_(net, 2)
    for blk in net.vit.blocks:
        for b in blk.attn.qkv.adapters(blk.attn.qkv.all_positions)[1]:
            torch.nn.init.normal_(b)
    _round_trip(net.vit, net.groups_per_block)
    local = copy.deepcopy(net.vit)
    assert shard_vit(local, 3, [[0], [2], [1]]) is local  # in place
    qkv = local.blocks[0].attn.qkv
    assert type(qkv) is type(net.vit.blocks[0].attn.qkv) and qkv.lora_A.shape == (2, 48)
    assert qkv.weight.shape == (3 * 16, 48) and qkv.group_ids == [0]
    assert sorted(n for n, _ in qkv.named_parameters()) == ["lora_A_g0", "lora_B_g0", "weight_g0"]
    assert local.blocks[1].mlp.fc2.group_ids == [2]


def test_shard_index_reads_the_layout_table():
    dim, idx = shard_index("blocks.1.attn.qkv.weight", (12, 4), 2, [[0], [1]])
    assert dim == 0 and idx.tolist() == [2, 3, 6, 7, 10, 11]  # q, k, v rows of group 1
    dim, idx = shard_index("vit.blocks.0.mlp.fc2.weight", (4, 8), 2, [[1]])
    assert dim == 1 and idx.tolist() == [4, 5, 6, 7]
    assert shard_index("blocks.0.norm1.weight", (4,), 2, [[0]]) is None


def test_shard_state_dict_and_bad_ownership(make_vit):
    vit = make_vit("tiny3")
    part = shard_state_dict(vit.state_dict(), 3, [[0, 2]] * 3)
    assert part["blocks.0.attn.qkv.weight"].shape == (96, 48) and part["head.weight"].shape == (5, 48)
    with pytest.raises(ValueError, match="at least one head group of every block"):
        shard_vit(vit, 3, [[0], [], [1]])
