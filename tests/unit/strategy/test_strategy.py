"""D2FTStrategy without processes: registration, and bad sizes refused before any process starts."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_d2ft import D2FTStrategy


def test_registered_by_name_and_on_one_device():
    from lightning.pytorch.strategies import StrategyRegistry

    assert "d2ft" in StrategyRegistry
    trainer = Trainer(strategy="d2ft", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, D2FTStrategy)
    assert trainer.strategy.tensor_parallel_size == 1 and trainer.strategy.data_parallel_size == 1


@pytest.mark.parametrize("bad", [dict(tensor_parallel_size=0), dict(on_nonfinite="ignore"),
                                 dict(data_parallel="async"), dict(lofi_average_every_n_steps=2),
                                 dict(defer_nonfinite_check="yes"),
                                 dict(defer_nonfinite_check=True, on_nonfinite="skip")])
def test_bad_arguments_are_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        D2FTStrategy(**bad)


def test_tensor_parallel_size_that_does_not_divide_the_devices_is_refused_when_the_trainer_is_built():
    """Before any process starts (it used to fail 17 s later, inside the processes)."""
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide the 2 devices"):
        Trainer(accelerator="cpu", devices=2, strategy=D2FTStrategy(tensor_parallel_size=3), logger=False)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 does not divide the 3 devices"):
        D2FTStrategy(tensor_parallel_size=2, parallel_devices=[torch.device("cpu")] * 3)


def test_a_schedule_with_more_op_patterns_than_cuda_graphs_capture_is_warned_about(make_vit):
    """Past ``max_patterns`` the micro-batches run eagerly (slower than plain timm): say so when installed."""
    from lightning.pytorch import LightningModule

    from lightning_d2ft import D2FTViT, Op, Schedule

    class Holder(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = D2FTViT(make_vit("tiny3"), subnets=None)

    module = Holder()
    K = module.net.num_subnets
    torch.manual_seed(0)
    schedule = Schedule.solve(torch.rand(6, K) + 0.5, torch.rand(6, K) + 0.5, budget=0.6, devices=1, solver="dp")
    assert schedule.distinct_patterns > 2 and (schedule.ops == Op.FULL).any()
    strategy = D2FTStrategy(parallel_devices=[torch.device("cpu")])
    strategy._lightning_module = module
    module.net.use_cuda_graphs(True, max_patterns=2)  # only a limit here: nothing is captured on CPU
    with pytest.warns(UserWarning, match=rf"{schedule.distinct_patterns} distinct op patterns, more than the 2"):
        strategy.install_schedule(schedule)
    module.net.use_cuda_graphs(True, max_patterns=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy.install_schedule(schedule)
