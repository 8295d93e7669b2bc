"""samplers: plain training loaders get fixed micro-batches; what cannot be converted is left alone."""

from __future__ import annotations

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler, TensorDataset

from lightning_d2ft.data import MicroBatchSampler, find_micro_batch_sampler
from lightning_d2ft.samplers import with_micro_batches

DATA = TensorDataset(torch.arange(40.0).view(20, 2), torch.arange(20))


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
