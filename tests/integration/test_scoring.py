"""The scoring pass in real 2-process fits (gloo): a tensor-parallel group scores together through the
sharded model, data-parallel replicas split the micro-batches, and both give the single-process scores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_d2ft import D2FTCallback, D2FTStrategy, Schedule
from lightning_d2ft.app.module import ViTClassifier
from lightning_d2ft.data.digits import DigitsDataModule
from lightning_d2ft.io import read_checked
from lightning_d2ft.scoring.scores import _CACHE_VERSION

pytestmark = pytest.mark.timeout(600)
SMALL = dict(img_size=16, patch_size=8, embed_dim=48, depth=2)  # 6 heads: 14 subnets


def _fit(tmp_path: Path, devices: int, tensor_parallel_size: int | str = "auto", **callback_kw) -> Path:
    """Fit a few steps; returns the run's score cache dir (rank 0 writes the gathered tables there)."""
    seed_everything(0)
    module = ViTClassifier(num_classes=10, subnets=14, model_kwargs=SMALL)
    strategy = D2FTStrategy(start_method="spawn", tensor_parallel_size=tensor_parallel_size) if devices > 1 \
        else D2FTStrategy(parallel_devices=[torch.device("cpu")])
    cache = tmp_path / "cache"
    callback = D2FTCallback(budget=0.6, backward_score="taylor", forward_score="fisher", cache_dir=cache,
                            progress=False, **callback_kw)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, callbacks=[callback], max_epochs=1,
                      limit_train_batches=3, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DigitsDataModule(img_size=16, batch_size=16, seed=0))
    return cache


def _tables(cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    (path,) = cache.glob("scores-*.pt")
    payload = read_checked(path, _CACHE_VERSION, "score cache")
    return payload["backward"], payload["forward"]


def _scored_rows(table: torch.Tensor) -> torch.Tensor:
    """Rows that were scored (the others hold the mean of the scored rows)."""
    mean = table.mean(0)
    return torch.tensor([not torch.allclose(row, mean) for row in table])


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    environ = dict(os.environ)
    tables = _tables(_fit(tmp_path_factory.mktemp("one"), devices=1))
    if torch.distributed.is_initialized():  # or the 2-process runs find its MASTER_PORT taken
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)
    return tables


def test_a_tensor_parallel_group_scores_together_and_gets_the_single_process_scores(tmp_path, single):
    back, fwd = _tables(_fit(tmp_path, devices=2, tensor_parallel_size=2))
    torch.testing.assert_close(back, single[0], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(fwd, single[1], rtol=1e-4, atol=1e-9)
    schedule = Schedule.load(tmp_path / "d2ft" / "schedule.pt")
    assert schedule.num_devices == 2 and schedule.info["scored_micro_batches"] == 3


def test_data_parallel_replicas_split_the_micro_batches_and_gather_them_once(tmp_path, single):
    back, fwd = _tables(_fit(tmp_path, devices=2, tensor_parallel_size=1))
    schedule = Schedule.load(tmp_path / "d2ft" / "schedule.pt")
    # each replica trains 3 batches of its own half: 6 micro-batches are scored, 3 by each replica
    assert schedule.info["scored_micro_batches"] == 6
    scored = _scored_rows(back)
    assert int(scored.sum()) == 6
    # a micro-batch scored in both runs gets the same numbers, whichever replica scored it
    both = scored & _scored_rows(single[0])
    assert both.any()
    torch.testing.assert_close(back[both], single[0][both], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(fwd[both], single[1][both], rtol=1e-4, atol=1e-9)
