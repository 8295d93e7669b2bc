"""Kill, move, corrupt and rerun a run directory (issue 13): the app, in-process, one device, tiny model.

A kill is a callback that raises at a fixed optimizer step (after that step's checkpoint hooks would
have run for earlier steps only), so every fault here is deterministic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch import Callback

import lightning_d2ft.app.run as app
from lightning_d2ft.__main__ import config_dir
from lightning_d2ft.app.config import register_configs

TINY = ["model=vit_s_digits", "model.kwargs.img_size=16", "model.kwargs.embed_dim=48", "+model.kwargs.depth=2",
        "model.subnets=14", "trainer=cpu1", "trainer.limit_train_batches=3", "data.batch_size=4",
        "data.train_per_class=8",
        "trainer.max_epochs=3", "trainer.log_every_n_steps=1", "+trainer.extra.enable_progress_bar=false",
        "+trainer.extra.enable_model_summary=false", "+trainer.extra.num_sanity_val_steps=0"]


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs (Lightning re-raises it)."""


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def _cfg(tmp_path: Path, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", [*TINY, f"schedule.cache_dir={tmp_path}/cache", *overrides])


def _run(tmp_path: Path, out: Path, *overrides: str, kill_at: int | None = None, monkeypatch=None) -> dict:
    if kill_at is not None:
        original = app._checkpoints
        monkeypatch.setattr(app, "_checkpoints", lambda *a: [KillAt(kill_at), *original(*a)])
        with pytest.raises(Killed):
            app.run(_cfg(tmp_path, *overrides), out)
        monkeypatch.setattr(app, "_checkpoints", original)
        return {}
    return app.run(_cfg(tmp_path, *overrides), out)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["global_step"]


@pytest.mark.parametrize("every_n_steps", [2, None])
def test_a_kill_in_epoch_1_of_3_then_rerun_reaches_the_uninterrupted_weights(tmp_path, monkeypatch, every_n_steps):
    """13.1 (the resumed epoch's skip must not leak into epoch 2) and 13.2 (last.ckpt at every epoch end
    even without step checkpoints). 3 steps per epoch; the kill hits step 5, in epoch 1."""
    steps = f"trainer.checkpoint_every_n_steps={'null' if every_n_steps is None else every_n_steps}"
    _run(tmp_path, tmp_path / "straight", steps)
    _run(tmp_path, tmp_path / "killed", steps, kill_at=5, monkeypatch=monkeypatch)
    ckpts = tmp_path / "killed" / "checkpoints"
    assert _weights(ckpts / "last.ckpt")[1] == 3  # epoch 0's end
    if every_n_steps:
        assert _weights(ckpts / "last-step.ckpt")[1] == 4  # resumes mid-epoch 1, after its first micro-batch
    result = _run(tmp_path, tmp_path / "killed", steps)
    expected, step = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    got, got_step = _weights(Path(result["last_checkpoint"]))
    assert step == got_step == 9
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_moved_run_directory_keeps_writing_the_same_last_ckpt(tmp_path):
    """13.3: no last-v1.ckpt; results.json points at the newest weights."""
    _run(tmp_path, tmp_path / "a", "trainer.max_epochs=1", "trainer.checkpoint_every_n_steps=null")
    shutil.move(tmp_path / "a", tmp_path / "b")
    result = _run(tmp_path, tmp_path / "b", "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=null")
    names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert names == ["last.ckpt"]
    assert result["last_checkpoint"] == str(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert _weights(tmp_path / "b" / "checkpoints" / "last.ckpt")[1] == 6
    assert json.loads((tmp_path / "b" / "results.json").read_text())["last_checkpoint"] == result["last_checkpoint"]


def test_a_truncated_or_nan_checkpoint_is_skipped_and_the_other_one_used(tmp_path, caplog):
    """13.4, 13.9, 13.11: the newer last-step.ckpt is truncated (disk full), then NaN; the rerun warns
    naming it and resumes from last.ckpt (no miniz error)."""
    out = tmp_path / "run"
    _run(tmp_path, out, "trainer.max_epochs=1", "trainer.checkpoint_every_n_steps=2")
    step_file = out / "checkpoints" / "last-step.ckpt"
    torch.save({"state_dict": {"w": torch.tensor([float("nan")])}, "global_step": 50}, step_file)
    assert app._resume_path(_cfg(tmp_path), out) == str(out / "checkpoints" / "last.ckpt")
    step_file.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    result = _run(tmp_path, out, "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=2")
    assert "last-step.ckpt" in caplog.text
    assert _weights(Path(result["last_checkpoint"]))[1] == 6


def test_a_rerun_with_another_budget_or_method_is_refused_naming_both(tmp_path):
    """13.6: the run directory's checkpoints belong to budget 0.6; asking for 0.8 there is refused."""
    out = tmp_path / "run"
    _run(tmp_path, out, "trainer.max_epochs=1", "trainer.checkpoint_every_n_steps=null")
    for change, before, after in [("schedule.budget=0.8", "0.6", "0.8"), ("schedule.method=moe", "d2ft", "moe")]:
        with pytest.raises(ValueError,
                           match=rf"{before}.* in this run directory, .*{after}.* asked.*hydra.run.dir.*resume=null"):
            _run(tmp_path, out, change)
    # starting fresh in the same directory is allowed, and names the new settings
    assert _run(tmp_path, out, "schedule.budget=0.8", "resume=null")["budget"] == 0.8


def test_a_malicious_checkpoint_in_the_run_directory_runs_no_code(tmp_path):
    """13.5: a pickle planted at checkpoints/last.ckpt is skipped on rerun; its code never runs."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "global_step": 9, "x": _Payload(marker)}, out / "checkpoints" / "last.ckpt")
    assert app._resume_path(_cfg(tmp_path), out) is None
    assert not marker.exists()


def test_two_processes_stopped_in_epoch_1_then_rerun_reach_the_uninterrupted_weights(tmp_path):
    """13.1 on 2 tensor-parallel processes (the command line, spawn): the first run stops at step 5
    (``max_steps``, in epoch 1 of 3) leaving step 4's checkpoint as a kill would; the rerun stops at step 6, the
    last of epoch 1, leaving that step's checkpoint and no last.ckpt, as a crash in validation would (issue 29,
    failure 1); the last rerun goes on with all of epoch 2."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    base = [sys.executable, "-m", "lightning_d2ft", *[o for o in TINY if o != "trainer=cpu1"], "trainer=cpu2",
            "trainer.checkpoint_every_n_steps=2", f"schedule.cache_dir={tmp_path}/cache"]

    def cli(run: str, *extra: str) -> None:
        proc = subprocess.run([*base, f"hydra.run.dir={tmp_path}/{run}", *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    cli("straight")
    cli("stopped", "+trainer.extra.max_steps=5")
    assert _weights(tmp_path / "stopped" / "checkpoints" / "last-step.ckpt")[1] == 4
    # a stop at max_steps ends the epoch (Lightning writes the epoch-end last.ckpt at step 5 and counts
    # epoch 1 as done); a kill would not: remove it, so the newest checkpoint is step 4's, mid-epoch 1
    (tmp_path / "stopped" / "checkpoints" / "last.ckpt").unlink()
    cli("stopped", "+trainer.extra.max_steps=6")
    assert _weights(tmp_path / "stopped" / "checkpoints" / "last-step.ckpt")[1] == 6
    (tmp_path / "stopped" / "checkpoints" / "last.ckpt").unlink()  # the crash before epoch 1's last.ckpt
    cli("stopped")
    expected, step = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    got, got_step = _weights(tmp_path / "stopped" / "checkpoints" / "last.ckpt")
    assert step == got_step == 9
    worst = max(expected, key=lambda k: float((got[k] - expected[k]).abs().max()))
    assert float((got[worst] - expected[worst]).abs().max()) <= 1e-5, (
        f"{worst}: max |diff| {float((got[worst] - expected[worst]).abs().max()):.3g}")


# -- issue 29: a crash at an epoch boundary --------------------------------------------------------------------
# 3 micro-batches an epoch and a step checkpoint every 3 steps: last-step.ckpt is written on the epoch's last
# micro-batch, before validation and before the epoch-end last.ckpt
BOUNDARY = ("trainer.checkpoint_every_n_steps=3",)


class KillIn(Callback):
    """Raises ``Killed`` in hook ``hook`` once the global step is ``step`` (placed before the checkpoints)."""

    def __init__(self, hook: str, step: int) -> None:
        self.hook, self.step = hook, step
        setattr(self, hook, self._kill)

    def _kill(self, trainer, *args) -> None:
        if trainer.global_step == self.step and not trainer.sanity_checking:
            raise Killed(f"killed in {self.hook} at step {self.step}")


def _kill_inside_write(monkeypatch, name: str, nth: int) -> None:
    """kill -9 inside the atomic write of ``name``: its ``nth`` rename never happens."""
    import lightning_d2ft.io as io_module

    real, seen = io_module.os.replace, []

    def replace(src, dst):
        if Path(dst).name == name:
            seen.append(dst)
            if len(seen) == nth:
                raise Killed(f"killed while writing {name}")
        return real(src, dst)

    monkeypatch.setattr(io_module.os, "replace", replace)


@pytest.fixture(scope="module")
def straight_boundary(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    _run(tmp, tmp / "run", *BOUNDARY)
    return _weights(tmp / "run" / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("where", ["in validation", "between the step checkpoint and last.ckpt",
                                   "inside the write of last.ckpt", "inside the write of last-step.ckpt"])
def test_a_crash_at_an_epoch_boundary_then_rerun_reaches_the_uninterrupted_weights_and_step(
        tmp_path, monkeypatch, straight_boundary, where):
    """Issue 29, failure 1: the step checkpoint of epoch 1's last micro-batch (step 6) is written, then the run
    dies before last.ckpt of epoch 1. The rerun must train all of epoch 2, not skip it."""
    out = tmp_path / "run"
    original = app._checkpoints
    if where == "in validation":
        monkeypatch.setattr(app, "_checkpoints", lambda *a: [KillIn("on_validation_start", 6), *original(*a)])
    elif where.startswith("between"):
        monkeypatch.setattr(app, "_checkpoints", lambda *a: [KillIn("on_train_epoch_end", 6), *original(*a)])
    else:
        _kill_inside_write(monkeypatch, where.split()[-1], nth=2)  # the 2nd write is epoch 1's (step 6)
    with pytest.raises(Killed):
        app.run(_cfg(tmp_path, *BOUNDARY), out)
    monkeypatch.undo()
    result = _run(tmp_path, out, *BOUNDARY)
    expected, step = straight_boundary
    got, got_step = _weights(Path(result["last_checkpoint"]))
    assert got_step == step == 9
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_mid_epoch_resume_on_another_layout_trains_the_rest_of_the_epoch(tmp_path, monkeypatch, capfd):
    """Issue 29, failure 7: killed 3 of 5 micro-batches into epoch 1 on one process; the rerun on two
    data-parallel replicas (2 batches an epoch each) trains the other 2 micro-batches of epoch 1, one per replica,
    instead of nothing."""
    out = tmp_path / "run"
    steps = ("trainer.limit_train_batches=null", "data.batch_size=8", "trainer.max_epochs=2",
             "trainer.checkpoint_every_n_steps=2")
    _run(tmp_path, out, *steps, kill_at=9, monkeypatch=monkeypatch)  # last-step.ckpt: step 8, epoch 1
    killed = torch.load(out / "checkpoints" / "last-step.ckpt", map_location="cpu", weights_only=True)
    assert killed["global_step"] == 8
    _one_process_run_leaves_no_process_group(monkeypatch)
    _run(tmp_path, out, *steps, "trainer.devices=2", "trainer.tensor_parallel_size=1")
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 9 and last["epoch"] == 1  # one more step: a micro-batch on each replica
    assert "the 2 left are trained now, 1 per replica" in capfd.readouterr().err
    before = killed["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert before["epoch"] == 1 and len(before["epoch_ids"]) == 1
    done = set(before["epoch_ids"][0][:3])
    after = last["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    trained = {mb for ids in after["epoch_ids"] for mb in ids if mb >= 0}
    assert len(trained) == 2 and not trained & done and trained | done == set(range(5))


def _one_process_run_leaves_no_process_group(monkeypatch) -> None:
    """A one-device run in this process initialised a process group and exported MASTER_PORT: a 2-process run
    started next from here would reuse that port (conftest cleans up only after the test)."""
    import os

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for name in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "RANK"):
        if name in os.environ:
            monkeypatch.delenv(name)
