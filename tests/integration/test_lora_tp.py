"""D2FT-LoRA on 2 tensor-parallel processes: exact against plain per-group LoRA, and mergeable into timm."""

from __future__ import annotations

import pytest
import torch
from fits import assert_same, digits_data, make_module, make_trainer, plain_timm_reference, vit_state

from lightning_d2ft import D2FTCallback
from lightning_d2ft.model.lora import merge_lora

pytestmark = pytest.mark.timeout(600)


def test_lora_at_tensor_parallel_two_trains_like_plain_lora_and_merges_into_timm(tmp_path):
    module = make_module(optimizer="sgd")
    d2ft = D2FTCallback(budget=1.0, lora_rank=2, cache_dir=tmp_path / "cache", progress=False)
    make_trainer(tmp_path, callbacks=[d2ft], limit_train_batches=4).fit(module, digits_data())
    state = vit_state(module)
    reference = plain_timm_reference(steps=4, optimizer="sgd", lora_rank=2)
    assert_same(state, reference)  # adapters (sharded by group over 2 ranks) and head, base untouched
    assert state["blocks.0.attn.qkv.lora_B"].abs().sum() > 0  # the adapters did train
    start = vit_state(make_module(optimizer="sgd"))
    assert torch.equal(state["blocks.1.mlp.fc1.weight"], start["blocks.1.mlp.fc1.weight"])  # frozen
    plain = make_module(optimizer="sgd").net.vit
    plain.load_state_dict(merge_lora(state))  # exports to a plain timm model


