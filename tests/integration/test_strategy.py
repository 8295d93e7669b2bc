"""D2FTStrategy + D2FTCallback in real Lightning CPU DDP runs: 2 processes, gloo, tensor-parallel 2."""

from __future__ import annotations

import json
import os
import signal
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.flop_counter import FlopCounterMode

from lightning_d2ft import CostModel, D2FTCallback, D2FTStrategy, Op, Schedule
from lightning_d2ft.data import DigitsDataModule, MicroBatchSampler
from lightning_d2ft.lora import add_lora_, merge_lora
from lightning_d2ft.module import ViTClassifier

pytestmark = pytest.mark.timeout(600)
SMALL = dict(img_size=16, patch_size=8, embed_dim=48, depth=2)  # 6 heads of width 8, 5 tokens


def _module(seed: int = 0, optimizer: str = "adamw") -> ViTClassifier:
    seed_everything(seed)
    return ViTClassifier(num_classes=10, subnets=14, lr=1e-3, optimizer=optimizer, model_kwargs=SMALL)


def _data(batch: int = 16, img: int = 16) -> DigitsDataModule:
    return DigitsDataModule(img_size=img, batch_size=batch, seed=0)


def _trainer(tmp_path: Path, devices: int = 2, callbacks=(), strategy_kw=None, **kw) -> Trainer:
    strategy_kw = strategy_kw or {}
    strategy = D2FTStrategy(start_method="spawn", **strategy_kw) if devices > 1 \
        else D2FTStrategy(parallel_devices=[torch.device("cpu")], **strategy_kw)
    kw = {"max_epochs": 1, "num_sanity_val_steps": 0, "limit_val_batches": 0, **kw}
    return Trainer(accelerator="cpu", devices=devices, strategy=strategy, callbacks=list(callbacks),
                   default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   deterministic=True, **kw)


def _d2ft(budget: float, tmp_path: Path) -> D2FTCallback:
    return D2FTCallback(budget=budget, cache_dir=tmp_path / "cache", progress=False)


def _plain_lora_qkv(self, x: torch.Tensor) -> torch.Tensor:
    """A plain per-head-group LoRA ``qkv`` (written here independently of partition.py): every group's
    rows of the weight get ``scale * B_g @ A_g``."""
    r, groups = self.lora_B.shape[1], self.lora_A.shape[0] // self.lora_B.shape[1]
    rows = self.out_features // (3 * groups)
    delta = torch.zeros_like(self.weight)
    for t in range(3):
        for g in range(groups):
            start = t * groups * rows + g * rows
            delta[start : start + rows] = self.lora_B[start : start + rows] @ self.lora_A[g * r : (g + 1) * r]
    return F.linear(x, self.weight + self.lora_scale * delta, self.bias)


def _plain_timm_reference(steps: int, optimizer: str, accumulate: int = 1, replica: tuple[int, int] = (1, 0),
                          lora_rank: int | None = None) -> dict[str, torch.Tensor]:
    """Single-process plain timm fine-tuning over the same micro-batches in the same order (an optimizer
    step every ``accumulate`` micro-batches, on the mean of their losses, as Lightning does); ``replica``
    (replicas, rank): only that data-parallel replica's share of the micro-batches; ``lora_rank``: plain
    LoRA (per head group, base frozen) on every ``qkv``."""
    module = _module(optimizer=optimizer)
    vit = module.net.vit
    if lora_rank is not None:
        add_lora_(module.net, lora_rank)
        for blk in vit.blocks:
            blk.attn.qkv.forward = types.MethodType(_plain_lora_qkv, blk.attn.qkv)
    dm = _data()
    dm.setup()
    sampler = MicroBatchSampler(dm.train_set, 16, seed=0)
    sampler.set_replicas(*replica)
    opt = module.configure_optimizers()
    opt.zero_grad()
    for i, mb in enumerate(sampler.micro_batch_ids(0)[:steps]):
        x, y = dm.train_set[sampler.micro_batches[mb]]
        (F.cross_entropy(vit(x), y) / accumulate).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
    return {k: v.detach() for k, v in vit.state_dict().items()}


def _vit_state(module: ViTClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.net.vit.state_dict().items()}


def _assert_same(a: dict, b: dict, atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


def test_budget_one_at_tensor_parallel_two_trains_like_plain_timm(tmp_path):
    # SGD: AdamW divides by tiny second moments and blows fp32 rounding up to ~1% of a step
    module = _module(optimizer="sgd")
    trainer = _trainer(tmp_path, callbacks=[_d2ft(1.0, tmp_path)], limit_train_batches=5)
    trainer.fit(module, _data())
    _assert_same(_vit_state(module), _plain_timm_reference(steps=5, optimizer="sgd"))


def test_gradient_accumulation_at_tensor_parallel_two_trains_like_plain_timm(tmp_path):
    module = _module(optimizer="sgd")
    trainer = _trainer(tmp_path, callbacks=[_d2ft(1.0, tmp_path)], limit_train_batches=6, accumulate_grad_batches=3)
    trainer.fit(module, _data())
    _assert_same(_vit_state(module), _plain_timm_reference(steps=6, optimizer="sgd", accumulate=3))


def test_lora_at_tensor_parallel_two_trains_like_plain_lora_and_merges_into_timm(tmp_path):
    module = _module(optimizer="sgd")
    d2ft = D2FTCallback(budget=1.0, lora_rank=2, cache_dir=tmp_path / "cache", progress=False)
    _trainer(tmp_path, callbacks=[d2ft], limit_train_batches=4).fit(module, _data())
    state = _vit_state(module)
    reference = _plain_timm_reference(steps=4, optimizer="sgd", lora_rank=2)
    _assert_same(state, reference)  # adapters (sharded by group over 2 ranks) and head, base untouched
    assert state["blocks.0.attn.qkv.lora_B"].abs().sum() > 0  # the adapters did train
    start = _vit_state(_module(optimizer="sgd"))
    assert torch.equal(state["blocks.1.mlp.fc1.weight"], start["blocks.1.mlp.fc1.weight"])  # frozen
    plain = _module(optimizer="sgd").net.vit
    plain.load_state_dict(merge_lora(state))  # exports to a plain timm model


def _lofi_reference(steps: int, every: int, dm: DigitsDataModule) -> dict[str, torch.Tensor]:
    """Two plain timm replicas on the two data halves in one process, parameters averaged every ``every``
    steps and at the end (optimizer state stays per replica)."""
    dm.setup()
    replicas = []
    for rank in range(2):
        module = _module(optimizer="sgd")
        sampler = MicroBatchSampler(dm.train_set, 16, seed=0)
        sampler.set_replicas(2, rank)
        replicas.append((module.net.vit, module.configure_optimizers(), sampler.micro_batch_ids(0), sampler))
    for step in range(steps):
        for vit, opt, ids, sampler in replicas:
            x, y = dm.train_set[sampler.micro_batches[ids[step]]]
            opt.zero_grad()
            F.cross_entropy(vit(x), y).backward()
            opt.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            with torch.no_grad():
                for a, b in zip(replicas[0][0].parameters(), replicas[1][0].parameters()):
                    a.copy_((a + b) / 2)
                    b.copy_(a)
    return {k: v.detach() for k, v in replicas[0][0].state_dict().items()}


def test_lofi_averaging_every_k_steps_matches_two_replicas_averaged_as_often(tmp_path):
    small = dict(img_size=16, batch_size=16, seed=0, train_per_class=16)  # 10 micro-batches: 5 per replica
    module = _module(optimizer="sgd")
    trainer = _trainer(tmp_path, callbacks=[_d2ft(1.0, tmp_path)], limit_val_batches=1,
                       strategy_kw=dict(tensor_parallel_size=1, data_parallel="lofi", lofi_average_every_n_steps=2))
    trainer.fit(module, DigitsDataModule(**small))
    _assert_same(_vit_state(module), _lofi_reference(steps=5, every=2, dm=DigitsDataModule(**small)))
    # each replica's epoch is its half of the micro-batches (5 steps, as the reference), and Lightning knows
    # it: the epoch-end validation runs
    assert "val/acc" in trainer.callback_metrics


def test_lofi_two_replicas_equal_the_average_of_two_independent_runs_on_the_data_halves(tmp_path):
    module = _module(optimizer="sgd")
    # validation after every 2 steps evaluates the average but must not change what the replicas train
    _trainer(tmp_path, callbacks=[_d2ft(1.0, tmp_path)], limit_train_batches=4, limit_val_batches=2,
             val_check_interval=2, strategy_kw=dict(tensor_parallel_size=1, data_parallel="lofi")).fit(module, _data())
    halves = [_plain_timm_reference(steps=4, optimizer="sgd", replica=(2, r)) for r in range(2)]
    _assert_same(_vit_state(module), {k: (halves[0][k] + halves[1][k]) / 2 for k in halves[0]})
    # the replicas really drifted apart, so matching their mean is not a trivial check
    with pytest.raises(AssertionError):
        _assert_same(halves[0], halves[1])


def test_speed_aware_placement_gives_the_faster_rank_twice_the_work_and_trains_exactly(tmp_path):
    from lightning_d2ft.placement import speed_aware

    module = _module(optimizer="sgd")
    trainer = _trainer(tmp_path, callbacks=[_d2ft(1.0, tmp_path)], limit_train_batches=4,
                       strategy_kw=dict(placement=speed_aware([2.0, 1.0])))
    trainer.fit(module, _data())
    _assert_same(_vit_state(module), _plain_timm_reference(steps=4, optimizer="sgd"))  # uneven shards, same math
    budget = D2FTCallback(budget=0.6, progress=False, cache_dir=tmp_path / "cache")
    _trainer(tmp_path / "b", callbacks=[budget], limit_train_batches=2,
             strategy_kw=dict(placement=speed_aware([2.0, 1.0]))).fit(_module(), _data())
    schedule = Schedule.load(tmp_path / "b" / "d2ft" / "schedule.pt")
    loads = schedule.device_loads
    assert float(loads[0] / loads[1]) == pytest.approx(2.0, rel=0.02)  # capacities follow the speeds
    assert schedule.workload_variance < 1e-4  # and the predicted step times are equal


def test_bf16_mixed_precision_follows_fp32_under_the_same_schedule(tmp_path):
    start = _vit_state(_module(optimizer="sgd"))
    deltas = {}
    for precision in ("32-true", "bf16-mixed"):
        module = _module(optimizer="sgd")
        _trainer(tmp_path / precision, callbacks=[_d2ft(0.6, tmp_path)], limit_train_batches=4,
                 precision=precision).fit(module, _data())
        deltas[precision] = torch.cat([(v - start[k]).flatten() for k, v in _vit_state(module).items()])
    exact, bf16 = deltas["32-true"], deltas["bf16-mixed"]
    assert exact.norm() > 0
    # bf16 rounds activations and gradients to ~3 significant digits; a wrong sum or a lost gradient is O(1)
    assert (bf16 - exact).norm() / exact.norm() < 0.1


class MeasureStep(Callback):
    """Per rank: FLOPs of every training step and bytes sent, written to a JSON file per rank."""

    def __init__(self, out: Path) -> None:
        self.out, self.flops, self.bytes, self.ops = out, 0, 0, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counter = FlopCounterMode(display=False)
        self.counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counter.__exit__(None, None, None)
        self.flops += self.counter.get_total_flops()
        self.bytes += trainer.strategy.comm_stats.total_bytes

    def on_train_end(self, trainer, pl_module):
        d2ft = next(c for c in trainer.callbacks if isinstance(c, D2FTCallback))
        rank = trainer.strategy.tensor_parallel_rank
        ids = d2ft._ids[: trainer.num_training_batches]
        Path(self.out).mkdir(parents=True, exist_ok=True)
        (Path(self.out) / f"rank{rank}.json").write_text(json.dumps(
            {"flops": self.flops, "bytes": self.bytes, "ids": ids}))
        if rank == 0:
            d2ft.schedule.save(Path(self.out) / "schedule.pt")


def _measure(tmp_path: Path, budget: float) -> tuple[list[dict], Schedule]:
    out = tmp_path / f"measure{budget}"
    seed_everything(0)
    module = ViTClassifier(num_classes=10, subnets=26, model_kwargs=dict(img_size=32, patch_size=8, embed_dim=96,
                                                                         depth=4))
    trainer = _trainer(tmp_path, callbacks=[_d2ft(budget, tmp_path), MeasureStep(out)], limit_train_batches=8)
    trainer.fit(module, _data(img=32))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], Schedule.load(out / "schedule.pt")


def test_budget_0_6_cuts_flops_and_bytes_per_rank_as_the_schedule_predicts(tmp_path):
    full, _ = _measure(tmp_path, 1.0)
    part, sched = _measure(tmp_path, 0.6)
    flop_cost = CostModel.flops()
    for rank in range(2):
        ids = part[rank]["ids"]
        mine = sched.placement == rank
        predicted = float(flop_cost.compute(sched.ops[ids][:, mine]).sum()) / (len(ids) * int(mine.sum()))
        measured = part[rank]["flops"] / full[rank]["flops"]
        # the stem, head and replicated norms always run: allow the cost model 10%
        assert measured == pytest.approx(predicted, rel=0.10), (rank, measured, predicted)
    ids = part[0]["ids"]
    wire = Schedule(ops=sched.ops[ids], placement=sched.placement, speeds=sched.speeds,
                    column_blocks=sched.column_blocks).wire_fraction
    measured_bytes = (part[0]["bytes"] + part[1]["bytes"]) / (full[0]["bytes"] + full[1]["bytes"])
    assert measured_bytes == pytest.approx(wire, rel=0.10)
    assert measured_bytes < 0.9


def test_save_and_resume_reaches_the_same_weights_on_the_same_or_another_world_size(tmp_path):
    straight = _module()
    _trainer(tmp_path / "a", callbacks=[_d2ft(1.0, tmp_path)], max_epochs=2, limit_train_batches=3).fit(straight, _data())

    first = _module()
    t1 = _trainer(tmp_path / "b", callbacks=[_d2ft(1.0, tmp_path)], max_epochs=1, limit_train_batches=3)
    t1.fit(first, _data())
    ckpt = tmp_path / "b" / "epoch1.ckpt"
    saved = sorted((tmp_path / "b").rglob("*.ckpt"))
    assert saved, "Lightning's default ModelCheckpoint wrote no checkpoint"
    os.replace(saved[-1], ckpt)
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert state["net.vit.blocks.0.attn.qkv.weight"].shape == (3 * 48, 48)  # the whole, unsharded model

    for devices in (2, 1):
        resumed = _module(seed=123)  # different init: everything must come from the checkpoint
        t2 = _trainer(tmp_path / f"c{devices}", callbacks=[_d2ft(1.0, tmp_path)], max_epochs=2, limit_train_batches=3)
        t2.fit(resumed, _data(), ckpt_path=ckpt)
        _assert_same(_vit_state(resumed), _vit_state(straight), atol=1e-4)


class KillRank(Callback):
    """Fault injection at the start of a training step on one rank: ``kill`` dies at once (no cleanup, like
    SIGKILL or a lost machine); ``sigterm`` gets SIGTERM (what schedulers send before preempting)."""

    def __init__(self, rank: int, step: int, how: str) -> None:
        self.rank, self.step, self.how = rank, step, how

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            if self.how == "kill":
                os._exit(17)
            os.kill(os.getpid(), signal.SIGTERM)


def _every_step_checkpoint(root: Path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=2, save_top_k=0)


@pytest.mark.parametrize("how", ["kill", "sigterm"])
def test_rank_killed_mid_epoch_resumes_from_last_checkpoint_to_the_same_weights(tmp_path, how):
    budget, steps = 0.6, 7
    straight = _module()
    _trainer(tmp_path / "a", callbacks=[_d2ft(budget, tmp_path)], limit_train_batches=steps).fit(straight, _data())

    run = tmp_path / "b"
    with pytest.raises(BaseException):  # the launcher reports the dead rank (exit code or signal)
        _trainer(run, callbacks=[_d2ft(budget, tmp_path), _every_step_checkpoint(run), KillRank(1, 5, how)],
                 limit_train_batches=steps).fit(_module(), _data())
    last = run / "ckpt" / "last.ckpt"
    # killed at step 5: the checkpoint of step 4 is intact; SIGTERM at step 5: every rank finishes step 5
    # together (the checkpoint of step 6 is written) and stops, instead of hanging in a collective
    assert torch.load(last, weights_only=False)["global_step"] == {"kill": 4, "sigterm": 6}[how]
    assert not list((run / "ckpt").glob("*.tmp*")), "a partial checkpoint was left behind"

    resumed = _module(seed=123)  # everything must come from the checkpoint
    _trainer(run, callbacks=[_d2ft(budget, tmp_path), _every_step_checkpoint(run)],
             limit_train_batches=steps).fit(resumed, _data(), ckpt_path=last)
    _assert_same(_vit_state(resumed), _vit_state(straight), atol=1e-5)


class PoisonedDigits(DigitsDataModule):
    """Digits with NaN pixels in the micro-batch that epoch 0 visits at training batch ``at_batch``."""

    def __init__(self, at_batch: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.at_batch = at_batch

    def setup(self, stage=None):
        super().setup(stage)
        sampler = MicroBatchSampler(self.train_set, self.hparams.batch_size, seed=self.hparams.seed)
        self.poisoned = sampler.micro_batch_ids(0)[self.at_batch]
        self.train_set.tensors[0][sampler.micro_batches[self.poisoned]] = float("nan")


def test_nonfinite_input_stops_every_rank_naming_step_and_micro_batch_and_keeps_the_checkpoint(tmp_path):
    dm = PoisonedDigits(at_batch=3, img_size=16, batch_size=16, seed=0)
    dm.setup()
    with pytest.raises(Exception, match=rf"non-finite input at global step 3 \(epoch 0, batch 3, "
                                        rf"micro-batch {dm.poisoned}\)"):
        _trainer(tmp_path, callbacks=[_d2ft(1.0, tmp_path), _every_step_checkpoint(tmp_path)],
                 limit_train_batches=6).fit(_module(), dm)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_nonfinite_input_can_be_skipped(tmp_path):
    dm = PoisonedDigits(at_batch=1, img_size=16, batch_size=16, seed=0)
    dm.setup()
    module = _module()
    strategy = D2FTStrategy(parallel_devices=[torch.device("cpu")], on_nonfinite="skip")
    trainer = Trainer(accelerator="cpu", devices=1, strategy=strategy, callbacks=[_d2ft(1.0, tmp_path)],
                      max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    assert strategy.skipped_steps == [{"global_step": 1, "epoch": 0, "batch_idx": 1, "micro_batch": dm.poisoned}]
    assert trainer.global_step == 3  # training went on past it
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    from lightning_d2ft.strategy import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "last.ckpt")
    with pytest.raises(FloatingPointError, match="refusing to write checkpoint"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, tmp_path / "last.ckpt")
    assert torch.equal(torch.load(tmp_path / "last.ckpt")["state_dict"]["w"], torch.ones(2))


def test_checkpoint_loads_into_plain_timm(tmp_path):
    module = _module()
    trainer = _trainer(tmp_path, callbacks=[_d2ft(0.6, tmp_path)], limit_train_batches=2)
    trainer.fit(module, _data())
    (ckpt,) = list(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    vit = _module(seed=5).net.vit
    vit.load_state_dict({k.removeprefix("net.vit."): v for k, v in state.items() if k.startswith("net.vit.")})
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(vit.eval()(x), module.net.vit.eval()(x))


def test_validate_runs_the_full_model(tmp_path):
    module = _module()
    trainer = _trainer(tmp_path, devices=1, callbacks=[_d2ft(0.3, tmp_path)], limit_train_batches=2,
                       limit_val_batches=2)
    trainer.fit(module, _data())
    assert module.net.scheduled_ops is None
    (res,) = trainer.validate(module, _data(), verbose=False)
    assert 0.0 <= res["val/acc"] <= 1.0
    (res,) = trainer.test(module, _data(), verbose=False)
    assert 0.0 <= res["test/acc"] <= 1.0
    predictions = torch.cat(trainer.predict(module, _data()))
    dm = _data()
    dm.setup()
    x = torch.stack([dm.val_set[i][0] for i in range(len(predictions))])
    assert torch.equal(predictions, module.net.vit.eval()(x).argmax(-1))  # the full, unscheduled model


def test_strategy_registered_by_name_and_bad_sizes_rejected():
    from lightning.pytorch.strategies import StrategyRegistry

    assert "d2ft" in StrategyRegistry
    trainer = Trainer(strategy="d2ft", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, D2FTStrategy)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        D2FTStrategy(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="budget"):
        D2FTCallback(budget=1.5)
    with pytest.raises(ValueError, match="unknown forward score metric"):
        D2FTCallback(forward_score="entropy")


def test_training_loader_without_fixed_micro_batches_is_explained(tmp_path):
    from torch.utils.data import DataLoader

    dm = _data()
    dm.setup()
    loader = DataLoader(dm.train_set, batch_size=16, shuffle=True)
    trainer = _trainer(tmp_path, devices=1, callbacks=[_d2ft(0.6, tmp_path)], limit_train_batches=2)
    with pytest.raises(TypeError, match="micro_batch_loader"):
        trainer.fit(_module(), train_dataloaders=loader)
