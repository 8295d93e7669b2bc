"""Plain training DataLoaders just work: a plain sampler becomes a MicroBatchSampler, as Lightning
injects DistributedSampler. What cannot be converted keeps the clear error of
:func:`~lightning_d2ft.data.find_micro_batch_sampler`.
"""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from lightning_d2ft.data import MicroBatchSampler

__all__ = ["with_micro_batches"]
_PLAIN = (SequentialSampler, RandomSampler, DistributedSampler)


def with_micro_batches(loader: object, seed: int = 0) -> object:
    """``loader`` with a MicroBatchSampler of its batch size when its sampler is plain; else ``loader``
    unchanged (a custom ``batch_sampler`` or an IterableDataset is left for the caller to refuse)."""
    if not isinstance(loader, DataLoader) or isinstance(loader.sampler, MicroBatchSampler):
        return loader
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return loader  # no index sampler / a custom batch_sampler: nothing to convert
    if type(loader.batch_sampler) is not BatchSampler or type(loader.sampler) not in _PLAIN:
        return loader
    shuffle = not isinstance(loader.sampler, SequentialSampler)
    if isinstance(loader.sampler, DistributedSampler):
        shuffle = loader.sampler.shuffle
    sampler = MicroBatchSampler(loader.dataset, loader.batch_size, shuffle=shuffle, seed=seed)
    left_out = len(loader.dataset) % loader.batch_size
    dropped = (f"; it leaves out {left_out} of the {len(loader.dataset)} samples, the same ones every epoch, so that "
               "every micro-batch is full") if left_out else ""
    rank_zero_info(f"D2FT: the training DataLoader's {type(loader.sampler).__name__} was replaced by a "
                   f"MicroBatchSampler (batch size {loader.batch_size}, shuffle={shuffle}, seed={seed}){dropped}: "
                   "D2FT needs micro-batches of fixed composition. Pass D2FTStrategy(use_micro_batch_sampler=False) "
                   "to opt out.")
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers)
