"""Files that can't be half-written or silently wrong: atomic writes with a version and a checksum.

Score caches, schedules and checkpoints all go through here, so a crash mid-write leaves the previous
file intact and a truncated, edited or outdated file is refused with a message saying what to do. Whatever is
read must be a regular file (a FIFO would block the reader forever, a directory or device is no file of ours);
the temporary files a killed writer leaves behind are named so that :func:`remove_stale_temp_files` finds them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import torch

__all__ = ["LINEAGE_KEY", "NotARegularFileError", "StaleFileError", "atomic_write", "check_regular_file",
           "checked_checkpoint", "newest_checkpoint", "read_checked", "remove_stale_temp_files", "temp_path",
           "tensor_bytes", "write_checked"]
log = logging.getLogger(__name__)
#: the key of a checkpoint that names the run (lineage) it belongs to: the app writes it, ranking reads it
LINEAGE_KEY = "d2ft_lineage"
#: what :func:`temp_path` names: ``.<name>.<pid of the writer>.tmp`` beside the target
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


class StaleFileError(ValueError):
    """A file exists but must not be used: corrupt, edited, or made by another version or for other inputs."""


class NotARegularFileError(StaleFileError):
    """A path to be read is a FIFO, a device, a socket or a directory: never ours, and a FIFO blocks a reader."""


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's raw bytes (contiguous, on the CPU; none for an empty one), for hashing its content exactly."""
    t = t.detach().cpu().contiguous()
    return t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def check_regular_file(path: str | os.PathLike, what: str) -> None:
    """Refuse, naming ``what`` and the path, anything but a regular file (symbolic links are followed); a FIFO
    is refused before anything opens it, which would wait forever for a writer. A missing file raises
    FileNotFoundError."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "special file")
        raise NotARegularFileError(f"{what} {path} is a {kind}, not a regular file; nothing here writes one: remove "
                                   "or rename it")


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary file :func:`atomic_write` writes before renaming it to ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file beside ``path`` and rename it into place: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, killed mid-write: leave the old file, and no temp file eating space
        try:
            tmp.unlink(missing_ok=True)
        except OSError as cleanup:  # a read-only mount refuses even this (EROFS): the write's error is the one
            log.warning(f"could not remove {tmp} after a failed write: {cleanup}")
        raise
    return path


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`atomic_write` (``.<name>.<pid>.tmp``, nothing else) under
    ``directory`` whose writer is no longer running: a kill -9 mid-write leaves one (a whole checkpoint, ~250 MB
    for ViT-S with AdamW). Each removal is logged; returns the removed paths."""
    removed = []
    for path in sorted(Path(directory).rglob(".*.tmp")):
        match = _TEMP.match(path.name)
        if match is None or not path.is_file() or path.is_symlink() or _running(int(match["pid"])):
            continue
        size = path.stat().st_size
        path.unlink()
        removed.append(path)
        log.warning(f"removed {path} ({size / 1e6:.1f} MB): the temporary file of a write of {match['name']} that "
                    f"process {match['pid']} never finished (killed)")
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_checked(path: str | os.PathLike, payload: dict[str, Any], version: int) -> Path:
    """Save ``payload`` (tensors, numbers, strings) with a format version and a SHA-256 of the body."""
    buffer = io.BytesIO()
    torch.save({"version": version, **payload}, buffer)
    body = buffer.getvalue()
    return atomic_write(path, hashlib.sha256(body).hexdigest().encode() + b"\n" + body)


def read_checked(path: str | os.PathLike, version: int, what: str) -> dict[str, Any]:
    """Load a file written by :func:`write_checked`, refusing it unless checksum and version match."""
    check_regular_file(path, what)
    raw = Path(path).read_bytes()
    digest, _, body = raw.partition(b"\n")
    if hashlib.sha256(body).hexdigest().encode() != digest:
        raise StaleFileError(f"{what} {path} is corrupt, truncated or was edited (checksum mismatch)")
    try:
        payload = torch.load(io.BytesIO(body), weights_only=True)
    except Exception as err:  # a body that matches its checksum but does not unpickle was written badly
        raise StaleFileError(f"{what} {path} could not be read: {err}") from err
    if payload.get("version") != version:
        raise StaleFileError(f"{what} {path} has format version {payload.get('version')}, expected {version}")
    return payload


def checked_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a Lightning checkpoint safely (``weights_only=True``: a pickle cannot run code) and refuse it,
    naming the file, when it is truncated, not a checkpoint, or holds NaN/inf weights. Anything but a regular
    file is refused (:class:`NotARegularFileError`) before it is opened."""
    check_regular_file(path, "checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip (miniz), foreign pickle, code-carrying pickle, ...
        raise StaleFileError(f"checkpoint {path} cannot be read safely (truncated, corrupt or not a weights-only "
                             f"Lightning checkpoint): {str(err).splitlines()[0][:200]}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise StaleFileError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict/global_step)")
    bad = [k for k, v in ckpt["state_dict"].items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise StaleFileError(f"checkpoint {path} holds NaN/inf weights ({', '.join(bad[:3])}"
                             f"{' and more' if len(bad) > 3 else ''})")
    return ckpt


def newest_checkpoint(paths: list[Path], lineage: str | None = None) -> Path | None:
    """The usable checkpoint with the highest global step among ``paths`` (on a tie, the first); a missing one
    is ignored, an unusable one (truncated, NaN/inf, code-carrying pickle) is skipped with a warning naming it.
    With ``lineage``, only checkpoints of that run (``LINEAGE_KEY``; one written before lineages existed has
    none and counts) are ranked; another run's is skipped with a warning. A path that is not a regular file
    (a FIFO, a directory) is refused: :class:`NotARegularFileError`."""
    best: tuple[int, Path] | None = None
    for path in paths:
        if not os.path.lexists(path):
            continue
        try:
            ckpt = checked_checkpoint(path)
        except NotARegularFileError:
            raise
        except (StaleFileError, FileNotFoundError) as err:
            log.warning(f"skipping {err}")
            continue
        theirs = ckpt.get(LINEAGE_KEY)
        if lineage is not None and theirs is not None and theirs != lineage:
            log.warning(f"skipping checkpoint {path}: it belongs to another run of this directory (lineage {theirs}, "
                        f"the current one is {lineage})")
            continue
        step = int(ckpt["global_step"])
        if best is None or step > best[0]:
            best = (step, Path(path))
    return None if best is None else best[1]
