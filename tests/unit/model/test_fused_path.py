"""The fused grouped kernels: gradcheck against finite differences on every op pattern of a block's branches
(the FORWARD_ONLY groups' part taken out by an independent per-group reference), equality with the general
grouped path, and the aten-op-count targets of issue 14 (deterministic)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from lightning_d2ft import D2FTViT, Op, Schedule
from lightning_d2ft.model import fused_path as kernels
from lightning_d2ft.model.fused_path import _gather, _trained, block_plan, branch_on
from lightning_d2ft.model.grouped import group_blocks_, timm_grads
from lightning_d2ft.ops import count_aten_ops

G = 3
PATTERNS = [p for p in itertools.product((0, 1, 2), repeat=G) if max(p) > 0]


def _tiny_block(fused: bool, bias: bool, heads_per_group: int = 1) -> Block:
    blk = Block(dim=6 * heads_per_group, num_heads=G * heads_per_group, mlp_ratio=1.0, qkv_bias=bias).double()
    blk.attn.fused_attn = fused
    holder = torch.nn.Module()
    holder.blocks = torch.nn.ModuleList([blk])
    group_blocks_(holder, G)
    return blk


def _attn_group_ref(blk, h, g):
    """Head group g's attention output through its proj columns, written out from timm's layout."""
    W, b, Wp = blk.attn.qkv.weight, blk.attn.qkv.bias, blk.attn.proj.weight
    B, N, _ = h.shape
    per = W.shape[0] // (3 * G)
    rows = [t * G * per + g * per + i for t in range(3) for i in range(per)]
    y = F.linear(h, W[rows], None if b is None else b[rows])
    heads = per // blk.attn.head_dim
    q, k, v = y.view(B, N, 3, heads, blk.attn.head_dim).permute(2, 0, 3, 1, 4)
    o = ((q * blk.attn.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
    return o.transpose(1, 2).reshape(B, N, per) @ Wp[:, g * per:(g + 1) * per].t()


def _mlp_group_ref(blk, h, g):
    W1, b1, W2 = blk.mlp.fc1.weight, blk.mlp.fc1.bias, blk.mlp.fc2.weight
    per = W1.shape[0] // G
    sl = slice(g * per, (g + 1) * per)
    return F.gelu(F.linear(h, W1[sl], None if b1 is None else b1[sl])) @ W2[:, sl].t()


@pytest.mark.parametrize("fused,bias,heads_per_group", [(True, True, 1), (False, False, 1), (True, True, 2)])
def test_gradcheck_every_op_pattern_of_a_block(fused, bias, heads_per_group):
    blk = _tiny_block(fused, bias, heads_per_group)
    D = blk.attn.qkv.in_features
    for ops, attention in itertools.product(PATTERNS, (True, False)):
        plan = block_plan(ops)
        first, second = (blk.attn.qkv, blk.attn.proj) if attention else (blk.mlp.fc1, blk.mlp.fc2)
        ref = _attn_group_ref if attention else _mlp_group_ref
        h = torch.randn(2, 3, D, dtype=torch.float64, requires_grad=True)

        def f(h, *params, plan=plan, attention=attention, ref=ref, ops=ops):
            with torch.no_grad():  # the FORWARD_ONLY part (it has, by design, no gradient)
                fo = sum((ref(blk, h, g) for g, o in enumerate(ops) if o == Op.FORWARD_ONLY), torch.zeros(()))
            full = _gather(blk, plan.full, None) if plan.full else None  # the Parameters as gradcheck moved them
            rest = _gather(blk, plan.forward_only, None) if plan.forward_only else None
            params = _trained(blk, plan.full, attention) if plan.full else []
            return branch_on(blk, h, full, rest, plan.n_full, len(plan.forward_only), params, plan.n_full,
                             attention) - fo

        if not plan.full:  # no FULL group: the branch is a plain forward, its bias included, with no graph
            with torch.no_grad():
                expected = sum(ref(blk, h, g) for g, o in enumerate(ops) if o == Op.FORWARD_ONLY) + second.bias
            out = f(h)
            assert not out.requires_grad
            torch.testing.assert_close(out + sum(ref(blk, h, g) for g, o in enumerate(ops) if o == Op.FORWARD_ONLY),
                                       expected.detach())
            continue
        # the very Parameters of the FULL groups and the shared bias: gradcheck perturbs them in place
        params = first.group_parameters(plan.full) + second.weights(plan.full) + [second.bias]
        assert torch.autograd.gradcheck(f, (h, *params), eps=1e-6, atol=1e-5, fast_mode=True), (ops, attention)
        blk.zero_grad(set_to_none=True)
        f(h, *params).sum().backward()
        skipped = [i for i, o in enumerate(ops) if o != Op.FULL]
        assert all(p.grad is None for p in first.group_parameters(skipped) + second.weights(skipped)), ops


def _grads(net):
    return {n: (None if g is None else g.clone()) for n, g in timm_grads(net).items()}


@pytest.mark.parametrize("shape,patterns", [("tiny3", PATTERNS), ("vit_s16", [(1, 2, 0), (2, 1, 1), (0, 1, 0)])])
def test_fused_equals_general_path_on_every_pattern_of_a_block(shape, patterns, make_vit, monkeypatch):
    vit = make_vit(shape)
    net = D2FTViT(vit, groups_per_block=3)
    x = torch.randn(2, 3, *vit.patch_embed.img_size)
    block = 1
    for pattern in patterns:
        ops = torch.full((net.num_subnets,), int(Op.FULL))
        ops[net.block_slice(block)] = torch.tensor(pattern)
        ops[net.subnet_index(0, 0)] = Op.FORWARD_ONLY  # block 0 mixed too
        results = []
        for fast in (True, False):
            monkeypatch.setattr("lightning_d2ft.model.vit.fast_path_ok", lambda blk, fast=fast: fast)
            net.zero_grad(set_to_none=True)
            y = net(x, ops)
            (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
            has = {n: p.grad is not None for n, p in net.named_parameters()}
            results.append((y.detach(), _grads(net), has))
        (y_fast, g_fast, has_fast), (y_ref, g_ref, has_ref) = results
        torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
        assert has_fast == has_ref, pattern  # the same Parameters get a gradient on both paths
        for name, ref in g_ref.items():
            got = g_fast[name]
            assert (got is None) == (ref is None), name
            if ref is not None:
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4, msg=f"{name} {pattern}")


def test_forward_only_and_shortcut_groups_get_no_gradient_and_full_ones_do(make_vit):
    vit = make_vit("vit_s16")
    net = D2FTViT(vit, groups_per_block=3)
    x = torch.randn(2, 3, 32, 32)
    ops = torch.full((net.num_subnets,), int(Op.FULL))
    ops[net.block_slice(0)] = torch.tensor([Op.FORWARD_ONLY, Op.FULL, Op.SHORTCUT])
    net(x, ops).sum().backward()
    blk = vit.blocks[0]
    for g, trained in ((0, False), (1, True), (2, False)):
        group = [p for n, p in blk.named_parameters() if n.endswith(f"_g{g}")]
        assert len(group) == 6  # qkv weight and bias, proj weight, fc1 weight and bias, fc2 weight
        assert all((p.grad is not None) == trained for p in group), g
    assert blk.norm1.weight.grad is not None and blk.attn.proj.bias.grad is not None  # shared: trained


def _budget_schedule(net: D2FTViT, micro_batches: int = 8) -> Schedule:
    gen = torch.Generator().manual_seed(0)
    back = torch.rand(micro_batches, net.num_subnets, generator=gen)
    fwd = torch.rand(micro_batches, net.num_subnets, generator=gen)
    return Schedule.solve(back, fwd, budget=0.6, devices=1, solver="dp")


def test_aten_ops_per_step_targets(make_vit):
    """Issue 14: <= 1.1x plain timm at all FULL, <= 1.3x at budget 0.6 (mean over the schedule's columns)."""
    vit = make_vit("vit_s16")
    plain = make_vit("vit_s16")
    net = D2FTViT(vit, subnets=74)
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])

    def ops_per_step(model, *ops) -> int:
        def step():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x, *ops), target).backward()
        step()
        return count_aten_ops(step)

    plain_ops = ops_per_step(plain)
    full = ops_per_step(net, torch.full((net.num_subnets,), int(Op.FULL)))
    columns = _budget_schedule(net, micro_batches=4).ops
    budget = sum(ops_per_step(net, col) for col in columns) / len(columns)
    assert full <= 1.1 * plain_ops, (full, plain_ops)
    assert budget <= 1.3 * plain_ops, (budget, plain_ops)
    assert kernels.fast_path_ok(vit.blocks[0])
