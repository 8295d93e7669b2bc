"""The spawn launcher of D2FTStrategy: Lightning's, with three changes a sharded model needs.

* The main process gets the whole model back, not rank 0's shard.
* A worker whose only error is that a peer went away (gloo's "Connection closed by peer", a timeout)
  waits a moment before it fails, so the launcher reports the peer's real error (for example rank 0's
  ValueError), not the echo of it.
* SIGTERM is a failure (non-zero exit) that names the last checkpoint, not a clean exit; a SIGTERM sent to
  the launching process is passed on to the workers, which stop together after a step, instead of killing
  the launcher at once and leaving them to die without a word; a worker whose launcher died (``kill -9``)
  stops the same way instead of training on alone.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from lightning.fabric.utilities.distributed import _destroy_dist_connection
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_d2ft.model.lora import match_lora_
from lightning_d2ft.model.vit import find_d2ft
from lightning_d2ft.parallel.collectives import CollectiveError
from lightning_d2ft.strategy.step_guard import sigterm_handled_by, sigterm_message

__all__ = ["PEER_ERROR_GRACE_S", "is_peer_error"]
PEER_ERROR_GRACE_S = 3.0
_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe")


def is_peer_error(err: BaseException) -> bool:
    """True when ``err`` only says a peer failed or stopped answering (not the cause itself)."""
    chain: BaseException | None = err
    while chain is not None:
        if isinstance(chain, CollectiveError) or any(s in str(chain) for s in _PEER_SIGNS):
            return True
        chain = chain.__cause__
    return False


class _WholeModelSpawnLauncher(_MultiProcessingLauncher):
    @override
    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        with _sigterm_passed_to_workers() as received:
            try:
                return super().launch(function, *args, trainer=trainer, **kwargs)
            except Exception as err:
                stopped = _SIGTERM_LINE.search(str(err))
                if received and stopped:  # as on one process: exit non-zero with the one line
                    raise SystemExit(stopped.group(0)) from err
                raise

    @override
    def _wrapping_function(self, process_idx: int, trainer: Any, *args: Any, **kwargs: Any) -> None:
        _stop_when_the_launcher_dies()
        try:
            super()._wrapping_function(process_idx, trainer, *args, **kwargs)
        except SIGTERMException as stop:
            # a SystemExit with code 0: the worker would look finished and the main process would wait
            # for its results forever; report the stop as the failure it is
            raise RuntimeError(sigterm_message(trainer)) from stop
        except Exception as err:
            if is_peer_error(err):
                time.sleep(PEER_ERROR_GRACE_S)  # let the rank with the real error exit (and be reported) first
            raise
        # a gloo group left to interpreter finalization can abort the worker (SIGABRT, "terminate called
        # without an active exception"); Lightning destroys groups at exit only for NCCL
        _destroy_dist_connection()

    @override
    def _collect_rank_zero_results(self, trainer: Any, results: Any) -> _WorkerOutput | None:
        callback = trainer.checkpoint_callback
        best_model_path = getattr(callback, "best_model_path", None) if callback else None
        state_dict = self._strategy.lightning_module_state_dict()  # a collective: every rank takes part
        if self._strategy.local_rank != 0:
            return None
        weights_path = None
        if trainer.state.fn == TrainerFn.FITTING:
            weights_path = os.path.join(tempfile.mkdtemp(), ".temp.ckpt")
            self._strategy.checkpoint_io.save_checkpoint(state_dict, weights_path)
        return _WorkerOutput(best_model_path, weights_path, trainer.state, results, self.get_extra_results(trainer))

    @override
    def _recover_results_in_main_process(self, worker_output: _WorkerOutput, trainer: Any) -> None:
        if worker_output.weights_path is not None:  # Lightning loads non-strictly: adapters would be dropped
            state = self._strategy.checkpoint_io.load_checkpoint(worker_output.weights_path)
            match_lora_(find_d2ft(trainer.lightning_module), state)
        super()._recover_results_in_main_process(worker_output, trainer)


_SIGTERM_LINE = re.compile(r"D2FT: stopped by SIGTERM[^\n]*")


@contextmanager
def _sigterm_passed_to_workers() -> Iterator[list[int]]:
    """While the workers run, SIGTERM to this (launching) process is sent on to them: they agree to stop after
    the step, checkpoint and report. Python's default would kill the launcher at once and orphan them.
    Yields the signals received (empty: none)."""
    received: list[int] = []
    launcher, before = os.getpid(), {p.pid for p in multiprocessing.active_children()}

    def pass_on(signum: int, frame: Any) -> None:
        if os.getpid() != launcher:  # a forked worker that has not installed its own handler yet
            return
        received.append(signum)
        for worker in multiprocessing.active_children():
            if worker.pid not in before and worker.pid is not None:
                try:
                    os.kill(worker.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    with sigterm_handled_by(pass_on):
        yield received


def _stop_when_the_launcher_dies(poll_s: float = 1.0) -> None:
    """A worker whose launcher died (``kill -9`` of the command, the OOM killer) would train on alone, and
    race a rerun in the same run directory. When its parent changes, it sends itself SIGTERM: every rank
    stops after the step with a checkpoint (at once before the first step)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="d2ft-launcher-watch", daemon=True).start()


def sigterm_exit(exception: BaseException, trainer: Any) -> None:
    """Turn Lightning's SIGTERMException (exit status 0) into a non-zero exit with a one-line message."""
    if isinstance(exception, SIGTERMException):
        exception.code = sigterm_message(trainer)
