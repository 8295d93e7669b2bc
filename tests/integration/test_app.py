"""The Hydra app from the command line: one run, and a 2-point multirun sweep (2 CPU processes each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[2]
# the package of this checkout, whatever the cwd (a relative PYTHONPATH=. would resolve against tmp_path)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
TINY = ["model.kwargs.img_size=16", "model.kwargs.embed_dim=48", "+model.kwargs.depth=2", "model.subnets=14",
        "trainer.max_epochs=1", "trainer.limit_train_batches=4", "data.batch_size=16", "model.pretrain.epochs=1"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lightning_d2ft", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=800, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_single_run_prints_savings_and_accuracy(tmp_path):
    proc = _run([*TINY, f"hydra.run.dir={tmp_path}/run", f"schedule.cache_dir={tmp_path}/cache",
                 f"model.pretrain.cache_dir={tmp_path}/pretrained"], tmp_path)
    assert "compute: 0.600 of full fine-tuning (40% saved)" in proc.stdout
    assert "validation top-1 accuracy" in proc.stdout
    assert f"outputs: {tmp_path / 'run'}" in proc.stdout  # the app says where its outputs went
    assert "per tensor-parallel shard (1 of 2 ranks); the whole model has" in proc.stdout + proc.stderr
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["compute_fraction"] == pytest.approx(0.6, abs=0.01) and 0 <= result["val_acc"] <= 1
    assert (tmp_path / "run" / "d2ft" / "schedule.png").exists()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()

    # the same command again (here asking for one more epoch) continues from the run's last checkpoint
    again = _run([*TINY, "trainer.max_epochs=2", f"hydra.run.dir={tmp_path}/run",
                  f"schedule.cache_dir={tmp_path}/cache",
                  f"model.pretrain.cache_dir={tmp_path}/pretrained"], tmp_path)
    assert "resuming from" in again.stdout + again.stderr
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 8  # 4 new steps on top of the first run's 4


def test_multirun_sweeps_the_budget(tmp_path):
    # ranks declared unequal in the config: speed-aware placement and capacities, same budgets
    _run(["-m", *TINY, "schedule.budget=0.5,1.0", "trainer.speeds=[2.0,1.0]", f"hydra.sweep.dir={tmp_path}/sweep",
          f"schedule.cache_dir={tmp_path}/cache", f"model.pretrain.cache_dir={tmp_path}/pretrained"], tmp_path)
    results = sorted(json.loads(p.read_text())["compute_fraction"] for p in (tmp_path / "sweep").rglob("results.json"))
    # within the budget; per (device, micro-batch) capacities round to whole items on ranks of unequal speed
    assert 0.45 <= results[0] <= 0.5 and results[1] == pytest.approx(1.0)
    # the Hydra callback summarised the sweep in its directory
    table = (tmp_path / "sweep" / "summary.md").read_text()
    assert "schedule.budget=0.5" in table and "schedule.budget=1.0" in table
    assert (tmp_path / "sweep" / "summary.csv").exists() and (tmp_path / "sweep" / "summary.png").exists()


def test_help_lists_config_groups(tmp_path):
    proc = _run(["--help"], tmp_path)
    for group in ("model:", "data:", "schedule:", "trainer:"):
        assert group in proc.stdout
    assert proc.stdout.startswith("lightning_d2ft: Distributed Dynamic Fine-Tuning")
    assert "powered by Hydra" not in proc.stdout and "gpu1" in proc.stdout


def test_bad_subnets_fail_before_any_data_or_pretraining(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lightning_d2ft", "model.subnets=27",
                           f"hydra.run.dir={tmp_path}/run",
                           f"model.pretrain.cache_dir={tmp_path}/pretrained"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode != 0
    assert "subnets=27 is not valid" in proc.stderr + proc.stdout and "{14, 26, 38, 74}" in proc.stderr + proc.stdout
    assert not (tmp_path / "pretrained").exists()


def test_bad_budget_fails_fast_with_a_clear_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lightning_d2ft", "schedule.budget=1.5", f"hydra.run.dir={tmp_path}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode != 0
    assert "budget must be a fraction of the all-FULL cost in (0, 1], got 1.5" in proc.stderr + proc.stdout
