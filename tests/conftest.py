"""Shared model builders: small timm ViTs of the shapes the SPEC cares about, random init, CPU."""

from __future__ import annotations

import os

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer


def vit_s16(img_size: int = 32, num_classes: int = 10) -> VisionTransformer:
    """ViT-S/16-shaped (12 blocks x 6 heads, width 384) on a small image so CPU tests stay fast."""
    return VisionTransformer(img_size=img_size, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                             num_classes=num_classes)


def vit_tiny3(**kw) -> VisionTransformer:
    """3 heads, no qkv bias, unfused (explicit softmax) attention."""
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5,
                            qkv_bias=False, **kw)
    for blk in vit.blocks:
        blk.attn.fused_attn = False
    return vit


def vit_layerscale() -> VisionTransformer:
    """LayerScale, qk-norm, average pooling without a class token, 4 heads."""
    return VisionTransformer(img_size=24, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=3,
                             init_values=0.5, qk_norm=True, class_token=False, global_pool="avg", mlp_ratio=2.0)


SHAPES = {"vit_s16": vit_s16, "tiny3": vit_tiny3, "layerscale": vit_layerscale}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    """A one-device run initialises a process group in the test process and exports MASTER_PORT; left
    there, the next 2-process run reuses that port and fails with EADDRINUSE."""
    environ = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


def pytest_generate_tests(metafunc):
    """A test that takes ``vit_shape`` runs once per test ViT shape (build it with ``make_vit(vit_shape)``)."""
    if "vit_shape" in metafunc.fixturenames:
        metafunc.parametrize("vit_shape", sorted(SHAPES))


@pytest.fixture
def make_vit():
    """Build a test ViT by shape name: ``make_vit("tiny3")``, ``make_vit("vit_s16", num_classes=3)``."""
    return lambda name, **kw: SHAPES[name](**kw)
