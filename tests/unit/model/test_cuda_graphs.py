"""Per-block CUDA-graph replay of training steps (lightning_d2ft.model.cuda_graphs) against the eager D2FTViT.

Every exactness test runs twice: with the CPU stand-in capture backend (whose "replay" reruns the captured
function on the static buffers, so keys, gathers into static rows, gradient routing and refusals are checked
without a GPU) and with real CUDA graphs where a GPU is present (the lent GPU machine:
``python -m pytest -q tests/unit/model/test_cuda_graphs.py``).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from lightning_d2ft.model.cuda_graphs import BlockGraphs, StandInBackend, block_keys
from lightning_d2ft.model.vit import D2FTViT
from lightning_d2ft.ops import Op

BACKENDS = ["stand-in", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA GPU"))]


def _vit(depth: int = 3) -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=96, depth=depth, num_heads=6, num_classes=7)


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
    # the same counts per block as mixed0, other groups: the same keys, other gathers
    shuffled = mixed[0].clone()
    G = net.groups_per_block
    for l in range(net.depth):
        block = shuffled[1 + l * G: 1 + (l + 1) * G]
        block.copy_(block.flip(0))
    return {"full": full, "fo": fo, "half": half, "mixed0": mixed[0], "mixed1": mixed[1], "mixed2": mixed[2],
            "shuffled": shuffled}


def _pair(backend: str, depth: int = 3) -> tuple[D2FTViT, D2FTViT, str]:
    torch.manual_seed(0)
    device = "cuda" if backend == "cuda" else "cpu"
    eager = D2FTViT(_vit(depth), subnets=None).to(device).train()
    graphed = copy.deepcopy(eager)
    graphed.use_cuda_graphs(backend=StandInBackend() if backend == "stand-in" else None)
    return eager, graphed, device


def _grads(net: D2FTViT) -> dict[str, torch.Tensor | None]:
    return {k: None if p.grad is None else p.grad.clone() for k, p in net.named_parameters()}


def _assert_close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] is None) == (b[k] is None), k
        if a[k] is not None:
            scale = a[k].abs().max().clamp_min(1e-12)
            assert (a[k] - b[k]).abs().max() <= rtol * scale, k


def _keys(net: D2FTViT, *rows: torch.Tensor) -> set:
    return block_keys(torch.stack(rows), net.groups_per_block)


def test_a_model_with_graphs_deep_copies_and_pickles_without_them():
    _, graphed, _ = _pair("stand-in")
    graphed.graphs.captures = 3
    for clone in (copy.deepcopy(graphed), pickle.loads(pickle.dumps(graphed))):
        assert clone.graphs is not graphed.graphs and clone.graphs.captures == 0


def test_cpu_models_run_eagerly_with_real_cuda_graphs_on():
    torch.manual_seed(0)
    eager = D2FTViT(_vit(), subnets=None).train()
    graphed = copy.deepcopy(eager)
    graphed.use_cuda_graphs()
    x = torch.randn(2, 3, 32, 32)
    ops = _patterns(eager)["mixed0"]
    torch.testing.assert_close(graphed(x, ops), eager(x, ops))
    assert graphed.graphs.captures == 0


def test_block_keys_count_each_blocks_full_and_active_groups():
    G = 3
    row = [Op.FULL, Op.FULL, Op.FORWARD_ONLY, Op.SHORTCUT,  # block 0: 1 FULL, 2 active
           Op.SHORTCUT, Op.FORWARD_ONLY, Op.SHORTCUT,  # block 1: no FULL, no graph
           Op.FULL, Op.FULL, Op.FULL, Op.FULL]  # block 2: all FULL
    other = list(row)
    other[1:4] = [Op.SHORTCUT, Op.FORWARD_ONLY, Op.FULL]  # block 0 again 1 FULL, 2 active: the same key
    assert block_keys([row, other], G) == {(0, 1, 2), (2, 3, 3)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast", [False, True])
def test_every_pattern_matches_eager_outputs_and_gradients(backend, autocast):
    eager, graphed, device = _pair(backend)
    x = torch.randn(4, 3, 32, 32, device=device)
    y = torch.randint(0, 7, (4,), device=device)
    rtol = 2e-2 if autocast else 1e-4
    patterns = _patterns(eager)
    for name, ops in patterns.items():
        outs, grads = [], []
        for net in (eager, graphed):
            net.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                out = net(x, ops)
                loss = torch.nn.functional.cross_entropy(out.float(), y)
            loss.backward()
            outs.append(out.detach().float())
            grads.append(_grads(net))
        torch.testing.assert_close(outs[1], outs[0], rtol=rtol, atol=rtol, msg=name)
        _assert_close(grads[0], grads[1], rtol)
    assert graphed.graphs.failure is None
    assert graphed.graphs.keys == _keys(eager, *patterns.values())
    assert graphed.graphs.captures == len(graphed.graphs.keys)  # "shuffled" replays mixed0's keys


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_with_accumulation_matches_eager_weights(backend):
    """Two micro-batches per optimizer step (the same pattern twice in one step too), the optimizer updating
    the weights the gathers read: after 3 steps the weights equal the eager run's. SGD, not Adam: Adam turns
    the float noise of gradients that are exactly zero in theory (the key bias) into full-size steps."""
    eager, graphed, device = _pair(backend)
    pats = _patterns(eager)
    order = [("mixed0", "mixed0"), ("mixed1", "shuffled"), ("full", "half")]
    gen = torch.Generator(device=device).manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, device=device, generator=gen),
                torch.randint(0, 7, (4,), device=device, generator=gen)) for _ in range(6)]
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
    assert graphed.graphs.keys == _keys(eager, *(pats[n] for pair in order for n in pair))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_forward_before_backward_runs_eagerly_and_stays_exact(backend):
    eager, graphed, device = _pair(backend)
    pats = _patterns(eager)
    x = torch.randn(4, 3, 32, 32, device=device)
    for net in (eager, graphed):
        net.zero_grad(set_to_none=True)
        loss = net(x, pats["mixed0"]).square().mean() + net(x, pats["mixed1"]).square().mean()
        loss.backward()
    _assert_close(_grads(eager), _grads(graphed), 1e-4)
    assert graphed.graphs.keys == _keys(eager, pats["mixed0"])  # the second forward: every block eager
    assert graphed.graphs.eager_runs == len(_keys(eager, pats["mixed1"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_backward_under_autocast_matches_eager(backend):
    """Some loops call backward inside autocast; the fused kernels' gradients then mix dtypes."""
    eager, graphed, device = _pair(backend)
    x = torch.randn(4, 3, 32, 32, device=device)
    ops = _patterns(eager)["mixed0"]
    for net in (eager, graphed):
        net.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            net(x, ops).float().square().mean().backward()
    _assert_close(_grads(eager), _grads(graphed), 2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_and_no_grad_never_capture(backend):
    _, graphed, device = _pair(backend)
    x = torch.randn(2, 3, 32, 32, device=device)
    graphed.eval()
    graphed(x)
    graphed.train()
    with torch.no_grad():
        graphed(x)
    assert graphed.graphs.captures == 0


def test_captures_are_bounded_by_the_model_not_the_data():
    """One distinct row per micro-batch (what real data give) for 300 micro-batches: the captures stay within
    ``depth * G (G + 1) / 2`` keys, and each is captured once, the first time it runs."""
    from lightning_d2ft.schedule.schedule import Schedule

    torch.manual_seed(0)
    net = D2FTViT(VisionTransformer(img_size=16, patch_size=8, embed_dim=48, depth=2, num_heads=6,
                                    num_classes=3), subnets=None).train()
    G = net.groups_per_block
    backend = StandInBackend()
    net.use_cuda_graphs(backend=backend)
    micro_batches = 300
    scores = torch.rand(micro_batches, net.num_subnets) + 0.1
    schedule = Schedule.solve(scores, torch.rand(micro_batches, net.num_subnets) + 0.1, budget=0.6, devices=1,
                              solver="dp")
    bound = net.depth * G * (G + 1) // 2
    assert schedule.distinct_patterns > bound  # keyed by rows this would capture 10 times more
    x = torch.randn(2, 3, 16, 16)
    for row in schedule.ops:
        net(x, row).sum().backward()
    expected = block_keys(schedule.ops, G)
    assert net.graphs.keys == expected and net.graphs.captures == len(expected) <= bound
    assert backend.pools == net.depth  # one memory pool per block, shared by its keys
    assert net.graphs.warmups <= len({k[1:] for k in expected})  # a work shape is warmed up once


def test_a_failed_capture_warns_once_and_every_block_runs_eagerly():
    class Failing(StandInBackend):
        def capture_pair(self, fwd, bwd, pool, warm_up, device):
            raise RuntimeError("operation not permitted when stream is capturing")

    eager, graphed, _ = _pair("stand-in")
    graphed.use_cuda_graphs(backend=Failing())
    x = torch.randn(2, 3, 32, 32)
    ops = _patterns(eager)["mixed0"]
    with pytest.warns(UserWarning, match="CUDA-graph capture failed"):
        out = graphed(x, ops)
    torch.testing.assert_close(out, eager(x, ops))
    graphed(x, ops).sum().backward()  # no second warning, eager from now on
    assert graphed.graphs.captures == 0 and "not permitted" in graphed.graphs.failure


def test_blocks_graphs_are_reset_when_the_input_shape_changes():
    eager, graphed, _ = _pair("stand-in")
    ops = _patterns(eager)["mixed0"]
    for batch in (2, 3):
        x = torch.randn(batch, 3, 32, 32)
        for net in (eager, graphed):
            net.zero_grad(set_to_none=True)
            net(x, ops).square().mean().backward()
        _assert_close(_grads(eager), _grads(graphed), 1e-4)
    assert isinstance(graphed.graphs, BlockGraphs) and graphed.graphs.captures == 2 * len(_keys(eager, ops))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_retained_graph_backs_up_again_only_until_its_blocks_replay(backend):
    """retain_graph: a second backward is exact while no forward replayed its blocks since; after one, the
    activations it would read are gone, and it is refused rather than silently wrong."""
    eager, graphed, device = _pair(backend)
    ops = _patterns(eager)["mixed0"]
    x = torch.randn(2, 3, 32, 32, device=device)
    for net in (eager, graphed):
        net.zero_grad(set_to_none=True)
        loss = net(x, ops).square().mean()
        loss.backward(retain_graph=True)
        loss.backward()  # twice the gradients
    _assert_close(_grads(eager), _grads(graphed), 1e-4)
    loss = graphed(x, ops).square().mean()
    loss.backward(retain_graph=True)
    graphed(x, ops).square().mean().backward()  # the same blocks replay
    # CUDA: our check; the CPU stand-in's copies into the static output also bump its version, which autograd
    # notices first where eager code saved it
    with pytest.raises(RuntimeError, match="second backward through a CUDA-graph replay|modified by an inplace"):
        loss.backward()
