"""The Hydra app behind ``python -m lightning_d2ft``: build model, data, callback and strategy from a config,
fine-tune, and print (and write as JSON) what the schedule saved and the accuracy reached."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch import LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from lightning_d2ft.app.checkpoints import RunCheckpoint
from lightning_d2ft.app.config import check_config, check_trainer_extra
from lightning_d2ft.app.module import ShardedModelSummary, ViTClassifier, build_vit
from lightning_d2ft.app.pretrain import pretrained_checkpoint
from lightning_d2ft.callback import D2FTCallback
from lightning_d2ft.data.digits import DigitsDataModule
from lightning_d2ft.data.fashion_mnist import FashionMNISTDataModule
from lightning_d2ft.io import atomic_write, checked_checkpoint, newest_checkpoint
from lightning_d2ft.model.vit import D2FTViT, find_d2ft
from lightning_d2ft.parallel.placement import speed_aware
from lightning_d2ft.schedule.schedule import Schedule
from lightning_d2ft.schedule.settings import ScheduleSettings
from lightning_d2ft.strategy.strategy import D2FTStrategy

__all__ = ["DATAMODULES", "build_datamodule", "check_model", "check_run_dir", "print_summary", "run"]
log = logging.getLogger(__name__)


# data set name -> LightningDataModule class taking the other ``data.*`` fields as keyword arguments
DATAMODULES: dict[str, Callable[..., LightningDataModule]] = {"digits": DigitsDataModule,
                                                               "fashion_mnist": FashionMNISTDataModule}
# the settings a run directory's checkpoints and schedule belong to: a rerun there must not change them
RUN_IDENTITY = ("schedule", "model.name", "model.subnets", "model.kwargs", "data", "seed")


def build_datamodule(cfg: DictConfig) -> LightningDataModule:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    name = data.pop("name")
    if name not in DATAMODULES:
        raise ValueError(f"data.name={name!r} is not known; choose one of {sorted(DATAMODULES)}")
    return DATAMODULES[name](**data)


def check_model(name: str, kwargs: dict, subnets: int | None) -> None:
    """Build the model's skeleton on the meta device (no memory, no download) to check that it is a
    supported transformer and that ``subnets`` fits it, before any data, pretraining or fit."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(name):
        raise ValueError(f"model.name={name!r} is not a timm model; use a timm VisionTransformer such as "
                         "'vit_small_patch16_224' (timm.list_models('vit_*') lists them)")
    with torch.device("meta"):
        try:
            vit = build_vit(name, num_classes=2, **kwargs)
        except TypeError as err:
            raise ValueError(f"model.name={name!r} with model.kwargs={kwargs} cannot be built: {err}; D2FT "
                             "needs a timm VisionTransformer such as 'vit_small_patch16_224'") from err
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"model.name={name!r} is a {type(vit).__name__}, not a timm VisionTransformer; "
                             "D2FT cuts attention heads into subnets (use e.g. 'vit_small_patch16_224')")
        D2FTViT(vit, subnets=subnets)


def check_run_dir(cfg: DictConfig, out: Path, resuming: bool) -> None:
    """A rerun in a run directory that holds checkpoints resumes them, so it must ask for the same schedule
    and model; otherwise results.json would report settings that never ran. Refuse, naming both values."""
    record = out / "d2ft" / "run_settings.json"
    identity = {key: OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)
                if isinstance(OmegaConf.select(cfg, key), DictConfig) else OmegaConf.select(cfg, key)
                for key in RUN_IDENTITY}
    identity["schedule"] = {k: v for k, v in identity["schedule"].items() if k not in ("cache_dir", "subnets")}
    if resuming and record.exists():
        before = _flatten(json.loads(record.read_text()))
        if "schedule.subnets" in before:  # a record written before the subnet count moved to the model
            before.setdefault("model.subnets", before.pop("schedule.subnets"))
        changed = [f"{k}: {before.get(k)!r} in this run directory, {v!r} asked"
                   for k, v in _flatten(identity).items() if before.get(k) != v]
        if changed:
            raise ValueError(f"{out} belongs to a run with other settings ({'; '.join(changed)}). Start fresh "
                             "with another hydra.run.dir=..., or resume=null to overwrite this one")
    atomic_write(record, json.dumps(identity, indent=2, sort_keys=True).encode())


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


def _resume_path(cfg: DictConfig, out: Path) -> str | None:
    """``auto``/``last``: the newest usable checkpoint in this run directory (epoch-end or step), if any; a
    truncated, NaN/inf or code-carrying one is skipped with a warning naming it. An explicit path must be
    usable, or the run is refused naming it."""
    if cfg.resume in (None, "", "none"):
        return None
    if cfg.resume in ("auto", "last"):
        newest = newest_checkpoint([out / "checkpoints" / "last.ckpt", out / "checkpoints" / "last-step.ckpt"])
        if newest is not None:
            log.warning(f"resuming from {newest}")
        return None if newest is None else str(newest)
    checked_checkpoint(cfg.resume)  # refuses, naming the file
    return str(cfg.resume)


def _checkpoints(out: Path, every_n_steps: int | None) -> list[RunCheckpoint]:
    """last.ckpt at every epoch end, and last-step.ckpt every ``every_n_steps`` (a crash loses at most that)."""
    epochs = RunCheckpoint(out / "checkpoints", "last", every_n_epochs=1)
    if not every_n_steps:
        return [epochs]
    return [epochs, RunCheckpoint(out / "checkpoints", "last-step", every_n_train_steps=every_n_steps)]


def _callback(cfg: DictConfig, settings: ScheduleSettings) -> D2FTCallback:
    s = cfg.schedule
    return D2FTCallback(settings=settings, cache_dir=s.cache_dir, seed=cfg.seed,
                        lora_rank=s.get("lora_rank"), lora_alpha=s.get("lora_alpha"))


def _module(cfg: DictConfig, dm: LightningDataModule, kwargs: dict) -> ViTClassifier:
    m = cfg.model
    checkpoint = m.checkpoint
    if checkpoint is None and m.get("pretrain") is not None:  # pretrain here, once, on other digits
        p = m.pretrain
        checkpoint = str(pretrained_checkpoint(p.cache_dir, m.name, kwargs, list(p.classes), epochs=p.epochs,
                                               lr=p.lr, seed=cfg.seed))
    return ViTClassifier(model=m.name, num_classes=dm.num_classes, subnets=m.subnets,
                         pretrained=m.pretrained, checkpoint=checkpoint, lr=m.lr, weight_decay=m.weight_decay,
                         optimizer=m.optimizer, model_kwargs=kwargs)


def _trainer(cfg: DictConfig, out: Path, callbacks: list) -> Trainer:
    """D2FTStrategy on every device count (one device too: atomic checkpoints, the NaN guard); any other
    Trainer argument comes from ``trainer.extra`` and wins over the app's own."""
    t = cfg.trainer
    speeds = t.get("speeds")
    # one device runs in this process (popen launches nobody for rank 0): no spawned copy of the run
    extra = OmegaConf.to_container(t.extra, resolve=True) if "extra" in t else {}
    start_method = "popen" if t.devices == 1 and extra.get("num_nodes", 1) == 1 else t.start_method
    strategy = D2FTStrategy(tensor_parallel_size=t.tensor_parallel_size, start_method=start_method,
                            data_parallel=t.get("data_parallel", "sync"),
                            placement=speed_aware(list(speeds)) if speeds else None)
    kwargs = dict(accelerator=t.accelerator, devices=t.devices, strategy=strategy, max_epochs=t.max_epochs,
                  precision=t.precision, accumulate_grad_batches=t.accumulate_grad_batches,
                  limit_train_batches=t.limit_train_batches, log_every_n_steps=t.log_every_n_steps,
                  callbacks=callbacks, default_root_dir=out, logger=CSVLogger(out, name="logs"), deterministic=True)
    check_trainer_extra(extra)
    if extra.get("enable_model_summary", True):  # says that its counts are per shard, with the total
        kwargs["callbacks"] = [*kwargs["callbacks"], ShardedModelSummary()]
    if extra.get("enable_progress_bar", True):
        kwargs["callbacks"] = [*kwargs["callbacks"], TQDMProgressBar(refresh_rate=t.progress_refresh_rate)]
    return Trainer(**{**kwargs, **extra})


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """One fine-tune; returns the summary it also writes to ``out/results.json``. With ``skip_existing``
    a run directory that already holds a results.json is not run again (resumable sweeps)."""
    if cfg.get("skip_existing") and (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    # every check before any heavy work (data, pretraining, scoring, fit)
    settings = check_config(cfg)  # the schedule's settings, validated by ScheduleSettings
    callback = _callback(cfg, settings)
    kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    check_model(cfg.model.name, kwargs, cfg.model.subnets)
    dm = build_datamodule(cfg)
    ckpt_path = _resume_path(cfg, out)
    check_run_dir(cfg, out, resuming=ckpt_path is not None and cfg.resume in ("auto", "last"))
    checkpoints = _checkpoints(out, cfg.trainer.get("checkpoint_every_n_steps"))
    # the Trainer refuses its own bad settings (a tensor-parallel size that does not divide the devices, say)
    # when it is built: before pretraining, which takes minutes
    trainer = _trainer(cfg, out, [callback, *checkpoints])
    seed_everything(cfg.seed, workers=True)
    module = _module(cfg, dm, kwargs)
    start = time.perf_counter()
    trainer.fit(module, dm, ckpt_path=ckpt_path, weights_only=True)  # a checkpoint cannot run code
    seconds = time.perf_counter() - start
    result = _result(cfg, trainer, callback, out, seconds, ckpt_path)
    if trainer.is_global_zero:
        atomic_write(out / "results.json", json.dumps(result, indent=2).encode())
    return result


def _result(cfg: DictConfig, trainer: Trainer, callback: D2FTCallback, out: Path, seconds: float,
            resumed_from: str | None) -> dict[str, Any]:
    s = cfg.schedule
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    schedule = callback.schedule or Schedule.load(out / "d2ft" / "schedule.pt")
    newest = newest_checkpoint([out / "checkpoints" / "last.ckpt", out / "checkpoints" / "last-step.ckpt"])
    return {
        "val_acc": metrics.get("val/acc"),
        **schedule.metrics(),  # compute (and, on 2+ devices, wire) fractions, balance, FULL dynamics, solve time
        "bytes_sent_all_ranks_last_epoch": metrics.get("d2ft/bytes_sent"),
        "scoring_seconds": schedule.info.get("scoring_seconds"),
        "fit_seconds": seconds,
        "budget": s.budget, "subnets": find_d2ft(trainer.lightning_module).num_subnets, "method": s.method,
        "devices": cfg.trainer.devices,
        "tensor_parallel_size": getattr(trainer.strategy, "tensor_parallel_size", None),
        "last_checkpoint": str(newest) if newest is not None else None,
        "output_dir": str(out),
        "resumed_from": resumed_from,  # the schedule (and its scoring time) came with this checkpoint
    }


def _full_dynamics(result: dict[str, Any]) -> str:
    """How dynamic the FULL set was, from a results.json: subnets never FULL, distinct FULL sets, and the
    subnets of each block FULL at least once."""
    blocks = sorted((int(k.rsplit("_", 1)[1]), int(v)) for k, v in result.items() if k.startswith("ever_full_block_"))
    line = (f"FULL dynamics: {int(result['never_full_subnets'])} subnets never FULL, "
            f"{int(result['distinct_full_sets'])} distinct FULL set(s)")
    if blocks:
        line += "; subnets ever FULL per block: " + " ".join(str(n) for _, n in blocks)
    return line


def print_summary(result: dict[str, Any]) -> None:
    print("\n=== D2FT fine-tune ===")
    print(f"method {result['method']}, budget {result['budget']}, {result['subnets']} subnets, "
          f"{result['devices']} devices")
    print(f"compute: {result['compute_fraction']:.3f} of full fine-tuning "
          f"({1 - result['compute_fraction']:.0%} saved)")
    tp = result.get("tensor_parallel_size")
    wire = result.get("wire_fraction")  # the one communication figure; a one-device schedule has none
    if wire is not None and (result["devices"] if tp is None else tp) > 1:
        print(f"communication: {wire:.3f} of full fine-tuning on the wire ({1 - wire:.0%} saved)")
    if result.get("never_full_subnets") is not None:
        print(_full_dynamics(result))
    if result["val_acc"] is not None:
        print(f"validation top-1 accuracy: {result['val_acc']:.2%}")
    scoring = result["scoring_seconds"]
    scored = f"scoring pass {scoring:.1f} s" if scoring else "no scoring pass (scores from the cache)"
    if result.get("resumed_from"):  # the schedule came with the checkpoint: its scoring ran before the stop
        scored = f"scoring pass {scoring or 0.0:.1f} s before the resume"
    print(f"{scored}, fit {result['fit_seconds']:.1f} s")
    if result.get("output_dir"):
        print(f"outputs: {result['output_dir']} (results.json, checkpoints/, d2ft/, logs/)")
