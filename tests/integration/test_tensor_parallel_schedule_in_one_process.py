"""The ops alone decide what a fine-tune learns: a 2-process tensor-parallel fit and a 1-process fit executing
the same 2-device schedule reach the same weights (what lets the accuracy benchmark run multi-device
schedules in one process: benchmarks/accuracy/tp_schedule.py).

With weight decay: the optimizer skips a head group's Parameter that got no gradient, on one process as on a
shard, so decay touches the same groups in both (before per-group Parameters it decayed whole tensors, and the
two differed by lr x wd x |w| per step: 3.7e-6 after one step of lr 1e-3, wd 0.05)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from fits import SMALL, assert_same, digits_data, make_trainer, vit_state
from lightning.pytorch import seed_everything

from lightning_d2ft import D2FTCallback, Op, Schedule
from lightning_d2ft.app.module import ViTClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy"))
from tp_schedule import TensorParallelSchedule

pytestmark = pytest.mark.timeout(600)


def make_module() -> ViTClassifier:
    """fits.make_module's model, with SGD (AdamW's first steps divide by sqrt(v) ~ |g| and so turn the rounding
    of near-zero gradients, added in another order by the tensor-parallel sums, into differences of up to the
    learning rate) and weight decay (see the module docstring)."""
    seed_everything(0)
    return ViTClassifier(num_classes=10, subnets=14, lr=1e-3, optimizer="sgd", weight_decay=0.05, model_kwargs=SMALL)


def test_a_two_device_schedule_gives_the_same_weights_on_two_processes_and_in_one(tmp_path):
    cache = tmp_path / "cache"
    kw = dict(budget=0.5, cache_dir=cache, progress=False)
    parallel = make_module()
    make_trainer(tmp_path / "tp", devices=2, callbacks=[D2FTCallback(**kw)], limit_train_batches=6).fit(
        parallel, digits_data())
    single = make_module()
    one = TensorParallelSchedule(devices=2, **kw)  # the scores come from the cache the 2-process fit wrote
    make_trainer(tmp_path / "one", devices=1, callbacks=[one], limit_train_batches=6).fit(single, digits_data())

    tp_schedule = Schedule.load(tmp_path / "tp" / "d2ft" / "schedule.pt")
    assert one.schedule.num_devices == tp_schedule.num_devices == 2
    assert torch.equal(one.schedule.ops, tp_schedule.ops)  # the same 2-device schedule ...
    ops = tp_schedule.ops[:, tp_schedule.scheduled]
    assert (ops == Op.SHORTCUT).any() and (ops == Op.FORWARD_ONLY).any() and (ops == Op.FULL).any()
    assert_same(vit_state(single), vit_state(parallel))  # ... the same weights
    untouched = make_module()
    assert not torch.allclose(vit_state(single)["blocks.0.attn.qkv.weight"],
                              vit_state(untouched)["blocks.0.attn.qkv.weight"])  # and it did train
