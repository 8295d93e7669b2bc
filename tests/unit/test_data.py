"""data.py: micro-batches keep their composition across epochs, replicas split them, a resume skip holds
for one pass only, and the digits data module refuses classes it does not have."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_d2ft import MicroBatchSampler, micro_batch_loader
from lightning_d2ft.data import DigitsDataModule, find_micro_batch_sampler


def _batches(sampler: MicroBatchSampler) -> list[list[int]]:
    flat = list(sampler)
    size = sampler.micro_batch_size
    return [flat[i: i + size] for i in range(0, len(flat), size)]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(4, 60), size=st.integers(1, 8), replicas=st.integers(1, 3), seed=st.integers(0, 5))
def test_micro_batches_keep_their_samples_and_replicas_split_them(n, size, replicas, seed):
    if size > n or replicas > n // size:
        return
    seen = []
    for rank in range(replicas):
        sampler = MicroBatchSampler(list(range(n)), size, seed=seed, num_replicas=replicas, rank=rank)
        for epoch in range(2):
            sampler.set_epoch(epoch)
            got = _batches(sampler)
            assert len(got) * size == len(sampler)
            ids = sampler.micro_batch_ids(epoch)
            assert got == [sampler.micro_batches[i] for i in ids]  # same samples, shuffled order
            if epoch == 0:
                seen += ids
    assert len(seen) == len(set(seen))  # replicas never share a micro-batch


def test_resume_skip_holds_for_one_pass_only_even_if_the_pass_is_not_exhausted():
    """Issue 13.1: Lightning stops after len() batches and never exhausts the sampler; the skip must
    still not leak into the next epoch, and len() stays the whole epoch (Lightning counts a resumed
    epoch's batches from its restored progress)."""
    sampler = MicroBatchSampler(list(range(40)), 4, seed=1)
    full = len(sampler)
    sampler.set_epoch(1)
    sampler.skip = 3
    assert len(sampler) == full
    it = iter(sampler)
    first = [next(it) for _ in range(4)]
    assert first == sampler.micro_batches[sampler.micro_batch_ids(1)[3]]
    del it  # abandoned before the end, as Lightning does
    sampler.set_epoch(2)
    assert _batches(sampler) == [sampler.micro_batches[i] for i in sampler.micro_batch_ids(2)]


def test_loader_and_errors():
    data = torch.utils.data.TensorDataset(torch.arange(20.0))
    loader = micro_batch_loader(data, 5, seed=0)
    assert isinstance(find_micro_batch_sampler(loader), MicroBatchSampler) and len(loader) == 4
    with pytest.raises(TypeError, match="micro_batch_loader"):
        find_micro_batch_sampler(torch.utils.data.DataLoader(data, batch_size=5, shuffle=True))
    with pytest.raises(ValueError, match="micro_batch_size must be in"):
        MicroBatchSampler(data, 21)


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
