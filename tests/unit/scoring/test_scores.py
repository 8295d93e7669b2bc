"""Contribution scores: every metric in either role, exact per-subnet sums, state restored, the cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_d2ft import D2FTViT
from lightning_d2ft.scoring.scores import METRICS, compute_scores, subnet_sums


def copy_of(module):
    import copy

    return copy.deepcopy(module)


def _data(n: int = 5, batch: int = 4):
    return [(torch.randn(batch, 3, 32, 32), torch.randint(0, 5, (batch,))) for _ in range(n)]


@pytest.mark.parametrize("backward", METRICS)
@pytest.mark.parametrize("forward", ["fisher", "random"])
def test_every_metric_in_either_role(backward, forward, make_vit):
    net = D2FTViT(make_vit("tiny3"))
    s = compute_scores(net, _data(), backward, forward, progress=False)
    assert s.backward.shape == s.forward.shape == (5, net.num_subnets)
    assert torch.isfinite(s.backward).all() and (s.backward >= 0).all()
    assert s.backward_metric == backward and s.forward_metric == forward and s.seconds > 0


def test_gradient_metrics_are_exact_per_subnet_sums(make_vit):
    net = D2FTViT(make_vit("tiny3"), groups_per_block=3)
    x, y = _data(1)[0]
    s = compute_scores(net, [(x, y)], "squared_gradient", "taylor", progress=False)
    plain = make_vit("tiny3")  # an independent plain timm model with the same weights
    plain.load_state_dict(net.vit.state_dict())
    F.cross_entropy(plain.eval()(x), y).backward()
    blk = plain.blocks[1]
    g = 2  # group 2 of block 1 owns rows [32:48) of q, k and v, the same columns of proj, 1/3 of the MLP
    D, per = 48, 16
    qkv = blk.attn.qkv.weight
    rows = torch.cat([torch.arange(c * D + g * per, c * D + (g + 1) * per) for c in range(3)])
    hid = torch.arange(g * 64, (g + 1) * 64)
    expected_fisher = (qkv.grad[rows].square().sum() + blk.attn.proj.weight.grad[:,
                                                                                 g * per:(g + 1) * per].square().sum()
                       + blk.mlp.fc1.weight.grad[hid].square().sum() + blk.mlp.fc1.bias.grad[hid].square().sum()
                       + blk.mlp.fc2.weight.grad[:, hid].square().sum())
    k = net.subnet_index(1, g)
    assert s.backward[0, k].item() == pytest.approx(expected_fisher.item(), rel=1e-5)
    expected_taylor = (qkv.grad * qkv)[rows].abs().sum()
    assert s.forward[0, k].item() > expected_taylor.item()  # qkv part plus proj and MLP parts


def test_every_weight_is_counted_once(make_vit):
    net = D2FTViT(make_vit("tiny3"))
    counted = subnet_sums(net, lambda p: torch.ones_like(p)).sum()
    shared = sum(p.numel() for n, p in net.vit.named_parameters()
                 if n.startswith("blocks") and any(s in n for s in ("norm", "proj.bias", "fc2.bias", "ls")))
    assert counted + shared == sum(p.numel() for p in net.parameters())


def test_scoring_restores_the_model_exactly(make_vit):
    net = D2FTViT(make_vit("tiny3"))
    net.train()
    marker = [torch.full_like(p, 0.5) for p in net.parameters()]
    for p, m in zip(net.parameters(), marker):
        p.grad = m
    before = {k: v.clone() for k, v in net.state_dict().items()}
    compute_scores(net, _data(), "taylor", "fisher", progress=False)
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is m for p, m in zip(net.parameters(), marker))


class _NoIteration(list):
    def __iter__(self):
        raise AssertionError("the data was read")


def test_weight_magnitude_is_the_same_row_for_every_micro_batch_and_reads_no_data(make_vit):
    net = D2FTViT(make_vit("tiny3"))
    s = compute_scores(net, _NoIteration(_data()), "weight_magnitude", "random", progress=False)
    expected = subnet_sums(net, lambda p: p.abs())
    assert torch.allclose(s.backward, expected.expand(5, -1))  # no loss scaling (issue 16): no starved rows
    assert s.scored == 0


def _reference(vit, x, y, G):
    """Per-subnet |g|, g^2 and |w*g| sums of plain timm's gradient, the group layout written out by hand."""
    vit.zero_grad(set_to_none=True)
    F.cross_entropy(vit.eval()(x), y).backward()
    blocks = []
    for blk in vit.blocks:
        D, hidden = blk.attn.qkv.in_features, blk.mlp.fc1.out_features
        per, hper = D // G, hidden // G
        cols = []
        for g in range(G):
            rows = torch.cat([torch.arange(c * D + g * per, c * D + (g + 1) * per) for c in range(3)])
            hid = torch.arange(g * hper, (g + 1) * hper)
            parts = [(blk.attn.qkv.weight, (rows,)), (blk.attn.proj.weight, (slice(None), slice(g * per,
                                                                                                (g + 1) * per))),
                     (blk.mlp.fc1.weight, (hid,)), (blk.mlp.fc1.bias, (hid,)), (blk.mlp.fc2.weight, (slice(None), hid))]
            if blk.attn.qkv.bias is not None:
                parts.append((blk.attn.qkv.bias, (rows,)))
            cols.append(parts)
        blocks.append(cols)
    stem = [p for n, p in vit.named_parameters()
            if n.startswith(("patch_embed", "norm_pre")) or n in ("cls_token", "pos_embed")]
    head = [p for n, p in vit.named_parameters() if not n.startswith("blocks") and all(p is not q for q in stem)]
    with torch.no_grad():
        return _sums(stem, blocks, head)


def _sums(stem, blocks, head):
    out = {}
    stats = {"gradient_magnitude": lambda p, i: p.grad[i].abs().sum(),
             "squared_gradient": lambda p, i: p.grad[i].square().sum(),
             "taylor": lambda p, i: (p.grad[i] * p.detach()[i]).abs().sum()}
    for name, f in stats.items():
        def whole(ps, f=f):
            return sum(float(f(p, ...)) for p in ps if p.grad is not None)

        groups = [float(sum(f(p, i) for p, i in parts)) for cols in blocks for parts in cols]
        out[name] = torch.tensor([whole(stem), *groups, whole(head)], dtype=torch.float64)
    return out


def test_every_gradient_metric_equals_a_plain_timm_reference_on_every_shape(vit_shape, make_vit):
    vit = make_vit(vit_shape)
    net = D2FTViT(vit)
    img = vit.patch_embed.img_size[0]
    data = [(torch.randn(3, 3, img, img), torch.randint(0, 3, (3,))) for _ in range(2)]
    first = compute_scores(net, data, "gradient_magnitude", "squared_gradient", progress=False)
    taylor = compute_scores(net, data, "taylor", "random", progress=False).backward
    plain = make_vit(vit_shape)  # an independent plain timm model with the same weights
    plain.load_state_dict(net.vit.state_dict())
    for n, (x, y) in enumerate(data):
        ref = _reference(plain, x, y, net.groups_per_block)
        for metric, got in (("gradient_magnitude", first.backward), ("squared_gradient", first.forward),
                            ("taylor", taylor)):
            assert torch.allclose(got[n], ref[metric], rtol=1e-4, atol=1e-9), metric


@pytest.mark.parametrize("with_batch_stats", [False, True])
def test_fisher_is_the_mean_of_squared_per_sample_gradients_on_every_shape(vit_shape, make_vit, with_batch_stats):
    """The empirical Fisher: each sample's own gradient squared, averaged over the micro-batch (not the square
    of the mean gradient, which is squared_gradient: the two differ); stem and head score 0."""
    vit = make_vit(vit_shape)
    net = D2FTViT(vit)
    img = vit.patch_embed.img_size[0]
    data = [(torch.randn(3, 3, img, img), torch.randint(0, 3, (3,))) for _ in range(2)]
    other = "taylor" if with_batch_stats else "weight_magnitude"  # fisher alone: no weight gradients at all
    got = compute_scores(net, data, other, "fisher", progress=False).forward
    squared = compute_scores(net, data, "squared_gradient", "random", progress=False).backward
    plain = make_vit(vit_shape)  # an independent plain timm model with the same weights
    plain.load_state_dict(net.vit.state_dict())
    for n, (x, y) in enumerate(data):
        per_sample = [_reference(plain, x[i : i + 1], y[i : i + 1], net.groups_per_block)["squared_gradient"]
                      for i in range(3)]
        want = torch.stack(per_sample).mean(0)
        want[0] = want[-1] = 0.0
        assert torch.allclose(got[n], want, rtol=1e-4, atol=1e-12)
        assert not torch.allclose(got[n, 1:-1], squared[n, 1:-1], rtol=1e-2)


def test_fisher_on_a_tensor_parallel_shard_counts_only_its_groups(make_vit):
    """A sharded model runs the grouped path (F.linear on full-width views of the shard's weights): the same
    per-sample sums for the shard's columns (stand-in collectives: one rank holding every group's partial)."""
    from lightning_d2ft.parallel.placement import Placement
    from lightning_d2ft.scoring.scoring_pass import SubnetIndex, score_pass

    class OneRank:  # a tensor-parallel group of one rank over the general (sharded) path
        rank, world = 0, 1

        def reduce_partial(self, partial, like, active):
            return partial

        def copy_to_ranks(self, h, active):
            return h

    vit = make_vit("tiny3")
    net = D2FTViT(vit)
    whole = D2FTViT(copy_of(vit))
    data = [(torch.randn(3, 3, 32, 32), torch.randint(0, 3, (3,)))]
    ref = compute_scores(whole, data, "weight_magnitude", "fisher", progress=False).forward
    net.shard_(Placement.round_robin(net.depth, net.groups_per_block, 1), OneRank())
    net.tp.world = 2  # take the sharded (general) path, as a real rank does
    sums, _ = score_pass(net, data, F.cross_entropy, ["fisher"], SubnetIndex(net))
    assert torch.allclose(sums[0, 0, 1:-1], ref[0, 1:-1], rtol=1e-4, atol=1e-12)


def test_sampling_scores_a_subset(make_vit):
    net = D2FTViT(make_vit("tiny3"))
    s = compute_scores(net, _data(6), "fisher", "fisher", sample_every=3, progress=False)
    assert s.backward.shape[0] == 6
    assert torch.equal(s.backward[1], s.backward[2])  # unscored micro-batches share the mean row


def test_cache_is_used_and_stale_or_corrupt_caches_are_recomputed(tmp_path, make_vit):
    net = D2FTViT(make_vit("tiny3"))
    data = _data()
    first = compute_scores(net, data, "taylor", "fisher", cache_dir=tmp_path, progress=False)
    again = compute_scores(net, data, "taylor", "fisher", cache_dir=tmp_path, progress=False)
    assert again.from_cache and torch.equal(again.backward, first.backward)
    other_metric = compute_scores(net, data, "fisher", "fisher", cache_dir=tmp_path, progress=False)
    assert not other_metric.from_cache
    with torch.no_grad():
        net.vit.head.weight.add_(0.1)  # new weights: the old cache no longer applies
    assert not compute_scores(net, data, "taylor", "fisher", cache_dir=tmp_path, progress=False).from_cache
    data2 = _data()
    other_data = compute_scores(net, data2, "taylor", "fisher", cache_dir=tmp_path, progress=False)
    assert not other_data.from_cache

    cache = tmp_path / f"scores-{other_data.key[:20]}.pt"
    raw = cache.read_bytes()
    for broken in (raw[:-100], raw.replace(b"taylor", b"fisher", 1)):  # truncated, edited
        cache.write_bytes(broken)
        with pytest.warns(UserWarning, match="recomputing"):
            redo = compute_scores(net, data2, "taylor", "fisher", cache_dir=tmp_path, progress=False)
        assert not redo.from_cache and torch.equal(redo.backward, other_data.backward)


def test_scores_cached_as_fisher_before_it_meant_per_sample_gradients_are_recomputed(tmp_path, make_vit,
                                                                                      monkeypatch):
    """Until issue 27 "fisher" was the squared mean gradient: a cache written then under that name holds the
    other metric, so it must never be read as the per-sample Fisher."""
    from lightning_d2ft.scoring import scores

    net = D2FTViT(make_vit("tiny3"))
    data = _data(2)
    monkeypatch.setattr(scores, "_CACHE_VERSION", 2)
    monkeypatch.setitem(scores._GRAD_STAT, "fisher", "sq")  # the old meaning, written by the old version
    old = compute_scores(net, data, "weight_magnitude", "fisher", cache_dir=tmp_path, progress=False)
    monkeypatch.undo()
    new = compute_scores(net, data, "weight_magnitude", "fisher", cache_dir=tmp_path, progress=False)
    assert not new.from_cache and not torch.allclose(new.forward[:, 1:-1], old.forward[:, 1:-1], rtol=1e-2)
    assert compute_scores(net, data, "weight_magnitude", "fisher", cache_dir=tmp_path, progress=False).from_cache


def test_unknown_metric_is_rejected(make_vit):
    with pytest.raises(ValueError, match="unknown backward score metric 'l2'"):
        compute_scores(D2FTViT(make_vit("tiny3")), _data(1), "l2", "fisher", progress=False)


def test_a_micro_batch_with_nan_input_is_named(make_vit):
    net = D2FTViT(make_vit("tiny3"))
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])) for _ in range(3)]
    batches[1][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="micro-batch 1 gives a non-finite loss"):
        compute_scores(net, batches, "weight_magnitude", "fisher", progress=False)


@pytest.mark.parametrize("edit", ["fewer rows", "negative", "nan", "fifo"])
def test_a_re_checksummed_cache_of_the_wrong_shape_or_values_is_named_and_recomputed(tmp_path, make_vit, edit):
    """Issue 29, failure 10: a cache whose checksum matched but whose table had fewer rows failed mid-training
    with IndexError; negative or NaN scores and a FIFO in its place are caught the same way, naming the file."""
    import os

    from lightning_d2ft.io import read_checked, write_checked
    from lightning_d2ft.scoring.scores import _CACHE_VERSION, cache_path

    net = D2FTViT(make_vit("tiny3"))
    data = _data()
    first = compute_scores(net, data, "taylor", "fisher", cache_dir=tmp_path, progress=False)
    path = cache_path(tmp_path, first.key)
    payload = read_checked(path, _CACHE_VERSION, "score cache")
    if edit == "fewer rows":
        payload["backward"], payload["forward"] = payload["backward"][:3], payload["forward"][:3]
        expected = r"holds \(3, 11\) tables; this run has 5 micro-batches x 11 subnets"
    elif edit == "negative":
        payload["backward"][1, 2] = -1.0
        expected = "non-finite or negative"
    elif edit == "nan":
        payload["forward"][0, 0] = float("nan")
        expected = "non-finite or negative"
    if edit == "fifo":
        path.unlink()
        os.mkfifo(path)
        expected = "is a FIFO"
    else:
        write_checked(path, {k: v for k, v in payload.items() if k != "version"}, _CACHE_VERSION)  # checksum redone
    with pytest.warns(UserWarning, match=rf"ignoring the score cache and recomputing: .*{path}.*{expected}|"
                                         rf"ignoring the score cache and recomputing: .*{expected}"):
        redo = compute_scores(net, data, "taylor", "fisher", cache_dir=tmp_path, progress=False)
    assert not redo.from_cache and torch.equal(redo.backward, first.backward)
