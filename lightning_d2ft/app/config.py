"""Structured configs of the Hydra app: types are checked by Hydra when the config is composed (so
``schedule.forward_mix=abc`` is refused naming the field before anything runs), ranges and choices by
:func:`check_config` right after, still before data, pretraining or fit. The schedule section is generated
from :class:`~lightning_d2ft.schedule.settings.ScheduleSettings` (its fields, types and defaults, written
once there, and its checks through :func:`schedule_settings`) plus the app's LoRA and cache fields. The
subnet count is the model's (``model.subnets``); ``schedule.subnets`` still works, with a deprecation note."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, get_args, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lightning_d2ft.schedule.settings import ScheduleSettings

__all__ = ["AppConfig", "check_config", "register_configs", "schedule_settings"]
log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    epochs: int = 15
    lr: float = 1.0e-3
    cache_dir: str = ".cache/pretrained"


@dataclass
class ModelConfig:
    name: str = "vit_small_patch16_224"
    subnets: int | None = None  # total count (26/38/74 for ViT-S) or groups per block; None: one head per subnet
    pretrained: bool = False
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float = 1.0e-3
    # the learning rate when schedule.lora_rank is set: adapters start at B = 0 and need a larger step than
    # full fine-tuning (5e-4 left the demo's LoRA run at 47% against 88%; the accuracy benchmark found ~5e-3)
    lora_lr: float = 5.0e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    pretrain: PretrainConfig | None = None


def _schedule_config() -> type:
    """ScheduleSettings' fields with their types and defaults (read from it, so written once) and the app's
    own: LoRA, the score cache, and ``subnets`` (deprecated: ``model.subnets``)."""
    hints = get_type_hints(ScheduleSettings)
    own = [(f.name, hints[f.name], field(default=f.default)) for f in fields(ScheduleSettings)]
    app = [("lora_rank", int | None, field(default=None)), ("lora_alpha", float | None, field(default=None)),
           ("cache_dir", str | None, field(default=None)), ("subnets", int | None, field(default=None))]
    cls = make_dataclass("ScheduleConfig", own + app)
    cls.__module__ = __name__  # pickles and prints like a class written here
    return cls


ScheduleConfig = _schedule_config()


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: int = 1
    tensor_parallel_size: Any = "auto"  # "auto" or an int
    speeds: list[float] | None = None
    data_parallel: str = "sync"
    start_method: str = "spawn"
    max_epochs: int = 3
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    limit_train_batches: float | None = None
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int | None = None
    # seconds any collective waits for a peer before it fails, naming the op and the rank (null: 30 minutes)
    timeout: float | None = None
    # torch threads per process (OMP_NUM_THREADS, which the spawned ranks inherit): a fixed count makes a CPU run
    # give the same figures on machines with other core counts (float sums follow the thread split); null: as
    # many as Lightning gives (the cores over the processes)
    threads: int | None = None
    # the progress bar reads the logged loss back at every refresh: on a GPU each read waits for the queue
    progress_refresh_rate: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # any other lightning.Trainer argument


@dataclass
class AppConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # ``data.name`` picks a data module (app.DATAMODULES); the other fields are its keyword arguments, so
    # each data set has its own (the data module checks them, naming the field, before loading anything)
    data: dict[str, Any] = field(default_factory=lambda: {"name": "digits"})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    resume: str | None = "auto"
    skip_existing: bool = False


def register_configs() -> None:
    """The schema config.yaml builds on (``defaults: [app_schema, ...]``)."""
    ConfigStore.instance().store(name="app_schema", node=AppConfig)


# choices of the app's own fields (the schedule's are ScheduleSettings')
_CHOICES = {
    "trainer.accelerator": ("cpu", "gpu", "cuda", "auto"),  # D2FTStrategy is a DDP strategy: no TPU, no MPS
    "trainer.data_parallel": ("sync", "lofi"),
    "trainer.start_method": ("spawn", "popen", "fork", "forkserver"),
    "model.optimizer": ("adamw", "sgd"),
}


def schedule_settings(cfg: DictConfig) -> ScheduleSettings:
    """The validated ScheduleSettings of ``cfg.schedule``; errors name the field (``schedule.budget ...``)."""
    return ScheduleSettings.from_mapping(cfg.schedule, where="schedule.")


def check_config(cfg: DictConfig) -> ScheduleSettings:
    """Ranges and choices the types cannot say; each error names the field and what is allowed. Returns the
    schedule's settings (validated by ScheduleSettings itself). A ``schedule.subnets`` is moved to
    ``model.subnets``, with a deprecation note."""
    from lightning_d2ft.parallel.placement import check_speeds  # here, not at import: --help loads no torch

    _check_known_keys(cfg)
    _move_deprecated_subnets(cfg)
    settings = schedule_settings(cfg)
    for key, allowed in {**_CHOICES, "trainer.precision": _precisions()}.items():
        group, name = key.split(".")
        value = cfg[group][name]
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")
    t, m = cfg.trainer, cfg.model
    _at_least("trainer.devices", t.devices, 1)
    _at_least("trainer.max_epochs", t.max_epochs, 1)
    _at_least("trainer.accumulate_grad_batches", t.accumulate_grad_batches, 1)
    _at_least("trainer.log_every_n_steps", t.log_every_n_steps, 1)
    _at_least("trainer.progress_refresh_rate", t.progress_refresh_rate, 0)  # 0: no bar, as in Lightning
    if not isinstance(cfg.data.get("name"), str):
        raise ValueError(f"data.name must name a data set, got {cfg.data.get('name')!r}")
    if t.checkpoint_every_n_steps is not None:
        _at_least("trainer.checkpoint_every_n_steps", t.checkpoint_every_n_steps, 1)
    if t.limit_train_batches is not None and t.limit_train_batches <= 0:
        raise ValueError(f"trainer.limit_train_batches must be null or > 0, got {t.limit_train_batches}")
    tp = t.tensor_parallel_size
    if tp != "auto" and (not isinstance(tp, int) or isinstance(tp, bool) or tp < 1):
        raise ValueError(f"trainer.tensor_parallel_size must be 'auto' or a positive int, got {tp!r}")
    world = t.devices * int(t.extra.get("num_nodes", 1))
    ranks = world if tp == "auto" else tp
    if t.speeds is not None:
        try:
            check_speeds(list(t.speeds), ranks, "trainer.speeds")
        except ValueError as err:
            raise ValueError(f"{err} (trainer.tensor_parallel_size={tp!r} on {world} devices)") from None
    for name in ("lr", "lora_lr"):
        if not m[name] > 0:
            raise ValueError(f"model.{name} must be > 0, got {m[name]}")
    if t.accelerator in ("gpu", "cuda"):
        import torch  # here, not at import: --help loads no torch

        if not torch.cuda.is_available():
            raise ValueError(f"trainer.accelerator={t.accelerator} (trainer=gpu1) needs a CUDA GPU and this machine "
                             "has none: use trainer=cpu1 (one process) or trainer=cpu2 (two processes)")
    if t.threads is not None:
        _at_least("trainer.threads", t.threads, 1)
    if t.timeout is not None and not t.timeout > 0:
        raise ValueError(f"trainer.timeout must be null or a number of seconds > 0, got {t.timeout}")
    check_trainer_extra(dict(t.extra))
    return settings


def _move_deprecated_subnets(cfg: DictConfig) -> None:
    """``schedule.subnets`` (before the subnet count moved to the model group) still works, and says so."""
    old, new = cfg.schedule.get("subnets"), cfg.model.get("subnets")
    if old is None:
        return
    if new is not None and new != old:
        raise ValueError(f"schedule.subnets={old} and model.subnets={new} disagree; give model.subnets only "
                         "(schedule.subnets is deprecated)")
    log.warning(f"schedule.subnets is deprecated: the subnet count is the model's; use model.subnets={old}")
    cfg.model.subnets, cfg.schedule.subnets = old, None


# the sections whose keys are fixed (model.kwargs, data and trainer.extra take any key, checked by their users)
_SECTIONS = {"": AppConfig, "model": ModelConfig, "model.pretrain": PretrainConfig, "schedule": ScheduleConfig,
             "trainer": TrainerConfig}


def _precisions() -> tuple[str, ...]:
    """Lightning's precision strings, its own list (imported here: ``--help`` should not load Lightning)."""
    from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    return get_args(_PRECISION_INPUT_STR) + get_args(_PRECISION_INPUT_STR_ALIAS)


def _check_known_keys(cfg: DictConfig) -> None:
    """A key added with Hydra's ``+`` escapes the schema: refuse any the app does not read, so that a typo
    (``+schedule.budgt=0.4``) fails instead of training at the default."""
    for section, schema in _SECTIONS.items():
        node = OmegaConf.select(cfg, section) if section else cfg
        if not isinstance(node, DictConfig):
            continue
        allowed = {f.name for f in fields(schema)}
        unknown = sorted(set(node.keys()) - allowed)
        if unknown:
            names = [f"{section}.{k}" if section else k for k in unknown]
            extra = " (any other Trainer argument goes under trainer.extra)" if section == "trainer" else ""
            raise ValueError(f"unknown key {', '.join(names)}; {section or 'the config'} has {sorted(allowed)}{extra}")


# Trainer arguments the app sets itself: through trainer.extra they would replace the app's D2FT callback,
# checkpoints, strategy or outputs (a fit without D2FT, results pointing at stale files); each names its owner
_OWNED_BY_THE_APP = {
    "callbacks": "the app's own callbacks (D2FT from schedule.*, checkpoints from trainer.checkpoint_every_n_steps, "
                 "the progress bar from trainer.progress_refresh_rate)",
    "strategy": "trainer.tensor_parallel_size, trainer.data_parallel, trainer.start_method, trainer.speeds and "
                "trainer.timeout (the app's D2FTStrategy)",
    "plugins": "trainer.precision (and D2FTStrategy's atomic checkpoint writer)",
    "logger": "the app's CSV logger in the run directory (hydra.run.dir=...)",
    "default_root_dir": "hydra.run.dir",
    "enable_checkpointing": "trainer.checkpoint_every_n_steps (last.ckpt at every epoch end is what a rerun resumes)",
    **{name: f"trainer.{name}" for name in ("accelerator", "devices", "max_epochs", "precision",
                                            "accumulate_grad_batches", "limit_train_batches", "log_every_n_steps")},
}


def check_trainer_extra(extra: dict[str, Any]) -> None:
    """``trainer.extra`` keys must be lightning.Trainer arguments (e.g. ``+trainer.extra.gradient_clip_val=1``)
    that the app does not set itself (those are refused naming the app setting that owns each)."""
    from lightning.pytorch import Trainer

    owned = [f"trainer.extra.{k} (set by {_OWNED_BY_THE_APP[k]})" for k in sorted(extra) if k in _OWNED_BY_THE_APP]
    if owned:
        raise ValueError(f"trainer.extra cannot set what the app sets itself: {'; '.join(owned)}")
    known = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"trainer.extra has {unknown}, which lightning.Trainer does not take; "
                         f"its arguments are {sorted(known)}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
