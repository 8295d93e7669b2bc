"""Files that can't be half-written or silently wrong: atomic writes with a version and a checksum.

Score caches, schedules and checkpoints all go through here, so a crash mid-write leaves the previous
file intact and a truncated, edited or outdated file is refused with a message saying what to do.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["StaleFileError", "atomic_write", "checked_checkpoint", "newest_checkpoint", "read_checked",
           "write_checked"]
log = logging.getLogger(__name__)


class StaleFileError(ValueError):
    """A file exists but must not be used: corrupt, edited, or made by another version or for other inputs."""


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file beside ``path`` and rename it into place: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, killed mid-write: leave the old file, and no temp file eating space
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_checked(path: str | os.PathLike, payload: dict[str, Any], version: int) -> Path:
    """Save ``payload`` (tensors, numbers, strings) with a format version and a SHA-256 of the body."""
    buffer = io.BytesIO()
    torch.save({"version": version, **payload}, buffer)
    body = buffer.getvalue()
    return atomic_write(path, hashlib.sha256(body).hexdigest().encode() + b"\n" + body)


def read_checked(path: str | os.PathLike, version: int, what: str) -> dict[str, Any]:
    """Load a file written by :func:`write_checked`, refusing it unless checksum and version match."""
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
    naming the file, when it is truncated, not a checkpoint, or holds NaN/inf weights."""
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


def newest_checkpoint(paths: list[Path]) -> Path | None:
    """The usable checkpoint with the highest global step among ``paths``; a missing one is ignored, an
    unusable one (truncated, NaN/inf, code-carrying pickle) is skipped with a warning naming it."""
    best: tuple[int, Path] | None = None
    for path in paths:
        if not Path(path).exists():
            continue
        try:
            step = int(checked_checkpoint(path)["global_step"])
        except StaleFileError as err:
            log.warning(f"skipping {err}")
            continue
        if best is None or step > best[0]:
            best = (step, Path(path))
    return None if best is None else best[1]
