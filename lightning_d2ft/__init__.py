"""lightning_d2ft: Distributed Dynamic Fine-Tuning (D2FT) of vision transformers in PyTorch Lightning."""

from lightning_d2ft.app.module import ViTClassifier
from lightning_d2ft.callback import D2FTCallback
from lightning_d2ft.data.micro_batches import MicroBatchSampler, micro_batch_loader
from lightning_d2ft.model.export import timm_state_dict
from lightning_d2ft.model.vit import D2FTViT
from lightning_d2ft.ops import CostModel, Op
from lightning_d2ft.schedule.schedule import Schedule
from lightning_d2ft.strategy.strategy import D2FTStrategy

__all__ = ["CostModel", "D2FTCallback", "D2FTStrategy", "D2FTViT", "MicroBatchSampler", "Op", "Schedule",
           "ViTClassifier", "micro_batch_loader", "timm_state_dict"]
__version__ = "0.1.0"
