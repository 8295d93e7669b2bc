"""Files that can't be half-written or silently wrong: atomic writes with a version and a checksum.

Score caches, schedules and checkpoints all go through here, so a crash mid-write leaves the previous
file intact and a truncated, edited or outdated file is refused with a message saying what to do.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch


class StaleFileError(ValueError):
    """A file exists but must not be used: corrupt, edited, or made by another version or for other inputs."""


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file beside ``path`` and rename it into place: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
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
