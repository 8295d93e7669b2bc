"""The conformance matrix: every standard Lightning flow on D2FTStrategy in 1 process, 2 processes
tensor-parallel, and 2 processes data-parallel (sync and lo-fi), against plain timm in one process.

Each multi-process setting is one pair of processes (started the way torchrun starts them, so fit,
validate, test and predict run in the same processes, as in a user's script) that runs every flow in
turn and saves what it saw; the assertions then run here. Flows:

1. exact: fit (SGD, budget 1.0, ``accumulate_grad_batches=2``, ``gradient_clip_val`` by norm,
   ``val_check_interval``, ``limit_*_batches``, ``ModelCheckpoint(monitor, save_last)``, ``EarlyStopping``),
   then validate/test/predict: weights equal plain timm's, evaluation leaves them intact, ``last.ckpt``
   holds them unsharded, and validation reports plain timm's loss.
2. resume: budget 0.3, AdamW, a checkpoint at every step; ``fit(ckpt_path=step 2)`` reaches the weights of
   the straight run.
3. lora_bf16: D2FT-LoRA at budget 0.3 (no deadlock), ``bf16-mixed``, clipping by value, ``max_steps``:
   it finishes, and replicated parameters stay identical on every rank.
"""

from __future__ import annotations

import os
import socket
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_d2ft import D2FTCallback, D2FTStrategy
from lightning_d2ft.app.module import ViTClassifier
from lightning_d2ft.data.digits import DigitsDataModule
from lightning_d2ft.data.micro_batches import MicroBatchSampler

pytestmark = pytest.mark.timeout(900)
SMALL = dict(img_size=16, patch_size=8, embed_dim=48, depth=2)  # 6 heads of width 8, 5 tokens
DATA = dict(img_size=16, batch_size=16, seed=0, train_per_class=16)  # 10 micro-batches
SETTINGS = {"tp2": dict(tensor_parallel_size=2), "dp2_sync": dict(tensor_parallel_size=1),
            "dp2_lofi": dict(tensor_parallel_size=1, data_parallel="lofi")}
CLIP, ACCUMULATE, BATCHES = 0.05, 2, 4


def _module(seed: int = 0, optimizer: str = "sgd") -> ViTClassifier:
    seed_everything(seed)
    return ViTClassifier(num_classes=10, subnets=14, lr=1e-2, optimizer=optimizer, model_kwargs=SMALL)


def _trainer(root: Path, world: int, strategy_kw: dict, callbacks=(), **kw) -> Trainer:
    devices = dict(devices=world) if world > 1 else dict(devices=1)
    strategy = D2FTStrategy(timeout=timedelta(seconds=120), **strategy_kw) if world > 1 \
        else D2FTStrategy(parallel_devices=[torch.device("cpu")], **strategy_kw)
    kw = {"max_epochs": 1, "num_sanity_val_steps": 0, "limit_val_batches": 0, **kw}
    return Trainer(accelerator="cpu", strategy=strategy, callbacks=list(callbacks), default_root_dir=root,
                   logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                   **devices, **kw)


def _d2ft(budget: float, root: Path, **kw) -> D2FTCallback:
    return D2FTCallback(budget=budget, cache_dir=root / "cache", progress=False, **kw)


def _full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The unsharded model (a collective: every rank calls it)."""
    state = trainer.strategy.lightning_module_state_dict()
    return {k.removeprefix("net.vit."): v.detach().cpu().clone() for k, v in state.items() if k.startswith("net.vit.")}


def _flow_exact(root: Path, world: int, kw: dict) -> dict:
    module = _module()
    ckpt = ModelCheckpoint(dirpath=root / "exact", monitor="val/loss", save_last=True, save_top_k=1)
    trainer = _trainer(root, world, kw, [_d2ft(1.0, root), ckpt, EarlyStopping(monitor="val/loss", patience=99)],
                       limit_train_batches=BATCHES, accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP,
                       val_check_interval=2, limit_val_batches=2)
    dm = DigitsDataModule(**DATA)
    trainer.fit(module, dm)
    after_fit = _full_state(trainer)
    (val,) = trainer.validate(module, dm, verbose=False)
    (test,) = trainer.test(module, dm, verbose=False)
    predictions = torch.cat(trainer.predict(module, dm))
    return {"after_fit": after_fit, "after_eval": _full_state(trainer), "val": val, "test": test,
            "predictions": predictions, "last": ckpt.last_model_path, "best": ckpt.best_model_path,
            "early_stopping": "EarlyStopping" in str(torch.load(ckpt.last_model_path, weights_only=False)["callbacks"])}


def _flow_resume(root: Path, world: int, kw: dict) -> dict:
    every = ModelCheckpoint(dirpath=root / "steps", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    straight = _trainer(root, world, kw, [_d2ft(0.3, root), every], limit_train_batches=BATCHES)
    straight.fit(_module(optimizer="adamw"), DigitsDataModule(**DATA))
    reference = _full_state(straight)
    resumed = _trainer(root / "resumed", world, kw, [_d2ft(0.3, root)], limit_train_batches=BATCHES)
    resumed.fit(_module(seed=123, optimizer="adamw"), DigitsDataModule(**DATA),
                ckpt_path=root / "steps" / "step=2.ckpt")
    return {"straight": reference, "resumed": _full_state(resumed),
            "checkpoints": sorted(p.name for p in (root / "steps").glob("*.ckpt"))}


def _flow_lora_bf16(root: Path, world: int, kw: dict) -> dict:
    module = _module()
    trainer = _trainer(root / "lora", world, kw, [_d2ft(0.3, root, lora_rank=2)], max_steps=3,
                       precision="bf16-mixed", gradient_clip_val=0.01, gradient_clip_algorithm="value")
    trainer.fit(module, DigitsDataModule(**DATA))
    local = {k: v.detach().clone() for k, v in module.net.vit.named_parameters()}
    return {"global_step": trainer.global_step, "local": local}


def _run_flows(root: Path, world: int, kw: dict) -> dict:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = {"exact": _flow_exact(root, world, kw), "resume": _flow_resume(root, world, kw),
               "lora_bf16": _flow_lora_bf16(root, world, kw)}
    out["sync_dist_warnings"] = [str(w.message) for w in seen if "sync_dist" in str(w.message)]
    return out


def _worker(rank: int, world: int, port: int, root: str, kw: dict) -> None:
    """One rank, started as torchrun starts it (Lightning then launches nothing)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    torch.set_num_threads(1)
    out = _run_flows(Path(root), world, kw)
    torch.save(out, Path(root) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    results = {}
    root = tmp_path_factory.mktemp("one")
    environ = dict(os.environ)  # the one-process fit exports MASTER_PORT etc.; later tests must not inherit them
    try:
        results["one"] = [_run_flows(root, 1, {})]
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    for name, kw in SETTINGS.items():
        root = tmp_path_factory.mktemp(name)
        mp.start_processes(_worker, args=(2, _free_port(), str(root), kw), nprocs=2, start_method="spawn")
        results[name] = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return results


# -- independent reference: plain timm, one process ----------------------------------------------
def _loss(vit, dm, sampler, mb) -> torch.Tensor:
    x, y = dm.train_set[sampler.micro_batches[mb]]
    return F.cross_entropy(vit(x), y)


def _reference(setting: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Plain timm over the micro-batches each replica sees: sync averages the replicas' gradients, lo-fi
    trains one model per replica and averages the weights at the end. SGD, accumulation and clipping by
    norm as Lightning does them."""
    dp = 2 if setting.startswith("dp2") else 1
    dm = DigitsDataModule(**DATA)
    dm.setup()
    samplers = []
    for r in range(dp):
        s = MicroBatchSampler(dm.train_set, 16, seed=0)
        s.set_replicas(dp, r)
        samplers.append(s)
    models = [_module() for _ in range(dp if setting == "dp2_lofi" else 1)]
    opts = [m.configure_optimizers() for m in models]
    for step in range(BATCHES // ACCUMULATE):
        for i, (m, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            replicas = [i] if len(models) > 1 else range(dp)
            for r in replicas:
                for j in range(ACCUMULATE):
                    mb = samplers[r].micro_batch_ids(0)[step * ACCUMULATE + j]
                    (_loss(m.net.vit, dm, samplers[r], mb) / (ACCUMULATE * len(replicas))).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
            opt.step()
    states = [{k: v.detach() for k, v in m.net.vit.state_dict().items()} for m in models]
    mean = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
    models[0].net.vit.load_state_dict(mean)
    return models[0], mean


def _assert_same(a: dict, b: dict, atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


ALL = ["one", *SETTINGS]


@pytest.mark.parametrize("setting", ALL)
def test_fit_with_accumulation_clipping_and_checkpoints_matches_plain_timm(runs, setting):
    exact = runs[setting][0]["exact"]
    _, reference = _reference(setting)
    _assert_same(exact["after_fit"], reference)
    state = torch.load(exact["last"], weights_only=False)["state_dict"]
    _assert_same({k.removeprefix("net.vit."): v for k, v in state.items() if k.startswith("net.vit.")}, reference)
    assert Path(exact["best"]).is_file() and exact["early_stopping"]


@pytest.mark.parametrize("setting", ALL)
def test_validate_test_predict_after_fit_leave_the_weights_and_report_plain_timm_metrics(runs, setting):
    exact = runs[setting][0]["exact"]
    _assert_same(exact["after_eval"], exact["after_fit"], atol=0)  # no rank-0 broadcast over shards
    assert 0.0 <= exact["test"]["test/acc"] <= 1.0
    if setting.startswith("dp2"):
        return  # each replica evaluates its half of the data: the check below needs all of it on one rank
    model, _ = _reference(setting)
    dm = DigitsDataModule(**DATA)
    dm.setup()
    x, y = dm.val_set.tensors  # 2 validation batches of 256 hold all of it; Lightning weighs by batch size
    assert len(y) <= 512
    with torch.no_grad():
        logits = model.net.vit.eval()(x)
    assert exact["val"]["val/loss"] == pytest.approx(float(F.cross_entropy(logits, y)), abs=1e-4)
    n = len(exact["predictions"])
    assert torch.equal(exact["predictions"], logits[:n].argmax(-1))


@pytest.mark.parametrize("setting", ALL)
def test_checkpoint_at_every_step_of_a_budget_0_3_run_resumes_to_the_same_weights(runs, setting):
    resume = runs[setting][0]["resume"]
    assert resume["checkpoints"] == [f"step={s}.ckpt" for s in range(1, BATCHES + 1)]
    if setting == "dp2_lofi":  # a resumed lo-fi run restarts both replicas from their average (documented)
        assert all(torch.isfinite(v).all() for v in resume["resumed"].values())
        return
    _assert_same(resume["resumed"], resume["straight"], atol=1e-5)


@pytest.mark.parametrize("setting", ALL)
def test_lora_bf16_clip_by_value_max_steps_finish_with_replicas_identical(runs, setting):
    ranks = [r["lora_bf16"] for r in runs[setting]]
    assert all(r["global_step"] == 3 for r in ranks)
    for r in ranks:
        assert all(torch.isfinite(v).all() for v in r["local"].values())
    if len(ranks) == 2:  # replicated pieces (stem, norms, head) are bitwise equal on every rank
        for key in ("head.weight", "head.bias", "norm.weight", "blocks.0.attn.proj.bias"):
            assert torch.equal(ranks[0]["local"][key], ranks[1]["local"][key]), key


@pytest.mark.parametrize("setting", ALL)
def test_our_own_logging_raises_no_sync_dist_warning(runs, setting):
    for rank in runs[setting]:
        assert rank["sync_dist_warnings"] == []
