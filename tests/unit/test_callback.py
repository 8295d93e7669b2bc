"""D2FTCallback: bad configuration and mismatched schedule files are refused before any heavy work."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_d2ft import D2FTCallback, D2FTStrategy, Schedule
from lightning_d2ft.app.module import ViTClassifier
from lightning_d2ft.data.digits import DigitsDataModule

SMALL = dict(img_size=16, patch_size=8, embed_dim=48, depth=2)  # 6 heads: 4, 8, 14 subnets


def _fit(tmp_path: Path, callback: D2FTCallback, subnets: int = 14, batch: int = 16, data_seed: int = 0,
         ckpt_path: Path | None = None, epochs: int = 1) -> Trainer:
    seed_everything(0)
    module = ViTClassifier(num_classes=10, subnets=subnets, model_kwargs=SMALL)
    trainer = Trainer(accelerator="cpu", devices=1, strategy=D2FTStrategy(parallel_devices=[torch.device("cpu")]),
                      callbacks=[callback], max_epochs=epochs, limit_train_batches=2, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DigitsDataModule(img_size=16, batch_size=batch, seed=data_seed), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0.0}, r"budget must be a fraction .* in \(0, 1\], got 0.0"),
    ({"budget": 1.5}, r"budget must be a fraction .* in \(0, 1\], got 1.5"),
    ({"comm_budget": -0.1}, r"comm_budget must be a fraction .* got -0.1"),
    ({"backward_score": "entropy"}, r"backward.*'entropy'.*weight_magnitude.*fisher"),
    ({"forward_score": "l2"}, r"forward.*'l2'"),
    ({"solver": "cplex"}, r"unknown solver 'cplex'; choose one of \['dp', 'ortools'\]"),
    ({"method": "greedy"}, r"unknown method 'greedy'"),
    ({"forward_mix": 2.0}, r"forward_mix must be a number in \[0, 1\]"),
    ({"score_every": 0}, r"score_every must be an int >= 1"),
    ({"capacity": "week"}, r"unknown capacity 'week'; choose one of \['step', 'epoch'\]"),
    ({"lora_rank": 0}, r"lora_rank must be a positive int or None, got 0"),
    ({"lora_rank": 4, "lora_alpha": -1.0}, r"lora_alpha must be positive"),
])
def test_bad_configuration_is_refused_when_the_callback_is_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        D2FTCallback(**kwargs)


def test_a_missing_schedule_file_is_refused_when_the_callback_is_built(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"schedule_path .*nope.pt is not a file.*drop schedule_path"):
        D2FTCallback(schedule_path=tmp_path / "nope.pt")


def test_a_subnet_count_the_model_cannot_have_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"subnets=13 is not valid.*one of \{4, 6, 8, 14\}"):
        _fit(tmp_path, D2FTCallback(budget=0.6, subnets=13, progress=False))


def test_a_communication_budget_too_small_to_train_is_refused_before_scoring(tmp_path):
    cache = tmp_path / "cache"
    # one device sends nothing on the tensor-parallel wire: a comm budget there is refused (before the
    # floor check, which tests/unit/schedule covers), and before the scoring pass
    with pytest.raises(ValueError, match=r"comm_budget=1e-05 bounds the bytes .* on one device nothing is sent"):
        _fit(tmp_path, D2FTCallback(budget=0.6, comm_budget=1e-5, cache_dir=cache, progress=False))
    assert not cache.exists(), "the scoring pass ran before the check"


def test_a_schedule_file_for_another_model_data_or_world_size_is_refused(tmp_path):
    made = _fit(tmp_path / "made", D2FTCallback(budget=0.6, cache_dir=tmp_path / "cache", progress=False))
    path = Path(made.default_root_dir) / "d2ft" / "schedule.pt"
    assert Schedule.load(path).ops.shape[1] == 14

    with pytest.raises(ValueError, match=r"another model.*14 subnets, the model has 8"):
        _fit(tmp_path / "model", D2FTCallback(schedule_path=path, progress=False), subnets=8)
    with pytest.raises(ValueError, match=r"another model, data.*micro-batches, the data has"):
        _fit(tmp_path / "data", D2FTCallback(schedule_path=path, progress=False), batch=32)
    n_mb = Schedule.load(path).num_micro_batches
    on_two = Schedule.solve(torch.ones(n_mb, 14), torch.ones(n_mb, 14), budget=0.6, devices=2)
    on_two.save(tmp_path / "two.pt")
    with pytest.raises(ValueError, match=r"world size.*2 devices / another placement, this run has 1"):
        _fit(tmp_path / "world", D2FTCallback(schedule_path=tmp_path / "two.pt", progress=False))
    # the matching run uses it as it is
    trainer = _fit(tmp_path / "same", D2FTCallback(schedule_path=path, progress=False))
    assert torch.equal(trainer.callbacks[0].schedule.ops, Schedule.load(path).ops)


def test_zero_or_negative_speeds_are_refused_when_the_callback_is_built():
    for speeds in ([0, 1], [1.0, -2.0], [], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match=r"speeds must be positive finite numbers, one per tensor-parallel rank"):
            D2FTCallback(speeds=speeds)


def test_the_default_solver_is_ortools():
    assert D2FTCallback().settings.solver == "ortools"


def test_the_callback_takes_the_settings_object_or_its_fields_not_both():
    from lightning_d2ft.schedule.settings import ScheduleSettings

    settings = ScheduleSettings(budget=0.4, solver="dp")
    assert D2FTCallback(settings).settings is settings
    assert D2FTCallback(budget=0.4, solver="dp").settings == settings
    with pytest.raises(ValueError, match=r"give settings=ScheduleSettings\(...\) or its fields \(budget\), not both"):
        D2FTCallback(settings, budget=0.5)
    with pytest.raises(TypeError, match=r"unknown schedule setting budgt; the settings are \['budget'"):
        D2FTCallback(budgt=0.5)


@pytest.mark.parametrize("strategy, world", [("DDPStrategy", 2), ("SingleDeviceStrategy", 1)])
def test_a_strategy_that_is_not_d2ft_is_refused_naming_the_fix(strategy, world):
    """The strategy executes the schedule: any other one would train every pair FULL (one process) or the same
    micro-batches on every replica (DDP), silently."""
    from lightning.pytorch import strategies

    made = strategies.DDPStrategy() if world > 1 else strategies.SingleDeviceStrategy(torch.device("cpu"))
    trainer = types.SimpleNamespace(strategy=made, world_size=world, is_global_zero=True)
    module = ViTClassifier(num_classes=10, subnets=14, model_kwargs=SMALL)
    with pytest.raises(ValueError, match=rf"needs D2FTStrategy, got {strategy} on {world} process.*strategy='d2ft'"):
        D2FTCallback().setup(trainer, module, "fit")


def test_an_unwritable_cache_dir_is_refused_before_the_scoring_pass(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(PermissionError, match=r"cache_dir .*a_file/cache.* cannot be written"):
        _fit(tmp_path, D2FTCallback(budget=0.6, cache_dir=tmp_path / "a_file" / "cache", progress=False))


def test_only_the_micro_batches_that_will_train_are_scored(tmp_path):
    limited = _fit(tmp_path / "a", D2FTCallback(budget=0.6, cache_dir=tmp_path / "c", progress=False))
    cb = limited.callbacks[0]
    assert cb.scored_micro_batches == 2  # limit_train_batches=2 of the epoch's micro-batches
    sampler = limited.train_dataloader.sampler
    assert cb.schedule.num_micro_batches == sampler.num_micro_batches > 2
    sampled = _fit(tmp_path / "b", D2FTCallback(budget=0.6, score_every=2, cache_dir=tmp_path / "c", progress=False))
    assert sampled.callbacks[0].scored_micro_batches == 1


def test_the_end_of_fit_line_compares_scoring_with_a_full_epoch_and_shows_no_wire_on_one_device(tmp_path):
    trainer = _fit(tmp_path, D2FTCallback(budget=0.6, cache_dir=tmp_path / "c", progress=False))
    line = trainer.callbacks[0].cost_summary(trainer)
    assert "wire" not in line and "x one training epoch" in line
    n = trainer.train_dataloader.sampler.num_micro_batches
    assert re.search(rf"x one training epoch \(~[\d.]+ s: {n} batches at the 2 trained batches' mean\)", line), line


def test_a_schedule_file_for_other_data_or_another_budget_is_refused(tmp_path):
    made = _fit(tmp_path / "made", D2FTCallback(budget=0.6, cache_dir=tmp_path / "cache", progress=False))
    path = Path(made.default_root_dir) / "d2ft" / "schedule.pt"
    with pytest.raises(ValueError, match=r"budget=0.6, this run has budget=0.8"):
        _fit(tmp_path / "budget", D2FTCallback(budget=0.8, schedule_path=path, progress=False))
    with pytest.raises(ValueError, match=r"method='d2ft', this run has method='random'"):
        _fit(tmp_path / "method", D2FTCallback(method="random", schedule_path=path, progress=False))
    with pytest.raises(ValueError, match=r"other data \(another data set, data seed"):
        _fit(tmp_path / "seed", D2FTCallback(schedule_path=path, progress=False), data_seed=1)


def test_a_resumed_run_with_another_budget_is_refused(tmp_path):
    first = _fit(tmp_path, D2FTCallback(budget=0.6, cache_dir=tmp_path / "c", progress=False))
    ckpt = tmp_path / "last.ckpt"
    first.save_checkpoint(ckpt)
    with pytest.raises(ValueError, match=r"checkpoint being resumed.*budget=0.6, this run has budget=0.4.*resume=null"):
        _fit(tmp_path, D2FTCallback(budget=0.4, cache_dir=tmp_path / "c", progress=False), ckpt_path=ckpt, epochs=2)


def test_lora_adapters_are_added_before_the_optimizer_and_the_scores_rate_the_base_subnets(tmp_path):
    plain = _fit(tmp_path / "plain", D2FTCallback(budget=0.6, forward_score="taylor", cache_dir=tmp_path / "c1",
                                                  progress=False))
    lora = _fit(tmp_path / "lora", D2FTCallback(budget=0.6, forward_score="taylor", lora_rank=2,
                                                cache_dir=tmp_path / "c2", progress=False))
    assert torch.equal(plain.callbacks[0].schedule.ops, lora.callbacks[0].schedule.ops)
    trained = {id(p) for g in lora.optimizers[0].param_groups for p in g["params"]}
    net = lora.lightning_module.net
    assert all(id(p) in trained for n, p in net.vit.named_parameters() if "lora_" in n)
    assert not net.vit.blocks[0].attn.qkv.weight.requires_grad  # frozen again after scoring


class _TrainStartFirst(D2FTCallback):
    """As if a Lightning version called on_train_start without on_fit_start before it."""

    def on_fit_start(self, trainer, pl_module):
        pass


def test_planning_does_not_depend_on_which_hook_comes_first(tmp_path):
    usual = _fit(tmp_path / "a", D2FTCallback(budget=0.6, cache_dir=tmp_path / "c1", progress=False))
    late = _fit(tmp_path / "b", _TrainStartFirst(budget=0.6, cache_dir=tmp_path / "c2", progress=False))
    assert torch.equal(usual.callbacks[0].schedule.ops, late.callbacks[0].schedule.ops)
    assert late.callbacks[0].scored_micro_batches == 2


def test_the_strategy_resolves_one_placement_that_the_model_and_the_callback_share(tmp_path, monkeypatch):
    """Resolved once when the model is sharded, stored once (on the model); Schedule.solve gets that object."""
    import lightning_d2ft.strategy.strategy as strategy_module
    from lightning_d2ft.parallel.placement import Placement

    calls, solved_with = [], []
    resolve = strategy_module.resolve_placement
    monkeypatch.setattr(strategy_module, "resolve_placement", lambda *a: calls.append(a) or resolve(*a))
    _record_placements(monkeypatch, solved_with)
    trainer = _fit(tmp_path, D2FTCallback(budget=0.6, cache_dir=tmp_path / "c", progress=False))
    net = trainer.lightning_module.net
    assert len(calls) == 1 and isinstance(net.placement, Placement)
    assert trainer.strategy.placement is net.placement is solved_with[0]
    assert torch.equal(trainer.callbacks[0].schedule.placement, net.placement.column_devices())


def test_the_callbacks_speeds_win_over_the_placements(tmp_path, monkeypatch):
    solved_with = []
    _record_placements(monkeypatch, solved_with)
    trainer = _fit(tmp_path, D2FTCallback(budget=0.6, speeds=[3.0], cache_dir=tmp_path / "c", progress=False))
    assert solved_with[0].speeds == (3.0,) and trainer.strategy.placement.speeds == (1.0,)
    assert torch.equal(solved_with[0].owner, trainer.strategy.placement.owner)


def _record_placements(monkeypatch, seen: list) -> None:
    """Note the placement every schedule problem is built with (the callback builds one before scoring)."""
    from lightning_d2ft.schedule.problem import ScheduleProblem

    build = ScheduleProblem.build.__func__
    monkeypatch.setattr(ScheduleProblem, "build", classmethod(
        lambda cls, settings, n_mb, n_sub, placement=None, **kw: seen.append(placement)
        or build(cls, settings, n_mb, n_sub, placement, **kw)))
