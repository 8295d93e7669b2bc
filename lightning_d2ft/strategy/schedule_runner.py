"""The schedule runner: each training batch gets its micro-batch's row of ops, and what that costs (compute
fraction, bytes on the wire) is logged without Lightning warnings.

The batch index maps to a micro-batch id through the loader's MicroBatchSampler (the epoch's order), and a
run resumed mid-epoch skips the micro-batches the epoch already trained, so it sees the same ops as an
uninterrupted run. :class:`~lightning_d2ft.strategy.strategy.D2FTStrategy` holds one runner and hands it
its training hooks; the runner reads the trainer and the module it is given, and nothing of the strategy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_d2ft.data.micro_batches import find_micro_batch_sampler, resume_in_epoch
from lightning_d2ft.model.vit import D2FTViT, find_d2ft

if TYPE_CHECKING:
    from lightning_d2ft.schedule.schedule import Schedule

__all__ = ["ScheduleRunner"]


class ScheduleRunner:
    """Executes one installed :class:`~lightning_d2ft.Schedule` (none: every subnet runs FULL)."""

    def __init__(self) -> None:
        self.schedule: Schedule | None = None
        self._fractions: list[float] = []  # each micro-batch's compute fraction, logged per step
        self._epoch_ids: tuple[int, list[int]] = (-1, [])  # (epoch, its micro-batch order)
        self._bytes_logged = 0
        self._net_of: tuple[LightningModule, D2FTViT] | None = None

    def install(self, schedule: Schedule) -> None:
        """From now on every training batch runs its micro-batch's row of ``schedule``."""
        self.schedule = schedule
        self._epoch_ids = (-1, [])
        self._fractions = schedule.micro_batch_compute_fractions.tolist()

    def micro_batch_of(self, trainer: Trainer, batch_idx: int) -> int:
        """The micro-batch id training batch ``batch_idx`` of the current epoch holds (-1 if unknown)."""
        epoch = trainer.current_epoch
        if self._epoch_ids[0] != epoch:
            try:
                sampler = find_micro_batch_sampler(trainer.train_dataloader)
            except TypeError:
                return -1
            self._epoch_ids = (epoch, sampler.micro_batch_ids(epoch))
        ids = self._epoch_ids[1]
        return int(ids[batch_idx]) if 0 <= batch_idx < len(ids) else -1

    def resume_mid_epoch(self, trainer: Trainer) -> None:
        """A run restarted mid-epoch goes on where its checkpoint left the epoch, so the rest of the epoch sees the
        micro-batches (and ops) it would have seen, on the same or another data-parallel layout."""
        resume_in_epoch(trainer)

    def start_batch(self, module: LightningModule, batch_idx: int) -> None:
        """Point the model at this batch's row of ops (none without a schedule) and log its compute fraction."""
        net = self.net(module)
        net.scheduled_ops = None
        if self.schedule is None:
            return
        mb = self.micro_batch_of(module.trainer, batch_idx)
        if mb >= 0:
            net.scheduled_ops = self.schedule.ops[mb]
            _log_number(module, "d2ft/compute_fraction", self._fractions[mb], sync_dist=True)

    def log_bytes(self, module: LightningModule, total_bytes: int) -> None:
        """Log the bytes every rank sent since the last call (summed over ranks once per epoch)."""
        _log_number(module, "d2ft/bytes_sent", total_bytes - self._bytes_logged, sync_dist=True, reduce_fx="sum")
        self._bytes_logged = total_bytes

    def stop(self, module: LightningModule) -> None:
        """Training ended: evaluation and inference run the whole model."""
        self.net(module).scheduled_ops = None

    def net(self, module: LightningModule) -> D2FTViT:
        """The module's D2FTViT, looked up once per LightningModule (a modules() walk costs ~1 ms a step)."""
        if self._net_of is None or self._net_of[0] is not module:
            self._net_of = (module, find_d2ft(module))
        return self._net_of[1]


def _log_number(module: LightningModule, name: str, value: float, **kwargs: Any) -> None:
    """Log a host number for the epoch, put on the module's device without a host sync: Lightning's own
    conversion (``torch.tensor(value, device=...)``) waits for the whole GPU queue (pytorch#120996), which
    twice a step kept the host from running ahead of the GPU."""
    module.log(name, torch.full((), float(value), device=module.device), on_step=False, on_epoch=True,
               batch_size=1, **kwargs)
