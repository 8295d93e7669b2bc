"""app_config.py + the app's early checks: wrong types, ranges, models, data and Trainer arguments are
refused when the config is composed or right after, naming the field and what is allowed; a multirun
summary is written from the jobs' results."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from lightning_d2ft.__main__ import config_dir
from lightning_d2ft.app.config import check_config, register_configs
from lightning_d2ft.app.run import check_model
from lightning_d2ft.app.sweep_summary import summarize_sweep

PATHS = ["schedule.cache_dir=/tmp/x", "model.pretrain.cache_dir=/tmp/y"]


def _compose(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", [*PATHS, *overrides])


def test_defaults_and_every_trainer_config_pass():
    import torch

    for trainer in ("cpu1", "cpu2"):
        check_config(_compose(f"trainer={trainer}"))
    gpu = _compose("trainer=gpu1")
    t = gpu.trainer
    assert (t.accelerator, t.precision, t.progress_refresh_rate) == ("gpu", "bf16-mixed", 50)
    if torch.cuda.is_available():
        check_config(gpu)
    else:  # one line naming the configs that work here (it was Lightning's 20-line "No supported gpu backend")
        with pytest.raises(ValueError, match=r"needs a CUDA GPU and this machine has none: use trainer=cpu1 .*cpu2"):
            check_config(gpu)


@pytest.mark.parametrize("override, field", [("schedule.forward_mix=abc", "schedule.forward_mix"),
                                             ("schedule.score_every=abc", "schedule.score_every"),
                                             ("seed=abc", "seed"), ("trainer.devices=two", "trainer.devices"),
                                             ("schedule.budgett=0.5", "budgett")])
def test_wrong_types_and_unknown_keys_are_refused_when_composed(override, field):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        _compose(override)
    assert field in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("override, message", [
    ("schedule.forward_mix=1.5", r"schedule.forward_mix must be a number in \[0, 1\], got 1.5"),
    ("schedule.score_every=0", "schedule.score_every must be an int >= 1, got 0"),
    ("schedule.method=magic", r"unknown schedule.method 'magic'; choose one of \['d2ft'"),
    ("schedule.solver=greedy", r"unknown schedule.solver 'greedy'; choose one of \['dp', 'ortools'\]"),
    ("schedule.budget=1.5", r"schedule.budget must be a fraction of the all-FULL cost in \(0, 1\], got 1.5"),
    ("schedule.capacity=week", r"unknown schedule.capacity 'week'; choose one of \['step', 'epoch'\]"),
    ("schedule.forward_score=loss", r"schedule.forward_score: unknown forward score metric 'loss'; choose one of"),
    ("trainer.max_epochs=0", "trainer.max_epochs must be an int >= 1"),
    ("trainer.progress_refresh_rate=-1", "trainer.progress_refresh_rate must be an int >= 0"),
    ("trainer.tensor_parallel_size=-2", "trainer.tensor_parallel_size must be 'auto' or a positive int"),
    ("+trainer.extra.gradient_clip_vall=1", r"trainer.extra has \['gradient_clip_vall'\], which lightning.Trainer"),
    ("+schedule.budgt=0.4", r"unknown key schedule.budgt; schedule has \[.*'budget'"),
    ("+foo=1", r"unknown key foo; the config has \["),
    ("+trainer.num_nodes=2", r"unknown key trainer.num_nodes; .*goes under trainer.extra"),
    ("+model.pretrain.epoch=3", r"unknown key model.pretrain.epoch; model.pretrain has \[.*'epochs'"),
    ("trainer.accelerator=tpu", r"trainer.accelerator='tpu' is not allowed; choose one of \['cpu', 'gpu'"),
    ("trainer.precision=17", r"trainer.precision='17' is not allowed; choose one of \[.*'bf16-mixed'"),
    ("trainer.speeds=[2.0]", r"trainer.speeds must be 2 positive finite numbers, one per tensor-parallel rank"),
    ("trainer.speeds=[2.0,-1]", r"trainer.speeds must be 2 positive finite numbers.*got \[2.0, -1.0\]"),
])
def test_ranges_and_choices_are_refused_naming_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        check_config(_compose(override))


def test_the_schedule_section_is_schedule_settings_plus_the_apps_own_fields():
    """ScheduleSettings is the one source of the schedule's defaults and checks; the app builds one from it."""
    import dataclasses

    from lightning_d2ft.app.config import ScheduleConfig
    from lightning_d2ft.schedule.settings import ScheduleSettings

    config = {f.name: f.default for f in dataclasses.fields(ScheduleConfig)}
    for f in dataclasses.fields(ScheduleSettings):
        assert config[f.name] == f.default, f.name
    assert check_config(_compose()) == ScheduleSettings()
    assert check_config(_compose("schedule.budget=0.5", "schedule.solver=dp")) == \
        ScheduleSettings(budget=0.5, solver="dp")


def test_trainer_extra_passes_any_trainer_argument():
    cfg = _compose("+trainer.extra.gradient_clip_val=1.0", "+trainer.extra.max_steps=5")
    check_config(cfg)
    assert dict(cfg.trainer.extra) == {"gradient_clip_val": 1.0, "max_steps": 5}


@pytest.mark.parametrize("name, message", [("resnet18", "model.name='resnet18'.*VisionTransformer"),
                                           ("no_such_model", "model.name='no_such_model' is not a timm model")])
def test_a_model_that_is_not_a_vit_is_refused_naming_model_name(name, message):
    with pytest.raises(ValueError, match=message):
        check_model(name, {"img_size": 32}, None)


def test_sweep_summary_writes_table_csv_and_plot(tmp_path):
    for job, (budget, acc) in enumerate([(0.4, 0.7), (0.8, 0.9)]):
        run = tmp_path / str(job)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- schedule.budget={budget}\n- hydra.job.num={job}\n")
        (run / "results.json").write_text(json.dumps({"val_acc": acc, "compute_fraction": budget,
                                                      "wire_fraction": 0.5, "fit_seconds": 1.0,
                                                      "never_full_subnets": 40 - 10 * job, "distinct_full_sets": 1,
                                                      "ever_full_block_0": 6, "ever_full_block_1": job}))
        (run / ".hydra" / "overrides.yaml").write_text(f"- schedule.budget={budget}\n- trainer=cpu1\n"
                                                       f"- hydra.job.num={job}\n")
    md, csv, png = summarize_sweep(tmp_path)
    table = md.read_text()
    assert "| 0 | schedule.budget=0.4 | 0.7 | 0.4 |" in table and "schedule.budget=0.8 | 0.9 | 0.8" in table
    assert "Every job: `trainer=cpu1`" in table and "cpu1 |" not in table  # un-swept overrides once, not per row
    assert "| 40 | 1 | 6 0 |" in table and "| 30 | 1 | 6 1 |" in table  # the FULL dynamics of each run
    assert "hydra.job" not in table
    assert csv.read_text().splitlines()[0] == ("job,setting,val_acc,compute_fraction,wire_fraction,never_full_subnets,"
                                               "distinct_full_sets,ever_full_per_block,fit_seconds")
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("override, message", [("data.batch_size=abc", "data.batch_size must be a positive int"),
                                               ("data.name=imagenet", r"data.name='imagenet' is not known")])
def test_data_fields_are_checked_by_the_data_module_before_loading(override, message):
    from lightning_d2ft.app.run import build_datamodule

    with pytest.raises(ValueError, match=message):
        build_datamodule(_compose(override))


def test_an_explicit_damaged_resume_path_is_refused_naming_the_file(tmp_path):
    from lightning_d2ft.app.run import _resume_path
    from lightning_d2ft.io import StaleFileError

    bad = tmp_path / "half.ckpt"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 64)  # a truncated zip: torch alone says only "miniz ..."
    with pytest.raises(StaleFileError, match="half.ckpt"):
        _resume_path(_compose(f"resume={bad}"), tmp_path)


@pytest.mark.parametrize("rate, shown", [(0, False), (50, True)])
def test_progress_refresh_rate_zero_turns_the_bar_off_as_in_lightning(tmp_path, rate, shown):
    from lightning_d2ft.app.run import _trainer

    cfg = _compose("trainer=cpu1", f"trainer.progress_refresh_rate={rate}")
    check_config(cfg)
    trainer = _trainer(cfg, tmp_path, [])
    bar = trainer.progress_bar_callback
    assert (bar is not None and bar.is_enabled) == shown
    assert bar is None or bar.refresh_rate == rate


def test_free_sections_take_any_key(tmp_path):
    """model.kwargs, data and trainer.extra are passed on (and checked) by timm, the data module, Lightning."""
    from lightning_d2ft.app.run import _trainer, build_datamodule

    cfg = _compose("+model.kwargs.depth=2", "+trainer.extra.max_steps=3", "+data.train_per_class=5", "trainer=cpu1")
    check_config(cfg)
    assert _trainer(cfg, tmp_path, []).max_steps == 3
    assert build_datamodule(cfg).hparams.train_per_class == 5
    with pytest.raises(ValueError, match="depth"):  # timm refuses a kwarg it does not take, naming it
        check_model(cfg.model.name, {"depth": 2, "depthh": 3}, 14)


def test_a_bad_trainer_setting_is_refused_before_pretraining(tmp_path):
    """The Trainer (which refuses its own bad settings) is built before the minutes of pretraining."""
    from lightning_d2ft.app.run import run

    cfg = _compose("trainer.tensor_parallel_size=3", f"model.pretrain.cache_dir={tmp_path / 'pretrained'}",
                   "resume=null")
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the 2 devices"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "pretrained").exists()


@pytest.mark.parametrize("scoring, resumed, says", [
    (2.94, None, "scoring pass 2.9 s, fit"),
    (0.0, None, "no scoring pass (scores from the cache), fit"),
    (2.94, "last.ckpt", "scoring pass 2.9 s before the resume, fit"),  # not "none" beside a stale figure
])
def test_the_summary_says_where_the_scores_came_from(capsys, scoring, resumed, says):
    from lightning_d2ft.app.run import print_summary

    print_summary({"method": "d2ft", "budget": 0.6, "subnets": 74, "devices": 1, "compute_fraction": 0.6,
                   "val_acc": 0.9, "scoring_seconds": scoring, "fit_seconds": 10.0, "resumed_from": resumed})
    assert says in capsys.readouterr().out


def test_the_summary_has_no_tensor_parallel_wire_line_without_tensor_parallelism(capsys):
    from lightning_d2ft.app.run import print_summary

    base = {"method": "d2ft", "budget": 0.6, "subnets": 74, "devices": 2, "compute_fraction": 0.6, "val_acc": 0.9,
            "scoring_seconds": 1.0, "fit_seconds": 10.0, "wire_fraction": 0.958}
    print_summary({**base, "tensor_parallel_size": 1})  # two data-parallel replicas
    assert "on the wire" not in capsys.readouterr().out
    print_summary({**base, "tensor_parallel_size": 2})
    out = capsys.readouterr().out
    assert "0.958 of full fine-tuning on the wire (4% saved)\n" in out and "per-item" not in out  # the wire only


def test_the_summary_prints_the_full_dynamics(capsys):
    from lightning_d2ft.app.run import print_summary

    print_summary({"method": "d2ft", "budget": 0.6, "subnets": 26, "devices": 1, "compute_fraction": 0.6,
                   "val_acc": 0.9, "scoring_seconds": 1.0, "fit_seconds": 10.0, "never_full_subnets": 5,
                   "distinct_full_sets": 1, "ever_full_block_1": 0, "ever_full_block_0": 2})
    assert "FULL dynamics: 5 subnets never FULL, 1 distinct FULL set; subnets ever FULL per block: 2 0" \
        in capsys.readouterr().out


def test_the_subnet_count_is_the_models_and_the_old_key_still_works_with_a_note(caplog):
    import logging

    assert _compose().model.subnets is None and _compose("model.subnets=26").model.subnets == 26  # None: finest
    cfg = _compose("schedule.subnets=38")
    with caplog.at_level(logging.WARNING):
        check_config(cfg)
    assert cfg.model.subnets == 38 and cfg.schedule.subnets is None
    assert "schedule.subnets is deprecated" in caplog.text and "model.subnets=38" in caplog.text
    with pytest.raises(ValueError, match="schedule.subnets=38 and model.subnets=26 disagree"):
        check_config(_compose("schedule.subnets=38", "model.subnets=26"))



def test_trainer_threads_pin_torch_threads_here_and_in_the_spawned_ranks(tmp_path, monkeypatch):
    """A CPU run's figures depend on how float sums are split over threads: the CPU configs fix the count."""
    import os

    import torch

    from lightning_d2ft.app.run import _trainer

    assert _compose("trainer=cpu2").trainer.threads == 1 and _compose("trainer=cpu1").trainer.threads == 2
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        cfg = _compose("trainer=cpu1", "trainer.threads=1")
        check_config(cfg)
        _trainer(cfg, tmp_path, [])
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="trainer.threads must be an int >= 1"):
        check_config(_compose("trainer.threads=0"))
