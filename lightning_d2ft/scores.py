"""Contribution scores: how much each subnet matters for each micro-batch, measured before fine-tuning.

One pass over the training micro-batches, forward + backward with every subnet FULL and **no weight
update**, gives per (micro-batch n, subnet k) a backward score (decides FULL) and a forward score (decides
FORWARD_ONLY among the rest), each from any of the metrics:

* ``weight_magnitude``: sum |w| over the subnet's own weights. It does not depend on the micro-batch, so
  (*our reading*) it is multiplied by the micro-batch's loss over the mean loss: the weights say which
  subnet matters, the loss says how much this micro-batch still has to teach.
* ``gradient_magnitude``: sum |g| of the micro-batch gradient over the subnet's weights.
* ``fisher``: sum g^2 (empirical Fisher of the micro-batch gradient, not of per-sample gradients).
* ``taylor``: sum |w * g| (first-order Taylor estimate of the loss change if the subnet were removed).
* ``random``: uniform in [0, 1), seeded.

A subnet's weights are its rows of ``qkv`` (q, k and v of its heads), its columns of ``attn.proj``, its
rows of ``fc1`` and its columns of ``fc2`` (with their biases); the stem and head subnets own everything
outside the blocks. Shared block pieces (norms, ``proj``/``fc2`` biases, LayerScale) count for nobody.

Scores are cached on disk, keyed by the model's weights, the data, the metrics and the granularity; a
cache file that is corrupt or was made for other inputs is detected and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_d2ft.files import StaleFileError, read_checked, write_checked
from lightning_d2ft.partition import D2FTViT

__all__ = ["METRICS", "Scores", "compute_scores"]

METRICS = ("weight_magnitude", "gradient_magnitude", "fisher", "taylor", "random")
_CACHE_VERSION = 1
log = logging.getLogger(__name__)


@dataclass
class Scores:
    """Backward and forward scores, ``[micro_batches, subnets]`` each, and what they cost to get."""

    backward: Tensor
    forward: Tensor
    backward_metric: str
    forward_metric: str
    seconds: float  # wall time of the scoring pass (0 when loaded from the cache)
    key: str
    from_cache: bool = False


def check_metric(role: str, metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown {role} score metric {metric!r}; choose one of {list(METRICS)}")


def compute_scores(
    net: D2FTViT,
    batches: Iterable[tuple[Tensor, Tensor]],
    backward_metric: str = "weight_magnitude",
    forward_metric: str = "fisher",
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    cache_dir: str | Path | None = None,
    data_key: str | None = None,
    sample_every: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> Scores:
    """Score every micro-batch of ``batches`` (an iterable of ``(inputs, targets)``, e.g. a DataLoader).

    ``sample_every=k`` scores every k-th micro-batch only and gives the others the mean of the scored ones,
    which cuts the scoring pass by k. ``data_key`` replaces the data fingerprint (which otherwise costs one
    pass over the inputs, no model work) for data sets too large to hash.
    """
    check_metric("backward", backward_metric)
    check_metric("forward", forward_metric)
    if sample_every < 1:
        raise ValueError(f"sample_every must be >= 1, got {sample_every}")
    batches = list(batches) if data_key is None else batches
    key = _cache_key(net, batches, data_key, backward_metric, forward_metric, sample_every, seed, loss_fn)
    path = Path(cache_dir) / f"scores-{key[:20]}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        cached = _load_cache(path, key)
        if cached is not None:
            return cached

    start = time.perf_counter()
    stats, losses = _score_pass(net, batches, loss_fn, {backward_metric, forward_metric}, sample_every, progress)
    gen = torch.Generator().manual_seed(seed)
    tables = {m: _metric_table(m, stats, losses, gen) for m in {backward_metric, forward_metric}}
    scores = Scores(
        backward=tables[backward_metric], forward=tables[forward_metric], backward_metric=backward_metric,
        forward_metric=forward_metric, seconds=time.perf_counter() - start, key=key,
    )
    if path is not None:
        write_checked(path, {"key": key, "backward": scores.backward, "forward": scores.forward,
                             "metrics": [backward_metric, forward_metric], "seconds": scores.seconds}, _CACHE_VERSION)
    return scores


def _load_cache(path: Path, key: str) -> Scores | None:
    try:
        payload = read_checked(path, _CACHE_VERSION, "score cache")
        if payload["key"] != key:
            raise StaleFileError(f"score cache {path} was made for other weights, data or metrics")
        back, fwd = payload["backward"], payload["forward"]
        if back.shape != fwd.shape or not (torch.isfinite(back).all() and torch.isfinite(fwd).all()):
            raise StaleFileError(f"score cache {path} holds malformed or non-finite scores")
    except (StaleFileError, KeyError, OSError) as err:
        warnings.warn(f"ignoring the score cache and recomputing: {err}", stacklevel=3)
        return None
    log.info("loaded contribution scores from %s", path)
    b, f = payload["metrics"]
    return Scores(back, fwd, b, f, seconds=0.0, key=key, from_cache=True)


def _cache_key(net, batches, data_key, backward_metric, forward_metric, sample_every, seed, loss_fn) -> str:
    h = hashlib.sha256()
    h.update(f"v{_CACHE_VERSION}|{backward_metric}|{forward_metric}|G={net.groups_per_block}|"
             f"every={sample_every}|seed={seed}|loss={getattr(loss_fn, '__name__', repr(loss_fn))}".encode())
    for name, t in net.vit.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    if data_key is not None:
        h.update(f"data={data_key}".encode())
    else:
        for x, y in batches:
            h.update(torch.as_tensor(x).cpu().contiguous().numpy().tobytes())
            h.update(torch.as_tensor(y).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _score_pass(net, batches, loss_fn, metrics, sample_every, progress):
    """Forward + backward per micro-batch; per-subnet sums of |g|, g^2 and |w*g|. Model state is restored."""
    from tqdm.auto import tqdm

    need_grads = bool(metrics - {"weight_magnitude", "random"})
    was_training = net.training
    saved_grads = {p: p.grad for p in net.parameters()}
    device = next(net.parameters()).device
    stats: dict[str, list[Tensor]] = {"abs": [], "sq": [], "taylor": []}
    losses, scored = [], []
    net.eval()  # dropout off: the scores describe the model, not one dropout mask
    try:
        for n, (x, y) in enumerate(tqdm(batches, desc="D2FT scores", disable=not progress, leave=False)):
            if n % sample_every:
                continue
            for p in net.parameters():
                p.grad = None
            with torch.set_grad_enabled(need_grads):
                loss = loss_fn(net(x.to(device)), y.to(device))
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"micro-batch {n} gives a non-finite loss ({float(loss)}) in the scoring "
                                         "pass (NaN/inf inputs?): fix those samples before fine-tuning")
            if need_grads:
                loss.backward()
                stats["abs"].append(subnet_sums(net, lambda p: None if p.grad is None else p.grad.abs()))
                stats["sq"].append(subnet_sums(net, lambda p: None if p.grad is None else p.grad.square()))
                stats["taylor"].append(subnet_sums(net, lambda p: None if p.grad is None else (p.grad * p).abs()))
            losses.append(float(loss.detach()))
            scored.append(n)
    finally:
        net.train(was_training)
        for p, g in saved_grads.items():
            p.grad = g
    if not scored:
        raise ValueError("no micro-batches to score: the dataloader is empty")
    total = scored[-1] + 1 if sample_every == 1 else _count(batches)
    stats["weight"] = [subnet_sums(net, lambda p: p.abs())]
    return {k: _fill(v, scored, total) for k, v in stats.items() if v}, _fill_1d(losses, scored, total)


def _count(batches) -> int:
    return sum(1 for _ in batches)


def _fill(rows: list[Tensor], scored: list[int], total: int) -> Tensor:
    """Stack the scored micro-batches' rows; the unscored ones get the mean row."""
    table = torch.stack(rows)
    if table.shape[0] == 1 and len(scored) != 1:  # sample-independent (weights): one row for all
        return table.expand(total, -1).clone()
    out = table.mean(0, keepdim=True).expand(total, -1).clone()
    out[scored] = table
    return out


def _fill_1d(values: list[float], scored: list[int], total: int) -> Tensor:
    return _fill([torch.tensor([v], dtype=torch.float64) for v in values], scored, total).flatten()


def _metric_table(metric: str, stats: dict[str, Tensor], losses: Tensor, gen: torch.Generator) -> Tensor:
    n_mb = losses.numel()
    if metric == "random":
        return torch.rand(n_mb, stats["weight"].shape[1], generator=gen, dtype=torch.float64)
    if metric == "weight_magnitude":
        mean = losses.mean()
        scale = losses / mean if mean > 0 else torch.ones_like(losses)
        return stats["weight"][:n_mb] * scale[:, None]
    return {"gradient_magnitude": stats.get("abs"), "fisher": stats.get("sq"), "taylor": stats.get("taylor")}[metric]


@torch.no_grad()
def subnet_sums(net: D2FTViT, stat: Callable[[nn.Parameter], Tensor | None]) -> Tensor:
    """Sum of ``stat(param)`` over each subnet's own weights: a float64 vector of ``num_subnets``.

    ``stat`` returns an elementwise tensor shaped like the parameter, or None to skip it (e.g. no gradient).
    """
    G = net.groups_per_block
    out = torch.zeros(net.num_subnets, dtype=torch.float64)
    vit = net.vit
    in_blocks = {id(p) for p in vit.blocks.parameters()}
    stem_ids = {id(p) for m in (vit.patch_embed, vit.norm_pre) for p in m.parameters()}
    stem_ids |= {id(p) for p in (getattr(vit, "cls_token", None), getattr(vit, "reg_token", None),
                                 getattr(vit, "pos_embed", None)) if isinstance(p, nn.Parameter)}
    for p in vit.parameters():
        value = None if id(p) in in_blocks else stat(p)
        if value is not None:
            out[0 if id(p) in stem_ids else -1] += float(value.sum())
    # (parameter, how its elements fold into [G, ...]: the group axis is 1 after the view)
    for l, blk in enumerate(vit.blocks):
        attn, mlp = blk.attn, blk.mlp
        D = attn.qkv.in_features
        layout = [(attn.qkv.weight, (3, G, -1, D)), (attn.qkv.bias, (3, G, -1)), (attn.proj.weight, (D, G, -1)),
                  (mlp.fc1.weight, (1, G, -1, D)), (mlp.fc1.bias, (1, G, -1)), (mlp.fc2.weight, (D, G, -1))]
        per_group = torch.zeros(G, dtype=torch.float64)
        for param, shape in layout:
            value = None if param is None else stat(param)
            if value is not None:
                grouped = value.reshape(shape).transpose(0, 1).reshape(G, -1)
                per_group += grouped.sum(1).double()
        out[net.block_slice(l)] = per_group
    return out
