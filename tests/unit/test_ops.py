"""Op values, the cost model, and the aten-op counter used as a launch proxy."""

from __future__ import annotations

import pytest
import torch

from lightning_d2ft.ops import CostModel, Op, count_aten_ops


def test_ops_are_ordered_by_work_and_costs_follow():
    assert Op.SHORTCUT < Op.FORWARD_ONLY < Op.FULL
    cost = CostModel()
    assert cost.compute([0, 1, 2]).tolist() == [0.0, 0.4, 1.0]
    assert cost.comm([0, 1, 2]).tolist() == [0.0, 0.5, 1.0]
    assert CostModel.flops().forward_only == pytest.approx(1 / 3)


def test_bad_cost_model_is_refused():
    with pytest.raises(ValueError, match="forward_only"):
        CostModel(forward_only=0.0)
    with pytest.raises(ValueError, match="comm_forward_only"):
        CostModel(comm_forward_only=2.0)


def test_count_aten_ops_skips_views_and_detaches():
    x = torch.randn(4, 4)
    assert count_aten_ops(lambda: x.view(16).detach()) == 0
    assert count_aten_ops(lambda: (x @ x).sum()) == 2
