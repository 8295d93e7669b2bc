"""Per-step agreement between ranks on what stops a run: non-finite data, and SIGTERM.

Every rank must raise, skip or stop at the same step, or the ones that go on wait forever in the next
collective. One tiny all-reduce per training step carries both flags (the maximum over ranks).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor

from lightning_d2ft.collectives import named_collective

__all__ = ["StepGuard", "last_checkpoint", "sigterm_message"]
log = logging.getLogger(__name__)
_WHAT = {0: "", 1: "loss", 2: "input"}


class StepGuard:
    """Notes SIGTERM, and agrees once per step on (non-finite input/loss, any rank got SIGTERM)."""

    def __init__(self) -> None:
        self.sigterm_seen = False

    def install_sigterm_handler(self, rank: int) -> None:
        """Lightning's SIGTERM handler broadcasts from inside the handler: when only some ranks get the signal,
        the others are inside a tensor-parallel collective and every rank hangs. Ours only notes it; the next
        step's agreement tells every rank (Lightning restores its handlers at teardown)."""
        self.sigterm_seen = False
        if threading.current_thread() is not threading.main_thread():
            return

        def note(signum: int, frame: Any) -> None:
            log.warning(f"[rank {rank}] received SIGTERM: every rank stops after this step")
            self.sigterm_seen = True

        signal.signal(signal.SIGTERM, note)

    def agree(self, batch: Any, loss: Any, world_size: int, rank: int) -> tuple[str, bool]:
        """('input' | 'loss' | '', any rank got SIGTERM): the same on every rank."""
        bad_input = [False]

        def check(t: Tensor) -> None:
            bad_input[0] = bad_input[0] or (t.is_floating_point() and not bool(torch.isfinite(t).all()))

        apply_to_collection(batch, Tensor, check)
        bad_loss = torch.is_tensor(loss) and not bool(torch.isfinite(loss).all())
        code = torch.tensor([2 if bad_input[0] else (1 if bad_loss else 0), int(self.sigterm_seen)])
        if world_size > 1 and dist.is_initialized():
            named_collective("step agreement all_reduce (NaN/SIGTERM flags)", rank, dist.all_reduce, code,
                             op=dist.ReduceOp.MAX)
        return _WHAT[int(code[0])], bool(code[1])


def last_checkpoint(trainer: Any) -> str | None:
    """The newest checkpoint file any ModelCheckpoint of ``trainer`` wrote, or None."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    paths = []
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint):
            paths += [p for p in (cb.last_model_path, cb.best_model_path) if p and os.path.isfile(p)]
    return max(paths, key=os.path.getmtime) if paths else None


def sigterm_message(trainer: Any) -> str:
    """One line: the run stopped on SIGTERM, and what to resume from."""
    last = last_checkpoint(trainer)
    where = f"resume from {last}" if last else "no checkpoint was written, so nothing can be resumed"
    return f"D2FT: stopped by SIGTERM at global step {trainer.global_step}; {where}"
