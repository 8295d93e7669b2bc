"""Only FULL subnets learn (issue 25): after an optimizer step, a head group that ran no FULL micro-batch in
it is bit-identical (weights, and optimizer state: momentum, Adam moments, step count, weight decay), and a
group FULL in any accumulated micro-batch is updated; for SGD with momentum, Adam and AdamW, each fused,
foreach and for-loop, with gradient clipping. Optimizers that cannot keep this are refused or named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_d2ft import D2FTViT, Op
from lightning_d2ft.model.optimizers import check_optimizer
from lightning_d2ft.parallel.layout import group_indices, grouped_dim

IMPLS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}
KINDS = {
    "sgd-momentum": lambda params, impl: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01, **impl),
    "adam": lambda params, impl: torch.optim.Adam(params, lr=0.01, weight_decay=0.01, **impl),
    "adamw": lambda params, impl: torch.optim.AdamW(params, lr=0.01, weight_decay=0.05, **impl),
}
F_, FO, S = int(Op.FULL), int(Op.FORWARD_ONLY), int(Op.SHORTCUT)


def _group_slices(net: D2FTViT, block: int, group: int) -> dict[str, torch.Tensor]:
    """Group ``group`` of block ``block``'s rows/columns of every grouped timm tensor (read from the state dict,
    in timm's layout, so the check does not depend on how the model stores its weights)."""
    out = {}
    for key, value in net.vit.state_dict().items():
        found = grouped_dim(key)
        if found is not None and found[0] == block:
            layout = found[1]
            idx = group_indices(value.shape[layout.dim], layout, net.groups_per_block, [group])
            out[key] = value.index_select(layout.dim, idx).clone()
    return out


def _group_state(net: D2FTViT, optimizer: torch.optim.Optimizer, block: int, group: int) -> dict:
    params = {n: p for n, p in net.vit.blocks[block].named_parameters() if n.endswith(f"_g{group}")}
    assert len(params) == 5  # qkv weight (tiny3: no qkv bias), proj weight, fc1 weight and bias, fc2 weight
    return {(n, k): (v.clone() if torch.is_tensor(v) else v) for n, p in params.items()
            for k, v in optimizer.state.get(p, {}).items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_group_without_a_full_micro_batch_is_bit_identical_after_the_step(kind, impl, make_vit):
    torch.manual_seed(0)
    net = D2FTViT(make_vit("tiny3"), groups_per_block=3)  # 3 blocks x 3 groups, qkv without bias
    optimizer = KINDS[kind](net.parameters(), IMPLS[impl])
    if (kind, impl) == ("sgd-momentum", "fused"):  # refused: see the test below
        with pytest.raises(ValueError, match=r"SGD\(fused=True\) with momentum"):
            check_optimizer(optimizer)
        return
    x = torch.randn(3, 4, 3, 32, 32)
    y = torch.randint(0, 5, (3, 4))

    def micro_batch(i, ops):
        F.cross_entropy(net(x[i], ops), y[i]).backward()

    micro_batch(0, None)  # step 1: every subnet FULL, so every group has momentum / moments to carry on
    optimizer.step()
    optimizer.zero_grad()

    a = torch.full((net.num_subnets,), F_)
    b = a.clone()
    a[net.block_slice(0)], b[net.block_slice(0)] = FO, S  # block 0: no FULL group at all
    a[net.block_slice(1)] = torch.tensor([F_, FO, S])  # block 1: group 0 FULL in the first micro-batch,
    b[net.block_slice(1)] = torch.tensor([S, S, F_])  # group 1 never FULL, group 2 FULL in the second
    before = {(l, g): (_group_slices(net, l, g), _group_state(net, optimizer, l, g)) for l in (0, 1) for g in range(3)}
    micro_batch(1, a)  # step 2: two accumulated micro-batches, clipped
    micro_batch(2, b)
    torch.nn.utils.clip_grad_norm_(net.parameters(), 0.01)
    optimizer.step()

    for (l, g), (weights, state) in before.items():
        trained = l == 1 and g != 1
        same_weights = _equal(_group_slices(net, l, g), weights)
        same_state = _equal(_group_state(net, optimizer, l, g), state)
        assert same_weights != trained, f"{kind} {impl}: block {l} group {g} weights {'not ' * trained}updated"
        assert same_state != trained, f"{kind} {impl}: block {l} group {g} optimizer state {'not ' * trained}updated"
    blk0 = net.vit.blocks[0]
    assert blk0.norm1.weight.grad is None and blk0.attn.proj.bias.grad is None  # shared pieces: as before


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_group_first_full_in_a_later_step_is_stepped_from_fresh_state(kind, impl, make_vit):
    """The usual case in a fit: a group never FULL in step 1 runs FULL in step 2. Its first update must be the
    one a fresh optimizer gives it (torch's fused SGD with momentum fails here instead, and is refused)."""
    torch.manual_seed(0)
    net = D2FTViT(make_vit("tiny3"), groups_per_block=3)
    optimizer = KINDS[kind](net.parameters(), IMPLS[impl])
    x, y = torch.randn(2, 4, 3, 32, 32), torch.randint(0, 5, (2, 4))
    first = torch.full((net.num_subnets,), F_)
    first[net.block_slice(1)] = torch.tensor([F_, S, S])  # groups 1 and 2 of block 1 wait for step 2
    if (kind, impl) == ("sgd-momentum", "fused"):
        F.cross_entropy(net(x[0], first), y[0]).backward()
        optimizer.step()
        optimizer.zero_grad()
        F.cross_entropy(net(x[1]), y[1]).backward()
        with pytest.raises((TypeError, RuntimeError), match="NoneType"):  # what check_optimizer prevents
            optimizer.step()
        return
    late = [p for n, p in net.vit.blocks[1].named_parameters() if n.endswith("_g1")]
    F.cross_entropy(net(x[0], first), y[0]).backward()
    optimizer.step()
    optimizer.zero_grad()
    F.cross_entropy(net(x[1]), y[1]).backward()
    fresh = [p.detach().clone().requires_grad_() for p in late]
    for f, p in zip(fresh, late):
        f.grad = p.grad.clone()
    reference = KINDS[kind](fresh, IMPLS[impl])
    optimizer.step()
    reference.step()
    for f, p in zip(fresh, late):
        torch.testing.assert_close(p.detach(), f.detach(), rtol=0, atol=0)


def test_an_optimizer_that_moves_parameters_without_a_gradient_is_refused_and_an_unknown_one_named():
    params = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="LBFGS"):
        check_optimizer(torch.optim.LBFGS(params))

    class SignSGD(torch.optim.Optimizer):  # ignores grad=None: moves every parameter
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.add_(-group["lr"])

    with pytest.warns(UserWarning, match="optimizer SignSGD is not one D2FT knows"):
        check_optimizer(SignSGD(params))

    class MyAdamW(torch.optim.AdamW):  # keeps AdamW's step: known
        pass

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for opt in (MyAdamW(params), torch.optim.SGD(params, lr=0.1, momentum=0.9), torch.optim.Adam(params)):
            check_optimizer(opt)
