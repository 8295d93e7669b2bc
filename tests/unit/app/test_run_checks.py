"""Issue 29, the app's checks that need no fit: trainer.extra cannot take what the app owns, the seed's range,
trainer.timeout, warnings for degenerate settings, the sample checks, the run directory's lock and probe."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lightning_d2ft.__main__ import config_dir
from lightning_d2ft.app.config import check_config, register_configs
from lightning_d2ft.app.run import check_model

# the app's new modules are imported in the tests (those of the Trainer arguments also run on older code)

PATHS = ["schedule.cache_dir=/tmp/x", "model.pretrain.cache_dir=/tmp/y"]
TINY = ["model=vit_s_digits", "model.kwargs.img_size=16", "model.kwargs.embed_dim=48", "+model.kwargs.depth=2",
        "model.subnets=14"]


def _compose(*overrides: str):
    register_configs()
    paths = PATHS if "model=vit_s_digits" not in overrides else PATHS[:1]  # that model does not pretrain
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", [*paths, *overrides])


@pytest.mark.parametrize("key, value, owner", [
    ("callbacks", "[]", "D2FT from schedule"), ("strategy", "ddp", "trainer.tensor_parallel_size"),
    ("plugins", "[]", "trainer.precision"), ("logger", "false", "CSV logger"),
    ("default_root_dir", "/tmp/z", "hydra.run.dir"), ("enable_checkpointing", "false", "checkpoint_every_n_steps"),
    ("max_epochs", "2", "trainer.max_epochs"), ("devices", "1", "trainer.devices"),
])
def test_trainer_extra_refuses_what_the_app_sets_naming_the_owner(key, value, owner):
    """Failure 5: ``+trainer.extra.callbacks=[]`` replaced the D2FT callback and the checkpoints."""
    with pytest.raises(ValueError, match=rf"trainer.extra cannot set what the app sets itself: trainer.extra.{key} "
                                         rf"\(set by .*{owner}"):
        check_config(_compose(f"+trainer.extra.{key}={value}"))


@pytest.mark.parametrize("seed", ["-1", str(2**40)])
def test_a_seed_out_of_range_is_refused_naming_the_setting(seed):
    from lightning_d2ft.app.preflight import check_inputs

    with pytest.raises(ValueError, match=rf"seed must be an int in \[0, 2\*\*32 - 1\].*got {seed}"):
        check_inputs(_compose(f"seed={seed}"))


def test_a_model_checkpoint_that_is_a_fifo_is_refused_by_name(tmp_path):
    from lightning_d2ft.app.preflight import check_inputs

    fifo = tmp_path / "weights.pt"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=rf"model.checkpoint {fifo} is a FIFO"):
        check_inputs(_compose(f"model.checkpoint={fifo}"))


def test_trainer_timeout_is_an_app_setting(tmp_path):
    from lightning_d2ft.app.run import _trainer

    cfg = _compose("trainer=cpu1", "trainer.timeout=5")
    check_config(cfg)
    assert _trainer(cfg, tmp_path, []).strategy._timeout == timedelta(seconds=5)
    with pytest.raises(ValueError, match="trainer.timeout must be null or a number of seconds > 0, got 0"):
        check_config(_compose("trainer.timeout=0"))


def _net(cfg):
    from omegaconf import OmegaConf

    return check_model(cfg.model.name, OmegaConf.to_container(cfg.model.kwargs), cfg.model.subnets)


def test_a_budget_without_one_full_per_device_and_step_is_warned_about():
    """Weak item: budget=1e-9 gave 100% SHORTCUT with no warning."""
    from lightning_d2ft.app.preflight import degenerate_settings

    cfg = _compose(*TINY, "schedule.budget=1e-9")
    with pytest.warns(UserWarning, match=r"schedule.budget=1e-09 leaves tensor-parallel rank\(s\) \[0, 1\] of 2 "
                                         r"no FULL subnet in any step.*Use schedule.budget >= 0\.\d+"):
        found = degenerate_settings(cfg, _net(cfg))
    least = float(found[0].split("schedule.budget >= ")[1].split(",")[0])
    assert degenerate_settings(_compose(*TINY, f"schedule.budget={least}"), _net(cfg)) == []
    assert degenerate_settings(_compose(*TINY, "schedule.budget=0.6"), _net(cfg)) == []


def test_a_lora_rank_over_the_head_width_is_warned_about():
    from lightning_d2ft.app.preflight import degenerate_settings

    cfg = _compose(*TINY, "schedule.lora_rank=8")  # 6 heads of 8, 14 subnets: one head per group, 8 wide
    assert degenerate_settings(cfg, _net(cfg)) == []
    cfg = _compose(*TINY, "schedule.lora_rank=12")
    with pytest.warns(UserWarning, match=r"schedule.lora_rank=12 is more than the width of a head group's q, k or v "
                                         r"slice \(1 head\(s\) of dimension 8 = 8 .*lora_rank <= 8"):
        degenerate_settings(cfg, _net(cfg))
    wide = _compose(*TINY[:-1], "model.subnets=4", "schedule.lora_rank=12")  # one group: 6 heads, 48 wide
    assert degenerate_settings(wide, _net(wide)) == []


def test_labels_out_of_range_and_nan_images_are_named_by_sample():
    from lightning_d2ft.app.preflight import check_samples

    images, labels = torch.zeros(6, 3, 4, 4), torch.tensor([0, 1, 2, 7, 1, -1])
    with pytest.raises(ValueError, match=r"training sample 3 has label 7, outside 0..4 .*samples \[5\] \(2 in all\)"):
        check_samples(images, labels, 5, "training")
    images[4, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="training sample 4 has NaN/inf pixels"):
        check_samples(images, labels.clamp(0, 4), 5, "training")
    with pytest.warns(UserWarning, match="validation sample 4 has NaN/inf pixels .*1 of 6.*counts them as wrong"):
        check_samples(images, labels.clamp(0, 4), 5, "validation")


# -- the run directory ----------------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_in_a_locked_run_directory_is_refused_naming_the_holder(tmp_path):
    """Failure 3: two runs at once in one run directory both exited 0, the first one's work lost."""
    from lightning_d2ft.app.run_dir import RunDirBusyError, RunDirLock

    with RunDirLock(tmp_path):
        with pytest.raises(RunDirBusyError, match=rf"{tmp_path} is in use by another run: process {os.getpid()} .*"
                                                  rf"\(.*{Path(sys.argv[0]).name}.*\).*another hydra.run.dir"):
            RunDirLock(tmp_path).acquire()
    with RunDirLock(tmp_path):  # released at the end: the next run takes it
        pass
    assert (tmp_path / ".lock").read_text() == ""  # nobody holds it


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    from lightning_d2ft.app.run_dir import RunDirLock

    pid = _dead_pid()
    (tmp_path / ".lock").write_text(json.dumps({"pid": pid, "command": "python -m lightning_d2ft old",
                                                "host": os.uname().nodename, "started": "yesterday"}))
    with caplog.at_level(logging.WARNING), RunDirLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"took over the stale lock of {tmp_path}: process {pid} (python -m lightning_d2ft old" in caplog.text


def test_a_lock_still_held_for_a_dead_holder_is_taken_over(tmp_path, caplog):
    """A process the dead holder left behind keeps its lock: the record names a dead pid, so it is taken over."""
    import fcntl

    from lightning_d2ft.app.run_dir import RunDirLock

    pid = _dead_pid()
    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, json.dumps({"pid": pid, "command": "orphaned", "host": os.uname().nodename}).encode())
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with caplog.at_level(logging.WARNING), RunDirLock(tmp_path):
            pass
    finally:
        os.close(fd)
    assert f"taking over the lock of {tmp_path} from process {pid} (orphaned)" in caplog.text


def test_only_the_launching_process_owns_the_run_directory(monkeypatch):
    from lightning_d2ft.app.run_dir import launching_process

    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert launching_process()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launching_process()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a worker Lightning's popen launcher started: the command again
    assert not launching_process()


def test_an_unwritable_checkpoint_directory_is_refused_before_any_work(tmp_path, monkeypatch):
    """Weak item: found only at the first save, after scoring and up to an epoch of training."""
    from lightning_d2ft.app.run_dir import probe_writable

    (tmp_path / "checkpoints").write_text("a file where the directory goes")
    with pytest.raises(PermissionError, match=rf"{tmp_path / 'checkpoints'} is not a directory"):
        probe_writable(tmp_path)
    (tmp_path / "checkpoints").unlink()

    def read_only(self, data):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(PermissionError, match=r"cannot be written \(Read-only file system\)"):
        probe_writable(tmp_path)
