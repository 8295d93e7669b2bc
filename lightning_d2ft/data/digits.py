"""The bundled offline data set: scikit-learn's 8x8 digits, upsampled to RGB images."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from lightning_d2ft.data.class_subset import ClassSubsetDataModule

__all__ = ["DigitsDataModule"]


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
