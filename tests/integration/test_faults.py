"""Faults on real runs: a killed or SIGTERMed rank, NaN data, a rank out of step, a rank's own error.
Every one ends (no hang), says what happened, and loses nothing the last checkpoint had."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from fits import assert_same, d2ft_callback, digits_data, make_module, make_trainer, vit_state
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_d2ft.data.digits import DigitsDataModule
from lightning_d2ft.data.micro_batches import MicroBatchSampler

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parents[2]


class KillRank(Callback):
    """Fault injection at the start of a training step on one rank: ``kill`` dies at once (no cleanup, like
    SIGKILL or a lost machine); ``sigterm`` gets SIGTERM (what schedulers send before preempting);
    ``sleep`` stops answering for a while (a rank out of step); ``raise`` fails with its own error."""

    def __init__(self, rank: int, step: int, how: str) -> None:
        self.rank, self.step, self.how = rank, step, how

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank != self.rank or trainer.global_step != self.step:
            return
        if self.how == "kill":
            os._exit(17)
        if self.how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        if self.how == "sleep":
            time.sleep(15)  # 3x the 5 s timeout its peer waits
        if self.how == "raise":
            raise ValueError("the real error, on rank 0")


def _every_step_checkpoint(root: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=0)


@pytest.mark.parametrize("how", ["kill", "sigterm"])
def test_rank_killed_mid_epoch_resumes_from_last_checkpoint_to_the_same_weights(tmp_path, how):
    budget, steps = 0.6, 7
    straight = make_module()
    make_trainer(tmp_path / "a", callbacks=[d2ft_callback(budget, tmp_path)],
                 limit_train_batches=steps).fit(straight, digits_data())

    run = tmp_path / "b"
    expected = {"kill": "exit code 17", "sigterm": "stopped by SIGTERM at global step 6; resume from"}[how]
    with pytest.raises(Exception, match=expected):
        make_trainer(run, callbacks=[d2ft_callback(budget, tmp_path), _every_step_checkpoint(run),
                                     KillRank(1, 5, how)], limit_train_batches=steps).fit(make_module(), digits_data())
    last = run / "ckpt" / "last.ckpt"
    # killed at step 5: the checkpoint of step 4 is intact; SIGTERM at step 5: every rank finishes step 5
    # together (the checkpoint of step 6 is written) and stops, instead of hanging in a collective
    assert torch.load(last, weights_only=False)["global_step"] == {"kill": 4, "sigterm": 6}[how]
    assert not list((run / "ckpt").glob("*.tmp*")), "a partial checkpoint was left behind"

    resumed = make_module(seed=123)  # everything must come from the checkpoint
    make_trainer(run, callbacks=[d2ft_callback(budget, tmp_path), _every_step_checkpoint(run)],
                 limit_train_batches=steps).fit(resumed, digits_data(), ckpt_path=last)
    assert_same(vit_state(resumed), vit_state(straight), atol=1e-5)


def test_a_rank_out_of_step_times_out_naming_the_collective_and_the_rank(tmp_path):
    """Rank 1 stops answering at step 1; rank 0 waits in a tensor-parallel collective, and instead of
    hanging it fails after the strategy's timeout, naming the op and itself."""
    with pytest.raises(Exception, match=r"collective '[^']+' failed on rank 0"):
        make_trainer(tmp_path, callbacks=[d2ft_callback(1.0, tmp_path), KillRank(1, 1, "sleep")],
                     limit_train_batches=4, strategy_kw=dict(timeout=timedelta(seconds=5))
                     ).fit(make_module(), digits_data())


def test_a_rank_s_own_error_is_what_the_user_sees_not_the_peer_s_connection_error(tmp_path):
    with pytest.raises(Exception, match="the real error, on rank 0") as err:
        make_trainer(tmp_path, callbacks=[d2ft_callback(1.0, tmp_path), KillRank(0, 1, "raise")],
                     limit_train_batches=4, strategy_kw=dict(timeout=timedelta(seconds=30))
                     ).fit(make_module(), digits_data())
    assert "Connection closed by peer" not in str(err.value)


SIGTERM_SCRIPT = """
import os, signal, sys
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_d2ft import D2FTCallback, D2FTStrategy
from lightning_d2ft.data.digits import DigitsDataModule
from lightning_d2ft.app.module import ViTClassifier

import lightning_d2ft.callback as callback_module
from lightning_d2ft.scoring.scoring_pass import score_shared

WHEN = sys.argv[3]  # module level: spawned workers import this file again, with the same argv
TRAINER = None

def term(trainer):
    # one process: it signals itself; two: rank 0 signals the launching process, as a scheduler or
    # `kill <pid of the command>` does (the workers must hear of it from the launcher)
    if trainer.global_rank == 0:
        os.kill(os.getpid() if trainer.world_size == 1 else os.getppid(), signal.SIGTERM)

class Term(Callback):
    def setup(self, trainer, *args, **kwargs):
        global TRAINER
        TRAINER = trainer
        open(os.path.join(sys.argv[1] + "-pids", str(os.getpid())), "w").close()

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == 2 and WHEN == "step":
            term(trainer)
        if trainer.global_step == 2 and WHEN == "kill-launcher" and trainer.global_rank == 0:
            os.kill(os.getppid(), signal.SIGKILL)  # kill -9 of the command, the OOM killer

def scoring_then_term(*args, **kwargs):
    if WHEN == "scoring":
        term(TRAINER)  # in the middle of the scoring pass, before any step (and any checkpoint)
    return score_shared(*args, **kwargs)

callback_module.score_shared = scoring_then_term

if __name__ == "__main__":
    root, devices = sys.argv[1], int(sys.argv[2])
    seed_everything(0)
    module = ViTClassifier(num_classes=10, subnets=14,
                           model_kwargs=dict(img_size=16, patch_size=8, embed_dim=48, depth=2))
    strategy = D2FTStrategy(parallel_devices=[torch.device("cpu")]) if devices == 1 else \
        D2FTStrategy(start_method="spawn")
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy,
                      callbacks=[D2FTCallback(budget=0.6 if WHEN == "scoring" else 1.0, progress=False,
                                              cache_dir=os.path.join(root, "cache")), Term(),
                                 ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1, save_top_k=0)],
                      max_epochs=1 if WHEN != "kill-launcher" else 20, limit_train_batches=8 if WHEN != "kill-launcher"
                      else None, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, default_root_dir=root)
    trainer.fit(module, DigitsDataModule(img_size=16, batch_size=16, seed=0))
    print("finished")
"""


def _run_sigterm_script(tmp_path: Path, devices: int, when: str) -> tuple[str, Path]:
    script = tmp_path / "run.py"
    script.write_text(SIGTERM_SCRIPT)
    (tmp_path / "ckpt-pids").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # a command started with `&` from a script ignores SIGINT, and so does what it spawns: torch's spawn then
    # cannot stop orphaned workers (its PR_SET_PDEATHSIG sends SIGINT)
    in_background = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if when == "kill-launcher" else None
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), str(devices), when],
                          capture_output=True, text=True, env=env, timeout=300, preexec_fn=in_background)
    assert done.returncode != 0, done.stdout + done.stderr
    if when == "kill-launcher":
        return "", tmp_path / "ckpt"
    assert "finished" not in done.stdout
    return done.stderr.strip().splitlines()[-1], tmp_path / "ckpt"


@pytest.mark.parametrize("devices", [1, 2])
def test_sigterm_exits_non_zero_naming_the_last_checkpoint(tmp_path, devices):
    last_line, ckpt = _run_sigterm_script(tmp_path, devices, "step")
    last = ckpt / "last.ckpt"
    # the signal reaches two workers through the launcher, so the step they stop after is not fixed
    step = torch.load(last, weights_only=False)["global_step"]
    assert last_line == f"D2FT: stopped by SIGTERM at global step {step}; resume from {last}"
    assert step == 3 if devices == 1 else 3 <= step < 8


def test_workers_whose_launcher_was_killed_stop_with_a_checkpoint_instead_of_training_on(tmp_path):
    """kill -9 of a 2-process command started in the background: the orphaned workers used to finish the whole
    fit, racing a rerun in the same run directory."""
    _, ckpt = _run_sigterm_script(tmp_path, 2, "kill-launcher")
    workers = [int(p.name) for p in (tmp_path / "ckpt-pids").iterdir()]
    assert len(workers) == 2
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.5)
    assert not any(_alive(pid) for pid in workers), "the workers trained on without their launcher"
    step = torch.load(ckpt / "last.ckpt", weights_only=False)["global_step"]
    assert 2 <= step < 20 * 60  # they stopped together after a step, long before the 20 epochs' end


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting for init to reap it has stopped too
        return stat.read().split()[2] != "Z"


def test_sigterm_during_the_scoring_pass_stops_at_once_saying_nothing_can_be_resumed(tmp_path):
    """Before the first step Lightning has no handler yet: the default action killed the run without a word."""
    last_line, ckpt = _run_sigterm_script(tmp_path, 1, "scoring")
    assert last_line == ("D2FT: stopped by SIGTERM at global step 0; no checkpoint was written, so nothing can be "
                         "resumed")
    assert not (ckpt / "last.ckpt").exists()


class PoisonedDigits(DigitsDataModule):
    """Digits with NaN pixels in the micro-batch that epoch 0 visits at training batch ``at_batch``."""

    def __init__(self, at_batch: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.at_batch = at_batch

    def setup(self, stage=None):
        super().setup(stage)
        sampler = MicroBatchSampler(self.train_set, self.hparams.batch_size, seed=self.hparams.seed)
        self.poisoned = sampler.micro_batch_ids(0)[self.at_batch]
        self.train_set.tensors[0][sampler.micro_batches[self.poisoned]] = float("nan")


@pytest.mark.parametrize("deferred", [False, True], ids=["checked-at-once", "checked-a-step-late"])
def test_nonfinite_input_stops_every_rank_naming_step_and_micro_batch_and_keeps_the_checkpoint(tmp_path, deferred):
    """Checked a step late (the default on a GPU), the bad step is still named and raised before the
    checkpoint written after it, so the last checkpoint is the one before it."""
    dm = PoisonedDigits(at_batch=3, img_size=16, batch_size=16, seed=0)
    dm.setup()
    applied = "Its update was applied in memory" if deferred else "Nothing from this step was applied or saved"
    with pytest.raises(Exception, match=rf"non-finite input at global step 3 \(epoch 0, batch 3, "
                                        rf"micro-batch {dm.poisoned}\)\. {applied}"):
        make_trainer(tmp_path, callbacks=[d2ft_callback(1.0, tmp_path), _every_step_checkpoint(tmp_path)],
                     strategy_kw=dict(defer_nonfinite_check=deferred), limit_train_batches=6).fit(make_module(), dm)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_a_deferred_check_still_raises_when_the_bad_step_is_the_last_one(tmp_path):
    dm = PoisonedDigits(at_batch=2, img_size=16, batch_size=16, seed=0)
    dm.setup()
    trainer = make_trainer(tmp_path, callbacks=[d2ft_callback(1.0, tmp_path)], devices=1,
                           strategy_kw=dict(defer_nonfinite_check=True), limit_train_batches=3)
    with pytest.raises(FloatingPointError, match=r"non-finite input at global step 2 \(epoch 0, batch 2"):
        trainer.fit(make_module(), dm)


def test_nonfinite_input_can_be_skipped_on_one_process_with_the_same_guarantees(tmp_path):
    dm = PoisonedDigits(at_batch=1, img_size=16, batch_size=16, seed=0)
    dm.setup()
    module = make_module()
    trainer = make_trainer(tmp_path, callbacks=[d2ft_callback(1.0, tmp_path)], devices=1,
                           strategy_kw=dict(on_nonfinite="skip"), limit_train_batches=3)
    trainer.fit(module, dm)
    assert trainer.strategy.skipped_steps == [{"global_step": 1, "epoch": 0, "batch_idx": 1,
                                               "micro_batch": dm.poisoned}]
    assert trainer.global_step == 3  # training went on past it
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    from lightning_d2ft.strategy.strategy import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "last.ckpt")
    with pytest.raises(FloatingPointError, match="refusing to write checkpoint"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, tmp_path / "last.ckpt")
    assert torch.equal(torch.load(tmp_path / "last.ckpt")["state_dict"]["w"], torch.ones(2))


class TermWhileStuck(Callback):
    """Rank 1 hangs at step 1 (stops answering); rank 0, stuck in the next collective, gets SIGTERM."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != 1:
            return
        if trainer.global_rank == 1:
            time.sleep(60)
        else:
            import threading

            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()


def test_sigterm_stops_a_rank_stuck_in_a_collective(tmp_path):
    """No Python handler runs while a rank waits inside gloo; the watchdog ends it after the grace period
    (well before the 120 s collective timeout)."""
    with pytest.raises(Exception, match="exit code 143"):
        make_trainer(tmp_path, callbacks=[d2ft_callback(1.0, tmp_path), TermWhileStuck()], limit_train_batches=4,
                     strategy_kw=dict(timeout=timedelta(seconds=120), sigterm_grace_s=2.0)
                     ).fit(make_module(), digits_data())
