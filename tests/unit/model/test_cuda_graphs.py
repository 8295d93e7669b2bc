"""CUDA-graph replay of training steps (lightning_d2ft.model.cuda_graphs) against the eager D2FTViT.

The CUDA tests run only where a GPU is present (the lent GPU machine: ``python3 -m pytest -q
tests/unit/test_cuda_graphs.py``); on CPU the graphs must stay out of the way.
"""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from lightning_d2ft.model.vit import D2FTViT
from lightning_d2ft.ops import Op

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _vit() -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=96, depth=3, num_heads=6, num_classes=7)


def _patterns(net: D2FTViT) -> dict[str, torch.Tensor]:
    n = net.num_subnets
    full = torch.full((n,), int(Op.FULL))
    fo = full.clone()
    fo[1:-1] = Op.FORWARD_ONLY
    gen = torch.Generator().manual_seed(0)
    mixed = [full.clone() for _ in range(3)]
    for m in mixed:
        m[1:-1] = torch.randint(0, 3, (n - 2,), generator=gen)
    half = full.clone()
    for l in range(net.depth):
        half[net.subnet_index(l, 0): net.subnet_index(l, 3)] = Op.SHORTCUT
    return {"full": full, "fo": fo, "half": half, "mixed0": mixed[0], "mixed1": mixed[1], "mixed2": mixed[2]}


def _pair(device: str) -> tuple[D2FTViT, D2FTViT]:
    torch.manual_seed(0)
    eager = D2FTViT(_vit(), subnets=6).to(device).train()
    graphed = copy.deepcopy(eager)
    graphed.use_cuda_graphs()
    return eager, graphed


def _grads(net: D2FTViT) -> dict[str, torch.Tensor | None]:
    return {k: None if p.grad is None else p.grad.clone() for k, p in net.named_parameters()}


def _assert_close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] is None) == (b[k] is None), k
        if a[k] is not None:
            scale = a[k].abs().max().clamp_min(1e-12)
            assert (a[k] - b[k]).abs().max() <= rtol * scale, k


def test_a_model_with_graphs_deep_copies_and_pickles_without_them():
    import pickle

    _, graphed = _pair("cpu")
    graphed.graphs.captures = 3
    for clone in (copy.deepcopy(graphed), pickle.loads(pickle.dumps(graphed))):
        assert clone.graphs is not graphed.graphs and clone.graphs.captures == 0


def test_cpu_models_run_eagerly_with_graphs_on():
    eager, graphed = _pair("cpu")
    x = torch.randn(2, 3, 32, 32)
    ops = _patterns(eager)["mixed0"]
    torch.testing.assert_close(graphed(x, ops), eager(x, ops))
    assert graphed.graphs.captures == 0


@cuda
@pytest.mark.parametrize("autocast", [False, True])
def test_every_pattern_matches_eager_outputs_and_gradients(autocast):
    eager, graphed = _pair("cuda")
    x = torch.randn(4, 3, 32, 32, device="cuda")
    y = torch.randint(0, 7, (4,), device="cuda")
    rtol = 2e-2 if autocast else 1e-4
    for name, ops in _patterns(eager).items():
        outs, grads = [], []
        for net in (eager, graphed):
            net.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out = net(x, ops)
                loss = torch.nn.functional.cross_entropy(out.float(), y)
            loss.backward()
            outs.append(out.detach().float())
            grads.append(_grads(net))
        torch.testing.assert_close(outs[1], outs[0], rtol=rtol, atol=rtol, msg=name)
        _assert_close(grads[0], grads[1], rtol)
    assert graphed.graphs.failure is None
    assert graphed.graphs.captures == len(_patterns(eager))


@cuda
def test_training_with_accumulation_matches_eager_weights():
    """Two micro-batches per optimizer step (the same pattern twice in one step too), the optimizer updating
    the weights the graphs read: after 3 steps the weights equal the eager run's. SGD, not Adam: Adam turns
    the float noise of gradients that are exactly zero in theory (the key bias) into full-size steps."""
    eager, graphed = _pair("cuda")
    pats = _patterns(eager)
    order = [("mixed0", "mixed0"), ("mixed1", "full"), ("mixed0", "half")]
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, device="cuda", generator=gen),
                torch.randint(0, 7, (4,), device="cuda", generator=gen)) for _ in range(6)]
    for net in (eager, graphed):
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        it = iter(batches)
        for pair in order:
            opt.zero_grad(set_to_none=True)
            for name in pair:
                x, y = next(it)
                torch.nn.functional.cross_entropy(net(x, pats[name]), y).backward()
            opt.step()
    for (k, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert graphed.graphs.failure is None
    assert graphed.graphs.captures == 4  # mixed0, mixed1, full, half


@cuda
def test_a_second_forward_before_backward_runs_eagerly_and_stays_exact():
    eager, graphed = _pair("cuda")
    pats = _patterns(eager)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    for net in (eager, graphed):
        net.zero_grad(set_to_none=True)
        loss = net(x, pats["mixed0"]).square().mean() + net(x, pats["mixed1"]).square().mean()
        loss.backward()
    _assert_close(_grads(eager), _grads(graphed), 1e-4)
    assert graphed.graphs.captures == 1


@cuda
def test_a_backward_under_autocast_matches_eager():
    """Some loops call backward inside autocast; the fused kernels' gradients then mix dtypes."""
    eager, graphed = _pair("cuda")
    x = torch.randn(4, 3, 32, 32, device="cuda")
    ops = _patterns(eager)["mixed0"]
    for net in (eager, graphed):
        net.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            net(x, ops).float().square().mean().backward()
    _assert_close(_grads(eager), _grads(graphed), 2e-2)


@cuda
def test_eval_and_no_grad_never_capture():
    _, graphed = _pair("cuda")
    x = torch.randn(2, 3, 32, 32, device="cuda")
    graphed.eval()
    graphed(x)
    graphed.train()
    with torch.no_grad():
        graphed(x)
    assert graphed.graphs.captures == 0
