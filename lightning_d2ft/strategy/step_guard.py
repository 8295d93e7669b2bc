"""Per-step agreement between ranks on what stops a run: non-finite data, and SIGTERM.

Every rank must raise, skip or stop at the same step, or the ones that go on wait forever in the next
collective. One tiny all-reduce per training step carries both flags (the maximum over ranks), computed
on the step's device. Read back at once, the flags cost one host sync a step, which on a GPU idles the
device while the host runs Lightning's loop; deferred, they are read one step later, when they are long
done (see ``D2FTStrategy(defer_nonfinite_check=...)``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from lightning_d2ft.parallel.collectives import named_collective

__all__ = ["StepGuard", "last_checkpoint", "sigterm_handled_by", "sigterm_message", "sigterm_stops_at_once"]
log = logging.getLogger(__name__)
_WHAT = {0: "", 1: "loss", 2: "input"}


class StepGuard:
    """Notes SIGTERM, and agrees once per step on (non-finite input/loss, any rank got SIGTERM); then raises on
    non-finite data (``on_nonfinite="raise"``) or says to skip the step (``"skip"``), read at once or a step late
    (``defer``; None: late on CUDA with "raise", where reading at once idles the GPU every step).

    A rank stuck in a collective (a peer hung) never returns to Python, so no Python signal handler runs
    there; a watchdog thread, woken by the signal itself (``signal.set_wakeup_fd``), ends the process when
    it has not stopped ``grace_s`` seconds after SIGTERM."""

    def __init__(self, grace_s: float = 60.0, on_nonfinite: str = "raise", defer: bool | None = None) -> None:
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if defer not in (None, True, False) or (defer and on_nonfinite == "skip"):
            raise ValueError(f"defer_nonfinite_check must be None, True or False, and not True with on_nonfinite="
                             f"'skip' (a skip must be known before the update); got {defer!r}")
        self.sigterm_seen = False
        self.grace_s = grace_s
        self.on_nonfinite, self.defer = on_nonfinite, defer
        self.skipped_steps: list[dict[str, int]] = []  # where each skipped step was (on_nonfinite="skip")
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._pending: tuple[Tensor, Any, dict[str, int]] | None = None  # a deferred step's flags

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
        """('input' | 'loss' | '', any rank got SIGTERM) of this step: the same on every rank. Reads the flags
        back now: one host sync, which on a GPU waits for the step's forward."""
        return _decode(self._reduced_flags(batch, loss, world_size, rank).tolist())

    def agree_deferred(self, batch: Any, loss: Any, world_size: int, rank: int,
                       where: dict[str, int]) -> tuple[str, bool, dict[str, int]]:
        """Queue this step's flags (reduced over ranks and copied to the host without waiting) and return the
        previous step's (what, sigterm, its ``where``), read now: long done, so nothing stalls the GPU queue."""
        previous = self.settle()
        flags = self._reduced_flags(batch, loss, world_size, rank)
        event = None
        if flags.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flags = host
        self._pending = (flags, event, where)
        return previous

    def settle(self) -> tuple[str, bool, dict[str, int]]:
        """The queued step's (what, sigterm, where), waiting for it if needed; ('', False, {}) when none is."""
        if self._pending is None:
            return "", False, {}
        flags, event, where = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        return (*_decode(flags.tolist()), where)

    def discard(self) -> None:
        """Forget a queued step (a new fit, or the run already failed)."""
        self._pending = None

    def check(self, batch: Any, loss: Any, where: dict[str, int], world_size: int, rank: int) -> tuple[bool, bool]:
        """After a training step: (skip this step, any rank got SIGTERM), agreed by every rank. Raises on
        non-finite data with "raise" (deferred: the previous step's, found now)."""
        if self._defers(loss):
            what, sigterm, previous = self.agree_deferred(batch, loss, world_size, rank, where)
            return self._act_on(what, previous, late=True), sigterm
        what, sigterm = self.agree(batch, loss, world_size, rank)
        return self._act_on(what, where, late=False), sigterm

    def settle_deferred(self) -> bool:
        """Act on a deferred step's flags now (before a checkpoint is written, validation, the end of fit): raise
        if that step was non-finite; returns whether a rank got SIGTERM."""
        what, sigterm, where = self.settle()
        self._act_on(what, where, late=True)
        return sigterm

    def _defers(self, loss: Any) -> bool:
        if self.defer is not None:
            return self.defer
        return self.on_nonfinite == "raise" and torch.is_tensor(loss) and loss.device.type == "cuda"

    def _act_on(self, what: str, where: dict[str, int], late: bool) -> bool:
        """Raise on non-finite data (``late``: found a step after it), or say to skip the step."""
        if not what:
            return False
        message = (f"non-finite {what} at global step {where['global_step']} (epoch {where['epoch']}, batch "
                   f"{where['batch_idx']}, micro-batch {where['micro_batch']})")
        if self.on_nonfinite == "skip":  # never deferred
            self.skipped_steps.append(where)
            log.warning(f"{message}: skipped (on_nonfinite='skip')")
            return True
        applied = ("Its update was applied in memory (checked a step late so as not to stall the GPU; "
                   "defer_nonfinite_check=False checks before each update) but never saved" if late else
                   "Nothing from this step was applied or saved")
        raise FloatingPointError(f"{message}. {applied}; the last checkpoint is intact. Fix the data, or pass "
                                 "D2FTStrategy(on_nonfinite='skip').")

    def _reduced_flags(self, batch: Any, loss: Any, world_size: int, rank: int) -> Tensor:
        code = _flag_code(batch, loss, self.sigterm_seen)
        if world_size > 1 and dist.is_initialized():
            named_collective("step agreement all_reduce (NaN/SIGTERM flags)", rank, dist.all_reduce, code,
                             op=dist.ReduceOp.MAX)
        return code


def _flag_code(batch: Any, loss: Any, sigterm: bool) -> Tensor:
    """[what, sigterm] (what: 2 non-finite input, 1 non-finite loss, 0 finite) on the loss's device, computed
    there without a host sync (so NCCL can reduce it too)."""
    inputs: list[Tensor] = []
    apply_to_collection(batch, Tensor, lambda t: inputs.append(torch.isfinite(t).all().reshape(1))
                        if t.is_floating_point() else None)
    device = loss.device if torch.is_tensor(loss) else (inputs[0].device if inputs else torch.device("cpu"))
    no = torch.zeros((), dtype=torch.bool, device=device)
    bad_input = ~torch.cat([f.to(device) for f in inputs]).all() if inputs else no
    bad_loss = ~torch.isfinite(loss).all() if torch.is_tensor(loss) else no
    what = torch.where(bad_input, 2, bad_loss.long())
    return torch.stack([what, torch.full_like(what, int(sigterm))])


def _decode(flags: list[int]) -> tuple[str, bool]:
    return _WHAT[int(flags[0])], bool(flags[1])


@contextmanager
def sigterm_handled_by(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler`` takes SIGTERM inside the block, the previous handler after it. Only the main thread can
    install handlers; elsewhere the block runs with whatever is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def sigterm_stops_at_once() -> AbstractContextManager[None]:
    """Before the first training step (the scoring pass, the solve) there is no step for the ranks to finish
    together, and Lightning's handler is not installed yet (Python's default would kill the process without
    a word): SIGTERM raises Lightning's SIGTERMException at once, which ends the run with the one line."""

    def stop(signum: int, frame: Any) -> None:
        raise SIGTERMException()

    return sigterm_handled_by(stop)


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
