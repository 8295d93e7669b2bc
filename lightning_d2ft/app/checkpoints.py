"""The app's checkpoints: always the same two files, rewritten in place, each stamped with the run's lineage
and the figures it had reached; and the run record, written once the checkpoint being resumed is restored."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_d2ft.io import LINEAGE_KEY, atomic_write

__all__ = ["METRICS_KEY", "RunCheckpoint", "RunRecord"]
#: a checkpoint's key for the run's figures when it was written: {"metrics": {...}, "validated_at": step}
METRICS_KEY = "d2ft_metrics"


class RunCheckpoint(ModelCheckpoint):
    """One file, ``<dirpath>/<name>.ckpt``, rewritten at every trigger (epoch end, or every n steps).

    Lightning's ``save_top_k=0`` writes ``last`` only when fit ends, and a run directory that was moved
    gets ``last-v1.ckpt`` beside the old file; this writes the same file every time, through the
    strategy's checkpoint IO (D2FTStrategy's is atomic), so a rerun always finds the newest weights.
    """

    def __init__(self, dirpath: str | os.PathLike, name: str = "last", **triggers: Any) -> None:
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False, **triggers)
        self.CHECKPOINT_NAME_LAST = name
        self._written_at: int | None = None

    @property
    def path(self) -> Path:
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def _save_topk_checkpoint(self, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
        self._save_last_checkpoint(trainer, monitor_candidates)  # the trigger fired: `last` is all we keep

    def _save_last_checkpoint(self, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
        if self._written_at == trainer.global_step:  # the same on every rank: saving is a collective
            return  # already written at this step by this callback (Lightning asks twice per trigger)
        self._written_at = trainer.global_step
        self.last_model_path = str(self.path)
        self._save_checkpoint(trainer, str(self.path))


class RunRecord(Callback):
    """Writes the run record (``identity`` plus ``lineage``, as JSON at ``path``) when training starts, that is
    after Lightning restored the checkpoint being resumed: a rerun that fails to restore leaves the record of
    the run it failed to continue untouched. Stamps every checkpoint with the lineage and with the figures
    reached so far (``METRICS_KEY``: what results.json reports, and the step of the last validation), so that a
    results write a kill interrupted can be redone from the final checkpoint."""

    def __init__(self, path: str | os.PathLike, identity: dict[str, Any], lineage: str) -> None:
        self.path, self.identity, self.lineage = Path(path), identity, lineage
        self._validated_at: int | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            record = {**self.identity, "lineage": self.lineage}
            atomic_write(self.path, json.dumps(record, indent=2, sort_keys=True).encode())

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._validated_at = trainer.global_step

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[LINEAGE_KEY] = self.lineage
        checkpoint[METRICS_KEY] = {"metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
                                   "validated_at": self._validated_at}
