"""FashionMNISTDataModule: reads IDX .gz files (a tiny fake set written here, and the Debian package when
installed) through torchvision, keeps and remaps classes, draws seeded per-class subsets, tests on every
test image of the kept classes, and names the apt command when the data set is missing."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_d2ft.data.fashion_mnist import DEBIAN_DIR, FashionMNISTDataModule, load_fashion_mnist
from lightning_d2ft.data.micro_batches import MicroBatchSampler


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX as the official files: magic (0, 0, ubyte=8, ndim), big-endian dims, then the bytes; gzipped."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_source(tmp_path: Path) -> tuple[Path, dict]:
    """A fake package dir: pixel (0, 0) of each image encodes its index, so selections can be checked."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", 60), ("t10k", 30)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, size=(n, 28, 28))
        images[:, 0, 0] = np.arange(n)
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
        out[split] = (images, labels)
    return tmp_path, out


def _index_of(x: torch.Tensor) -> list[int]:
    """Recover each image's index from its (0, 0) pixel after the module's normalisation."""
    from lightning_d2ft.data.fashion_mnist import MEAN, STD

    return torch.round((x[:, 0, 0, 0] * STD + MEAN) * 255).long().tolist()


def test_reads_the_idx_files_through_torchvision(fake_source, tmp_path):
    source, ref = fake_source
    images, labels = load_fashion_mnist(True, source, tmp_path / "cache")
    assert torch.equal(images, torch.tensor(ref["train"][0], dtype=torch.uint8))
    assert torch.equal(labels, torch.tensor(ref["train"][1]))
    assert (tmp_path / "cache" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()


def test_keeps_remaps_and_subsamples_classes(fake_source, tmp_path):
    source, ref = fake_source
    dm = FashionMNISTDataModule(classes=[7, 5], train_per_class=3, seed=1, source_dir=source,
                                cache_dir=tmp_path / "cache", batch_size=2)
    dm.setup()
    x, y = dm.train_set.tensors
    assert x.shape == (6, 1, 28, 28) and dm.num_classes == 2
    train_labels = ref["train"][1]
    assert [int(train_labels[i]) for i in _index_of(x)] == [7 if int(c) == 0 else 5 for c in y]
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    # validation: every test image of the kept classes, nothing else
    xv, yv = dm.val_set.tensors
    expected = sorted(i for i, c in enumerate(ref["t10k"][1]) if c in (5, 7))
    assert sorted(_index_of(xv)) == expected and len(yv) == len(expected)


def test_same_seed_same_subset_other_seed_another(fake_source, tmp_path):
    source, _ = fake_source

    def subset(seed: int) -> list[int]:
        dm = FashionMNISTDataModule(classes=[0, 1, 2], train_per_class=2, seed=seed, source_dir=source,
                                    cache_dir=tmp_path / "cache")
        dm.setup()
        return _index_of(dm.train_set.tensors[0])

    assert subset(0) == subset(0)
    assert any(subset(0) != subset(s) for s in range(1, 6))


def test_three_channels_and_resize(fake_source, tmp_path):
    source, _ = fake_source
    dm = FashionMNISTDataModule(img_size=32, channels=3, classes=[1], source_dir=source, cache_dir=tmp_path / "c")
    dm.setup()
    x = dm.train_set.tensors[0]
    assert x.shape == (6, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])


def test_train_loader_uses_fixed_micro_batches(fake_source, tmp_path):
    source, _ = fake_source
    dm = FashionMNISTDataModule(classes=[0, 1], train_per_class=6, batch_size=4, source_dir=source,
                                cache_dir=tmp_path / "cache")
    dm.setup()
    assert isinstance(dm.train_dataloader().sampler, MicroBatchSampler)


def test_missing_data_set_names_the_apt_command(tmp_path):
    dm = FashionMNISTDataModule(source_dir=tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        dm.setup()


@pytest.mark.parametrize("kwargs, field", [({"channels": 2}, "channels"), ({"classes": [3, 10]}, "classes"),
                                           ({"classes": [1, 1]}, "classes"),
                                           ({"train_per_class": 0}, "train_per_class")])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FashionMNISTDataModule(**kwargs)


@pytest.mark.skipif(not (DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").is_file(), reason="dataset-fashion-mnist absent")
def test_debian_package_has_the_official_test_split(tmp_path):
    dm = FashionMNISTDataModule(classes=[5, 6, 7, 8, 9], train_per_class=10, cache_dir=tmp_path / "cache")
    dm.setup()
    assert len(dm.val_set) == 5000 and torch.bincount(dm.val_set.tensors[1]).tolist() == [1000] * 5
