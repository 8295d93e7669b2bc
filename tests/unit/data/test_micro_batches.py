"""data/micro_batches.py: micro-batches keep their composition across epochs, replicas split them, a
resume skip holds for one pass only, and plain training loaders become micro-batch loaders."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler, TensorDataset

from lightning_d2ft import micro_batch_loader
from lightning_d2ft.data.micro_batches import (
    MicroBatchLoader,
    MicroBatchSampler,
    find_micro_batch_sampler,
    plan_resume,
    with_micro_batches,
)

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


def test_samples_a_micro_batch_split_never_trains_are_warned_about(caplog):
    import logging

    with pytest.warns(UserWarning, match=r"2 of the 20 training samples are never trained.*batch size 6"):
        sampler = find_micro_batch_sampler(with_micro_batches(DataLoader(DATA, batch_size=6, shuffle=True)))
    assert sampler.num_micro_batches * 6 == 18
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.INFO):
            with_micro_batches(DataLoader(DATA, batch_size=5, shuffle=True))
    assert "shuffled sampler was replaced by a MicroBatchSampler" in caplog.text


def test_the_replacement_names_no_sampler_the_user_never_made(caplog):
    """On a DDP strategy Lightning has already swapped the user's RandomSampler for its DistributedSampler."""
    import logging

    from torch.utils.data import DistributedSampler

    injected = DataLoader(DATA, batch_size=5, sampler=DistributedSampler(DATA, num_replicas=1, rank=0, shuffle=False))
    with caplog.at_level(logging.INFO):
        with_micro_batches(injected)
    assert "sequential sampler was replaced" in caplog.text and "DistributedSampler" not in caplog.text


class _Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


@pytest.mark.parametrize("loader, message", [
    (DataLoader(_Stream(), batch_size=2), r"an IterableDataset \(_Stream\) cannot be split into fixed micro-batches.*"
                                          r"map-style Dataset.*micro_batch_loader"),
    (DataLoader(DATA, batch_sampler=BatchSampler(SequentialSampler(DATA), 4, drop_last=False)), None),
    (DataLoader(DATA, batch_size=4), r"sampler \(SequentialSampler\) does not keep micro-batches fixed.*"
                                     r"use_micro_batch_sampler=False"),
    ([(torch.zeros(2), torch.zeros(2))], r"the training data is a list, not a DataLoader"),
])
def test_refusals_name_what_the_user_gave_and_a_fix_that_works(loader, message):
    if message is None:  # a custom batch_sampler class (a subclass of BatchSampler is custom too)
        class Mine(BatchSampler):
            pass

        loader = DataLoader(DATA, batch_sampler=Mine(SequentialSampler(DATA), 4, drop_last=False))
        message = r"a custom batch_sampler \(Mine\) chooses its own batches.*batch_size="
    with pytest.raises(TypeError, match=message):
        find_micro_batch_sampler(loader)
    if isinstance(loader, DataLoader) and isinstance(loader.dataset, _Stream):
        with pytest.raises(TypeError, match="IterableDataset"):
            list(micro_batch_loader(loader.dataset, 2))


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


# -- issue 29: resuming mid-epoch, on the same or another data-parallel layout ----------------------------------
def _sampler(replicas: int = 1, rank: int = 0, n: int = 40, size: int = 4) -> MicroBatchSampler:
    sampler = MicroBatchSampler(list(range(n)), size, seed=2, num_replicas=replicas, rank=rank)
    sampler.set_epoch(1)
    return sampler


def _saved(replicas: int, batches: int | None = None) -> dict:
    """What a checkpoint of a run with ``replicas`` replicas holds, taken in epoch 1."""
    sampler = _sampler(replicas)
    sampler.epoch_batches = batches
    return sampler.state_dict()


def test_the_loader_state_says_which_micro_batches_every_replica_trains_this_epoch():
    loader = micro_batch_loader(list(range(40)), 4, seed=2)
    assert isinstance(loader, MicroBatchLoader)
    loader.sampler.set_replicas(2, 1)
    loader.sampler.set_epoch(3)
    loader.sampler.epoch_batches = 4
    state = loader.state_dict()
    assert state["epoch"] == 3 and state["num_micro_batches"] == 10
    assert state["epoch_ids"] == [loader.sampler.replica_ids(3, r)[:4] for r in range(2)]
    loader.load_state_dict(state)
    assert loader.sampler.restored == state  # kept for resume_in_epoch; nothing else changes
    assert isinstance(with_micro_batches(DataLoader(DATA, batch_size=4, shuffle=True)), MicroBatchLoader)


def test_a_checkpoint_on_the_epoch_s_last_batch_resumes_the_next_epoch_from_its_start():
    """Issue 29, failure 1: the skip used to land in the next epoch."""
    point = plan_resume(_sampler(), 10, 10, _saved(1))
    assert (point.epoch, point.batches_done, point.ids) == (2, 0, None)
    assert plan_resume(_sampler(), 3, 3, _saved(1, batches=3)).batches_done == 0  # limit_train_batches=3
    assert plan_resume(_sampler(), 3, 3, None).batches_done == 0  # an older checkpoint without the state


def test_the_same_layout_goes_on_after_the_batches_done():
    point = plan_resume(_sampler(2, 1), 3, 5, _saved(2))
    assert (point.epoch, point.batches_done, point.ids, point.warn) == (1, 3, None, False)
    assert plan_resume(_sampler(), 4, 10, None).batches_done == 4


def _trained(point, sampler: MicroBatchSampler, replicas: int) -> list[int]:
    """The micro-batches the replicas train in the rest of the epoch, as the sampler yields them."""
    got = []
    for rank in range(replicas):
        s = _sampler(replicas, rank)
        s.resumed, s.skip = (1, point.ids), point.batches_done
        got += [s.micro_batches.index(mb) for mb in _batches(s)]
    return got


@pytest.mark.parametrize("old, new", [(1, 2), (2, 1), (2, 5), (5, 2)])
def test_another_layout_trains_the_rest_of_the_epoch_not_nothing(old, new):
    """Issue 29, failure 7: 6 of 10 micro-batches of epoch 1 trained on one replica; resumed on two replicas of 5
    batches, the other 4 are trained (2 per replica), none twice and none dropped."""
    processed = {1: 6, 2: 1, 5: 1}[old]
    saved = _saved(old)
    done = {mb for ids in saved["epoch_ids"] for mb in ids[:processed]}
    rest = {mb for ids in saved["epoch_ids"] for mb in ids[processed:]}
    batches = 10 // new
    point = plan_resume(_sampler(new), processed, batches, saved)
    assert point.epoch == 1 and point.warn and "trained now" in point.note
    trained = _trained(point, _sampler(new), new)
    assert len(trained) == len(set(trained)) and not set(trained) & done
    left_out = len(rest) % new
    assert set(trained) <= rest and len(trained) == len(rest) - left_out
    assert (f"{left_out} of them cannot be dealt evenly" in point.note) == bool(left_out)
    assert point.batches_done == batches - len(trained) // new


def test_a_second_resume_in_a_dealt_epoch_knows_what_was_done():
    first = plan_resume(_sampler(2), 6 // 1, 5, _saved(1))  # 1 replica -> 2 replicas, 2 each left
    sampler = _sampler(2)
    sampler.resumed, sampler.epoch_batches = (1, first.ids), 5
    state = sampler.state_dict()
    assert state["epoch_ids"] == first.ids and state["epoch_ids"][0][:3] == [-1, -1, -1]
    again = plan_resume(_sampler(1), 4, 10, state)  # one of the two trained, back on one replica
    left = {first.ids[r][4] for r in range(2)}
    assert again.ids is not None and sorted(again.ids[0][again.batches_done:]) == sorted(left)
    assert again.batches_done == 8


def test_fewer_micro_batches_left_than_replicas_is_refused_naming_the_way_out():
    with pytest.raises(ValueError, match=r"leaving 1 micro-batch.*fewer than this run's 2 data-parallel replicas"
                                         r".*Resume on the checkpoint's layout.*last\.ckpt"):
        plan_resume(_sampler(2), 9, 5, _saved(1))
    with pytest.raises(ValueError, match="micro-batches are not this run's|not this run's"):
        plan_resume(_sampler(n=80), 3, 10, _saved(1))
