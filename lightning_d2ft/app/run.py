"""The Hydra app behind ``python -m lightning_d2ft``: build model, data, callback and strategy from a config,
fine-tune, and print (and write as JSON) what the schedule saved and the accuracy reached."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from lightning.pytorch import LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from lightning_d2ft.app.checkpoints import METRICS_KEY, RunCheckpoint, RunRecord
from lightning_d2ft.app.config import check_config, check_trainer_extra
from lightning_d2ft.app.module import ShardedModelSummary, ViTClassifier, build_vit
from lightning_d2ft.app.preflight import DataCheck, check_inputs, degenerate_settings
from lightning_d2ft.app.pretrain import pretrained_checkpoint
from lightning_d2ft.app.run_dir import (
    RECORD,
    RunDirBusyError,
    RunDirLock,
    checkpoint_paths,
    launching_process,
    lineage_of,
    move_aside,
    new_lineage,
    probe_writable,
    read_json,
    run_files,
)
from lightning_d2ft.callback import D2FTCallback
from lightning_d2ft.data.digits import DigitsDataModule
from lightning_d2ft.data.fashion_mnist import FashionMNISTDataModule
from lightning_d2ft.io import atomic_write, checked_checkpoint, newest_checkpoint, remove_stale_temp_files
from lightning_d2ft.model.vit import D2FTViT
from lightning_d2ft.parallel.placement import speed_aware
from lightning_d2ft.schedule.resume import schedule_from_state
from lightning_d2ft.schedule.schedule import Schedule
from lightning_d2ft.schedule.settings import ScheduleSettings
from lightning_d2ft.strategy.strategy import D2FTStrategy

__all__ = ["DATAMODULES", "build_datamodule", "check_model", "check_run_dir", "print_summary", "run"]
log = logging.getLogger(__name__)


# data set name -> LightningDataModule class taking the other ``data.*`` fields as keyword arguments
DATAMODULES: dict[str, Callable[..., LightningDataModule]] = {"digits": DigitsDataModule,
                                                               "fashion_mnist": FashionMNISTDataModule}
# the settings a run directory's checkpoints and schedule belong to: a rerun there must not change them
RUN_IDENTITY = ("schedule", "model.name", "model.subnets", "model.kwargs", "model.optimizer", "model.lr",
                "model.lora_lr", "model.weight_decay", "data", "seed")
# the checkpoint's hyper-parameters (ViTClassifier's) and the settings they come from
_CHECKPOINT_SETTINGS = {"model": "model.name", "model_kwargs": "model.kwargs", "optimizer": "model.optimizer",
                        "lr": "model.lr", "weight_decay": "model.weight_decay", "subnets": "model.subnets"}
_START_FRESH = ("Start fresh with another hydra.run.dir=..., or resume=null (which moves this directory's "
                "checkpoints and results aside into superseded/<date>/)")


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
        return D2FTViT(vit, subnets=subnets)


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The settings of ``RUN_IDENTITY`` (resolved; the schedule's cache directory is not part of it)."""
    identity = {key: OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)
                if isinstance(OmegaConf.select(cfg, key), DictConfig) else OmegaConf.select(cfg, key)
                for key in RUN_IDENTITY}
    identity["schedule"] = {k: v for k, v in identity["schedule"].items() if k not in ("cache_dir", "subnets")}
    return identity


def check_run_dir(cfg: DictConfig, out: Path, resume: Resume) -> None:
    """A rerun that resumes a checkpoint must ask for the same schedule, model, optimizer and data; otherwise
    results.json would report settings that never ran, or a restored optimizer would silently keep the old
    learning rate. Refuse, naming both values: against the run record of this directory when continuing its
    lineage, and against what the checkpoint itself says it was trained with (its hyper-parameters, LoRA)."""
    if resume.path is None:
        return
    record = read_json(out / RECORD, "run record") if resume.continues_record else None
    changed = []
    if record is not None:  # keys an older record does not have are checked against the checkpoint below
        before = _flatten(record)
        if "schedule.subnets" in before:  # a record written before the subnet count moved to the model
            before.setdefault("model.subnets", before.pop("schedule.subnets"))
        changed = [f"{k}: {before[k]!r} in this run directory, {v!r} asked"
                   for k, v in _flatten(run_identity(cfg)).items() if k in before and before[k] != v]
    if changed:
        raise ValueError(f"{out} belongs to a run with other settings ({'; '.join(changed)}). {_START_FRESH}")
    changed = _checkpoint_differences(cfg, resume.checkpoint)
    if changed:
        raise ValueError(f"checkpoint {resume.path} was trained with other settings ({'; '.join(changed)}); resuming "
                         f"it would restore them silently or fail. {_START_FRESH}")


def _checkpoint_differences(cfg: DictConfig, ckpt: dict[str, Any]) -> list[str]:
    """What the checkpoint's hyper-parameters and LoRA adapters say differs from ``cfg``, named by setting."""
    hparams = ckpt.get("hyper_parameters") or {}
    changed = []
    for key, setting in _CHECKPOINT_SETTINGS.items():
        if key in hparams:
            if key == "lr" and cfg.schedule.get("lora_rank") is not None:
                setting = "model.lora_lr"  # the optimizer was built with the adapters' learning rate
            asked = OmegaConf.select(cfg, setting)
            asked = OmegaConf.to_container(asked, resolve=True) if isinstance(asked, DictConfig) else asked
            theirs = hparams[key] if key != "model_kwargs" else hparams[key] or {}  # None: no kwargs
            if theirs != asked:
                changed.append(f"{setting}: {theirs!r} in the checkpoint, {asked!r} asked")
    lora_b = next((v for k, v in ckpt["state_dict"].items() if k.endswith("blocks.0.attn.qkv.lora_B")), None)
    theirs = None if lora_b is None else int(lora_b.shape[1])
    ours = cfg.schedule.get("lora_rank")
    if theirs != ours:
        changed.append(f"schedule.lora_rank: {theirs!r} in the checkpoint (LoRA {'on' if theirs else 'off'}), "
                       f"{ours!r} asked")
    elif theirs is not None:
        scale = next(float(v) for k, v in ckpt["state_dict"].items() if k.endswith("blocks.0.attn.qkv.lora_scale"))
        alpha = cfg.schedule.get("lora_alpha")
        alpha = float(ours if alpha is None else alpha)
        if abs(scale * theirs - alpha) > 1e-6 * max(1.0, alpha):
            changed.append(f"schedule.lora_alpha: {scale * theirs:g} in the checkpoint, {alpha:g} asked")
    return changed


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


@dataclass
class Resume:
    """What a run continues: the checkpoint (``path`` and its contents; None for a fresh start), the lineage the
    run belongs to, and whether it continues the lineage this directory's run record names."""

    path: str | None
    checkpoint: dict[str, Any]
    lineage: str
    continues_record: bool


def _resume(cfg: DictConfig, out: Path) -> Resume:
    """``auto``/``last``: the newest usable checkpoint of this directory's current lineage (the run record's),
    if any; a truncated, NaN/inf or code-carrying one is skipped with a warning naming it, another lineage's
    too. An explicit path must be usable, or the run is refused naming it. ``null``: a fresh lineage."""
    if cfg.resume in (None, "", "none"):
        return Resume(None, {}, new_lineage(), False)
    if cfg.resume in ("auto", "last"):
        record = read_json(out / RECORD, "run record") or {}
        current = record.get("lineage") if isinstance(record.get("lineage"), str) else None
        newest = newest_checkpoint(checkpoint_paths(out), lineage=current)
        if newest is None:
            return Resume(None, {}, new_lineage(), False)
        log.warning(f"resuming from {newest}")
        ckpt = checked_checkpoint(newest)
        return Resume(str(newest), ckpt, lineage_of(ckpt) or current or new_lineage(), True)
    ckpt = checked_checkpoint(cfg.resume)  # refuses, naming the file
    return Resume(str(cfg.resume), ckpt, lineage_of(ckpt) or new_lineage(), False)


def _resume_path(cfg: DictConfig, out: Path) -> str | None:
    """The checkpoint :func:`_resume` picks (None: a fresh start)."""
    return _resume(cfg, out).path


def _set_lineage_aside(cfg: DictConfig, out: Path, resume: Resume) -> None:
    """A fresh start moves the files of whatever run was here aside (``resume=null``, or nothing usable to
    resume); a continued run moves aside only checkpoints of another lineage. Nothing is deleted."""
    if resume.path is None:
        files = run_files(out)
        if any(f.suffix == ".ckpt" or f.name == "results.json" for f in files):
            why = "resume=null" if cfg.resume in (None, "", "none") else "nothing in this run directory can be resumed"
            move_aside(out, files, f"{why}, so this run starts a new lineage ({resume.lineage})")
        return
    others = []
    for path in checkpoint_paths(out):
        if path.is_file() and str(path) != resume.path:
            with contextlib.suppress(Exception):  # an unreadable one is left where it is (and never ranked)
                theirs = lineage_of(checked_checkpoint(path))
                if theirs is not None and theirs != resume.lineage:
                    others.append(path)
    move_aside(out, others, f"checkpoints of another run than the one resumed (lineage {resume.lineage})")


def _finished(cfg: DictConfig, ckpt: dict[str, Any]) -> bool:
    """Whether fitting on from ``ckpt`` would train nothing: its epochs (one closed by a checkpoint written on
    the epoch's last batch included) reach ``trainer.max_epochs``, or its steps ``trainer.extra.max_steps``."""
    max_steps = cfg.trainer.extra.get("max_steps", -1)
    if max_steps not in (None, -1) and int(ckpt["global_step"]) >= max_steps:
        return True
    try:
        fit = ckpt["loops"]["fit_loop"]
        epochs, batches = fit["epoch_progress"]["current"], fit["epoch_loop.batch_progress"]["current"]
        done = epochs["processed"]
        loader = (fit.get("state_dict") or {}).get("combined_loader") or []
        if epochs["started"] > done and loader and batches["processed"] >= min(map(len, loader[0]["epoch_ids"])):
            done += 1  # written on the last batch of an epoch it did not close yet
    except (KeyError, TypeError, ValueError):
        return False
    return done >= cfg.trainer.max_epochs

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
                         pretrained=m.pretrained, checkpoint=checkpoint, lr=learning_rate(cfg),
                         weight_decay=m.weight_decay, optimizer=m.optimizer, model_kwargs=kwargs)


def learning_rate(cfg: DictConfig) -> float:
    """``model.lora_lr`` when LoRA adapters train (``schedule.lora_rank``), else ``model.lr``."""
    return cfg.model.lora_lr if cfg.schedule.get("lora_rank") is not None else cfg.model.lr


def _trainer(cfg: DictConfig, out: Path, callbacks: list) -> Trainer:
    """D2FTStrategy on every device count (one device too: atomic checkpoints, the NaN guard); any other
    Trainer argument comes from ``trainer.extra`` and wins over the app's own."""
    t = cfg.trainer
    speeds = t.get("speeds")
    _pin_threads(t.get("threads"))
    # one device runs in this process (popen launches nobody for rank 0): no spawned copy of the run
    extra = OmegaConf.to_container(t.extra, resolve=True) if "extra" in t else {}
    start_method = "popen" if t.devices == 1 and extra.get("num_nodes", 1) == 1 else t.start_method
    timeout = {"timeout": timedelta(seconds=t.timeout)} if t.get("timeout") is not None else {}
    strategy = D2FTStrategy(tensor_parallel_size=t.tensor_parallel_size, start_method=start_method,
                            data_parallel=t.get("data_parallel", "sync"),
                            placement=speed_aware(list(speeds)) if speeds else None, **timeout)
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


def _pin_threads(threads: int | None) -> None:
    """``threads`` torch threads in this process and, through OMP_NUM_THREADS (which Lightning then leaves alone),
    in the ranks it spawns; None leaves Lightning's choice (the cores over the processes)."""
    if threads is None:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


class SetupError(ValueError):
    """A setting or an input the run cannot start with, found before any training: ``python -m lightning_d2ft``
    prints it as one line (it names the setting and the fix) and exits with status 2."""


@contextlib.contextmanager
def refusals_before_training() -> Iterator[None]:
    """Bad settings and inputs refused before training (a ValueError naming the field, a file that is not what
    it must be, a run directory held by another run, Lightning refusing a Trainer argument) become SetupError."""
    try:
        yield
    except (ValueError, OSError, RunDirBusyError, MisconfigurationException) as err:
        raise SetupError(str(err)) from err


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """One fine-tune; returns the summary it also writes to ``out/results.json``. With ``skip_existing``
    a run directory that already holds a results.json is not run again (resumable sweeps).

    The launching process holds the run directory's lock for the whole run (a second run there is refused);
    a finished run run again leaves its results.json as it is (or redoes a write that was interrupted)."""
    # every check before any heavy work (data, pretraining, scoring, fit)
    with refusals_before_training():
        settings = check_config(cfg)  # the schedule's settings, validated by ScheduleSettings
        check_inputs(cfg)
        if cfg.get("skip_existing"):
            existing = read_json(out / "results.json", "results")
            if existing is not None:
                return existing
        callback = _callback(cfg, settings)
        kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
        net = check_model(cfg.model.name, kwargs, cfg.model.subnets)
        cfg.model.subnets = net.num_subnets  # resolved (null: one head per subnet), as records and results hold it
        degenerate_settings(cfg, net)
        launching = launching_process()  # not a worker started by a launcher: it owns the run directory
        lock = RunDirLock(out) if launching else contextlib.nullcontext()
        lock.__enter__()
    try:
        return _run(cfg, out, callback, kwargs, launching)
    finally:
        lock.__exit__(None, None, None)


def _run(cfg: DictConfig, out: Path, callback: D2FTCallback, kwargs: dict, launching: bool) -> dict[str, Any]:
    with refusals_before_training():
        if launching:
            remove_stale_temp_files(out)  # of writes a kill -9 interrupted
        probe_writable(out)  # before scoring and training, not at the first save
        dm = build_datamodule(cfg)
        resume = _resume(cfg, out)
        check_run_dir(cfg, out, resume)
        if launching:
            _set_lineage_aside(cfg, out, resume)
    if resume.path is not None and _finished(cfg, resume.checkpoint):
        return _already_finished(cfg, out, dm, kwargs, resume)
    checkpoints = _checkpoints(out, cfg.trainer.get("checkpoint_every_n_steps"))
    record = RunRecord(out / RECORD, run_identity(cfg), resume.lineage)  # written once the restore succeeded
    with refusals_before_training():
        # the Trainer refuses its own bad settings (a tensor-parallel size that does not divide the devices, say)
        # when it is built: before pretraining, which takes minutes
        trainer = _trainer(cfg, out, [callback, record, DataCheck(), *checkpoints])
        seed_everything(cfg.seed, workers=True)
        module = _module(cfg, dm, kwargs)
    start = time.perf_counter()
    trainer.fit(module, dm, ckpt_path=resume.path, weights_only=True)  # a checkpoint cannot run code
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    newest = newest_checkpoint(checkpoint_paths(out), lineage=resume.lineage)
    step = int(checked_checkpoint(newest)["global_step"]) if newest is not None else None
    if resume.path is not None and (step is None or step <= int(resume.checkpoint["global_step"])):
        existing = _valid_results(out, int(resume.checkpoint["global_step"]))
        if existing is not None:  # nothing was trained: the finished run's results stay as they are
            return _keep(out, existing)
        metrics = {**(resume.checkpoint.get(METRICS_KEY) or {}).get("metrics", {}), **metrics}
    schedule = callback.schedule or Schedule.load(out / "d2ft" / "schedule.pt")
    tp = getattr(trainer.strategy, "tensor_parallel_size", None)
    result = _result(cfg, metrics, schedule, newest, tp, out, seconds, resume.path, step)
    if trainer.is_global_zero:
        atomic_write(out / "results.json", json.dumps(result, indent=2).encode())
    return result


def _valid_results(out: Path, step: int) -> dict[str, Any] | None:
    """results.json when it holds a validation accuracy for checkpoint step ``step`` (an older results.json
    without the step counts); else None."""
    existing = read_json(out / "results.json", "results")
    if existing is None or existing.get("val_acc") is None or existing.get("global_step", step) != step:
        return None
    return existing


def _keep(out: Path, existing: dict[str, Any]) -> dict[str, Any]:
    log.warning(f"already finished: {out / 'results.json'} holds val_acc {existing['val_acc']:.4f} (compute "
                f"{existing.get('compute_fraction', float('nan')):.3f} of all-FULL); nothing was left to train, so it "
                "is left as it is. Ask for more (trainer.max_epochs=...) or start over (resume=null)")
    return existing


def _already_finished(cfg: DictConfig, out: Path, dm: LightningDataModule, kwargs: dict,
                      resume: Resume) -> dict[str, Any]:
    """The checkpoint to resume has nothing left to train: keep its results.json, or, when the write of that
    was interrupted (or the final validation), redo it from the checkpoint: the figures it recorded when it
    was written, validating its weights again if the final validation did not run before it."""
    step = int(resume.checkpoint["global_step"])
    existing = _valid_results(out, step)
    if existing is not None:
        return _keep(out, existing)
    saved = resume.checkpoint.get(METRICS_KEY) or {}
    metrics, zero = dict(saved.get("metrics") or {}), True
    if saved.get("validated_at") != step:  # stopped before (or in) the final validation: validate now
        trainer = _trainer(cfg, out, [DataCheck()])
        module = _module(cfg, dm, kwargs)
        validated = trainer.validate(module, dm, ckpt_path=resume.path, weights_only=True, verbose=False)
        metrics.update({k: float(v) for k, v in (validated[0] if validated else {}).items()})
        zero = trainer.is_global_zero
    schedule = _schedule_of(resume.checkpoint) or Schedule.load(out / "d2ft" / "schedule.pt")
    result = _result(cfg, metrics, schedule, Path(resume.path), schedule.num_devices, out, None, resume.path, step)
    if zero:
        log.warning(f"{out / 'results.json'} was missing or incomplete (stopped between the end of training and its "
                    f"write): redone from the final checkpoint {resume.path}")
        atomic_write(out / "results.json", json.dumps(result, indent=2).encode())
    return result


def _schedule_of(ckpt: dict[str, Any]) -> Schedule | None:
    """The schedule in a checkpoint's D2FTCallback state (checked as on resume), if any."""
    for state in (ckpt.get("callbacks") or {}).values():
        if isinstance(state, dict) and "ops" in state:
            return schedule_from_state(state)[0]
    return None


def _result(cfg: DictConfig, metrics: dict[str, float], schedule: Schedule, newest: Path | None, tp: int | None,
            out: Path, seconds: float | None, resumed_from: str | None, step: int | None) -> dict[str, Any]:
    s = cfg.schedule
    return {
        "val_acc": metrics.get("val/acc"),
        **schedule.metrics(),  # compute (and, on 2+ devices, wire) fractions, balance, FULL dynamics, solve time
        "bytes_sent_all_ranks_last_epoch": metrics.get("d2ft/bytes_sent"),
        "scoring_seconds": schedule.info.get("scoring_seconds"),
        "fit_seconds": seconds,  # None: results redone from the final checkpoint, the fit's time is not known
        "budget": s.budget, "subnets": cfg.model.subnets, "method": s.method, "devices": cfg.trainer.devices,
        "tensor_parallel_size": tp, "lora_rank": s.get("lora_rank"), "lr": learning_rate(cfg),
        "last_checkpoint": str(newest) if newest is not None else None,
        "global_step": step,
        "output_dir": str(out),
        "resumed_from": resumed_from,  # the schedule (and its scoring time) came with this checkpoint
    }


def _full_dynamics(result: dict[str, Any]) -> str:
    """How dynamic the FULL set was, from a results.json: subnets never FULL, distinct FULL sets, and the
    subnets of each block FULL at least once."""
    blocks = sorted((int(k.rsplit("_", 1)[1]), int(v)) for k, v in result.items() if k.startswith("ever_full_block_"))
    never, sets = int(result["never_full_subnets"]), int(result["distinct_full_sets"])
    line = (f"FULL dynamics: {never} subnet{'s' if never != 1 else ''} never FULL, "
            f"{sets} distinct FULL set{'s' if sets != 1 else ''}")
    if blocks:
        line += "; subnets ever FULL per block: " + " ".join(str(n) for _, n in blocks)
    return line


def print_summary(result: dict[str, Any]) -> None:
    print("\n=== D2FT fine-tune ===")
    devices = result["devices"]
    lora = f", LoRA rank {result['lora_rank']} (lr {result['lr']:g})" if result.get("lora_rank") else ""
    print(f"method {result['method']}, budget {result['budget']}, {result['subnets']} subnets, "
          f"{devices} device{'s' if devices != 1 else ''}{lora}")
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
    fit = result.get("fit_seconds")
    fit = f"{fit:.1f} s" if fit is not None else "time not known (results redone from the checkpoint)"
    print(f"{scored}, fit {fit}")
    if result.get("output_dir"):
        print(f"outputs: {result['output_dir']} (results.json, checkpoints/, d2ft/, logs/)")
