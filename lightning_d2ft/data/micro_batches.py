"""Micro-batches of fixed composition: a schedule row belongs to one micro-batch, so the same samples must
form the same micro-batch in every epoch; only the order of micro-batches may change.

:class:`MicroBatchSampler` does that. It subclasses ``DistributedSampler`` so that Lightning keeps it as it
is, and it splits micro-batches over the *data-parallel* replicas only: all tensor-parallel ranks of a
replica see the same micro-batches. Plain training DataLoaders just work: :func:`with_micro_batches` swaps a
plain sampler for a MicroBatchSampler, as Lightning injects DistributedSampler.

A run resumed mid-epoch continues that epoch where the checkpoint left it (:func:`resume_in_epoch`): the
loaders built here (:class:`MicroBatchLoader`) are stateful, so Lightning's checkpoints record which
micro-batches every data-parallel replica trains in the current epoch, and a resume on another layout
(another number of replicas) trains the rest of the epoch instead of dropping it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = ["MicroBatchLoader", "MicroBatchSampler", "ResumePoint", "find_micro_batch_sampler", "micro_batch_loader",
           "plan_resume", "resume_in_epoch", "with_micro_batches"]
_STATE_FORMAT = 1


class MicroBatchSampler(DistributedSampler):
    """Yields sample indices so that consecutive ``micro_batch_size`` chunks are fixed micro-batches.

    Micro-batch ``i`` always holds the same samples (drawn once from ``seed``); each epoch the micro-batches
    are shuffled (``seed + epoch``) and dealt to the ``num_replicas`` data-parallel replicas. Incomplete
    trailing samples are dropped so every micro-batch has the same size.
    """

    def __init__(self, dataset: Dataset | Sequence, micro_batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError(f"an IterableDataset ({type(dataset).__name__}) cannot be split into fixed micro-batches "
                            "(it has no sample indices): use a map-style Dataset, with __getitem__ and __len__")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        n = len(dataset)
        if micro_batch_size < 1 or micro_batch_size > n:
            raise ValueError(f"micro_batch_size must be in [1, {n}] for a data set of {n} samples, "
                             f"got {micro_batch_size}")
        self.micro_batch_size = micro_batch_size
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        count = n // micro_batch_size
        self.micro_batches: list[list[int]] = order[: count * micro_batch_size].view(count, -1).tolist()
        self.skip = 0  # micro-batches to skip at the start of the next pass only (resuming mid-epoch)
        self.epoch_batches: int | None = None  # batches Lightning takes per epoch (limit_train_batches applied)
        # (epoch, ids of every replica): that epoch's micro-batches when a resume dealt its rest anew (-1: done)
        self.resumed: tuple[int, list[list[int]]] | None = None
        self.restored: dict[str, Any] | None = None  # the state of the checkpoint being resumed, if any

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches)

    def set_replicas(self, num_replicas: int, rank: int) -> None:
        """Point the sampler at one data-parallel replica (the strategy knows which)."""
        if not 0 <= rank < num_replicas:
            raise ValueError(f"replica rank {rank} outside [0, {num_replicas})")
        if num_replicas > self.num_micro_batches:
            raise ValueError(f"{num_replicas} data-parallel replicas but only {self.num_micro_batches} micro-batches")
        self.num_replicas, self.rank = num_replicas, rank

    def micro_batch_ids(self, epoch: int | None = None) -> list[int]:
        """The micro-batches this replica visits in ``epoch``, in order (index = batch_idx)."""
        return self.replica_ids(self.epoch if epoch is None else epoch, self.rank)

    def replica_ids(self, epoch: int, rank: int, replicas: int | None = None) -> list[int]:
        """The micro-batches data-parallel replica ``rank`` of ``replicas`` (default: this run's) visits in
        ``epoch``; -1 marks a batch index the epoch had trained before a resume dealt its rest anew."""
        replicas = self.num_replicas if replicas is None else replicas
        if self.resumed is not None and self.resumed[0] == epoch and replicas == self.num_replicas:
            return list(self.resumed[1][rank])
        count = self.num_micro_batches
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed + epoch)) if self.shuffle \
            else torch.arange(count)
        per_replica = count // replicas
        return order[rank::replicas][:per_replica].tolist()

    # -- checkpoint state (through MicroBatchLoader: Lightning saves a stateful training loader's state) --------
    def state_dict(self) -> dict[str, Any]:
        """Which micro-batches every replica trains in the current epoch, in order, as far as Lightning takes
        them: what a resume on any layout needs to know what the epoch has left."""
        batches = self.epoch_batches
        lists = [self.replica_ids(self.epoch, r) for r in range(self.num_replicas)]
        return {"format": _STATE_FORMAT, "epoch": int(self.epoch), "num_micro_batches": self.num_micro_batches,
                "epoch_ids": [ids[:batches] if batches is not None else ids for ids in lists]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep the state of the checkpoint being resumed for :func:`resume_in_epoch` (nothing changes yet)."""
        self.restored = dict(state) if state else None

    def __iter__(self) -> Iterator[int]:
        # ``skip`` holds for one pass only: read and cleared when the pass starts, not when it ends, because
        # Lightning stops fetching after ``len(dataloader)`` batches and never exhausts this generator
        skip, self.skip = self.skip, 0
        for mb in self.micro_batch_ids()[skip:]:
            yield from self.micro_batches[mb]

    def __len__(self) -> int:
        # the whole epoch, skip or not: Lightning counts a resumed epoch's batches from the restored progress
        return self.num_micro_batches // self.num_replicas * self.micro_batch_size


class MicroBatchLoader(DataLoader):
    """A DataLoader over a :class:`MicroBatchSampler` whose state goes into Lightning's checkpoints: Lightning
    saves (and restores) the state of a stateful training loader with its loops."""

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state_dict)


def micro_batch_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                       **loader_kwargs) -> DataLoader:
    """A training DataLoader whose batches are D2FT's fixed micro-batches."""
    sampler = MicroBatchSampler(dataset, batch_size, shuffle=shuffle, seed=seed)
    return MicroBatchLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, **loader_kwargs)


def find_micro_batch_sampler(loader: object) -> MicroBatchSampler:
    """The MicroBatchSampler of a train dataloader, or an error that names what the loader has and a fix that
    works for it."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, MicroBatchSampler):
        return sampler
    fix = ("lightning_d2ft.micro_batch_loader(dataset, batch_size), or a plain DataLoader(dataset, batch_size=..., "
           "shuffle=True), which D2FTStrategy converts")
    why = "D2FT schedules fixed micro-batches (a schedule row belongs to one micro-batch)"
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, IterableDataset):
        raise TypeError(f"an IterableDataset ({type(dataset).__name__}) cannot be split into fixed micro-batches: "
                        f"{why}. Use a map-style Dataset (with __getitem__ and __len__) and {fix}")
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        raise TypeError(f"a custom batch_sampler ({type(batch_sampler).__name__}) chooses its own batches, but {why}. "
                        f"Give the DataLoader batch_size= instead, or build it with {fix}")
    if not isinstance(loader, DataLoader):
        raise TypeError(f"the training data is a {type(loader).__name__}, not a DataLoader: {why}. Use {fix}")
    raise TypeError(f"the training DataLoader's sampler ({type(sampler).__name__}) does not keep micro-batches "
                    f"fixed and D2FTStrategy(use_micro_batch_sampler=False) leaves it as it is: {why}. Use {fix}, or "
                    "sampler=MicroBatchSampler(dataset, batch_size)")


_PLAIN = (SequentialSampler, RandomSampler, DistributedSampler)


def with_micro_batches(loader: object, seed: int = 0) -> object:
    """``loader`` with a MicroBatchSampler of its batch size when its sampler is plain; else ``loader``
    unchanged (a custom ``batch_sampler`` or an IterableDataset is left for the caller to refuse)."""
    if not isinstance(loader, DataLoader) or isinstance(loader.sampler, MicroBatchSampler):
        return loader
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return loader  # no index sampler / a custom batch_sampler: nothing to convert
    if type(loader.batch_sampler) is not BatchSampler or type(loader.sampler) not in _PLAIN:
        return loader
    shuffle = not isinstance(loader.sampler, SequentialSampler)
    if isinstance(loader.sampler, DistributedSampler):
        shuffle = loader.sampler.shuffle
    sampler = MicroBatchSampler(loader.dataset, loader.batch_size, shuffle=shuffle, seed=seed)
    # named by what it does: on a DDP strategy Lightning has already put its own DistributedSampler in place of
    # the user's RandomSampler or SequentialSampler, which the user never made
    rank_zero_info(f"D2FT: the training DataLoader's {'shuffled' if shuffle else 'sequential'} sampler was replaced "
                   f"by a MicroBatchSampler (batch size {loader.batch_size}, shuffle={shuffle}, seed={seed}): D2FT "
                   "needs micro-batches of fixed composition. Pass D2FTStrategy(use_micro_batch_sampler=False) to opt "
                   "out.")
    left_out = len(loader.dataset) % loader.batch_size
    if left_out:
        rank_zero_warn(f"D2FT: {left_out} of the {len(loader.dataset)} training samples are never trained: "
                       f"{len(loader.dataset)} is not a multiple of the batch size {loader.batch_size}, and every "
                       "micro-batch is full (the same samples are left out every epoch). Choose a batch size that "
                       "divides the data set to train them all.")
    return MicroBatchLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=False,
                            num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                            pin_memory=loader.pin_memory, timeout=loader.timeout,
                            worker_init_fn=loader.worker_init_fn, persistent_workers=loader.persistent_workers)


# -- resuming mid-epoch -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResumePoint:
    """Where the epoch of a resumed checkpoint goes on: ``epoch`` (None: unknown, a checkpoint of an older
    version) with its first ``batches_done`` batch indexes counted as trained; ``ids``: every replica's
    micro-batches of that epoch when its rest was dealt anew (None: the sampler's own order); ``note``: what to
    log (a warning when ``warn``)."""

    epoch: int | None
    batches_done: int
    ids: list[list[int]] | None = None
    note: str = ""
    warn: bool = False


def plan_resume(sampler: MicroBatchSampler, processed: int, batches: int, state: dict[str, Any] | None) -> ResumePoint:
    """Where a run resumed mid-epoch goes on, on this run's layout (``sampler``'s replicas).

    ``processed``: batches of its epoch each replica of the checkpoint's run had trained (Lightning's batch
    progress); ``batches``: batches per epoch Lightning takes on this run's layout; ``state``: the sampler
    state the checkpoint holds (None: a checkpoint of an older version, taken to have this run's layout).

    A checkpoint written on its epoch's last batch closed that epoch (Lightning goes on with the next one, from
    its first batch). Otherwise the micro-batches of the epoch not trained yet are dealt, in the epoch's order,
    to this run's replicas: on the checkpoint's own layout that is exactly what each replica had left. What
    cannot be dealt evenly is left out with a warning, as an epoch leaves out what does not divide; fewer
    micro-batches left than replicas is refused (they cannot run in lockstep).
    """
    replicas = sampler.num_replicas
    if state is None:
        if processed >= batches:
            return ResumePoint(None, 0)
        return ResumePoint(None, processed, note=f"after micro-batch {processed}")
    if state.get("format") != _STATE_FORMAT or state.get("num_micro_batches") != sampler.num_micro_batches:
        raise ValueError(f"the checkpoint's training micro-batches (format {state.get('format')}, "
                         f"{state.get('num_micro_batches')} micro-batches) are not this run's "
                         f"({sampler.num_micro_batches} micro-batches): resume with the same data and batch size, "
                         "or start fresh (resume=null)")
    lists = [[int(i) for i in ids] for ids in state["epoch_ids"]]
    epoch, length = int(state["epoch"]), min(len(ids) for ids in lists)
    if processed >= length:  # written on the epoch's last batch: that epoch is done
        return ResumePoint(epoch + 1, 0)
    rest = [ids[i] for i in range(processed, length) for ids in lists if ids[i] >= 0]
    per = min(len(rest) // replicas, batches)
    where = (f"the checkpoint stopped epoch {epoch} after {processed} of its {length} batches on {len(lists)} "
             f"data-parallel replica(s), leaving {len(rest)} micro-batch(es) of the epoch")
    if per == 0:
        raise ValueError(f"{where}: fewer than this run's {replicas} data-parallel replicas, so they cannot be "
                         "trained in lockstep. Resume on the checkpoint's layout (trainer.devices / "
                         "trainer.tensor_parallel_size as before) to finish the epoch, then change it; or resume from "
                         "the epoch-end checkpoint (resume=<run dir>/checkpoints/last.ckpt), which gives up the steps "
                         "after it")
    done = batches - per
    dealt = [[-1] * done + rest[r::replicas][:per] for r in range(replicas)]
    if done == processed and all(dealt[r][done:] == sampler.replica_ids(epoch, r)[done:batches]
                                 for r in range(replicas)):
        return ResumePoint(epoch, processed, note=f"after micro-batch {processed}")
    left_out = len(rest) - per * replicas
    note = (f"{where}; this run has {replicas} replica(s) of {batches} batches an epoch: the {per * replicas} "
            f"left are trained now, {per} per replica, then epoch {epoch + 1} as usual")
    if left_out:
        note += (f". {left_out} of them cannot be dealt evenly to {replicas} replicas (lockstep) and are left out of "
                 "this epoch, as every epoch leaves out the micro-batches that do not divide")
    return ResumePoint(epoch, done, dealt, note, warn=True)


def resume_in_epoch(trainer: Trainer) -> None:
    """At train start: on a run resumed mid-epoch, point the training sampler, and Lightning's batch progress,
    at the rest of the epoch the checkpoint was in (:func:`plan_resume`). Also records how many batches an epoch
    has, for the sampler's checkpoint state. D2FTStrategy calls it from ``on_train_start``."""
    loop = trainer.fit_loop
    try:
        sampler = find_micro_batch_sampler(trainer.train_dataloader)
    except TypeError:
        if loop.restarted_mid_epoch:
            raise
        return
    batches = trainer.num_training_batches
    sampler.epoch_batches = int(batches) if batches != float("inf") else None
    if not loop.restarted_mid_epoch:
        return
    load = getattr(loop, "_load_combined_loader_states", None)
    if load is not None:  # the loader was built (D2FTCallback's planning) before Lightning restored its loops
        try:
            load()
        except RuntimeError as err:  # a checkpoint with our loader's state resumed with a loader without it
            rank_zero_warn(f"D2FT: the checkpoint's training-loader state cannot be restored ({err}); the epoch goes "
                           "on as if the checkpoint had this run's data-parallel layout")
    progress = loop.epoch_loop.batch_progress.current
    point = plan_resume(sampler, progress.processed, sampler.epoch_batches or len(sampler), sampler.restored)
    sampler.restored = None
    if point.epoch is not None and point.epoch != trainer.current_epoch:
        raise RuntimeError(f"resuming: Lightning goes on with epoch {trainer.current_epoch}, but the checkpoint's "
                           f"micro-batches say epoch {point.epoch} ({progress.processed} batches done)")
    if point.ids is not None:
        sampler.resumed = (trainer.current_epoch, point.ids)
    sampler.skip = point.batches_done
    if point.batches_done != progress.processed:  # Lightning counts the epoch's batches from its progress
        behind = progress.processed - progress.completed  # saved in on_train_batch_end: 1, else 0
        progress.ready = progress.started = progress.processed = point.batches_done
        progress.completed = point.batches_done - behind
    # our loader is resumable; an older checkpoint's or a custom loader's resume is handled here all the same
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
    if point.warn:
        rank_zero_warn(f"D2FT: {point.note}")
    elif point.note:
        rank_zero_info(f"D2FT: resuming epoch {trainer.current_epoch} {point.note}")
