"""What the bundled image data modules share: a class subset, fixed training micro-batches, one held-out set."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from lightning_d2ft.data.micro_batches import micro_batch_loader

__all__ = ["ClassSubsetDataModule"]


class ClassSubsetDataModule(LightningDataModule):
    """What the bundled image data modules share: a ``classes`` subset (remapped to ``0..C-1``, else all
    ``total_classes``), a training set of fixed micro-batches and one held-out set for validation, test and
    predict. Subclasses set ``train_set`` / ``val_set`` in ``setup``."""

    total_classes = 10
    eval_batch_size = 256

    def __init__(self) -> None:
        super().__init__()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.hparams.classes) if self.hparams.classes is not None else self.total_classes

    def train_dataloader(self) -> DataLoader:
        return micro_batch_loader(self.train_set, self.hparams.batch_size, seed=self.hparams.seed,
                                  **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, **self._loader_kwargs())

    def _loader_kwargs(self) -> dict:
        """Workers, and pinned batches when the trainer runs on CUDA: a host-to-GPU copy from pageable memory
        is synchronous with respect to the host, so the host could not queue the next step meanwhile."""
        trainer = self.trainer
        cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return {"num_workers": self.hparams.num_workers, "pin_memory": cuda}

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
