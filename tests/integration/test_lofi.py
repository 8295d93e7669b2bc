"""lo-fi data parallelism: independent replicas, weights averaged, against plain timm replicas averaged."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

from lightning_d2ft import D2FTCallback, D2FTStrategy
from lightning_d2ft.data import DigitsDataModule, MicroBatchSampler
from lightning_d2ft.lora import add_lora_
from lightning_d2ft.module import ViTClassifier

pytestmark = pytest.mark.timeout(600)
SMALL = dict(img_size=16, patch_size=8, embed_dim=48, depth=2)  # 6 heads of width 8, 5 tokens


def _module(seed: int = 0, optimizer: str = "adamw") -> ViTClassifier:
    seed_everything(seed)
    return ViTClassifier(num_classes=10, subnets=14, lr=1e-3, optimizer=optimizer, model_kwargs=SMALL)


def _data(batch: int = 16, img: int = 16) -> DigitsDataModule:
    return DigitsDataModule(img_size=img, batch_size=batch, seed=0)


def _trainer(tmp_path: Path, devices: int = 2, callbacks=(), strategy_kw=None, **kw) -> Trainer:
    strategy_kw = strategy_kw or {}
    strategy = D2FTStrategy(start_method="spawn", **strategy_kw) if devices > 1 \
        else D2FTStrategy(parallel_devices=[torch.device("cpu")], **strategy_kw)
    kw = {"max_epochs": 1, "num_sanity_val_steps": 0, "limit_val_batches": 0, **kw}
    return Trainer(accelerator="cpu", devices=devices, strategy=strategy, callbacks=list(callbacks),
                   default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   deterministic=True, **kw)


def _d2ft(budget: float, tmp_path: Path) -> D2FTCallback:
    return D2FTCallback(budget=budget, cache_dir=tmp_path / "cache", progress=False)


def _plain_lora_qkv(self, x: torch.Tensor) -> torch.Tensor:
    """A plain per-head-group LoRA ``qkv`` (written here independently of partition.py): every group's
    rows of the weight get ``scale * B_g @ A_g``."""
    r, groups = self.lora_B.shape[1], self.lora_A.shape[0] // self.lora_B.shape[1]
    rows = self.out_features // (3 * groups)
    delta = torch.zeros_like(self.weight)
    for t in range(3):
        for g in range(groups):
            start = t * groups * rows + g * rows
            delta[start : start + rows] = self.lora_B[start : start + rows] @ self.lora_A[g * r : (g + 1) * r]
    return F.linear(x, self.weight + self.lora_scale * delta, self.bias)


def _plain_timm_reference(steps: int, optimizer: str, accumulate: int = 1, replica: tuple[int, int] = (1, 0),
                          lora_rank: int | None = None) -> dict[str, torch.Tensor]:
    """Single-process plain timm fine-tuning over the same micro-batches in the same order (an optimizer
    step every ``accumulate`` micro-batches, on the mean of their losses, as Lightning does); ``replica``
    (replicas, rank): only that data-parallel replica's share of the micro-batches; ``lora_rank``: plain
    LoRA (per head group, base frozen) on every ``qkv``."""
    module = _module(optimizer=optimizer)
    vit = module.net.vit
    if lora_rank is not None:
        add_lora_(module.net, lora_rank)
        for blk in vit.blocks:
            blk.attn.qkv.forward = types.MethodType(_plain_lora_qkv, blk.attn.qkv)
    dm = _data()
    dm.setup()
    sampler = MicroBatchSampler(dm.train_set, 16, seed=0)
    sampler.set_replicas(*replica)
    opt = module.configure_optimizers()
    opt.zero_grad()
    for i, mb in enumerate(sampler.micro_batch_ids(0)[:steps]):
        x, y = dm.train_set[sampler.micro_batches[mb]]
        (F.cross_entropy(vit(x), y) / accumulate).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
    return {k: v.detach() for k, v in vit.state_dict().items()}


def _vit_state(module: ViTClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.net.vit.state_dict().items()}


def _assert_same(a: dict, b: dict, atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


def _lofi_reference(steps: int, every: int, dm: DigitsDataModule) -> dict[str, torch.Tensor]:
    """Two plain timm replicas on the two data halves in one process, parameters averaged every ``every``
    steps and at the end (optimizer state stays per replica)."""
    dm.setup()
    replicas = []
    for rank in range(2):
        module = _module(optimizer="sgd")
        sampler = MicroBatchSampler(dm.train_set, 16, seed=0)
        sampler.set_replicas(2, rank)
        replicas.append((module.net.vit, module.configure_optimizers(), sampler.micro_batch_ids(0), sampler))
    for step in range(steps):
        for vit, opt, ids, sampler in replicas:
            x, y = dm.train_set[sampler.micro_batches[ids[step]]]
            opt.zero_grad()
            F.cross_entropy(vit(x), y).backward()
            opt.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            with torch.no_grad():
                for a, b in zip(replicas[0][0].parameters(), replicas[1][0].parameters()):
                    a.copy_((a + b) / 2)
                    b.copy_(a)
    return {k: v.detach() for k, v in replicas[0][0].state_dict().items()}


def test_lofi_averaging_every_k_steps_matches_two_replicas_averaged_as_often(tmp_path):
    small = dict(img_size=16, batch_size=16, seed=0, train_per_class=16)  # 10 micro-batches: 5 per replica
    module = _module(optimizer="sgd")
    trainer = _trainer(tmp_path, callbacks=[_d2ft(1.0, tmp_path)], limit_val_batches=1,
                       strategy_kw=dict(tensor_parallel_size=1, data_parallel="lofi", lofi_average_every_n_steps=2))
    trainer.fit(module, DigitsDataModule(**small))
    _assert_same(_vit_state(module), _lofi_reference(steps=5, every=2, dm=DigitsDataModule(**small)))
    # each replica's epoch is its half of the micro-batches (5 steps, as the reference), and Lightning knows
    # it: the epoch-end validation runs
    assert "val/acc" in trainer.callback_metrics


def test_lofi_two_replicas_equal_the_average_of_two_independent_runs_on_the_data_halves(tmp_path):
    module = _module(optimizer="sgd")
    # validation after every 2 steps evaluates the average but must not change what the replicas train
    _trainer(tmp_path, callbacks=[_d2ft(1.0, tmp_path)], limit_train_batches=4, limit_val_batches=2,
             val_check_interval=2, strategy_kw=dict(tensor_parallel_size=1, data_parallel="lofi")).fit(module, _data())
    halves = [_plain_timm_reference(steps=4, optimizer="sgd", replica=(2, r)) for r in range(2)]
    _assert_same(_vit_state(module), {k: (halves[0][k] + halves[1][k]) / 2 for k in halves[0]})
    # the replicas really drifted apart, so matching their mean is not a trivial check
    with pytest.raises(AssertionError):
        _assert_same(halves[0], halves[1])


