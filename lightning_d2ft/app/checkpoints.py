"""The app's checkpoints: always the same two files, rewritten in place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["RunCheckpoint"]


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
