"""Issue 29 with the app (in-process, one device, tiny model): a run directory has one owner and one lineage,
its record is written only once the restore succeeded, a changed optimizer is refused, a finished run keeps its
results, and what the run reads is checked for what it must be."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from test_kill_and_resume import BOUNDARY, Killed, KillIn, _cfg, _run

import lightning_d2ft.app.run as app

pytestmark = pytest.mark.timeout(300)
ONE_EPOCH = ("trainer.max_epochs=1", "trainer.checkpoint_every_n_steps=null")


def _record(out: Path) -> dict:
    return json.loads((out / "d2ft" / "run_settings.json").read_text())


def test_resume_null_starts_a_clean_lineage_and_the_old_one_is_moved_aside(tmp_path, caplog):
    """Failure 2: the first run's last-step.ckpt (step 6) outranked the second run's last.ckpt (step 3), and with
    another budget the third run was refused quoting the first run's budget."""
    out = tmp_path / "run"
    _run(tmp_path, out, "trainer.checkpoint_every_n_steps=2", "trainer.max_epochs=2")  # both checkpoints at step 6
    first = _record(out).get("lineage")
    with caplog.at_level(logging.WARNING):
        _run(tmp_path, out, "resume=null", "schedule.budget=0.8", *ONE_EPOCH)
    second = _record(out).get("lineage")
    result = _run(tmp_path, out, "schedule.budget=0.8", "trainer.max_epochs=2",
                  "trainer.checkpoint_every_n_steps=null")
    assert result["resumed_from"] == str(out / "checkpoints" / "last.ckpt") and result["global_step"] == 6
    assert result["budget"] == 0.8 and second is not None and _record(out)["lineage"] == second != first
    moved = list((out / "superseded").iterdir())
    assert len(moved) == 1 and "moved the previous run's files" in caplog.text and str(moved[0]) in caplog.text
    assert sorted(p.name for p in (moved[0] / "checkpoints").iterdir()) == ["last-step.ckpt", "last.ckpt"]
    assert (moved[0] / "results.json").exists() and not (out / "checkpoints" / "last-step.ckpt").exists()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["d2ft_lineage"] == second and ckpt["global_step"] == 6


def test_a_second_run_in_the_same_directory_is_refused_at_once(tmp_path):
    """Failure 3: both runs exited 0, results and checkpoints all the second's, the first's steps gone."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    holder = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)  # the first run, still running, holds the lock
    os.write(holder, json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "command": "python -m lightning_d2ft "
                                 "schedule.budget=0.6", "started": "now"}).encode())
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(app.SetupError, match=rf"in use by another run: process {os.getpid()} .*\(python -m "
                                                 r"lightning_d2ft schedule.budget=0.6\)") as refused:
            _run(tmp_path, out)
        assert isinstance(refused.value.__cause__, app.RunDirBusyError)  # the app prints it as one line
    finally:
        os.close(holder)
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_a_finished_run_run_again_keeps_its_results_and_an_interrupted_write_is_redone(tmp_path, caplog):
    """Failure 4: the same command twice rewrote results.json with val_acc null; so did a kill between the fit
    and the results write."""
    out = tmp_path / "run"
    first = _run(tmp_path, out, *ONE_EPOCH)
    written = (out / "results.json").read_bytes()
    with caplog.at_level(logging.WARNING):
        again = _run(tmp_path, out, *ONE_EPOCH)
    assert (out / "results.json").read_bytes() == written and again == json.loads(written)
    assert f"already finished: {out / 'results.json'} holds val_acc {first['val_acc']:.4f}" in caplog.text
    (out / "results.json").unlink()  # killed between the end of fit and the results write
    redone = _run(tmp_path, out, *ONE_EPOCH)
    same = ("val_acc", "compute_fraction", "wire_fraction", "bytes_sent_all_ranks_last_epoch", "last_checkpoint",
            "global_step", "scoring_seconds")
    assert {k: redone.get(k) for k in same} == {k: first.get(k) for k in same} and redone["val_acc"] is not None
    assert json.loads((out / "results.json").read_text())["val_acc"] == first["val_acc"]


def test_a_crash_in_the_final_validation_is_redone_with_a_validation(tmp_path, monkeypatch):
    """The last step's checkpoint is written, then the final validation dies: the rerun has nothing to train,
    validates the final weights and writes the results an uninterrupted run writes."""
    straight = _run(tmp_path, tmp_path / "straight", *BOUNDARY)
    out = tmp_path / "run"
    original = app._checkpoints
    monkeypatch.setattr(app, "_checkpoints", lambda *a: [KillIn("on_validation_start", 9), *original(*a)])
    with pytest.raises(Killed):
        app.run(_cfg(tmp_path, *BOUNDARY), out)
    monkeypatch.undo()
    result = _run(tmp_path, out, *BOUNDARY)
    assert result["val_acc"] == pytest.approx(straight["val_acc"], abs=1e-6)
    assert result["global_step"] == 9 and result["compute_fraction"] == straight["compute_fraction"]


def test_a_refused_rerun_leaves_the_run_record_as_it_was(tmp_path):
    """Failure 6: a rerun with another embed_dim rewrote run_settings.json before its restore failed, and then
    the original, correct command was refused."""
    out = tmp_path / "run"
    _run(tmp_path, out, *ONE_EPOCH)
    record = (out / "d2ft" / "run_settings.json").read_bytes()
    last = out / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"model.kwargs: .*'embed_dim': 48.* in the checkpoint, .*'embed_dim': 96"):
        _run(tmp_path, out, *ONE_EPOCH, "model.kwargs.embed_dim=96", f"resume={last}")
    assert (out / "d2ft" / "run_settings.json").read_bytes() == record
    assert _run(tmp_path, out, "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=null")["global_step"] == 6


def test_another_optimizer_learning_rate_or_weight_decay_is_refused_naming_both(tmp_path):
    """Failure 8: sgd loaded AdamW state (a raw KeyError 'momentum'); a new lr or weight decay was ignored."""
    out = tmp_path / "run"
    _run(tmp_path, out, *ONE_EPOCH)
    changes = [("model.optimizer=sgd", "'adamw'", "'sgd'"), ("model.lr=0.002", "0.001", "0.002"),
               ("model.weight_decay=0.0", "0.05", "0.0")]
    for change, before, after in changes:
        setting = change.split("=")[0]
        with pytest.raises(ValueError, match=rf"{setting}: {before} in this run directory, {after} asked.*resume=null"):
            _run(tmp_path, out, "trainer.max_epochs=2", change)
    record = _record(out)  # a record written before these settings joined the identity: the checkpoint says
    del record["model.optimizer"], record["model.lr"], record["model.weight_decay"]
    (out / "d2ft" / "run_settings.json").write_text(json.dumps(record))
    for change, before, after in changes:
        with pytest.raises(ValueError, match=rf"{change.split('=')[0]}: {before} in the checkpoint, {after} asked"):
            _run(tmp_path, out, "trainer.max_epochs=2", change)
    assert _run(tmp_path, out, *ONE_EPOCH, "model.optimizer=sgd", "resume=null")["global_step"] == 3  # on purpose


def test_a_lora_checkpoint_resumed_without_lora_is_refused_naming_the_setting(tmp_path):
    """Weak item: it silently switched LoRA on; the reverse failed with a raw "Missing key(s) lora_A"."""
    out = tmp_path / "run"
    _run(tmp_path, out, *ONE_EPOCH, "schedule.lora_rank=2")
    last = out / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"schedule.lora_rank: 2 in the checkpoint \(LoRA on\), None asked"):
        _run(tmp_path, out, "trainer.max_epochs=2", f"resume={last}")


@pytest.mark.timeout(30)
def test_a_fifo_in_place_of_the_checkpoint_is_refused_by_name_without_hanging(tmp_path):
    """Failure 9: torch.load waited forever on checkpoints/last.ckpt, a FIFO, with an empty log."""
    from lightning_d2ft.io import StaleFileError

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    os.mkfifo(out / "checkpoints" / "last.ckpt")
    with pytest.raises(app.SetupError, match=rf"checkpoint {out / 'checkpoints' / 'last.ckpt'} is a FIFO") as refused:
        _run(tmp_path, out)
    assert isinstance(refused.value.__cause__, StaleFileError)


def test_temp_files_of_killed_writes_are_removed_when_the_run_starts(tmp_path, caplog):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    stale = out / "checkpoints" / f".last.ckpt.{dead.pid}.tmp"
    stale.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING):
        _run(tmp_path, out, *ONE_EPOCH)
    assert not stale.exists() and f"removed {stale}" in caplog.text


def test_the_checkpoint_directory_is_probed_before_scoring(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory")
    with pytest.raises(app.SetupError, match="checkpoints is not a directory") as refused:
        _run(tmp_path, out)
    assert isinstance(refused.value.__cause__, PermissionError)
    assert not (tmp_path / "cache").exists()  # no scoring pass ran


def test_labels_out_of_range_fail_naming_the_sample(tmp_path, monkeypatch):
    from lightning_d2ft.data.digits import DigitsDataModule

    class BadLabels(DigitsDataModule):
        def setup(self, stage=None):
            super().setup(stage)
            self.train_set.tensors[1][7] = 12

    monkeypatch.setitem(app.DATAMODULES, "digits", BadLabels)
    with pytest.raises(ValueError, match=r"training sample 7 has label 12, outside 0..4"):
        _run(tmp_path, tmp_path / "run", *ONE_EPOCH)

