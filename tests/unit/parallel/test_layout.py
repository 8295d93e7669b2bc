"""The group layout table: indices and per-group views agree with timm's q|k|v, head-major layout."""

from __future__ import annotations

import pytest
import torch

from lightning_d2ft.parallel.layout import GROUPED, GroupedDim, group_indices, grouped_dim, per_group


def test_group_indices_follow_lead_group_per_layout():
    assert group_indices(12, GroupedDim(0, 3), 2, [1]).tolist() == [2, 3, 6, 7, 10, 11]
    assert group_indices(6, GroupedDim(0), 3, [2, 0]).tolist() == [4, 5, 0, 1]
    with pytest.raises(ValueError, match="does not split"):
        group_indices(10, GroupedDim(0, 3), 2, [0])


def test_per_group_rows_hold_each_groups_elements():
    w = torch.arange(12 * 2).view(12, 2)
    rows = per_group(w, GROUPED["attn.qkv.weight"], 2)
    idx = group_indices(12, GroupedDim(0, 3), 2, [1])
    assert sorted(rows[1].tolist()) == sorted(w[idx].reshape(-1).tolist())


def test_grouped_dim_finds_block_tensors_only():
    assert grouped_dim("vit.blocks.3.attn.qkv.lora_B") == (3, GroupedDim(0, 3))
    assert grouped_dim("blocks.0.attn.proj.bias") is None
    assert grouped_dim("head.weight") is None
