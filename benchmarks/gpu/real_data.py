"""Fashion-MNIST for the GPU session: a subset of the official idx files, carried to the device as files,
read without torchvision, resized to the model's input on the device.

Why this shape: the device machine has no network and no dataset package, and the device tool carries at
most 64 MiB of ignored files, so ``prepare`` writes the first ``--train``/``--test`` images of the official
files (``/usr/share/datasets/fashion-mnist``, Debian's ``dataset-fashion-mnist``) as gzipped idx files into
``.gpu_data/fashion-mnist`` (12,800 + 2,000 images: ~6 MiB). Batches travel as 28x28 uint8 (a 224 px float
batch of 256 would be 150 MiB per step through the host); :func:`resize_on_input` turns them into normalised
3-channel ``img_size`` images inside the model's stem (``F.interpolate`` on the batch's device), so the
scoring pass, training and validation all see the same 224 px input.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

SOURCE = Path("/usr/share/datasets/fashion-mnist")
DATA = Path(".gpu_data/fashion-mnist")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics (of values in [0, 1])
_SPLITS = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> Tensor:
    """An idx(.gz) file as a uint8 tensor of its declared shape (the format: 2 zero bytes, type 0x08 =
    uint8, the rank, then one big-endian int32 per dimension, then the data)."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    zero, dtype, rank = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not a uint8 idx file")
    shape = struct.unpack(f">{rank}I", raw[4: 4 + 4 * rank])
    return torch.frombuffer(bytearray(raw[4 + 4 * rank:]), dtype=torch.uint8).reshape(shape)


def write_idx(path: Path, data: Tensor) -> None:
    """``data`` (uint8) as a gzipped idx file."""
    header = struct.pack(">HBB", 0, 0x08, data.dim()) + struct.pack(f">{data.dim()}I", *data.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + data.contiguous().numpy().tobytes())


def prepare(out: Path = DATA, train: int = 12800, test: int = 2000, source: Path = SOURCE) -> list[Path]:
    """Write the first ``train`` / ``test`` images and labels of the official files under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, count in (("train", train), ("test", test)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{_SPLITS[split]}-{kind}-ubyte.gz"
            path = out / name
            write_idx(path, read_idx(source / name)[:count])
            written.append(path)
    return written


def load(split: str, count: int | None = None, root: Path = DATA) -> tuple[Tensor, Tensor]:
    """Images ``[N, 1, 28, 28]`` uint8 and labels ``[N]`` int64 of a prepared split (the first ``count``)."""
    prefix = _SPLITS[split]
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")[:count]
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")[:count]
    if count is not None and len(images) < count:
        raise ValueError(f"{root} holds {len(images)} {split} images, {count} asked: run `fit_real.py prepare` "
                         "with a larger --train/--test")
    return images[:, None], labels.long()


class Batched(Dataset):
    """Images and labels whose batches are sliced in one indexing op (``__getitems__``, which the
    DataLoader's fetcher prefers): no worker processes and no per-sample collate on the step's path."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices)
        return self.images[idx], self.labels[idx]


def as_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The collate_fn for :class:`Batched` (already a batch; top-level so that loaders pickle)."""
    return batch


def to_model_input(x: Tensor, img_size: int) -> Tensor:
    """uint8 ``[B, 1, 28, 28]`` -> normalised float ``[B, 3, img_size, img_size]`` (bilinear)."""
    x = (x.float() / 255.0 - MEAN) / STD
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=img_size, mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1)


def resize_on_input(vit: nn.Module, img_size: int) -> None:
    """Make the timm model's stem take the raw uint8 batch (a forward pre-hook on ``patch_embed``), so the
    resize runs on the batch's device inside every forward: training, scoring and validation alike."""
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (to_model_input(args[0], img_size), *args[1:])

    vit.patch_embed.register_forward_pre_hook(hook)
