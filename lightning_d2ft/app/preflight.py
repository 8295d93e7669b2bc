"""Checks of the app's inputs that name the setting or the sample at fault, before the heavy work; and warnings
for settings that run but make no sense (a budget that leaves a device no FULL subnet, a LoRA rank wider than
what it adapts)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig
from torch.utils.data import TensorDataset

from lightning_d2ft.io import check_regular_file
from lightning_d2ft.model.vit import D2FTViT
from lightning_d2ft.parallel.placement import resolve_placement, speed_aware
from lightning_d2ft.schedule.problem import ScheduleProblem
from lightning_d2ft.schedule.settings import ScheduleSettings

__all__ = ["MAX_SEED", "DataCheck", "check_inputs", "degenerate_settings"]
log = logging.getLogger(__name__)
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seeds are unsigned 32-bit


def check_inputs(cfg: DictConfig) -> None:
    """The seed's range and the files the config names (a regular file each: a FIFO would block the read)."""
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**32 - 1] (the range numpy and Lightning seed), got {seed!r}")
    if cfg.model.checkpoint is not None:
        try:
            check_regular_file(cfg.model.checkpoint, "model.checkpoint")
        except FileNotFoundError:
            raise FileNotFoundError(f"model.checkpoint {cfg.model.checkpoint} does not exist: give a timm state dict "
                                    "(or model.checkpoint=null)") from None


def degenerate_settings(cfg: DictConfig, net: D2FTViT) -> list[str]:
    """Warnings (also logged) for settings that run but train little or waste work: a compute budget that gives
    some device no FULL subnet in any step (nothing on it is ever trained), a LoRA rank above the width of a
    head group's q, k or v slice (the adapter cannot use it). ``net``: the model's skeleton (meta device)."""
    s, t = cfg.schedule, cfg.trainer
    found = []
    if s.method != "full" and s.capacity == "step" and (s.budget < 1.0 or s.comm_budget is not None):
        world = t.devices * int(t.extra.get("num_nodes", 1))
        tp = world if t.tensor_parallel_size == "auto" else int(t.tensor_parallel_size)
        speeds = list(t.speeds) if t.speeds is not None else None
        settings = ScheduleSettings.from_mapping(s)
        try:
            starved = _devices_without_full(net, tp, speeds, settings)
        except ValueError:  # a layout the strategy will refuse, naming it, when the Trainer is built
            starved = []
        if starved:
            least = _least_budget(net, tp, speeds, settings)
            raise_to = f"schedule.budget >= {least:.3g}" if least is not None else "a larger schedule.budget"
            found.append(f"schedule.budget={s.budget} leaves tensor-parallel rank(s) {starved} of {tp} no FULL subnet "
                         f"in any step (with schedule.forward_mix={s.forward_mix}"
                         f"{f', schedule.comm_budget={s.comm_budget}' if s.comm_budget is not None else ''}): "
                         f"nothing on them is ever trained. Use {raise_to}, or fewer tensor-parallel ranks")
    rank = s.get("lora_rank")
    if rank is not None:
        attn = net.vit.blocks[0].attn
        per_group = attn.num_heads // net.groups_per_block
        width = per_group * attn.head_dim
        if rank > width:
            found.append(f"schedule.lora_rank={rank} is more than the width of a head group's q, k or v slice "
                         f"({per_group} head(s) of dimension {attn.head_dim} = {width} with {net.num_subnets} "
                         f"subnets): each of the group's q, k and v updates has rank at most {width}, so the extra "
                         f"rank adds parameters and compute it cannot use. Use schedule.lora_rank <= {width}")
    for line in found:
        rank_zero_warn(f"D2FT: {line}")
    return found


def _devices_without_full(net: D2FTViT, tp: int, speeds: list[float] | None, settings: ScheduleSettings) -> list[int]:
    """The ranks whose per-step capacities (the schedule problem's own, one micro-batch) plan no FULL subnet."""
    placement = resolve_placement(speed_aware(speeds) if speeds else None, net.depth, net.groups_per_block, tp)
    return ScheduleProblem.build(settings, 1, net.num_subnets, placement).devices_without_full()


def _least_budget(net: D2FTViT, tp: int, speeds: list[float] | None, settings: ScheduleSettings) -> float | None:
    """The least compute budget (to 1e-3) that gives every rank a FULL subnet per step; None if even 1.0 does not."""
    if _devices_without_full(net, tp, speeds, dataclasses.replace(settings, budget=1.0)):
        return None
    low, high = settings.budget, 1.0
    while high - low > 1e-3:
        mid = (low + high) / 2
        if _devices_without_full(net, tp, speeds, dataclasses.replace(settings, budget=mid)):
            low = mid
        else:
            high = mid
    return high


class DataCheck(Callback):
    """Checks the data module's tensor data sets once (vectorised) when fit or validation sets up: every label
    in ``0..num_classes-1`` and every image finite. A bad training sample is refused, a non-finite validation
    image warned about, each naming the sample (its index in the data set). Data sets that are not tensors are
    left to the checks of the step (the strategy's NaN guard names the micro-batch)."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        dm = trainer.datamodule
        classes = getattr(dm, "num_classes", None)
        for what, name in (("training", "train_set"), ("validation", "val_set")):
            data = getattr(dm, name, None)
            if isinstance(data, TensorDataset) and len(data.tensors) >= 2:
                check_samples(data.tensors[0], data.tensors[1], classes, what)


def check_samples(images: torch.Tensor, labels: torch.Tensor, classes: int | None, what: str) -> None:
    """Refuse labels outside ``0..classes-1`` and non-finite training images; warn about non-finite
    validation images (accuracy on them means nothing). Each message names the first samples."""
    if classes is not None and labels.dtype not in (torch.float16, torch.float32, torch.float64, torch.bfloat16):
        bad = ((labels < 0) | (labels >= classes)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{what} sample {bad[0]} has label {int(labels[bad[0]])}, outside 0..{classes - 1} "
                             f"(the data module has {classes} classes: data.classes)"
                             f"{f'; so do samples {bad[1:10]}' if len(bad) > 1 else ''} ({len(bad)} in all)")
    if images.is_floating_point():
        bad = (~torch.isfinite(images.flatten(1))).any(1).nonzero().flatten().tolist()
        if bad:
            others = f"; so do samples {bad[1:10]}" if len(bad) > 1 else ""
            message = f"{what} sample {bad[0]} has NaN/inf pixels{others} ({len(bad)} of {len(images)})"
            if what == "training":
                raise ValueError(message + ": fix or drop them before fine-tuning")
            rank_zero_warn(f"D2FT: {message}: the validation accuracy counts them as wrong")
