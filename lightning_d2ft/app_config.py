"""Structured configs of the Hydra app: types are checked by Hydra when the config is composed (so
``schedule.forward_mix=abc`` is refused naming the field before anything runs), ranges and choices by
:func:`check_config` right after, still before data, pretraining or fit."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

__all__ = ["AppConfig", "check_config", "register_configs"]


@dataclass
class PretrainConfig:
    classes: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    epochs: int = 15
    lr: float = 1.0e-3
    cache_dir: str = ".cache/pretrained"


@dataclass
class ModelConfig:
    name: str = "vit_small_patch16_224"
    pretrained: bool = False
    checkpoint: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    lr: float = 1.0e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    pretrain: Optional[PretrainConfig] = None


@dataclass
class ScheduleConfig:
    budget: float = 0.6
    comm_budget: Optional[float] = None
    subnets: Optional[int] = None
    backward_score: str = "weight_magnitude"
    forward_score: str = "fisher"
    solver: str = "ortools"
    method: str = "d2ft"
    forward_mix: float = 0.5
    score_every: int = 1
    capacity: str = "step"
    validate: bool = True
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None
    cache_dir: Optional[str] = None


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: int = 1
    tensor_parallel_size: Any = "auto"  # "auto" or an int
    speeds: Optional[List[float]] = None
    data_parallel: str = "sync"
    start_method: str = "spawn"
    max_epochs: int = 3
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    limit_train_batches: Optional[float] = None
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)  # any other lightning.Trainer argument


@dataclass
class AppConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # ``data.name`` picks a data module (app.DATAMODULES); the other fields are its keyword arguments, so
    # each data set has its own (the data module checks them, naming the field, before loading anything)
    data: Dict[str, Any] = field(default_factory=lambda: {"name": "digits"})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    resume: Optional[str] = "auto"
    skip_existing: bool = False


def register_configs() -> None:
    """The schema config.yaml builds on (``defaults: [app_schema, ...]``)."""
    ConfigStore.instance().store(name="app_schema", node=AppConfig)


# the Trainer arguments the app sets from its own fields (trainer.extra may override them, knowingly)
_CHOICES = {
    "schedule.method": ("d2ft", "random", "dpruning", "moe", "full"),
    "schedule.solver": ("dp", "ortools"),
    "trainer.data_parallel": ("sync", "lofi"),
    "trainer.start_method": ("spawn", "popen", "fork", "forkserver"),
    "model.optimizer": ("adamw", "sgd"),
}


def check_config(cfg: DictConfig) -> None:
    """Ranges and choices the types cannot say; each error names the field and what is allowed."""
    for key, allowed in _CHOICES.items():
        group, name = key.split(".")
        value = cfg[group][name]
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")
    s, t, m = cfg.schedule, cfg.trainer, cfg.model
    _in_range("schedule.forward_mix", s.forward_mix, 0.0, 1.0)
    _at_least("schedule.score_every", s.score_every, 1)
    _at_least("trainer.devices", t.devices, 1)
    _at_least("trainer.max_epochs", t.max_epochs, 1)
    _at_least("trainer.accumulate_grad_batches", t.accumulate_grad_batches, 1)
    _at_least("trainer.log_every_n_steps", t.log_every_n_steps, 1)
    if not isinstance(cfg.data.get("name"), str):
        raise ValueError(f"data.name must name a data set, got {cfg.data.get('name')!r}")
    if t.checkpoint_every_n_steps is not None:
        _at_least("trainer.checkpoint_every_n_steps", t.checkpoint_every_n_steps, 1)
    if t.limit_train_batches is not None and t.limit_train_batches <= 0:
        raise ValueError(f"trainer.limit_train_batches must be null or > 0, got {t.limit_train_batches}")
    tp = t.tensor_parallel_size
    if tp != "auto" and (not isinstance(tp, int) or isinstance(tp, bool) or tp < 1):
        raise ValueError(f"trainer.tensor_parallel_size must be 'auto' or a positive int, got {tp!r}")
    if t.speeds is not None and any(v <= 0 for v in t.speeds):
        raise ValueError(f"trainer.speeds must be positive relative speeds, got {list(t.speeds)}")
    if m.lr <= 0:
        raise ValueError(f"model.lr must be > 0, got {m.lr}")
    check_trainer_extra(dict(t.extra))


def check_trainer_extra(extra: dict[str, Any]) -> None:
    """``trainer.extra`` keys must be lightning.Trainer arguments (e.g. ``+trainer.extra.gradient_clip_val=1``)."""
    from lightning.pytorch import Trainer

    known = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"trainer.extra has {unknown}, which lightning.Trainer does not take; "
                         f"its arguments are {sorted(known)}")


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
