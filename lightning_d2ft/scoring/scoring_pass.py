"""The scoring pass itself: forward + backward per micro-batch, per-subnet sums kept on the device.

Where each parameter belongs is worked out once (:class:`SubnetIndex`: every head group of a block holds
Parameters of its own, named after it, see :mod:`lightning_d2ft.parallel.layout`); per micro-batch every statistic
of every parameter is reduced with a few tensor ops and accumulated on the device, so the pass makes no host
sync until it ends.

The pass runs on whatever model it is given: whole on one process, or this rank's shard of a
tensor-parallel model (the tensor-parallel group runs the sharded forward/backward together, and each rank
sums only its own head groups; the replicated stem and head are counted by tensor-parallel rank 0 only).
:func:`sum_over_ranks` then adds the per-rank tables with one all-reduce.
"""

from __future__ import annotations

import contextlib
import copy
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_d2ft.data.micro_batches import MicroBatchSampler
from lightning_d2ft.model.grouped import join_groups
from lightning_d2ft.model.vit import D2FTViT
from lightning_d2ft.parallel.layout import group_param

__all__ = ["GRAD_STATS", "SubnetIndex", "micro_batches_to_train", "score_pass", "score_shared", "scoring_loader",
           "sum_over_ranks"]

#: statistics the gradient metrics are built from: per element of the micro-batch gradient ``g`` (and weight
#: ``w``), and "fisher", the squared per-sample gradients (:mod:`lightning_d2ft.scoring.per_sample`)
GRAD_STATS = ("abs", "sq", "taylor", "fisher")
_BATCH_STATS = ("abs", "sq", "taylor")
_STEM = ("patch_embed.", "norm_pre.")
_STEM_TOKENS = ("cls_token", "reg_token", "pos_embed")


def _whole(t: Tensor) -> Tensor:
    """``t`` as one row (one subnet column: the tensor is summed whole)."""
    return t.reshape(1, -1)


def _is_adapter(name: str) -> bool:
    return ".lora_A" in name or ".lora_B" in name


class SubnetIndex:
    """How every scored parameter of ``net`` folds into subnet columns; built once, reused per micro-batch.

    Every head group of a block holds its own Parameters (its slice of qkv, proj, fc1, fc2; see
    :mod:`lightning_d2ft.model.grouped`), each summed whole into that subnet's column; a stem/head tensor
    goes whole to column 0 / the last column (only when ``count_replicated``: one tensor-parallel rank counts
    them); shared block tensors (norms, the proj/fc2 biases, LayerScale) and LoRA adapters count for nobody.
    A tensor-parallel rank holds only its own groups' Parameters, so it sums only their columns.
    """

    def __init__(self, net: D2FTViT, *, count_replicated: bool = True) -> None:
        self.num_subnets = net.num_subnets
        # every base weight takes part in the backward, counted or not, so that every tensor-parallel rank
        # runs the same backward collectives; LoRA adapters (zero at this point) do not
        self.base_params = [p for name, p in net.vit.named_parameters() if not _is_adapter(name)]
        device = next(net.parameters()).device
        # (name, parameter, a view whose reduction over ``dims`` leaves one entry per column, dims, columns)
        self.pieces: list[tuple[str, nn.Parameter, Callable[[Tensor], Tensor], tuple[int, ...], Tensor]] = []
        for name, p in net.vit.named_parameters():
            if _is_adapter(name):
                continue
            found = group_param(name)
            if found is not None:
                block, group, _ = found
                cols = [net.subnet_index(block, group)]
            elif name.startswith("blocks.") or not count_replicated:
                continue
            else:
                stem = name.startswith(_STEM) or name in _STEM_TOKENS
                cols = [0 if stem else net.num_subnets - 1]
            self.pieces.append((name, p, _whole, (1,), torch.tensor(cols, device=device)))
        # the same, batched: a grouped tensor's groups (side by side in memory) reduced together, one row each
        batches: dict[str, tuple[list[nn.Parameter], list[int]]] = {}
        for name, p, _, _, cols in self.pieces:
            found = group_param(name)
            key = name if found is None else f"{found[0]}.{found[2]}"
            params, columns = batches.setdefault(key, ([], []))
            params.append(p)
            columns.append(int(cols[0]))
        self._batches = [(params, torch.tensor(columns, device=device)) for params, columns in batches.values()]

    @property
    def params(self) -> list[nn.Parameter]:
        return [piece[1] for piece in self.pieces]

    @torch.no_grad()
    def grad_sums(self, stats: Sequence[str]) -> Tensor:
        """``[len(stats), num_subnets]`` float64 sums of each statistic of the current gradients (on device)."""
        out = None
        for params, cols in self._batches:
            grads = [p.grad for p in params]
            if any(g is None for g in grads):
                if all(g is None for g in grads):
                    continue
                keep = [i for i, g in enumerate(grads) if g is not None]
                params, grads, cols = [params[i] for i in keep], [grads[i] for i in keep], cols[keep]
            g = join_groups(grads).view(len(grads), -1)
            rows = []
            for s in stats:
                if s == "abs":
                    rows.append(torch.linalg.vector_norm(g, 1, dim=1))
                elif s == "sq":
                    rows.append(torch.linalg.vector_norm(g, 2, dim=1).square())
                else:  # taylor
                    rows.append((g * join_groups(params).view(len(params), -1)).abs().sum(1))
            if out is None:
                out = torch.zeros(len(stats), self.num_subnets, dtype=torch.float64, device=g.device)
            out.index_add_(1, cols, torch.stack(rows).double())
        return out if out is not None else torch.zeros(len(stats), self.num_subnets, dtype=torch.float64)

    @torch.no_grad()
    def weight_sums(self) -> Tensor:
        """``[num_subnets]`` float64 sums of |w| over each subnet's own weights (on device)."""
        out = None
        for params, cols in self._batches:
            w = join_groups(params).view(len(params), -1)
            if out is None:
                out = torch.zeros(self.num_subnets, dtype=torch.float64, device=w.device)
            out.index_add_(0, cols, torch.linalg.vector_norm(w, 1, dim=1).double())
        return out if out is not None else torch.zeros(self.num_subnets, dtype=torch.float64)


@contextmanager
def _scoring_mode(net: D2FTViT, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Eval mode (dropout off: the scores describe the model, not one mask), every scored parameter
    requiring grad (frozen LoRA base weights included), the existing ``.grad`` kept aside; all restored."""
    was_training = net.training
    saved_grads = {p: p.grad for p in net.parameters()}
    saved_flags = {p: p.requires_grad for p in net.parameters()}
    net.eval()
    for p in net.parameters():
        p.grad = None
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        net.train(was_training)
        for p in net.parameters():
            p.requires_grad_(saved_flags[p])
            p.grad = saved_grads[p]


def score_pass(net: D2FTViT, batches: Iterable, loss_fn: Callable[[Tensor, Tensor], Tensor],
               stats: Sequence[str], index: SubnetIndex, *, progress: bool = False,
               total: int | None = None) -> tuple[Tensor, Tensor]:
    """Forward + backward of every ``(inputs, targets)`` in ``batches``, no weight update.

    Returns ``([n, len(stats), num_subnets] float64, losses [n] float64)``, both on the model's device;
    nothing is synced to the host per micro-batch (non-finite losses are for the caller to check).
    The model's mode, gradients and ``requires_grad`` flags are restored. With "fisher" alone the backward
    computes the output gradients of the scored layers only (no weight gradients).
    """
    from tqdm.auto import tqdm

    from lightning_d2ft.scoring.per_sample import PerSampleFisher

    device = next(net.parameters()).device
    batch_stats = [s for s in stats if s in _BATCH_STATS]
    fisher = PerSampleFisher(net) if "fisher" in stats else None
    rows, losses = [], []
    with _scoring_mode(net, index.base_params if stats else []):
        for x, y in tqdm(batches, desc="D2FT scores", disable=not progress, leave=False, total=total):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.set_grad_enabled(bool(stats)), (fisher.recording() if fisher else contextlib.nullcontext()):
                loss = loss_fn(net(x), y)
            if stats:
                row = {}
                if batch_stats:
                    if fisher is not None:  # the per-sample statistic reads the layers' output gradients
                        outputs = fisher.outputs
                        for out in outputs:
                            out.retain_grad()
                    loss.backward()
                    row.update(zip(batch_stats, index.grad_sums(batch_stats)))
                    for p in index.base_params:
                        p.grad = None
                    if fisher is not None:
                        row["fisher"] = fisher.sums([out.grad for out in outputs])
                else:  # fisher alone: the layers' output gradients, no weight gradients
                    outputs = fisher.outputs
                    grads = torch.autograd.grad(loss, outputs, allow_unused=True) if outputs else []
                    row["fisher"] = fisher.sums(list(grads))
                rows.append(torch.stack([row[s].to(device) for s in stats]))
            losses.append(loss.detach().double().reshape(1))
    if not losses:
        raise ValueError("no micro-batches to score: the dataloader is empty")
    table = torch.stack(rows) if rows else torch.zeros(len(losses), 0, index.num_subnets, dtype=torch.float64,
                                                         device=device)
    return table, torch.cat(losses)


def scoring_loader(train_loader: DataLoader, micro_batches: Sequence[Sequence[int]]) -> DataLoader:
    """A loader over the training loader's dataset that yields exactly ``micro_batches``, one at a time,
    with the training loader's collate_fn, workers and pin_memory: the data set is streamed, never held."""
    workers = train_loader.num_workers
    extra = {"prefetch_factor": train_loader.prefetch_factor} if workers > 0 else {}
    return DataLoader(train_loader.dataset, batch_sampler=[list(mb) for mb in micro_batches],
                      collate_fn=train_loader.collate_fn, num_workers=workers, pin_memory=train_loader.pin_memory,
                      worker_init_fn=train_loader.worker_init_fn,
                      multiprocessing_context=train_loader.multiprocessing_context if workers > 0 else None,
                      timeout=train_loader.timeout, **extra)


def sum_over_ranks(table: Tensor) -> Tensor:
    """Element-wise sum of ``table`` over every process (one all-reduce; a no-op on one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        table = table.clone()
        dist.all_reduce(table)
    return table


def score_shared(net: D2FTViT, train_loader: DataLoader, micro_batches: Sequence[Sequence[int]],
                 ids: Sequence[int], stats: Sequence[str], loss_fn: Callable[[Tensor, Tensor], Tensor], *,
                 replica: int = 0, replicas: int = 1, count_replicated: bool = True,
                 progress: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Score micro-batches ``ids`` with every rank doing its share, and gather once.

    Data-parallel replica ``replica`` of ``replicas`` scores ``ids[replica::replicas]`` (streamed from the
    training loader's dataset); the ranks of one tensor-parallel group score the same micro-batches together
    through the sharded model. One all-reduce adds everything up; every rank gets
    ``(sums [len(ids), len(stats), num_subnets], losses [len(ids)], weight sums [num_subnets])``.
    """
    index = SubnetIndex(net, count_replicated=count_replicated)
    device = next(net.parameters()).device
    k, S, n = len(stats), net.num_subnets, len(ids)
    packed = torch.zeros(n + 1, max(k, 1) * S + 1, dtype=torch.float64, device=device)
    mine = list(range(replica, n, replicas))
    if mine and stats:
        loader = scoring_loader(train_loader, [micro_batches[ids[i]] for i in mine])
        sums, losses = score_pass(net, loader, loss_fn, stats, index, progress=progress, total=len(mine))
        rows = torch.tensor(mine, device=device)
        packed[rows, : k * S] = sums.flatten(1)
        if count_replicated:  # one rank per tensor-parallel group reports the (shared) loss
            packed[rows, -1] = losses
    if replica == 0:
        packed[n, :S] = index.weight_sums()
    packed = sum_over_ranks(packed)
    return packed[:n, : k * S].reshape(n, k, S), packed[:n, -1], packed[n, :S]


def micro_batches_to_train(trainer: Any, sampler: MicroBatchSampler) -> list[int]:
    """The micro-batches (over every data-parallel replica) that this fit will train, in id order: all of them
    unless ``limit_train_batches``, ``max_steps`` or ``max_epochs`` stop it short of covering them."""
    count, replicas = sampler.num_micro_batches, sampler.num_replicas
    per_epoch = trainer.num_training_batches
    per_epoch = count // replicas if math.isinf(per_epoch) else int(per_epoch)
    batches_left = trainer.max_steps * trainer.accumulate_grad_batches if trainer.max_steps >= 0 else math.inf
    epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else 1000
    views = []
    for r in range(replicas):
        view = copy.copy(sampler)
        view.set_replicas(replicas, r)
        views.append(view)
    needed: set[int] = set()
    for epoch in range(trainer.current_epoch, max(epochs, trainer.current_epoch + 1)):
        take = int(min(per_epoch, batches_left))
        for view in views:
            needed.update(view.micro_batch_ids(epoch)[:take])
        batches_left -= take
        if batches_left <= 0 or len(needed) == count or not sampler.shuffle:
            break
    return sorted(needed)
