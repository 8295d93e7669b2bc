"""Micro-batches of fixed composition: a schedule row belongs to one micro-batch, so the same samples must
form the same micro-batch in every epoch; only the order of micro-batches may change.

:class:`MicroBatchSampler` does that. It subclasses ``DistributedSampler`` so that Lightning keeps it as it
is, and it splits micro-batches over the *data-parallel* replicas only: all tensor-parallel ranks of a
replica see the same micro-batches. Plain training DataLoaders just work: :func:`with_micro_batches` swaps a
plain sampler for a MicroBatchSampler, as Lightning injects DistributedSampler.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

__all__ = ["MicroBatchSampler", "find_micro_batch_sampler", "micro_batch_loader", "with_micro_batches"]


class MicroBatchSampler(DistributedSampler):
    """Yields sample indices so that consecutive ``micro_batch_size`` chunks are fixed micro-batches.

    Micro-batch ``i`` always holds the same samples (drawn once from ``seed``); each epoch the micro-batches
    are shuffled (``seed + epoch``) and dealt to the ``num_replicas`` data-parallel replicas. Incomplete
    trailing samples are dropped so every micro-batch has the same size.
    """

    def __init__(self, dataset: Dataset | Sequence, micro_batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
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
        epoch = self.epoch if epoch is None else epoch
        count = self.num_micro_batches
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed + epoch)) if self.shuffle \
            else torch.arange(count)
        per_replica = count // self.num_replicas
        return order[self.rank :: self.num_replicas][:per_replica].tolist()

    def __iter__(self) -> Iterator[int]:
        # ``skip`` holds for one pass only: read and cleared when the pass starts, not when it ends, because
        # Lightning stops fetching after ``len(dataloader)`` batches and never exhausts this generator
        skip, self.skip = self.skip, 0
        for mb in self.micro_batch_ids()[skip:]:
            yield from self.micro_batches[mb]

    def __len__(self) -> int:
        # the whole epoch, skip or not: Lightning counts a resumed epoch's batches from the restored progress
        return self.num_micro_batches // self.num_replicas * self.micro_batch_size


def micro_batch_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                       **loader_kwargs) -> DataLoader:
    """A training DataLoader whose batches are D2FT's fixed micro-batches."""
    sampler = MicroBatchSampler(dataset, batch_size, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, **loader_kwargs)


def find_micro_batch_sampler(loader: object) -> MicroBatchSampler:
    """The MicroBatchSampler of a train dataloader, or an error that says how to get one."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, MicroBatchSampler):
        return sampler
    raise TypeError(
        "D2FT needs micro-batches of fixed composition (a schedule row belongs to one micro-batch): build the "
        "training DataLoader with lightning_d2ft.data.micro_batches.micro_batch_loader(dataset, batch_size) or pass "
        f"sampler=MicroBatchSampler(dataset, batch_size); got sampler {type(sampler).__name__}"
    )



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
    left_out = len(loader.dataset) % loader.batch_size
    dropped = (f"; it leaves out {left_out} of the {len(loader.dataset)} samples, the same ones every epoch, so that "
               "every micro-batch is full") if left_out else ""
    rank_zero_info(f"D2FT: the training DataLoader's {type(loader.sampler).__name__} was replaced by a "
                   f"MicroBatchSampler (batch size {loader.batch_size}, shuffle={shuffle}, seed={seed}){dropped}: "
                   "D2FT needs micro-batches of fixed composition. Pass D2FTStrategy(use_micro_batch_sampler=False) "
                   "to opt out.")
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers)
