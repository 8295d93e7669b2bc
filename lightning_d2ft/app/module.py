"""A ready LightningModule: image classification by fine-tuning a timm ViT wrapped in :class:`D2FTViT`.

Any LightningModule works with D2FT as long as it holds exactly one D2FTViT and calls it in
``training_step``; this one is what the Hydra app, the demo and the benchmarks use.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.classification import MulticlassAccuracy

from lightning_d2ft.model.vit import D2FTViT

__all__ = ["ShardedModelSummary", "ViTClassifier", "build_vit"]


def build_vit(name: str = "vit_small_patch16_224", *, pretrained: bool = False, num_classes: int = 10,
              checkpoint: str | None = None, **model_kwargs: Any) -> torch.nn.Module:
    """A timm model by name. ``pretrained=True`` downloads hub weights (needs a network); ``checkpoint``
    loads a local timm state dict (e.g. one pretrained by this project) without its classifier head, which
    starts fresh for the new task, as timm does for a pretrained model with another ``num_classes``."""
    try:
        vit = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **model_kwargs)
    except OSError as err:  # the hub's download and offline-cache errors are OSErrors
        if not pretrained:
            raise
        raise OSError(f"could not get the pretrained weights of {name} ({type(err).__name__}: {err}). Without a "
                      "network, start from a local timm state dict instead: pretrained=False, checkpoint=PATH "
                      "(the app: model.pretrained=false model.checkpoint=PATH)") from err
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = vit.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("head.") for k in missing):
            raise ValueError(f"checkpoint {checkpoint} does not fit {name} {model_kwargs}: missing {missing}, "
                             f"unexpected {unexpected}")
    return vit


class ViTClassifier(LightningModule):
    """Cross-entropy fine-tuning of a timm ViT; the D2FT schedule applies in training, the full model in eval."""

    def __init__(self, model: str = "vit_small_patch16_224", num_classes: int = 10, subnets: int | None = 74,
                 pretrained: bool = False, checkpoint: str | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.05, optimizer: str = "adamw", model_kwargs: dict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        vit = build_vit(model, pretrained=pretrained, num_classes=num_classes, checkpoint=checkpoint,
                        **(model_kwargs or {}))
        self.net = D2FTViT(vit, subnets=subnets)
        self.whole_model_parameters = sum(p.numel() for p in self.parameters())  # before any sharding
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch, metric: MulticlassAccuracy, stage: str) -> None:
        x, y = batch
        logits = self.net(x)
        metric(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_acc, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_acc, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).argmax(-1)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.optimizer == "adamw":
            return _fused_if_supported(torch.optim.AdamW, params, self._trainer, lr=self.hparams.lr,
                                       weight_decay=self.hparams.weight_decay)
        if self.hparams.optimizer == "sgd":  # not fused: torch's fused SGD fails on a group first FULL late
            return torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay,
                                   foreach=True)
        raise ValueError(f"unknown optimizer {self.hparams.optimizer!r}; choose 'adamw' or 'sgd'")


def _fused_if_supported(cls: type[torch.optim.Optimizer], params: list, trainer: Trainer | None,
                        **kwargs: Any) -> torch.optim.Optimizer:
    """``cls`` with its fused kernel (one kernel over all parameters) where the parameters' device has one: a
    ViT-S AdamW step takes ~17 ms fused vs ~85 ms per-tensor on a 2-core CPU, and fewer launches on a GPU.
    Not under Lightning's mixed precision with gradient clipping, which refuses fused optimizers (they
    unscale fp16 gradients inside ``step``); there, and where the device has no fused kernel, torch's default."""
    clipped_amp = (trainer is not None and isinstance(trainer.precision_plugin, MixedPrecision)
                   and bool(trainer.gradient_clip_val))
    if params and not clipped_amp:
        try:
            return cls(params, fused=True, **kwargs)
        except RuntimeError:  # this device (or dtype) has no fused kernel
            pass
    return cls(params, **kwargs)


class ShardedModelSummary(ModelSummary):
    """Lightning's model summary, plus one line saying that under tensor parallelism its counts are one
    rank's shard, and the whole model's count (a module may set ``whole_model_parameters``)."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        tp = getattr(trainer.strategy, "tensor_parallel_size", 1)
        whole = getattr(pl_module, "whole_model_parameters", None)
        if tp > 1:
            total = f"; the whole model has {whole / 1e6:.2f} M parameters" if whole else ""
            rank_zero_info(f"D2FT: the parameter counts above are per tensor-parallel shard (1 of {tp} ranks){total}")
