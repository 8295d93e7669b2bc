"""io.py: atomic writes leave no temp file, checked files refuse corruption, checkpoints load without
running code, and the newest usable checkpoint is chosen (a truncated or NaN one is skipped, named); only
regular files are read, a killed writer's temp files are removed, and only the current lineage is ranked."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_d2ft.io import (
    StaleFileError,
    atomic_write,
    checked_checkpoint,
    newest_checkpoint,
    read_checked,
    write_checked,
)


class _Payload:
    """Unpickling this runs code: it creates the file named ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def malicious(path: Path, marker: Path, zipped: bool = True) -> Path:
    """A file that runs code when loaded with ``weights_only=False`` (torch.save zip, or a raw pickle)."""
    evil = {"state_dict": {"w": torch.zeros(1)}, "global_step": 99, "x": _Payload(marker)}
    if zipped:
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil))
    return path


def _ckpt(path: Path, step: int, value: float = 0.0) -> Path:
    torch.save({"state_dict": {"net.vit.w": torch.full((2,), value)}, "global_step": step}, path)
    return path


def test_atomic_write_removes_its_temp_file_when_the_write_fails(tmp_path, monkeypatch):
    target = atomic_write(tmp_path / "f.bin", b"old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no .tmp left behind


def test_checked_file_round_trips_and_refuses_truncation(tmp_path):
    path = write_checked(tmp_path / "c.pt", {"a": torch.arange(3)}, version=2)
    assert torch.equal(read_checked(path, 2, "thing")["a"], torch.arange(3))
    with pytest.raises(StaleFileError, match="version"):
        read_checked(path, 3, "thing")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(StaleFileError, match="checksum"):
        read_checked(path, 2, "thing")


@pytest.mark.parametrize("zipped", [True, False])
def test_a_code_carrying_checkpoint_is_refused_and_runs_nothing(tmp_path, zipped):
    marker = tmp_path / "pwned"
    path = malicious(tmp_path / "last.ckpt", marker, zipped)
    with pytest.raises(StaleFileError, match="last.ckpt"):
        checked_checkpoint(path)
    assert newest_checkpoint([path]) is None
    assert not marker.exists()


def test_a_code_carrying_checked_file_runs_nothing(tmp_path):
    """Schedules and score caches are read through read_checked: a valid checksum does not let code run."""
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"version": 1, "x": _Payload(marker)}, buffer)
    body = buffer.getvalue()
    path = tmp_path / "cache.pt"
    path.write_bytes(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    with pytest.raises(StaleFileError):
        read_checked(path, 1, "score cache")
    assert not marker.exists()


def test_newest_usable_checkpoint_skips_truncated_and_nan_files_naming_them(tmp_path, caplog):
    epoch, step = _ckpt(tmp_path / "last.ckpt", 6), _ckpt(tmp_path / "last-step.ckpt", 8)
    assert newest_checkpoint([epoch, step, tmp_path / "missing.ckpt"]) == step
    step.write_bytes(step.read_bytes()[: step.stat().st_size // 2])  # disk full mid-copy
    with caplog.at_level(logging.WARNING):
        assert newest_checkpoint([epoch, step]) == epoch
    assert "last-step.ckpt" in caplog.text
    _ckpt(step, 9, value=float("nan"))  # bit-flipped to NaN
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert newest_checkpoint([epoch, step]) == epoch
    assert "last-step.ckpt" in caplog.text and "NaN" in caplog.text
    with pytest.raises(StaleFileError, match="last-step.ckpt.*NaN"):
        checked_checkpoint(step)


# -- issue 29 --------------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_a_fifo_a_directory_or_a_device_is_refused_by_name_without_hanging(tmp_path, kind):
    """Failure 9: a FIFO at checkpoints/last.ckpt blocked torch.load forever, with an empty log."""
    path = tmp_path / "last.ckpt"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path = Path(os.devnull)
    what = {"fifo": "FIFO", "directory": "directory", "device": "character device"}[kind]
    with pytest.raises(StaleFileError, match=rf"checkpoint {path} is a {what}.*not a regular file"):
        checked_checkpoint(path)
    with pytest.raises(StaleFileError, match=str(path)):
        newest_checkpoint([_ckpt(tmp_path / "last-step.ckpt", 3), path])  # refused, not skipped
    with pytest.raises(StaleFileError, match=rf"schedule file {path} is a {what}"):
        read_checked(path, 2, "schedule file")


def test_leftover_temp_files_of_killed_writers_are_removed_and_nothing_else(tmp_path, caplog):
    """Weak item: every kill -9 during a write left its .<name>.<pid>.tmp behind, forever."""
    from lightning_d2ft.io import remove_stale_temp_files

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / f".last.ckpt.{dead.pid}.tmp"
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / f".results.json.{os.getpid()}.tmp"  # a writer still running: not touched
    live.write_bytes(b"x")
    others = [tmp_path / "notes.tmp", tmp_path / ".hidden.tmp", tmp_path / "checkpoints" / "last.ckpt"]
    for other in others:
        other.write_bytes(b"keep")
    with caplog.at_level(logging.WARNING):
        assert remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and all(p.exists() for p in others)
    assert f"removed {stale}" in caplog.text and f"process {dead.pid} never finished" in caplog.text


def test_on_a_read_only_mount_the_write_error_is_not_hidden_by_the_cleanup(tmp_path, monkeypatch):
    """Weak item: the cleanup's unlink raised EROFS and hid the real error."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError, match="No space left on device"):
        atomic_write(tmp_path / "f.bin", b"data")


def test_newest_checkpoint_ranks_only_the_current_lineage(tmp_path, caplog):
    """Failure 2: the first run's last-step.ckpt (a higher step) won over the second run's last.ckpt."""
    from lightning_d2ft.io import LINEAGE_KEY

    old = tmp_path / "last-step.ckpt"
    torch.save({"state_dict": {}, "global_step": 20, LINEAGE_KEY: "first"}, old)
    new = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "global_step": 6, LINEAGE_KEY: "second"}, new)
    assert newest_checkpoint([new, old]) == old  # by step alone
    with caplog.at_level(logging.WARNING):
        assert newest_checkpoint([new, old], lineage="second") == new
    assert f"skipping checkpoint {old}: it belongs to another run" in caplog.text
    legacy = _ckpt(tmp_path / "legacy.ckpt", 9)  # written before lineages: counts for any
    assert newest_checkpoint([new, legacy], lineage="second") == legacy
