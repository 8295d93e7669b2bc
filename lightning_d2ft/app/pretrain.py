"""A pretrained starting point that needs no network: a ViT pretrained here on part of the digits.

The paper fine-tunes ImageNet-pretrained ViT-S; those weights cannot be downloaded on our machines. To
still *fine-tune* (not train from scratch), the demo and the accuracy benchmark pretrain the same ViT
shape on some digit classes and fine-tune it on the others. The checkpoint is a plain timm state dict,
built once and cached under a name derived from every setting that shapes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from lightning_d2ft.app.module import build_vit
from lightning_d2ft.data.digits import DigitsDataModule
from lightning_d2ft.io import atomic_write, check_regular_file

__all__ = ["held_out_top1", "pretrained_checkpoint", "save_state_dict", "train_classifier"]
log = logging.getLogger(__name__)


def pretrained_checkpoint(cache_dir: str | Path, model: str, model_kwargs: dict, classes: Sequence[int],
                          epochs: int = 15, lr: float = 1e-3, batch_size: int = 32, seed: int = 0) -> Path:
    """Path of a timm state dict pretrained on digit ``classes``; trains it (single process) if not cached."""
    settings = {"model": model, "kwargs": model_kwargs, "classes": list(classes), "epochs": epochs, "lr": lr,
                "batch_size": batch_size, "seed": seed, "version": 1}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"pretrained-{key}.pt"
    if os.path.lexists(path):
        check_regular_file(path, "pretrained cache")  # a FIFO would block the load forever
        return path
    log.info("pretraining %s on digits %s for %d epochs (cached afterwards at %s)", model, list(classes), epochs,
             path)
    # the caller's random state is left as it was: a run that pretrains draws the same numbers afterwards
    # (its new head, its data order) as the same run that finds the cache
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dm = DigitsDataModule(img_size=model_kwargs.get("img_size", 32), batch_size=batch_size, classes=classes,
                              seed=seed)
        dm.setup()
        vit = train_classifier(dm, model, model_kwargs, epochs, lr)
        accuracy = held_out_top1(vit, dm.val_dataloader(), len(dm.val_set))
    log.info("pretrained: %.1f%% top-1 on held-out images of digits %s", accuracy, list(classes))
    save_state_dict(vit, path)
    return path


def train_classifier(dm, model: str, model_kwargs: dict, epochs: int, lr: float,
                     reshuffle_each_epoch: bool = False) -> torch.nn.Module:
    """A timm ViT trained from scratch on ``dm``'s training loader (AdamW, one-cycle, weight decay 0.05):
    the one pretraining loop of the demo and the accuracy benchmarks."""
    from tqdm.auto import tqdm

    vit = build_vit(model, num_classes=dm.num_classes, **model_kwargs)
    opt = torch.optim.AdamW(vit.parameters(), lr=lr, weight_decay=0.05)
    loader = dm.train_dataloader()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * len(loader), pct_start=0.1)
    for epoch in tqdm(range(epochs), desc="pretraining", leave=False):
        if reshuffle_each_epoch:
            loader.sampler.set_epoch(epoch)
        vit.train()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(vit(x), y).backward()
            opt.step()
            sched.step()
    return vit


@torch.no_grad()
def held_out_top1(net: torch.nn.Module, loader, total: int) -> float:
    """Percent correct of ``net`` (eval mode) over ``loader``'s ``total`` images."""
    net.eval()
    return 100.0 * sum(int((net(x).argmax(-1) == y).sum()) for x, y in loader) / total


def save_state_dict(net: torch.nn.Module, path: Path) -> None:
    """``net``'s state dict written atomically (a killed run leaves no half-written cache entry)."""
    import io

    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    atomic_write(path, buffer.getvalue())
