"""A D2FT training step must not make the host wait for the GPU: each wait stops the host from queueing the
next step while the GPU runs this one, and on a fast GPU that serialises Lightning's loop with the kernels.

On CPU the mechanism is checked (no Python number is logged in a training step: Lightning would turn it into
a tensor with ``torch.tensor(value, device=cuda)``, which waits for the GPU queue); on a GPU, the syncs
themselves (``torch.cuda.set_sync_debug_mode``) in steady-state training steps.
"""

from __future__ import annotations

import numbers
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from fits import make_module, make_trainer
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import TensorDataset

from lightning_d2ft import D2FTCallback, D2FTStrategy
from lightning_d2ft.data.micro_batches import micro_batch_loader
from lightning_d2ft.model.vit import find_d2ft


class StepLogSpy(Callback):
    """Records the type of every value logged between a training batch's start and end."""

    def __init__(self) -> None:
        self.inside, self.logged = False, []

    def on_train_batch_start(self, *args) -> None:
        self.inside = True

    def on_train_batch_end(self, *args) -> None:
        self.inside = False


def _random_loader():
    """Random 16 px images in micro-batches: runs where scikit-learn (the digits) is not installed."""
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(320, 3, 16, 16, generator=gen), torch.randint(0, 10, (320,), generator=gen))
    return micro_batch_loader(data, 16, seed=0)


def _callback(tmp_path: Path) -> D2FTCallback:
    """Budget 0.6 with the DP solver: runs where OR-Tools is not installed."""
    return D2FTCallback(budget=0.6, solver="dp", cache_dir=tmp_path / "cache", progress=False)


def test_training_steps_log_device_tensors_never_python_numbers(tmp_path, monkeypatch):
    spy = StepLogSpy()
    original = LightningModule.log

    def log(self, name, value, *args, **kwargs):
        if spy.inside:
            spy.logged.append((name, isinstance(value, numbers.Number)))
        return original(self, name, value, *args, **kwargs)

    monkeypatch.setattr(LightningModule, "log", log)
    trainer = make_trainer(tmp_path, devices=1, callbacks=[_callback(tmp_path), spy], limit_train_batches=3)
    trainer.fit(make_module(), _random_loader())
    names = {name for name, _ in spy.logged}
    assert {"d2ft/compute_fraction", "d2ft/bytes_sent", "train/loss"} <= names
    assert [name for name, number in spy.logged if number] == []
    assert 0 < trainer.callback_metrics["d2ft/compute_fraction"] < 1  # still logged, as a mean over the steps


class SyncWatch(Callback):
    """Turns torch's sync debug mode on for the training steps of epochs 2+ (after the graph captures) and
    keeps, for every synchronising CUDA call, the innermost frames outside torch."""

    def __init__(self) -> None:
        self.sites: list[list[str]] = []
        self.steps = 0

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing CUDA operation" in str(message):
            frames = [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
                      for f in traceback.extract_stack()[:-1]
                      if "/torch/" not in f.filename and "warnings" not in f.filename]
            self.sites.append(frames[::-1][:4])

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.current_epoch >= 1:
            self.steps += 1
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, *args) -> None:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_steady_state_training_steps_on_one_gpu_make_no_host_sync_of_ours(tmp_path):
    """Lightning's own loop may sync (listed in the failure message); the strategy's and callback's per-step
    code (clipping by the global norm included), and logging through them, may not."""
    watch = SyncWatch()
    # whole epochs: epoch 2 revisits epoch 1's micro-batches, so every op pattern was captured before
    trainer = Trainer(accelerator="gpu", devices=1, strategy=D2FTStrategy(), precision="bf16-mixed",
                      callbacks=[_callback(tmp_path), watch], max_epochs=2, limit_val_batches=0, gradient_clip_val=1.0,
                      num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    module = make_module()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = watch._show
        trainer.fit(module, _random_loader())
    assert watch.steps > 0 and find_d2ft(module).graphs is not None
    # ours: made in our code, or a number logged by anyone (Lightning's __to_tensor copies it to the GPU)
    ours = [site for site in watch.sites if "lightning_d2ft/" in site[0] or "__to_tensor" in site[0]]
    assert not ours, f"{len(watch.sites)} syncs in {watch.steps} steps; ours: {ours}; all: {watch.sites}"
