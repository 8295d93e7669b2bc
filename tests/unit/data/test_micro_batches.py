"""data/micro_batches.py: micro-batches keep their composition across epochs, replicas split them, a
resume skip holds for one pass only, and plain training loaders become micro-batch loaders."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler, TensorDataset

from lightning_d2ft import micro_batch_loader
from lightning_d2ft.data.micro_batches import MicroBatchSampler, find_micro_batch_sampler, with_micro_batches

DATA = TensorDataset(torch.arange(40.0).view(20, 2), torch.arange(20))


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


def test_a_shuffled_loader_becomes_micro_batches_of_its_batch_size():
    loader = with_micro_batches(DataLoader(DATA, batch_size=4, shuffle=True), seed=3)
    sampler = find_micro_batch_sampler(loader)
    assert sampler.micro_batch_size == 4 and sampler.num_micro_batches == 5
    assert sorted(i for mb in sampler.micro_batches for i in mb) == list(range(20))
    first = [b[1].tolist() for b in loader]
    assert first == [b[1].tolist() for b in loader]  # the same composition every pass (epoch 0 order)


def test_the_replacement_says_how_many_samples_it_leaves_out(caplog):
    import logging

    with caplog.at_level(logging.INFO):
        sampler = find_micro_batch_sampler(with_micro_batches(DataLoader(DATA, batch_size=6, shuffle=True)))
    assert sampler.num_micro_batches * 6 == 18
    assert "leaves out 2 of the 20 samples, the same ones every epoch" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        with_micro_batches(DataLoader(DATA, batch_size=5, shuffle=True))
    assert "replaced by a MicroBatchSampler" in caplog.text and "leaves out" not in caplog.text


def test_a_sequential_loader_keeps_its_order():
    sampler = find_micro_batch_sampler(with_micro_batches(DataLoader(DATA, batch_size=5)))
    assert not sampler.shuffle


def test_custom_batch_sampler_and_iterable_dataset_are_left_for_the_clear_error():
    custom = DataLoader(DATA, batch_sampler=BatchSampler(SequentialSampler(DATA), 4, drop_last=False))
    assert with_micro_batches(custom) is custom

    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(3)

    stream = DataLoader(Stream(), batch_size=2)
    assert with_micro_batches(stream) is stream
    already = DataLoader(DATA, batch_size=4, sampler=MicroBatchSampler(DATA, 4))
    assert with_micro_batches(already) is already
