"""Shared pieces of the 2-process fits: a tiny ViTClassifier on digits, D2FTStrategy trainers, and the
independent single-process plain timm (and plain per-group LoRA) references they are compared with."""

from __future__ import annotations

import types
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

from lightning_d2ft import D2FTCallback, D2FTStrategy
from lightning_d2ft.app.module import ViTClassifier
from lightning_d2ft.data.digits import DigitsDataModule
from lightning_d2ft.data.micro_batches import MicroBatchSampler
from lightning_d2ft.model.lora import add_lora_

SMALL = dict(img_size=16, patch_size=8, embed_dim=48, depth=2)  # 6 heads of width 8, 5 tokens


def make_module(seed: int = 0, optimizer: str = "adamw") -> ViTClassifier:
    seed_everything(seed)
    return ViTClassifier(num_classes=10, subnets=14, lr=1e-3, optimizer=optimizer, model_kwargs=SMALL)


def digits_data(batch: int = 16, img: int = 16) -> DigitsDataModule:
    return DigitsDataModule(img_size=img, batch_size=batch, seed=0)


def make_trainer(tmp_path: Path, devices: int = 2, callbacks=(), strategy_kw=None, **kw) -> Trainer:
    strategy_kw = strategy_kw or {}
    strategy = D2FTStrategy(start_method="spawn", **strategy_kw) if devices > 1 \
        else D2FTStrategy(parallel_devices=[torch.device("cpu")], **strategy_kw)
    kw = {"max_epochs": 1, "num_sanity_val_steps": 0, "limit_val_batches": 0, **kw}
    return Trainer(accelerator="cpu", devices=devices, strategy=strategy, callbacks=list(callbacks),
                   default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   deterministic=True, **kw)


def d2ft_callback(budget: float, tmp_path: Path) -> D2FTCallback:
    return D2FTCallback(budget=budget, cache_dir=tmp_path / "cache", progress=False)


def plain_lora_qkv(self, x: torch.Tensor) -> torch.Tensor:
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


def plain_timm_reference(steps: int, optimizer: str, accumulate: int = 1, replica: tuple[int, int] = (1, 0),
                          lora_rank: int | None = None) -> dict[str, torch.Tensor]:
    """Single-process plain timm fine-tuning over the same micro-batches in the same order (an optimizer
    step every ``accumulate`` micro-batches, on the mean of their losses, as Lightning does); ``replica``
    (replicas, rank): only that data-parallel replica's share of the micro-batches; ``lora_rank``: plain
    LoRA (per head group, base frozen) on every ``qkv``."""
    module = make_module(optimizer=optimizer)
    vit = module.net.vit
    if lora_rank is not None:
        add_lora_(module.net, lora_rank)
        for blk in vit.blocks:
            blk.attn.qkv.forward = types.MethodType(plain_lora_qkv, blk.attn.qkv)
    dm = digits_data()
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


def vit_state(module: ViTClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.net.vit.state_dict().items()}


def assert_same(a: dict, b: dict, atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)
