"""module.py: the example module builds from timm, a pretrained cache file cannot run code, and the
model summary says its counts are per shard."""

from __future__ import annotations

import pytest
import timm
import torch

from lightning_d2ft import ViTClassifier
from lightning_d2ft.app.module import build_vit

KW = dict(img_size=16, patch_size=8, embed_dim=48, depth=2, num_heads=3)


class _Payload:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_a_code_carrying_pretrained_cache_runs_no_code(tmp_path):
    """13.5: the pretrained cache (and any model.checkpoint) is loaded with weights_only=True."""
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(marker)}, tmp_path / "pretrained-0123.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        build_vit("vit_small_patch16_224", checkpoint=str(tmp_path / "pretrained-0123.pt"), **KW)
    assert not marker.exists()


def test_a_checkpoint_loads_without_its_classifier_head(tmp_path):
    source = build_vit("vit_small_patch16_224", num_classes=5, **KW)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    vit = build_vit("vit_small_patch16_224", num_classes=3, checkpoint=str(tmp_path / "w.pt"), **KW)
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert vit.head.out_features == 3


def test_pretrained_weights_that_cannot_be_fetched_say_how_to_start_offline(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, pretrained=False, **kwargs):
        if pretrained:  # what timm raises without a network or a filled hub cache
            raise LocalEntryNotFoundError("check your connection")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(OSError, match=r"pretrained weights of vit_small_patch16_224 .*model.checkpoint=PATH"):
        build_vit("vit_small_patch16_224", pretrained=True, **KW)
    build_vit("vit_small_patch16_224", pretrained=False, **KW)  # only the download is reworded


def test_classifier_knows_its_whole_parameter_count():
    module = ViTClassifier(num_classes=4, subnets=None, model_kwargs=KW)
    timm_count = sum(p.numel() for p in build_vit("vit_small_patch16_224", num_classes=4, **KW).parameters())
    assert module.whole_model_parameters == timm_count
    with pytest.raises(ValueError, match="choose 'adamw' or 'sgd'"):
        ViTClassifier(num_classes=4, subnets=None, model_kwargs=KW, optimizer="lamb").configure_optimizers()
