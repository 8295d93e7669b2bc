"""Data for D2FT: micro-batches of fixed composition, and the bundled offline data set (digits).

A schedule row belongs to one micro-batch, so the same samples must form the same micro-batch in every
epoch; only the order of micro-batches may change. :class:`MicroBatchSampler` does that. It subclasses
``DistributedSampler`` so that Lightning keeps it as it is, and it splits micro-batches over the
*data-parallel* replicas only: all tensor-parallel ranks of a replica see the same micro-batches.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

__all__ = ["DigitsDataModule", "MicroBatchSampler", "micro_batch_loader"]


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
            raise ValueError(f"micro_batch_size must be in [1, {n}] for a data set of {n} samples, got {micro_batch_size}")
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
        "training DataLoader with lightning_d2ft.data.micro_batch_loader(dataset, batch_size) or pass "
        f"sampler=MicroBatchSampler(dataset, batch_size); got sampler {type(sampler).__name__}"
    )


def _check_digits_settings(img_size: int, batch_size: int, classes: Sequence[int] | None,
                           train_per_class: int | None, val_fraction: float) -> None:
    """Refuse settings the digits cannot satisfy before any data is loaded, naming the field."""
    if classes is not None:
        classes = list(classes)
        bad = [c for c in classes if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= 9]
        if bad or len(set(classes)) != len(classes) or len(classes) < 2:
            raise ValueError(f"data.classes must be at least 2 distinct digits from 0..9 (the digits data set has "
                             f"no other classes), got {classes}")
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"data.img_size must be a positive int, got {img_size!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"data.batch_size must be a positive int, got {batch_size!r}")
    if train_per_class is not None and (not isinstance(train_per_class, int) or train_per_class < 1):
        raise ValueError(f"data.train_per_class must be null or a positive int, got {train_per_class!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction!r}")


class ClassSubsetDataModule(LightningDataModule):
    """What the bundled image data modules share: a ``classes`` subset (remapped to ``0..C-1``, else all
    ``total_classes``), a training set of fixed micro-batches and one held-out set for validation, test and
    predict. Subclasses set ``train_set`` / ``val_set`` in ``setup``."""

    total_classes = 10
    eval_batch_size = 256

    def __init__(self) -> None:
        super().__init__()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.hparams.classes) if self.hparams.classes is not None else self.total_classes

    def train_dataloader(self) -> DataLoader:
        return micro_batch_loader(self.train_set, self.hparams.batch_size, seed=self.hparams.seed,
                                  **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, **self._loader_kwargs())

    def _loader_kwargs(self) -> dict:
        """Workers, and pinned batches when the trainer runs on CUDA: a host-to-GPU copy from pageable memory
        is synchronous with respect to the host, so the host could not queue the next step meanwhile."""
        trainer = self.trainer
        cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return {"num_workers": self.hparams.num_workers, "pin_memory": cuda}

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class DigitsDataModule(ClassSubsetDataModule):
    """scikit-learn's bundled 8x8 digits (1,797 real images, 10 classes), upsampled to RGB ``img_size``.

    Ships inside scikit-learn, so it needs no network. ``classes`` keeps a subset of the digits (for a
    pretrain-on-some, fine-tune-on-others transfer setting); ``train_per_class`` keeps a few labels only.
    """

    def __init__(self, img_size: int = 32, batch_size: int = 32, classes: Sequence[int] | None = None,
                 train_per_class: int | None = None, val_fraction: float = 0.25, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        _check_digits_settings(img_size, batch_size, classes, train_per_class, val_fraction)
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        hp = self.hparams
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # pixel values are 0..16
        labels = torch.tensor(digits.target, dtype=torch.long)
        if hp.classes is not None:
            keep = torch.isin(labels, torch.tensor(list(hp.classes)))
            remap = {c: i for i, c in enumerate(hp.classes)}
            images, labels = images[keep], torch.tensor([remap[int(t)] for t in labels[keep]])
        rng = np.random.default_rng(hp.seed)
        train_idx, val_idx = [], []
        for c in labels.unique().tolist():  # stratified split
            idx = rng.permutation(np.flatnonzero(labels.numpy() == c))
            n_val = math.ceil(len(idx) * hp.val_fraction)
            val_idx += idx[:n_val].tolist()
            train = idx[n_val:]
            train_idx += (train[: hp.train_per_class] if hp.train_per_class else train).tolist()
        x = self._to_rgb(images)
        self.train_set = TensorDataset(x[train_idx], labels[train_idx])
        self.val_set = TensorDataset(x[val_idx], labels[val_idx])

    def _to_rgb(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images[:, None], size=self.hparams.img_size, mode="bilinear", align_corners=False)
        x = (x - 0.5) / 0.5
        return x.expand(-1, 3, -1, -1).contiguous()
