"""Fashion-MNIST, offline: the accuracy benchmark's task (70k real 28x28 images, 10 classes).

Debian's ``dataset-fashion-mnist`` package ships the four official ``.gz`` files; they are unpacked once
into torchvision's ``FashionMNIST/raw`` layout in a cache directory and read by
``torchvision.datasets.FashionMNIST`` (no hand-written parser, no network). The transfer protocol of the
benchmark keeps some classes (``classes``), remaps them to ``0..len(classes)-1``, draws
``train_per_class`` training images per class from ``seed`` and tests on *all* official test images of
those classes.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from lightning_d2ft.data.class_subset import ClassSubsetDataModule

__all__ = ["DEBIAN_DIR", "FashionMNISTDataModule", "load_fashion_mnist"]

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics (of values in [0, 1])


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning_d2ft"


def _unpack(source_dir: Path, cache_dir: Path) -> Path:
    """Unpack the package's ``.gz`` files into ``cache_dir/FashionMNIST/raw`` (once); returns ``cache_dir``."""
    raw = cache_dir / "FashionMNIST" / "raw"
    missing = [f for f in FILES if not (raw / f).exists()]
    if not missing:
        return cache_dir
    absent = [f for f in missing if not (source_dir / f"{f}.gz").is_file()]
    if absent:
        raise FileNotFoundError(f"Fashion-MNIST is not installed ({source_dir}/{absent[0]}.gz is missing): "
                                f"run `{INSTALL_HINT}` (as root)")
    raw.mkdir(parents=True, exist_ok=True)
    for name in missing:
        tmp = raw / f".{name}.tmp"
        with gzip.open(source_dir / f"{name}.gz", "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(raw / name)  # atomic: a concurrent reader never sees half a file
    return cache_dir


def load_fashion_mnist(train: bool, source_dir: str | Path = DEBIAN_DIR,
                       cache_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The official training (60k) or test (10k) split: uint8 images ``[N, 28, 28]`` and labels ``[N]``."""
    from torchvision.datasets import FashionMNIST

    root = _unpack(Path(source_dir), Path(cache_dir) if cache_dir else _default_cache() / "fashion_mnist")
    ds = FashionMNIST(root=str(root), train=train, download=False)
    return ds.data, ds.targets


class FashionMNISTDataModule(ClassSubsetDataModule):
    """Fashion-MNIST classes ``classes`` (remapped to ``0..C-1``): ``train_per_class`` seeded training images
    per class (``None``: all 6,000) and every official test image of those classes for validation and test.

    ``channels`` 1 (grey) or 3 (the grey image repeated, for models built with ``in_chans=3``);
    ``img_size`` other than 28 resizes bilinearly.
    """

    eval_batch_size = 500

    def __init__(self, img_size: int = 28, batch_size: int = 50, classes: Sequence[int] | None = None,
                 train_per_class: int | None = None, seed: int = 0, channels: int = 1, num_workers: int = 0,
                 source_dir: str | Path = DEBIAN_DIR, cache_dir: str | Path | None = None) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        bad = [c for c in (classes or []) if not 0 <= int(c) < 10]
        if bad or (classes is not None and len(set(classes)) != len(classes)):
            raise ValueError(f"classes must be distinct labels in 0..9, got {list(classes)}")
        if train_per_class is not None and not 1 <= train_per_class <= 6000:
            raise ValueError(f"train_per_class must be in [1, 6000] or None, got {train_per_class}")
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        gen = torch.Generator().manual_seed(hp.seed)
        x, y = self._select(*load_fashion_mnist(True, hp.source_dir, hp.cache_dir), hp.train_per_class, gen)
        self.train_set = TensorDataset(x, y)
        self.val_set = TensorDataset(*self._select(*load_fashion_mnist(False, hp.source_dir, hp.cache_dir), None, gen))

    def _select(self, images: torch.Tensor, labels: torch.Tensor, per_class: int | None,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        classes = list(self.hparams.classes) if self.hparams.classes is not None else list(range(10))
        idx, new = [], []
        for i, c in enumerate(classes):  # seeded per-class subset, in class order (the sampler shuffles)
            found = (labels == c).nonzero().flatten()
            if per_class is not None:
                found = found[torch.randperm(len(found), generator=gen)[:per_class]].sort().values
            idx.append(found)
            new.append(torch.full((len(found),), i, dtype=torch.long))
        idx = torch.cat(idx)
        return self._to_input(images[idx]), torch.cat(new)

    def _to_input(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float()[:, None] / 255.0 - MEAN) / STD
        if self.hparams.img_size != x.shape[-1]:
            x = F.interpolate(x, size=self.hparams.img_size, mode="bilinear", align_corners=False)
        return x.expand(-1, self.hparams.channels, -1, -1).contiguous()
