"""data/digits.py: the digits data module refuses classes it does not have, stratifies and remaps
its subset, and pins batches only for a CUDA trainer."""

from __future__ import annotations

import pytest
import torch

from lightning_d2ft.data.digits import DigitsDataModule


@pytest.mark.parametrize("classes", [[5, 6, 42], [3, 3], [7], [-1, 2]])
def test_digits_refuse_classes_they_do_not_have(classes):
    with pytest.raises(ValueError, match=r"data.classes must be .* 0..9"):
        DigitsDataModule(classes=classes)


def test_digits_subset_is_stratified_and_remapped():
    dm = DigitsDataModule(img_size=8, classes=[5, 9], train_per_class=10)
    dm.setup()
    assert dm.num_classes == 2 and dm.train_set.tensors[0].shape[1:] == (3, 8, 8)
    assert sorted(dm.train_set.tensors[1].tolist()) == [0] * 10 + [1] * 10


@pytest.mark.parametrize("device, pinned", [("cpu", False), ("cuda", True)])
def test_bundled_loaders_pin_batches_only_for_a_cuda_trainer(device, pinned):
    import types

    dm = DigitsDataModule(img_size=16, batch_size=16, seed=0)
    dm.setup()
    assert not dm.train_dataloader().pin_memory  # no trainer attached
    dm.trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device(device)))
    assert dm.train_dataloader().pin_memory is pinned and dm.val_dataloader().pin_memory is pinned
