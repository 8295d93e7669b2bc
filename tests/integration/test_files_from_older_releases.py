"""Files written by an older release still load: a checkpoint, a schedule file and a score cache written by
the code at d00f4a6, before the package moved into subpackages (``tests/fixtures/d00f4a6/make_fixtures.py``
wrote them, run against that commit)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from lightning_d2ft import D2FTCallback, D2FTStrategy, Schedule
from lightning_d2ft.app.module import ViTClassifier
from lightning_d2ft.data.digits import DigitsDataModule
from lightning_d2ft.io import checked_checkpoint, read_checked
from lightning_d2ft.scoring.scores import _CACHE_VERSION, load_cached

OLD = Path(__file__).parent.parent / "fixtures" / "d00f4a6"
SMALL = dict(img_size=16, patch_size=8, embed_dim=48, depth=2)


def test_an_old_schedule_file_loads():
    schedule = Schedule.load(OLD / "d00f4a6-schedule.pt")
    assert schedule.ops.shape == (3, 14) and 0.5 < schedule.compute_fraction < 0.7


def test_an_old_score_cache_loads_under_its_key(tmp_path):
    old = next(OLD.glob("d00f4a6-scores-*.pt"))
    shutil.copy(old, tmp_path / old.name.removeprefix("d00f4a6-"))
    key = read_checked(old, _CACHE_VERSION, "score cache")["key"]
    scores = load_cached(tmp_path, key)
    assert scores is not None and scores.backward.shape == (3, 14)


def test_an_old_checkpoint_resumes_a_fit(tmp_path):
    ckpt = checked_checkpoint(OLD / "d00f4a6.ckpt")
    assert ckpt["global_step"] == 2
    module = ViTClassifier(num_classes=10, subnets=14, lr=1e-3, model_kwargs=SMALL)
    dm = DigitsDataModule(img_size=16, batch_size=64, seed=0, train_per_class=20)
    callback = D2FTCallback(budget=0.6, solver="dp", cache_dir=tmp_path / "cache", progress=False)
    trainer = Trainer(accelerator="cpu", devices=1, strategy=D2FTStrategy(parallel_devices=[torch.device("cpu")]),
                      callbacks=[callback], max_steps=3, default_root_dir=tmp_path, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0)
    trainer.fit(module, dm, ckpt_path=OLD / "d00f4a6.ckpt", weights_only=True)
    assert trainer.global_step == 3
    assert callback.scored_micro_batches == 0  # the schedule came with the checkpoint: no scoring pass
    restored = Schedule.load(OLD / "d00f4a6-schedule.pt")
    assert torch.equal(callback.schedule.ops, restored.ops)
