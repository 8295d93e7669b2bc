"""Contribution scores: how much each subnet matters for each micro-batch, measured before fine-tuning.

One pass over the training micro-batches, forward + backward with every subnet FULL and **no weight
update**, gives per (micro-batch n, subnet k) a backward score (decides FULL) and a forward score (decides
FORWARD_ONLY among the rest), each from any of the metrics:

* ``weight_magnitude``: sum |w| over the subnet's own weights, the same row for every micro-batch (no data
  needed). It used to be scaled by each micro-batch's loss over the mean loss; with per-(device,
  micro-batch) capacity a per-row factor cannot change the FULL choice, and with per-epoch capacity it gave
  the high-loss micro-batches every FULL pair and starved the rest (issue 16), so it was removed.
* ``gradient_magnitude``: sum |g| of the micro-batch gradient over the subnet's weights.
* ``squared_gradient``: sum g^2 of the micro-batch (mean) gradient. It was called ``fisher`` until issue 27;
  it is not the empirical Fisher, which sums squared *per-sample* gradients.
* ``fisher``: the empirical Fisher, ``(1/B) sum_i sum g_i^2`` over the per-sample gradients g_i of the B
  samples (:mod:`lightning_d2ft.scoring.per_sample`; the stem and head, never scheduled, score 0).
* ``taylor``: sum |w * g| (first-order Taylor estimate of the loss change if the subnet were removed).
* ``random``: uniform in [0, 1), seeded.

A subnet's weights are its rows of ``qkv`` (q, k and v of its heads), its columns of ``attn.proj``, its
rows of ``fc1`` and its columns of ``fc2`` (with their biases); the stem and head subnets own everything
outside the blocks. Shared block pieces (norms, ``proj``/``fc2`` biases, LayerScale) count for nobody.

Scores are cached on disk, keyed by the model's weights, a cheap fingerprint of the data (the micro-batch
index lists plus a seeded sample of the samples, or a user-given ``data_key``), the metrics and the
granularity; a cache file that is corrupt or was made for other inputs is detected and recomputed, never
used. The pass itself (streamed, vectorised, shared between ranks) is :mod:`lightning_d2ft.scoring.scoring_pass`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Sized

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_d2ft.io import StaleFileError, read_checked, tensor_bytes, write_checked
from lightning_d2ft.model.vit import D2FTViT
from lightning_d2ft.scoring.scoring_pass import SubnetIndex, score_pass

__all__ = ["METRICS", "Scores", "compute_scores", "data_fingerprint", "subnet_sums", "weights_digest"]

METRICS = ("weight_magnitude", "gradient_magnitude", "squared_gradient", "fisher", "taylor", "random")
#: which gradient statistic each gradient metric sums ("fisher": squared per-sample gradients)
_GRAD_STAT = {"gradient_magnitude": "abs", "squared_gradient": "sq", "taylor": "taylor", "fisher": "fisher"}
# 2: keyed by a data fingerprint and the scored micro-batches; weight_magnitude unscaled. 3: "fisher" is the
# per-sample empirical Fisher (before, the squared mean gradient, now "squared_gradient"): a version-2 file
# under the name "fisher" holds the other metric, so it is recomputed, never read
_CACHE_VERSION = 3
_FINGERPRINT_SAMPLES = 16
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
    scored: int = 0  # micro-batches that went through the model (0 when loaded or when no pass was needed)


def check_metric(role: str, metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown {role} score metric {metric!r}; choose one of {list(METRICS)}")


def grad_stats(metrics: Iterable[str]) -> list[str]:
    """The gradient statistics ``metrics`` need, in a fixed order (empty: no forward/backward needed)."""
    wanted = {_GRAD_STAT[m] for m in metrics if m in _GRAD_STAT}
    return [s for s in ("abs", "sq", "taylor", "fisher") if s in wanted]


# -- cheap identifiers ------------------------------------------------------------------------------
def weights_digest(net: D2FTViT) -> str:
    """SHA-256 of the model's weights (LoRA adapters excluded: scores rate the base subnets)."""
    h = hashlib.sha256(f"G={net.groups_per_block}".encode())
    for name, t in net.vit.state_dict().items():
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    """Hash any sample: tensors and arrays by their bytes, containers recursively, the rest by repr."""
    if torch.is_tensor(obj):
        h.update(f"{obj.dtype}{tuple(obj.shape)}".encode())
        h.update(tensor_bytes(obj))
    elif isinstance(obj, np.ndarray):
        h.update(f"{obj.dtype}{obj.shape}".encode() + np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k])
    elif hasattr(obj, "tobytes"):  # PIL images and the like
        h.update(obj.tobytes())
    else:
        h.update(repr(obj).encode())


def data_fingerprint(dataset: Any, micro_batches: Sequence[Sequence[int]], seed: int = 0,
                     samples: int = _FINGERPRINT_SAMPLES) -> str:
    """Identify the training data cheaply: its length, the micro-batch index lists, and ``samples``
    samples drawn with ``seed`` (never a pass over the whole data set)."""
    h = hashlib.sha256(f"n={len(dataset)}|mb={len(micro_batches)}".encode())
    h.update(np.asarray(micro_batches, dtype=np.int64).tobytes())
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:samples].tolist()
    for i in sorted(picks):
        _feed(h, dataset[i])
    return h.hexdigest()


def _batches_fingerprint(batches: Sequence, seed: int) -> str:
    """The same idea for a sequence of ready batches: the count and a seeded sample of them."""
    dataset, sampler = getattr(batches, "dataset", None), getattr(batches, "batch_sampler", None)
    if dataset is not None and sampler is not None:  # a DataLoader: its index lists name the batches
        return data_fingerprint(dataset, [list(b) for b in sampler], seed)
    h = hashlib.sha256(f"batches={len(batches)}".encode())
    picks = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed))[:_FINGERPRINT_SAMPLES]
    for i in sorted(picks.tolist()):
        _feed(h, batches[i])
    return h.hexdigest()


def cache_key(weights: str, data: str, backward_metric: str, forward_metric: str, scored: Sequence[int],
              total: int, seed: int, loss_fn: Callable | None = None) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{backward_metric}|{forward_metric}|seed={seed}|total={total}|"
                       f"loss={getattr(loss_fn, '__name__', repr(loss_fn))}|w={weights}|d={data}".encode())
    h.update(np.asarray(list(scored), dtype=np.int64).tobytes())
    return h.hexdigest()


# -- the cache ---------------------------------------------------------------------------------------
def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"scores-{key[:20]}.pt"


def load_cached(cache_dir: str | Path | None, key: str, shape: tuple[int, int] | None = None) -> Scores | None:
    """The cached scores for ``key``, or None (absent, or corrupt / stale: warned, naming the file, and ignored).
    The tables must be finite, non-negative and, with ``shape``, ``(micro-batches, subnets)`` of this run: a file
    whose checksum was recomputed after an edit is caught by what it holds."""
    if cache_dir is None or not os.path.lexists(cache_path(cache_dir, key)):
        return None
    path = cache_path(cache_dir, key)
    try:
        payload = read_checked(path, _CACHE_VERSION, "score cache")
        if payload["key"] != key:
            raise StaleFileError(f"score cache {path} was made for other weights, data or metrics")
        back, fwd = payload["backward"], payload["forward"]
        if not (torch.is_tensor(back) and torch.is_tensor(fwd)) or back.dim() != 2 or back.shape != fwd.shape:
            raise StaleFileError(f"score cache {path} holds no pair of equal [micro-batches, subnets] tables")
        if shape is not None and tuple(back.shape) != tuple(shape):
            raise StaleFileError(f"score cache {path} holds {tuple(back.shape)} tables; this run has {shape[0]} "
                                 f"micro-batches x {shape[1]} subnets")
        if not (torch.isfinite(back).all() and torch.isfinite(fwd).all()) or (back < 0).any() or (fwd < 0).any():
            raise StaleFileError(f"score cache {path} holds non-finite or negative scores")
    except (StaleFileError, KeyError, OSError) as err:
        warnings.warn(f"ignoring the score cache and recomputing: {err}", stacklevel=3)
        return None
    log.info("loaded contribution scores from %s", path)
    b, f = payload["metrics"]
    return Scores(back, fwd, b, f, seconds=0.0, key=key, from_cache=True)


def save_cached(cache_dir: str | Path | None, scores: Scores) -> None:
    if cache_dir is not None:
        write_checked(cache_path(cache_dir, scores.key),
                      {"key": scores.key, "backward": scores.backward, "forward": scores.forward,
                       "metrics": [scores.backward_metric, scores.forward_metric], "seconds": scores.seconds},
                      _CACHE_VERSION)


def check_cache_dir(cache_dir: str | Path) -> None:
    """Refuse a cache directory that cannot be written, before any scoring work."""
    path = Path(cache_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{id(path)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"cache_dir {str(path)!r} cannot be written ({err.strerror or err}): give a writable "
                              "cache_dir (Hydra: schedule.cache_dir=...)") from err


# -- tables ------------------------------------------------------------------------------------------
def score_tables(sums: Tensor, stats: Sequence[str], weights: Tensor, scored: Sequence[int], total: int,
                 backward_metric: str, forward_metric: str, seed: int) -> tuple[Tensor, Tensor]:
    """Backward and forward tables ``[total, subnets]`` (float64, CPU) from the pass's sums.

    ``sums[i, j]`` holds statistic ``stats[j]`` of micro-batch ``scored[i]``; micro-batches that were not
    scored get the mean row of those that were.
    """
    sums, weights = sums.double().cpu(), weights.double().cpu()
    gen = torch.Generator().manual_seed(seed)
    tables = {}
    for metric in dict.fromkeys((backward_metric, forward_metric)):
        if metric == "random":
            tables[metric] = torch.rand(total, weights.numel(), generator=gen, dtype=torch.float64)
        elif metric == "weight_magnitude":
            tables[metric] = weights.expand(total, -1).clone()
        else:
            rows = sums[:, stats.index(_GRAD_STAT[metric])]
            out = rows.mean(0, keepdim=True).expand(total, -1).clone()
            out[list(scored)] = rows
            tables[metric] = out
    return tables[backward_metric], tables[forward_metric]


def check_finite_losses(losses: Tensor, scored: Sequence[int]) -> None:
    """One host sync at the end of the pass: name the micro-batches with a non-finite loss."""
    bad = (~torch.isfinite(losses.cpu())).nonzero().flatten().tolist()
    if bad:
        ids = [int(scored[i]) for i in bad]
        raise FloatingPointError(
            f"micro-batch {ids[0]} gives a non-finite loss ({float(losses[bad[0]])}) in the scoring pass "
            f"(NaN/inf inputs?){f'; so do {ids[1:10]}' if len(ids) > 1 else ''}: fix those samples before fine-tuning")


# -- one process, batches given ------------------------------------------------------------------------
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
    """Score every micro-batch of ``batches`` (a sequence of ``(inputs, targets)`` or a DataLoader, which is
    streamed) on one process. :class:`~lightning_d2ft.D2FTCallback` does the same on the training device,
    shared between ranks.

    ``sample_every=k`` scores every k-th micro-batch only and gives the others the mean of the scored ones,
    which cuts the scoring pass by k. ``data_key`` names the data for the cache key instead of the
    fingerprint (the count plus a seeded sample of the batches, or of a DataLoader's dataset).
    """
    check_metric("backward", backward_metric)
    check_metric("forward", forward_metric)
    if sample_every < 1:
        raise ValueError(f"sample_every must be >= 1, got {sample_every}")
    if not isinstance(batches, Sized):
        batches = list(batches)
    total = len(batches)
    scored = list(range(0, total, sample_every))
    stats = grad_stats((backward_metric, forward_metric))
    key = None
    if cache_dir is not None:
        data = data_key if data_key is not None else _batches_fingerprint(batches, seed)
        key = cache_key(weights_digest(net), data, backward_metric, forward_metric, scored, total, seed, loss_fn)
        cached = load_cached(cache_dir, key, shape=(total, net.num_subnets))
        if cached is not None:
            return cached
    start = time.perf_counter()
    index = SubnetIndex(net)
    sums = torch.zeros(len(scored), 0, net.num_subnets, dtype=torch.float64)
    if stats:  # weight_magnitude and random need no data
        chosen = (b for n, b in enumerate(batches) if n % sample_every == 0)
        sums, losses = score_pass(net, chosen, loss_fn, stats, index, progress=progress, total=len(scored))
        check_finite_losses(losses, scored)
    backward, forward = score_tables(sums, stats, index.weight_sums(), scored, total, backward_metric,
                                     forward_metric, seed)
    scores = Scores(backward, forward, backward_metric, forward_metric, seconds=time.perf_counter() - start,
                    key=key or "", scored=len(scored) if stats else 0)
    save_cached(cache_dir, scores)
    return scores


def subnet_sums(net: D2FTViT, stat: Callable[[nn.Parameter], Tensor | None]) -> Tensor:
    """Sum of ``stat(param)`` over each subnet's own weights: a float64 vector of ``num_subnets`` (a slow,
    general helper for tests and one-off statistics; the scoring pass uses :class:`SubnetIndex`)."""
    index = SubnetIndex(net)
    out = torch.zeros(net.num_subnets, dtype=torch.float64)
    with torch.no_grad():
        for _, p, fold, dims, cols in index.pieces:
            value = stat(p)
            if value is not None:
                out.index_add_(0, cols.cpu(), fold(value).sum(dims).double().cpu())
    return out
