"""The Hydra app behind ``python -m lightning_d2ft``: build model, data, callback and strategy from a config,
fine-tune, and print (and write as JSON) what the schedule saved and the accuracy reached."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from lightning_d2ft.callback import D2FTCallback
from lightning_d2ft.data import DigitsDataModule
from lightning_d2ft.datasets import FashionMNISTDataModule
from lightning_d2ft.module import ViTClassifier, build_vit
from lightning_d2ft.partition import D2FTViT
from lightning_d2ft.placement import speed_aware
from lightning_d2ft.pretrain import pretrained_checkpoint
from lightning_d2ft.scheduling import Schedule
from lightning_d2ft.strategy import D2FTStrategy

__all__ = ["build_datamodule", "check_model", "run"]
log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> DigitsDataModule | FashionMNISTDataModule:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    name = data.pop("name")
    if name == "fashion_mnist":
        return FashionMNISTDataModule(**data)
    if name != "digits":
        raise ValueError(f"unknown data set {name!r}; choose 'digits' or 'fashion_mnist'")
    return DigitsDataModule(**data)


def check_model(name: str, kwargs: dict, subnets: int | None) -> None:
    """Build the model's skeleton on the meta device (no memory, no download) to check that it is a
    supported transformer and that ``subnets`` fits it, before any data, pretraining or fit."""
    with torch.device("meta"):
        D2FTViT(build_vit(name, num_classes=2, **kwargs), subnets=subnets)


def _resume_path(cfg: DictConfig, out: Path) -> str | None:
    """``auto``/``last``: the newest checkpoint in this run directory (epoch-end or step), if any."""
    if cfg.resume in (None, "", "none"):
        return None
    if cfg.resume in ("auto", "last"):
        found = [p for p in (out / "checkpoints" / "last.ckpt", out / "checkpoints" / "last-step.ckpt") if p.exists()]
        if not found:
            return None
        # mmap: reads the step without loading every tensor (Lightning loads the chosen one afterwards)
        newest = max(found, key=lambda p: torch.load(p, map_location="cpu", weights_only=False,
                                                      mmap=True)["global_step"])
        log.warning(f"resuming from {newest}")
        return str(newest)
    return str(cfg.resume)


def _checkpoints(out: Path, every_n_steps: int | None) -> list[ModelCheckpoint]:
    """last.ckpt at every epoch end, and last-step.ckpt every ``every_n_steps`` (a crash loses at most that)."""
    epochs = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, every_n_epochs=1, save_top_k=0)
    if not every_n_steps:
        return [epochs]
    steps = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, every_n_train_steps=every_n_steps,
                            save_top_k=0)
    steps.CHECKPOINT_NAME_LAST = "last-step"
    return [epochs, steps]


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """One fine-tune; returns the summary it also writes to ``out/results.json``. With ``skip_existing``
    a run directory that already holds a results.json is not run again (resumable sweeps)."""
    if cfg.get("skip_existing") and (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    m, s, t = cfg.model, cfg.schedule, cfg.trainer
    # built first: it checks the schedule settings before any heavy work (data, pretraining, fit)
    callback = D2FTCallback(budget=s.budget, backward_score=s.backward_score, forward_score=s.forward_score,
                            solver=s.solver, method=s.method, comm_budget=s.comm_budget, forward_mix=s.forward_mix,
                            score_every=s.score_every, cache_dir=s.cache_dir, seed=cfg.seed,
                            lora_rank=s.get("lora_rank"), lora_alpha=s.get("lora_alpha"))
    kwargs = OmegaConf.to_container(m.kwargs, resolve=True)
    check_model(m.name, kwargs, s.subnets)
    seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    checkpoint = m.checkpoint
    if checkpoint is None and m.get("pretrain") is not None:  # pretrain here, once, on other digits
        p = m.pretrain
        checkpoint = str(pretrained_checkpoint(p.cache_dir, m.name, kwargs, list(p.classes), epochs=p.epochs,
                                               lr=p.lr, seed=cfg.seed))
    module = ViTClassifier(model=m.name, num_classes=dm.num_classes, subnets=s.subnets, pretrained=m.pretrained,
                           checkpoint=checkpoint, lr=m.lr, weight_decay=m.weight_decay, optimizer=m.optimizer,
                           model_kwargs=kwargs)
    speeds = t.get("speeds")
    strategy = D2FTStrategy(tensor_parallel_size=t.tensor_parallel_size, start_method=t.start_method,
                            data_parallel=t.get("data_parallel", "sync"),
                            placement=speed_aware(list(speeds)) if speeds else None) \
        if t.devices > 1 else "auto"
    checkpoints = _checkpoints(out, t.get("checkpoint_every_n_steps"))
    trainer = Trainer(accelerator=t.accelerator, devices=t.devices, strategy=strategy, max_epochs=t.max_epochs,
                      precision=t.precision, accumulate_grad_batches=t.accumulate_grad_batches,
                      limit_train_batches=t.limit_train_batches, log_every_n_steps=t.log_every_n_steps,
                      callbacks=[callback, *checkpoints], default_root_dir=out, logger=CSVLogger(out, name="logs"),
                      deterministic=True)
    start = time.perf_counter()
    trainer.fit(module, dm, ckpt_path=_resume_path(cfg, out))
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    schedule = callback.schedule or Schedule.load(out / "d2ft" / "schedule.pt")
    result = {
        "val_acc": metrics.get("val/acc"),
        "compute_fraction": schedule.compute_fraction,
        "comm_fraction": schedule.comm_fraction,
        "wire_fraction": schedule.wire_fraction,
        "workload_variance": schedule.workload_variance,
        "bytes_sent_rank0_last_epoch": metrics.get("d2ft/bytes_sent_epoch"),
        "scoring_seconds": schedule.info.get("scoring_seconds"),
        "fit_seconds": seconds,
        "budget": s.budget, "subnets": s.subnets, "method": s.method, "devices": t.devices,
        "last_checkpoint": str(out / "checkpoints" / "last.ckpt"),
    }
    if trainer.is_global_zero:
        (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def print_summary(result: dict[str, Any]) -> None:
    print("\n=== D2FT fine-tune ===")
    print(f"method {result['method']}, budget {result['budget']}, {result['subnets']} subnets, "
          f"{result['devices']} devices")
    print(f"compute: {result['compute_fraction']:.3f} of full fine-tuning "
          f"({1 - result['compute_fraction']:.0%} saved)")
    print(f"communication: {result['wire_fraction']:.3f} of full fine-tuning on the wire "
          f"({1 - result['wire_fraction']:.0%} saved); per-item cost model {result['comm_fraction']:.3f}")
    if result["val_acc"] is not None:
        print(f"validation top-1 accuracy: {result['val_acc']:.2%}")
    scoring = result["scoring_seconds"] or 0.0
    print(f"scoring pass {scoring:.1f} s, fit {result['fit_seconds']:.1f} s")
