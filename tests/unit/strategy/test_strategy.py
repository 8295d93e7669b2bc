"""D2FTStrategy without processes: registration, and bad sizes refused before any process starts."""

from __future__ import annotations

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


def test_the_strategy_is_composed_not_assembled_from_mixins():
    """Every Lightning hook it touches is in strategy.py and hands its work to a composed part."""
    ours = [c for c in D2FTStrategy.__mro__ if c.__module__.startswith("lightning_d2ft")]
    assert ours == [D2FTStrategy]
    strategy = D2FTStrategy()
    assert type(strategy.runner).__name__ == "ScheduleRunner" and type(strategy.guard).__name__ == "StepGuard"
    assert D2FTStrategy.__dict__.keys() >= {"on_train_start", "on_train_batch_start", "training_step", "backward",
                                            "optimizer_step", "lightning_module_state_dict", "load_model_state_dict",
                                            "optimizer_state", "load_optimizer_state_dict"}
    fresh = D2FTStrategy()
    assert fresh.runner is not strategy.runner and fresh.skipped_steps is not strategy.skipped_steps  # no shared state


def test_a_fit_without_the_callback_says_once_that_every_subnet_ran_full(tmp_path, make_vit):
    """D2FTStrategy alone is plain fine-tuning: a user must not believe they ran D2FT (issue 28.1)."""
    from lightning.pytorch import LightningModule
    from torch.utils.data import TensorDataset

    from lightning_d2ft import D2FTViT, micro_batch_loader

    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = D2FTViT(make_vit("tiny3"), subnets=None)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,)))
    trainer = Trainer(accelerator="cpu", devices=1, strategy=D2FTStrategy(parallel_devices=[torch.device("cpu")]),
                      max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"no schedule was installed.*every subnet runs FULL.*D2FTCallback") as seen:
        trainer.fit(Tiny(), micro_batch_loader(data, 4))
    assert sum("no schedule was installed" in str(w.message) for w in seen) == 1
