"""LoRA on subnets: same outputs as the merged plain timm model, op semantics on adapters, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_d2ft import D2FTViT, Op
from lightning_d2ft.model.lora import add_lora_, merge_lora


def _with_lora(vit: torch.nn.Module, rank: int = 2) -> D2FTViT:
    net = D2FTViT(vit.eval())
    add_lora_(net, rank, alpha=3.0)
    for blk in net.vit.blocks:  # B starts at 0 (no change); make the adapters matter
        for b in blk.attn.qkv.adapters(blk.attn.qkv.all_positions)[1]:
            torch.nn.init.normal_(b, std=0.1)
    return net


def test_adapters_start_neutral_and_merge_into_a_plain_timm_model(vit_shape, make_vit):
    vit = make_vit(vit_shape).eval()
    x = torch.randn(2, 3, *vit.patch_embed.img_size)
    before = vit(x)
    net = D2FTViT(copy.deepcopy(vit))
    add_lora_(net, 2)
    torch.testing.assert_close(net(x), before, atol=1e-5, rtol=1e-5)  # B = 0: the model is unchanged

    net = _with_lora(make_vit(vit_shape))
    plain = make_vit(vit_shape).eval()
    plain.load_state_dict(merge_lora(net.vit.state_dict()))  # strict: no adapter keys left
    torch.testing.assert_close(net(x), plain(x), atol=1e-5, rtol=1e-5)


def test_only_adapters_and_head_train_and_each_op_keeps_its_meaning(make_vit):
    net = _with_lora(make_vit("tiny3"))
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"vit.blocks.{l}.attn.qkv.lora_{m}_g{g}" for l in range(3) for m in "AB" for g in range(3)} \
        | {"vit.head.weight", "vit.head.bias"}
    ops = torch.full((net.num_subnets,), int(Op.FULL))
    ops[net.subnet_index(1, 0)] = Op.FORWARD_ONLY
    ops[net.subnet_index(1, 1)] = Op.SHORTCUT
    x = torch.randn(2, 3, 32, 32)
    net(x, ops).square().sum().backward()
    qkv = net.vit.blocks[1].attn.qkv
    a, b = qkv.adapters(qkv.all_positions)
    assert a[0].grad is None and b[0].grad is None  # FORWARD_ONLY: no gradient, so no optimizer step
    assert a[1].grad is None and b[1].grad is None  # SHORTCUT: the same
    assert a[2].grad.abs().sum() > 0 and b[2].grad.abs().sum() > 0  # FULL trains its adapter
    assert all(p.grad is None for n, p in net.named_parameters() if not p.requires_grad)


def test_forward_only_adapter_changes_the_output_like_full(make_vit):
    net = _with_lora(make_vit("tiny3"))
    x = torch.randn(2, 3, 32, 32)
    ops = torch.full((net.num_subnets,), int(Op.FULL))
    ops[net.subnet_index(0, 2)] = Op.FORWARD_ONLY
    torch.testing.assert_close(net(x, ops), net(x), atol=1e-6, rtol=1e-6)


def test_bad_lora_settings_are_refused(make_vit):
    net = D2FTViT(make_vit("tiny3"))
    with pytest.raises(ValueError, match="lora_rank must be a positive int"):
        add_lora_(net, 0)
    with pytest.raises(ValueError, match="lora_alpha must be positive"):
        add_lora_(net, 2, alpha=-1.0)
    add_lora_(net, 2)
    with pytest.raises(RuntimeError, match="already has LoRA"):
        add_lora_(net, 2)
