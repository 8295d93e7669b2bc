"""The strategy executes the schedule: each training batch gets its micro-batch's row of ops, and what
that costs (compute fraction, bytes on the wire) is counted and logged without Lightning warnings.

The batch index maps to a micro-batch id through the loader's MicroBatchSampler (the epoch's order), and a
run resumed mid-epoch skips the micro-batches the epoch already trained, so it sees the same ops as an
uninterrupted run. A mixin before DDPStrategy in D2FTStrategy.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_d2ft.data.micro_batches import find_micro_batch_sampler, resume_in_epoch
from lightning_d2ft.model.vit import find_d2ft
from lightning_d2ft.schedule.schedule import Schedule

__all__ = ["ScheduleExecution"]


class ScheduleExecution:
    schedule: Schedule | None = None
    _epoch_ids: tuple[int, list[int]] = (-1, [])
    _bytes_logged = 0
    _compute_fractions: tuple[float, ...] = ()

    def install_schedule(self, schedule: Schedule) -> None:
        """From now on every training batch runs its micro-batch's row of ``schedule``."""
        self.schedule = schedule
        self._epoch_ids = (-1, [])
        self._compute_fractions = schedule.micro_batch_compute_fractions.tolist()  # logged per step
        graphs = self._scheduled_net().graphs
        if graphs is not None and schedule.distinct_patterns > graphs.max_patterns:
            rank_zero_warn(f"D2FT: the schedule has {schedule.distinct_patterns} distinct op patterns, more than the "
                           f"{graphs.max_patterns} that CUDA graphs capture: the micro-batches of the others run "
                           "eagerly, each step slower than plain timm (fewer, larger micro-batches give fewer)")

    def micro_batch_of(self, batch_idx: int) -> int:
        """The micro-batch id training batch ``batch_idx`` of the current epoch holds (-1 if unknown)."""
        trainer = self.lightning_module.trainer
        epoch = trainer.current_epoch
        if self._epoch_ids[0] != epoch:
            try:
                sampler = find_micro_batch_sampler(trainer.train_dataloader)
            except TypeError:
                return -1
            self._epoch_ids = (epoch, sampler.micro_batch_ids(epoch))
        ids = self._epoch_ids[1]
        return int(ids[batch_idx]) if 0 <= batch_idx < len(ids) else -1

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        resume_in_epoch(self.lightning_module.trainer)  # a resumed epoch goes on where its checkpoint left it

    def _scheduled_net(self):
        """The module's D2FTViT, looked up once per LightningModule (a modules() walk costs ~1 ms a step)."""
        module = self.lightning_module
        cached = getattr(self, "_net_of", None)
        if cached is None or cached[0] is not module:
            self._net_of = (module, find_d2ft(module))
        return self._net_of[1]

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        net = self._scheduled_net()
        net.scheduled_ops = None
        if self.schedule is not None:
            mb = self.micro_batch_of(batch_idx)
            net.scheduled_ops = self.schedule.ops[mb] if mb >= 0 else None
            if net.scheduled_ops is not None:
                self._log_number("d2ft/compute_fraction", self._compute_fractions[mb], sync_dist=True)

    def _log_number(self, name: str, value: float, **kwargs: Any) -> None:
        """Log a host number for the epoch, put on the module's device without a host sync: Lightning's own
        conversion (``torch.tensor(value, device=...)``) waits for the whole GPU queue (pytorch#120996), which
        twice a step kept the host from running ahead of the GPU."""
        module = self.lightning_module
        module.log(name, torch.full((), float(value), device=module.device), on_step=False, on_epoch=True,
                   batch_size=1, **kwargs)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        out = super().backward(closure_loss, optimizer, *args, **kwargs)
        total = self.comm_stats.total_bytes + self.dp_bytes
        # bytes every rank sent for this micro-batch, summed over the ranks (Lightning reduces once per epoch)
        self._log_number("d2ft/bytes_sent", total - self._bytes_logged, sync_dist=True, reduce_fx="sum")
        self._bytes_logged = total
        return out

