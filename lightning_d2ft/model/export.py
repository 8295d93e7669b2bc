"""From a D2FT checkpoint back to plain timm."""

from __future__ import annotations

import os

import torch

__all__ = ["timm_state_dict"]


def timm_state_dict(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain timm state dict from a Lightning checkpoint of a module holding a D2FTViT (or from a plain
    state dict): the ``<attr>.vit.`` prefix is stripped and LoRA adapters, if any, are merged into ``qkv``.
    ``timm.create_model(name, **kwargs).load_state_dict(timm_state_dict(path))`` then loads it."""
    from lightning_d2ft.model.lora import merge_lora

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    anchors = [k for k in state if k.endswith("patch_embed.proj.weight")]
    if len(anchors) != 1:
        raise ValueError(f"{checkpoint} holds {len(anchors)} vision transformers (keys ending in "
                         "patch_embed.proj.weight); expected one")
    prefix = anchors[0][: -len("patch_embed.proj.weight")]
    vit = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return merge_lora(vit)
