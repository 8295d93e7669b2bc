"""pretrain.py: the cached pretraining of the demo leaves the caller's random state alone."""

from __future__ import annotations

import torch

from lightning_d2ft.app.pretrain import pretrained_checkpoint

TINY = dict(img_size=16, patch_size=8, embed_dim=48, depth=2)


def test_a_run_that_pretrains_draws_the_same_numbers_afterwards_as_one_that_finds_the_cache(tmp_path):
    """The same command and seed must give the same fine-tune on a fresh machine and on a warm cache."""
    torch.manual_seed(0)
    cold = pretrained_checkpoint(tmp_path, "vit_small_patch16_224", TINY, [0, 1], epochs=1)
    after_training = torch.rand(4)
    torch.manual_seed(0)
    warm = pretrained_checkpoint(tmp_path, "vit_small_patch16_224", TINY, [0, 1], epochs=1)
    assert warm == cold and cold.exists()
    assert torch.equal(torch.rand(4), after_training)
