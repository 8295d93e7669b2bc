"""lightning_d2ft: Distributed Dynamic Fine-Tuning (D2FT) of vision transformers in PyTorch Lightning."""

from lightning_d2ft.callback import D2FTCallback
from lightning_d2ft.ops import CostModel, Op
from lightning_d2ft.partition import D2FTViT
from lightning_d2ft.scheduling import Schedule
from lightning_d2ft.strategy import D2FTStrategy

__all__ = ["CostModel", "D2FTCallback", "D2FTStrategy", "D2FTViT", "Op", "Schedule"]
__version__ = "0.1.0"
