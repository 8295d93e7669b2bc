"""D2FTViT: the SPEC section 2 invariants, proven numerically, and clear errors on bad input."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_d2ft import CostModel, D2FTViT, Op
from lightning_d2ft.model.grouped import timm_grads
from lightning_d2ft.model.vit import valid_groups_per_block, valid_subnet_counts

TOL = dict(atol=1e-5, rtol=1e-5)


def _input(vit: nn.Module, batch: int = 3) -> torch.Tensor:
    size = vit.patch_embed.img_size
    return torch.randn(batch, 3, *size)


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Gradients by timm name, in timm's layout (a D2FTViT holds one Parameter per head group)."""
    return {n: (None if g is None else g.clone()) for n, g in timm_grads(model).items()}


def _run(model, x, *args):
    model.zero_grad(set_to_none=True)
    y = model(x, *args)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()  # a loss that weighs the logits differently
    return y.detach(), _grads(model)


def test_all_full_equals_timm(vit_shape, make_vit):
    vit = make_vit(vit_shape)
    x = _input(vit)
    y_ref, g_ref = _run(vit, x)
    for g in valid_groups_per_block(vit):
        net = D2FTViT(vit, groups_per_block=g)
        y, grads = _run(net, x)
        torch.testing.assert_close(y, y_ref, **TOL)
        for name, ref in g_ref.items():
            torch.testing.assert_close(grads["vit." + name], ref, **TOL, msg=f"grad of {name} (G={g})")


def test_all_shortcut_block_is_identity(vit_shape, make_vit):
    vit = make_vit(vit_shape)
    net = D2FTViT(vit)
    x = _input(vit)
    block = len(vit.blocks) // 2
    ops = torch.full((net.num_subnets,), int(Op.FULL))
    ops[net.block_slice(block)] = Op.SHORTCUT
    y, grads = _run(net, x, ops)

    reference = copy.deepcopy(vit)
    reference.blocks[block] = nn.Identity()
    y_ref, g_ref = _run(reference, x)
    torch.testing.assert_close(y, y_ref, **TOL)
    for name, p in vit.blocks[block].named_parameters():  # every per-group Parameter too
        assert p.grad is None, f"SHORTCUT block parameter {name} got a gradient"
    for name, ref in g_ref.items():
        torch.testing.assert_close(grads["vit." + name], ref, **TOL)


def test_forward_only_changes_output_like_full_but_gets_no_gradient(vit_shape, make_vit):
    vit = make_vit(vit_shape)
    net = D2FTViT(vit)
    x = _input(vit)
    G = net.groups_per_block
    ops = torch.full((net.num_subnets,), int(Op.FULL))
    fo_block = 0
    ops[net.block_slice(fo_block)] = Op.FORWARD_ONLY  # a whole block forward-only
    if G > 1:
        ops[net.subnet_index(len(vit.blocks) - 1, G - 1)] = Op.FORWARD_ONLY  # one group of the last block
    y_full, _ = _run(net, x)
    y, grads = _run(net, x, ops)
    torch.testing.assert_close(y, y_full, **TOL)  # FORWARD_ONLY changes the output exactly as FULL does
    for name, p in vit.blocks[fo_block].named_parameters():  # every per-group Parameter too
        assert p.grad is None, f"{name} of a FORWARD_ONLY block got a .grad"
    if G > 1:  # the forward-only group's slices get exactly zero, its FULL neighbours do not
        last = len(vit.blocks) - 1
        fc1 = grads[f"vit.blocks.{last}.mlp.fc1.weight"].view(G, -1, vit.embed_dim)
        assert fc1[-1].abs().max() == 0 and fc1[0].abs().max() > 0
        qkv = grads[f"vit.blocks.{last}.attn.qkv.weight"].view(3, G, -1, vit.embed_dim)
        assert qkv[:, -1].abs().max() == 0 and qkv[:, 0].abs().max() > 0
        # and its own Parameters have no gradient at all: the optimizer leaves them alone
        assert all(p.grad is None for n, p in vit.blocks[last].named_parameters() if n.endswith(f"_g{G - 1}"))


def _saved_bytes(net, x, ops) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x, ops).sum()
    return total


def test_forward_only_builds_no_autograd_graph(make_vit):
    vit = make_vit("tiny3")
    net = D2FTViT(vit)
    x = _input(vit)
    ops = torch.full((net.num_subnets,), int(Op.FULL))
    ops[1:-1] = Op.FORWARD_ONLY
    shortcut = ops.clone()
    shortcut[1:-1] = Op.SHORTCUT
    # With every block forward-only, autograd keeps exactly what it keeps when the blocks do not exist.
    assert _saved_bytes(net, x, ops) == _saved_bytes(net, x, shortcut)
    assert _saved_bytes(net, x, None) > 2 * _saved_bytes(net, x, ops)


def _train_flops(net, x, ops) -> int:
    net.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        net(x, ops).sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_measured_flops_follow_the_cost_model(seed, make_vit):
    vit = make_vit("vit_s16")
    net = D2FTViT(vit, subnets=74)
    x = _input(vit, batch=2)
    gen = torch.Generator().manual_seed(seed)
    ops = torch.randint(0, 3, (net.num_subnets,), generator=gen)
    ops[0] = ops[-1] = Op.FULL
    all_shortcut = torch.full_like(ops, int(Op.SHORTCUT))
    all_shortcut[0] = all_shortcut[-1] = Op.FULL

    full, outside_blocks = _train_flops(net, x, None), _train_flops(net, x, all_shortcut)
    block_fraction = CostModel.flops().compute(ops[1:-1]).mean().item()
    predicted = outside_blocks + (full - outside_blocks) * block_fraction
    measured = _train_flops(net, x, ops)
    assert measured == pytest.approx(predicted, rel=0.10)
    assert outside_blocks < 0.1 * full  # the blocks are where the work is


def test_old_names_still_import():
    from lightning_d2ft.model.vit import TensorParallel, find_d2ft, shard_state_dict, shard_vit, unshard_state_dict
    from lightning_d2ft.parallel.sharding import shard_vit as moved

    assert shard_vit is moved and callable(shard_state_dict) and callable(unshard_state_dict)
    assert find_d2ft(D2FTViT(VisionTransformer(img_size=8, patch_size=8, embed_dim=8, depth=1, num_heads=2)))
    assert TensorParallel is not None


def test_subnet_counts_for_vit_s(make_vit):
    vit = make_vit("vit_s16")
    assert [D2FTViT(vit, subnets=n).num_subnets for n in (26, 38, 74)] == [26, 38, 74]
    assert D2FTViT(vit, subnets=3).num_subnets == 38  # groups per block
    assert D2FTViT(vit, groups_per_block=6).num_subnets == 74
    assert D2FTViT(vit).num_subnets == 74  # default: one head per subnet
    assert D2FTViT(vit).vit is vit  # wraps, does not copy


@pytest.mark.parametrize("bad", [4, 5, 27, 75, 0])
def test_invalid_subnet_count_lists_valid_values(bad, make_vit):
    with pytest.raises(ValueError, match=r"subnets = one of \{14, 26, 38, 74\}"):
        D2FTViT(make_vit("vit_s16"), subnets=bad)


def test_invalid_groups_per_block_and_both_given(make_vit):
    with pytest.raises(ValueError, match="does not divide"):
        D2FTViT(make_vit("tiny3"), groups_per_block=2)
    with pytest.raises(ValueError, match="either"):
        D2FTViT(make_vit("tiny3"), subnets=5, groups_per_block=1)


@pytest.mark.parametrize("model", [nn.Linear(3, 3), timm.create_model("resnet18", num_classes=3)])
def test_rejects_models_that_are_not_vits(model):
    with pytest.raises(TypeError, match="not a supported transformer"):
        D2FTViT(model)


def test_rejects_unsupported_vit_variants():
    from timm.models.vision_transformer import VisionTransformer
    with pytest.raises(TypeError, match="drop_path"):
        D2FTViT(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                  drop_path_rate=0.1))
    with pytest.raises(TypeError, match="scale_mlp_norm"):
        D2FTViT(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                  scale_mlp_norm=True))


def test_bad_ops_are_rejected_clearly(make_vit):
    net = D2FTViT(make_vit("tiny3"))
    x = _input(net.vit)
    n = net.num_subnets
    with pytest.raises(ValueError, match=f"{n} Op values"):
        net(x, [Op.FULL] * (n - 1))
    with pytest.raises(ValueError, match="not Op values"):
        net(x, [2] + [7] * (n - 2) + [2])
    with pytest.raises(ValueError, match="stem"):
        net(x, [Op.SHORTCUT] * n)
    with pytest.raises(TypeError, match="integer"):
        net(x, torch.ones(n))


# -- fuzz: random timm ViT shapes, subnet counts and ops --------------------------------------------
@st.composite
def _fuzz_vits(draw):
    heads = draw(st.integers(1, 4))
    patch = draw(st.sampled_from([4, 8]))
    class_token = draw(st.booleans())
    kw = dict(img_size=patch * draw(st.integers(1, 3)), patch_size=patch, depth=draw(st.integers(1, 3)),
              num_heads=heads, embed_dim=heads * draw(st.sampled_from([2, 4, 8])), num_classes=draw(st.integers(1, 6)),
              qkv_bias=draw(st.booleans()), qk_norm=draw(st.booleans()),
              mlp_ratio=draw(st.sampled_from([1.0, 2.0, 4.0])),
              init_values=draw(st.none() | st.just(0.3)), class_token=class_token,
              global_pool=draw(st.sampled_from(["token", "avg"])) if class_token else "avg",
              drop_path_rate=draw(st.sampled_from([0.0, 0.0, 0.0, 0.1])))
    return kw, draw(st.none() | st.integers(-1, 30)), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(_fuzz_vits())
def test_fuzz_d2ftvit_matches_timm_or_rejects_clearly(case):
    kw, subnets, seed = case
    torch.manual_seed(seed)
    vit = VisionTransformer(**kw).eval()
    if kw["drop_path_rate"] > 0 and kw["depth"] > 1:  # timm's rates rise from 0: one block gets none
        with pytest.raises(TypeError, match="drop_path"):
            D2FTViT(vit, subnets=subnets)
        return
    if subnets is not None and subnets not in valid_subnet_counts(vit) + valid_groups_per_block(vit):
        with pytest.raises((ValueError, TypeError), match="valid"):
            D2FTViT(vit, subnets=subnets)
        return
    net = D2FTViT(vit, subnets=subnets)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    torch.testing.assert_close(net(x), vit(x), **TOL)
    gen = torch.Generator().manual_seed(seed)
    ops = torch.randint(0, 3, (net.num_subnets,), generator=gen)
    ops[0] = ops[-1] = Op.FULL
    y = net(x, ops)
    assert y.shape == (2, kw["num_classes"]) and torch.isfinite(y).all()
    y.square().sum().backward()  # any op mix trains
    # a malformed ops vector is refused with a message, never executed
    bad = torch.randint(-2, 5, (int(torch.randint(0, net.num_subnets + 3, (1,), generator=gen)),), generator=gen)
    if bad.numel() != net.num_subnets or bad.min() < 0 or bad.max() > 2 or bad[0] != Op.FULL or bad[-1] != Op.FULL:
        with pytest.raises(ValueError):
            net(x, bad)


def test_shard_keeps_the_placement_object_it_is_given(make_vit):
    """The model stores the strategy's one Placement (no owner buffer of its own); a bare owner table works too."""
    from lightning_d2ft.parallel.collectives import SparseTensorParallel
    from lightning_d2ft.parallel.placement import Placement

    vit = make_vit("tiny3")
    net = D2FTViT(copy.deepcopy(vit))
    assert net.placement is None
    placement = Placement.round_robin(net.depth, net.groups_per_block, 1)
    net.shard_(placement, SparseTensorParallel(None, 0, 1))
    assert net.placement is placement and "group_owner" not in dict(net.named_buffers())
    x = _input(vit)
    torch.testing.assert_close(net(x), vit(x), **TOL)  # one rank holds every group: exactly timm
    with pytest.raises(RuntimeError, match="already sharded"):
        net.shard_(placement, SparseTensorParallel(None, 0, 1))
    other = D2FTViT(copy.deepcopy(vit))
    with pytest.raises(ValueError, match=r"placement has 1 ranks, the tensor-parallel size is 2"):
        other.shard_(placement.owner, SparseTensorParallel(None, 0, 2))


def test_a_one_rank_tensor_parallel_group_runs_mixed_blocks_through_the_fused_kernels(make_vit, monkeypatch):
    """One device under D2FTStrategy is a tensor-parallel group of one: no collectives are needed, so mixed
    blocks take the fused path (before this, every block of a one-device fit took the slow general path),
    with the same outputs and gradients as the unsharded model."""
    from lightning_d2ft.parallel.collectives import SparseTensorParallel
    from lightning_d2ft.parallel.placement import Placement

    vit = make_vit("vit_s16")
    plain, one_rank = D2FTViT(copy.deepcopy(vit)), D2FTViT(copy.deepcopy(vit))
    one_rank.shard_(Placement.round_robin(one_rank.depth, one_rank.groups_per_block, 1),
                    SparseTensorParallel(None, 0, 1))
    ops = torch.full((plain.num_subnets,), int(Op.FULL))
    ops[1:-1] = torch.tensor([Op.FULL, Op.FORWARD_ONLY, Op.SHORTCUT]).repeat((plain.num_subnets - 2) // 3 + 1)[
        : plain.num_subnets - 2]
    x = _input(vit)
    import lightning_d2ft.model.vit as vit_module

    fused_calls = []
    real = vit_module.fused_block
    monkeypatch.setattr(vit_module, "fused_block", lambda *a: fused_calls.append(1) or real(*a))
    outs = []
    for net in (plain, one_rank):
        out = net(x, ops)
        out.square().mean().backward()
        outs.append(out)
    assert len(fused_calls) == 2 * plain.depth, "mixed blocks did not use the fused kernels"
    torch.testing.assert_close(outs[1], outs[0], **TOL)
    for (k, a), b in zip(plain.named_parameters(), one_rank.parameters()):
        assert (a.grad is None) == (b.grad is None), k
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, **TOL)
