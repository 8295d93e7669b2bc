"""A run directory has one owner, one lineage, and nothing half-written left in it.

* :class:`RunDirLock`: an advisory lock (``fcntl.flock`` on ``<run dir>/.lock``) held by the launching process
  for the whole run. A second run in the same directory is refused at once, naming the holder's pid and
  command; a lock whose recorded holder is dead (killed) is taken over with a warning.
* A lineage id names one run of the directory from its fresh start through all its resumes: it is recorded in
  ``d2ft/run_settings.json`` and in every checkpoint, and only checkpoints of the current lineage are resumed.
  Starting fresh where another run left files moves those files aside (never deletes them) into
  ``superseded/<date>/``, named in the log.
* :func:`probe_writable`: the run directory, ``checkpoints/`` and ``d2ft/`` are written to (and the probe
  removed) before any data, pretraining or scoring, so an unwritable one fails at once, not at the first save.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from lightning_d2ft.io import LINEAGE_KEY, check_regular_file, temp_path

__all__ = ["RECORD", "RunDirBusyError", "RunDirLock", "checkpoint_paths", "launching_process", "lineage_of",
           "move_aside", "new_lineage", "probe_writable", "read_json", "run_files"]
log = logging.getLogger(__name__)

RECORD = Path("d2ft") / "run_settings.json"  # the run's identity and lineage, relative to the run directory
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


class RunDirBusyError(RuntimeError):
    """Another run, still running, holds the run directory."""


def launching_process() -> bool:
    """Whether this process launched the run: not a worker that Lightning's launcher, torchrun or SLURM started
    (those run the app again with a rank set; the launching process owns the directory for all of them)."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name)
        if value not in (None, "") and value.strip() != "0":
            return False
    return True


class RunDirLock:
    """``fcntl.flock`` on ``<out>/.lock``, which records the holder (pid, host, command, start time) while it is
    held and is emptied on release; the kernel drops the lock when the holder dies, however it dies."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.path = self.out / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        fd = self._open()
        if not self._try_lock(fd):
            holder = _holder(fd)
            if holder.get("host") not in (None, socket.gethostname()) or _alive(holder.get("pid")):
                os.close(fd)
                raise RunDirBusyError(
                    f"{self.out} is in use by another run: process {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')} ({holder.get('command', 'command unknown')}), started "
                    f"{holder.get('started', '?')}. Wait for it to end, or give this run another hydra.run.dir=... "
                    f"(lock file {self.path})")
            # the recorded holder is dead, yet the lock is held (a process it left behind inherited it)
            log.warning(f"taking over the lock of {self.out} from process {holder.get('pid')} "
                        f"({holder.get('command', '?')}), which is no longer running")
            os.close(fd)
            self.path.unlink()
            fd = self._open()
            if not self._try_lock(fd):
                os.close(fd)
                raise RunDirBusyError(f"{self.out} was locked again by another run while this one took over its "
                                      f"stale lock ({self.path}); give this run another hydra.run.dir=...")
        else:
            stale = _holder(fd)
            if stale.get("pid") not in (None, os.getpid()):  # the holder died without releasing: killed
                log.warning(f"took over the stale lock of {self.out}: process {stale['pid']} "
                            f"({stale.get('command', '?')}, started {stale.get('started', '?')}) held it and is no "
                            "longer running (killed?)")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty lock file: nobody holds it (a killed holder leaves its record)
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _open(self) -> int:
        try:
            check_regular_file(self.path, "lock file")
        except FileNotFoundError:
            pass
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    @staticmethod
    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def _holder(fd: int) -> dict[str, Any]:
    raw = os.pread(fd, 4096, 0)
    try:
        holder = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def probe_writable(out: Path) -> None:
    """Write (and remove) a probe file in the run directory, ``checkpoints/`` and ``d2ft/``: an unwritable one
    (read-only, or a file where the directory should be) is refused now, naming it, not at the first save after
    scoring and an epoch of training."""
    for directory in (out, out / "checkpoints", out / "d2ft"):
        probe = temp_path(directory / "write-probe")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            what = "is not a directory" if directory.exists() and not directory.is_dir() else \
                f"cannot be written ({err.strerror or err})"
            raise PermissionError(f"{directory} {what}: the run writes its checkpoints, schedule and results there. "
                                  "Give a writable run directory (hydra.run.dir=...)") from err


def new_lineage() -> str:
    return uuid.uuid4().hex[:12]


def checkpoint_paths(out: Path) -> list[Path]:
    """The run's checkpoints, the epoch-end one first (it wins a tie)."""
    return [out / "checkpoints" / "last.ckpt", out / "checkpoints" / "last-step.ckpt"]


def run_files(out: Path) -> list[Path]:
    """What a run leaves in its directory that belongs to it alone (moved aside when another run starts fresh):
    every checkpoint, the results, and the schedule and record of ``d2ft/``."""
    checkpoints = sorted(p for p in (out / "checkpoints").glob("*.ckpt")) if (out / "checkpoints").is_dir() else []
    others = [out / "results.json", out / RECORD, out / "d2ft" / "schedule.pt", out / "d2ft" / "schedule.png"]
    return [*checkpoints, *(p for p in others if os.path.lexists(p))]


def move_aside(out: Path, files: list[Path], why: str) -> Path | None:
    """Move ``files`` (inside ``out``) into ``out/superseded/<date>/``, keeping their paths below ``out``;
    logs where. Nothing is deleted. Returns the folder (None when there was nothing to move)."""
    files = [f for f in files if os.path.lexists(f)]
    if not files:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = out / "superseded" / stamp
    n = 1
    while folder.exists():
        n += 1
        folder = out / "superseded" / f"{stamp}-{n}"
    for path in files:
        target = folder / path.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(target))
    names = ", ".join(str(p.relative_to(out)) for p in files)
    log.warning(f"{why}: moved the previous run's files ({names}) aside to {folder} (nothing was deleted)")
    return folder


def read_json(path: Path, what: str) -> dict[str, Any] | None:
    """A JSON object file of the run, or None when it is absent or unreadable (warned, naming it). Anything
    but a regular file is refused (a FIFO would block the read)."""
    try:
        check_regular_file(path, what)
    except FileNotFoundError:
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning(f"ignoring {what} {path}: it cannot be read as JSON ({err})")
        return None
    if not isinstance(value, dict):
        log.warning(f"ignoring {what} {path}: it holds a {type(value).__name__}, not an object")
        return None
    return value


def lineage_of(checkpoint: dict[str, Any]) -> str | None:
    lineage = checkpoint.get(LINEAGE_KEY)
    return lineage if isinstance(lineage, str) else None
