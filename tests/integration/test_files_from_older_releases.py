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


def test_an_old_score_cache_is_recomputed_not_misread(tmp_path):
    """Issue 27: this cache holds weight_magnitude / fisher as d00f4a6 computed "fisher" (the squared mean
    gradient, now squared_gradient). Score caches are version 3 since, so it is ignored (with a warning) and
    the scores are recomputed, never read as the per-sample Fisher."""
    import pytest

    old = next(OLD.glob("d00f4a6-scores-*.pt"))
    shutil.copy(old, tmp_path / old.name.removeprefix("d00f4a6-"))
    payload = read_checked(old, 2, "score cache")
    assert payload["metrics"] == ["weight_magnitude", "fisher"] and _CACHE_VERSION == 3
    with pytest.warns(UserWarning, match="recomputing"):
        assert load_cached(tmp_path, payload["key"]) is None


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
