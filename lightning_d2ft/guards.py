"""Per-step agreement between ranks on what stops a run: non-finite data, and SIGTERM.

Every rank must raise, skip or stop at the same step, or the ones that go on wait forever in the next
collective. One tiny all-reduce per training step carries both flags (the maximum over ranks).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
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
    """Notes SIGTERM, and agrees once per step on (non-finite input/loss, any rank got SIGTERM).

    A rank stuck in a collective (a peer hung) never returns to Python, so no Python signal handler runs
    there; a watchdog thread, woken by the signal itself (``signal.set_wakeup_fd``), ends the process when
    it has not stopped ``grace_s`` seconds after SIGTERM."""

    def __init__(self, grace_s: float = 60.0) -> None:
        self.sigterm_seen = False
        self.grace_s = grace_s
        self._wakeup: tuple[socket.socket, socket.socket] | None = None

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
        self._start_watchdog(rank)

    def _start_watchdog(self, rank: int) -> None:
        self.stop_watchdog()
        read, write = socket.socketpair()
        write.setblocking(False)
        signal.set_wakeup_fd(write.fileno())
        self._wakeup = (read, write)

        def watch() -> None:
            try:
                while (data := read.recv(1)) and data[0] != signal.SIGTERM:
                    pass
            except OSError:
                return  # closed: training ended
            if not data:
                return
            time.sleep(self.grace_s)  # time to finish the step and stop with every rank
            sys.stderr.write(f"D2FT: rank {rank} did not stop within {self.grace_s:g} s of SIGTERM (stuck in a "
                             "collective: a peer hung or died); exiting with status 143\n")
            sys.stderr.flush()
            os._exit(143)

        threading.Thread(target=watch, name="d2ft-sigterm-watchdog", daemon=True).start()

    def stop_watchdog(self) -> None:
        """Detach the wakeup fd and end the watchdog (training is over)."""
        if self._wakeup is None:
            return
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(-1)
        for sock in self._wakeup:
            sock.close()
        self._wakeup = None

    def agree(self, batch: Any, loss: Any, world_size: int, rank: int) -> tuple[str, bool]:
        """('input' | 'loss' | '', any rank got SIGTERM): the same on every rank."""
        finite: list[Tensor] = []  # device flags, read back with one host sync (each bool() would be one)
        apply_to_collection(batch, Tensor, lambda t: finite.append(torch.isfinite(t).all().reshape(1))
                            if t.is_floating_point() else None)
        n_input = len(finite)
        if torch.is_tensor(loss):
            finite.append(torch.isfinite(loss).all().reshape(1))
        flags = torch.cat([f.to(finite[0].device) for f in finite]).tolist() if finite else []
        bad_input, bad_loss = not all(flags[:n_input]), not all(flags[n_input:])
        code = torch.tensor([2 if bad_input else (1 if bad_loss else 0), int(self.sigterm_seen)])
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
