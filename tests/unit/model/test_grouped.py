"""GroupedLinear: one Parameter per head group behind timm's forward, keys and layout; packed side by side."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from lightning_d2ft import D2FTViT
from lightning_d2ft.model.grouped import GroupedLinear, _side_by_side, join_groups
from lightning_d2ft.parallel.layout import GROUPED, from_groups, to_groups


def test_timm_checkpoints_load_and_state_dicts_stay_timm(vit_shape, make_vit):
    plain = make_vit(vit_shape)
    net = D2FTViT(make_vit(vit_shape))  # other random weights
    net.vit.load_state_dict(plain.state_dict())  # a plain timm checkpoint, strict
    state = net.vit.state_dict()
    assert list(state) == list(plain.state_dict())  # timm's keys, in timm's order
    for k, v in plain.state_dict().items():
        assert torch.equal(state[k], v), k
    x = torch.randn(2, 3, *plain.patch_embed.img_size)
    torch.testing.assert_close(net.vit.eval()(x), plain.eval()(x))  # timm's own forward, on the groups
    with pytest.raises(RuntimeError, match="size mismatch for blocks.0.attn.qkv.weight"):
        bad = dict(plain.state_dict())
        bad["blocks.0.attn.qkv.weight"] = bad["blocks.0.attn.qkv.weight"][:-1]
        net.vit.load_state_dict(bad)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "blocks.0.attn.qkv.extra"'):
        net.vit.load_state_dict({**plain.state_dict(), "blocks.0.attn.qkv.extra": torch.zeros(1)})


def test_one_parameter_per_group_packed_side_by_side_through_moves_and_copies(make_vit):
    net = D2FTViT(make_vit("vit_s16"), subnets=26)  # 2 groups of 3 heads
    qkv = net.vit.blocks[0].attn.qkv
    assert isinstance(qkv, GroupedLinear) and qkv.group_ids == [0, 1]
    assert [n for n, _ in qkv.named_parameters()] == ["weight_g0", "weight_g1", "bias_g0", "bias_g1"]
    assert [n for n, _ in net.vit.blocks[0].attn.proj.named_parameters()] == ["weight_g0", "weight_g1", "bias"]
    assert qkv.weights([0])[0].shape == (3 * 192, 384)  # head-major q|k|v rows of the group's 3 heads
    for model in (net, copy.deepcopy(net), pickle.loads(pickle.dumps(net)), copy.deepcopy(net).double()):
        q = model.vit.blocks[0].attn.qkv
        assert _side_by_side(q.weights([0, 1])) and join_groups(q.weights([0, 1]))._base is not None
    before = [p.data_ptr() for p in net.parameters()]
    net.to("cpu")  # nothing to move: the packing keeps its addresses (CUDA graphs read them there)
    assert [p.data_ptr() for p in net.parameters()] == before


def test_regrouping_keeps_the_model_and_lora_fixes_the_groups(make_vit):
    vit = make_vit("vit_s16")
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    net = D2FTViT(vit, subnets=74)
    net.regroup_(26)
    assert net.vit.blocks[3].mlp.fc1.num_groups == 2
    assert all(torch.equal(net.vit.state_dict()[k], v) for k, v in state.items())
    from lightning_d2ft.model.lora import add_lora_

    add_lora_(net, 2)
    with pytest.raises(RuntimeError, match="LoRA"):
        net.regroup_(74)


@pytest.mark.parametrize("key", sorted(GROUPED))
def test_to_groups_and_back_is_exact_and_qkv_rows_are_head_major(key):
    shape = {0: (3 * 4 * 2 * 5, 7) if GROUPED[key].lead == 3 else (4 * 6, 7), 1: (7, 4 * 6)}[GROUPED[key].dim]
    if key.endswith("bias"):
        shape = shape[:1]
    t = torch.randn(shape)
    parts = to_groups(t, GROUPED[key], 4, heads_per_group=2)
    assert all(p.is_contiguous() for p in parts) and len(parts) == 4
    assert torch.equal(from_groups(parts, GROUPED[key], 2), t)
    if key == "attn.qkv.weight":  # group 1 = heads 2, 3: q, k, v of head 2, then of head 3
        rows = t.view(3, 8, 5, 7)
        want = torch.cat([rows[0, 2], rows[1, 2], rows[2, 2], rows[0, 3], rows[1, 3], rows[2, 3]])
        assert torch.equal(parts[1], want)


def test_a_shard_keeps_only_its_groups_memory(make_vit):
    from lightning_d2ft.parallel.collectives import SparseTensorParallel
    from lightning_d2ft.parallel.placement import Placement

    net = D2FTViT(make_vit("vit_s16"), subnets=74)
    owner = torch.tensor([[0, 0, 0, 1, 1, 1]] * net.depth)  # rank 0 holds neighbouring groups 0, 1, 2
    net.shard_(Placement.from_any(owner), SparseTensorParallel(None, 0, 2))
    fc1 = net.vit.blocks[0].mlp.fc1
    assert fc1.group_ids == [0, 1, 2]
    w = fc1.weights([0, 1, 2])
    assert _side_by_side(w) and w[0].untyped_storage().nbytes() == 3 * w[0].numel() * 4  # the others' rows freed
