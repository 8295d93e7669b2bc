"""Fashion-MNIST accuracy sweep (issues 16, 27): paired runs, appended to ``runs.jsonl`` as they finish.

    nice -n 10 python benchmarks/accuracy/fashion.py                 # the v3 sweep, all tiers (resumable)
    nice -n 10 python benchmarks/accuracy/fashion.py --tiers 1       # the key comparisons only
    python benchmarks/accuracy/fashion.py --smoke                    # rehearse the pipeline in minutes
    python benchmarks/accuracy/fashion_tables.py --tag v3            # tables from runs.jsonl

Protocol: a ViT-S-shaped model (12 blocks x 6 heads, narrow) is pretrained on Fashion-MNIST classes 0-4
(once per seed, cached), then fine-tuned on a seeded subset of classes 5-9 and tested on all 5,000
official test images of classes 5-9. Within a seed every run shares the pretrained checkpoint, the
fine-tuning subset, the micro-batches (same sampler seed) and the head initialisation (``seed_everything``
right before the model is built). One process, one CPU device (``trainer=cpu1``-like); runs go in priority
tiers over all seeds, so a cut-short sweep still holds complete seeds for the key comparisons. A run
already in the runs file (same settings, seed and ``--tag``) is skipped.

Tag ``v3`` (issue 27): the train-or-skip baselines and their ``_fo`` ablations, the paper's capacity with the
FULL floor, ``forward_mix``, the per-sample ``fisher`` against ``squared_gradient``, and schedules solved for
2 and 4 tensor-parallel devices, **executed in one process**: the ops alone decide what a fine-tune learns
(tensor parallelism splits the same sums over ranks; ``tp_schedule.py`` and
``tests/integration/test_tensor_parallel_schedule_in_one_process.py``), and on one device with per-step
capacity D2FT's knapsack is a per-micro-batch top-k. Every row records a hash of its ops (``ops_sha``), so
the tables say "identical schedules" where two methods gave the same ops. ``--smoke`` runs every tier on a
few images for 1 epoch and 2 seeds, into ``.cache/fashion-smoke/`` (never into the results).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lightning_d2ft.app.module import ViTClassifier  # noqa: E402
from lightning_d2ft.app.pretrain import held_out_top1, save_state_dict, train_classifier  # noqa: E402
from lightning_d2ft.data.fashion_mnist import FashionMNISTDataModule  # noqa: E402
from lightning_d2ft.ops import Op  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tp_schedule import TensorParallelSchedule  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "accuracy" / "fashion"
CACHE = REPO / ".cache" / "fashion"
MODEL = "vit_small_patch16_224"  # 12 blocks x 6 heads: 26/38/74 subnets exist
KWARGS = {"img_size": 28, "patch_size": 7, "embed_dim": 96, "in_chans": 1}
# sized (pilot, tag "v2") for a full-fine-tuning seed SD under 1 point; tag "v1" (first called "merged") used
# 1000/3 and 400/3
PRETRAIN = {"classes": [0, 1, 2, 3, 4], "per_class": 2000, "epochs": 4, "lr": 1e-3, "batch_size": 50}
FINETUNE = {"classes": [5, 6, 7, 8, 9], "per_class": 1000, "epochs": 4, "lr": 5e-4, "batch_size": 50,
            "lora_lr": 5e-3}  # LoRA rows (LoRA and D2FT-LoRA alike): at 5e-4 rank-4 adapters reached only 48%
SEEDS = [0, 1, 2, 3, 4]
# a v2 row without the keys added since holds their defaults (fashion_tables reads it so)
DEFAULT = {"method": "d2ft", "budget": 0.6, "comm_budget": None, "subnets": 74, "backward_score": "weight_magnitude",
           "forward_score": "fisher", "score_every": 1, "lora_rank": None, "devices": 1, "capacity": "step",
           "forward_mix": 0.5}
SMOKE = {"pretrain_per_class": 60, "pretrain_epochs": 1, "per_class": 40, "epochs": 1, "batch_size": 10,
         "test_per_class": 100, "seeds": [0, 1]}


def _runs(*specs: dict) -> list[dict]:
    return [{**DEFAULT, **s} for s in specs]


BASELINES = ("random", "dpruning", "moe")
TRAIN_OR_SKIP = BASELINES
ABLATIONS = ("random_fo", "dpruning_fo", "moe_fo")
TIERS_V3: dict[int, list[dict]] = {
    # the targets: full, D2FT, the train-or-skip baselines and their _fo ablations at budgets 0.6 and 0.4
    1: _runs({"method": "full", "budget": 1.0},
             *({"method": m, "budget": b} for b in (0.6, 0.4) for m in ("d2ft", *TRAIN_OR_SKIP, *ABLATIONS))),
    # schedules solved for 2 and 4 tensor-parallel devices (executed in one process): D2FT is not MoE there
    2: _runs(*({"devices": d, "budget": b} for b in (0.6, 0.4) for d in (2, 4))),
    # the paper's capacity with its floor, forward_mix, fisher (per sample) against squared_gradient
    3: _runs(*({"capacity": "epoch", "budget": b} for b in (0.6, 0.4)),
             {"forward_mix": 0.0}, {"forward_mix": 1.0},
             {"forward_score": "squared_gradient"}, {"backward_score": "fisher"},
             {"backward_score": "squared_gradient"}),
    # the wire budget (2 devices: one device sends nothing) at compute 1.0
    4: _runs({"devices": 2, "budget": 1.0, "comm_budget": 0.5}),
    # issue 25: v2's tier-1 rows again with only the optimizer semantics changed (per-group Parameters): v2's
    # "fisher" is today's squared_gradient and v2's baselines are today's _fo ones (tier 1 has full and random_fo,
    # tier 3 D2FT with squared_gradient); v2's comm-budget row has no equivalent (one device sends nothing now)
    5: _runs(*({"method": m, "forward_score": "squared_gradient"} for m in ("dpruning_fo", "moe_fo"))),
}
TIERS: dict[int, list[dict]] = {
    # the targets: full, default D2FT and every baseline at budget 0.6 / 74 subnets, D2FT at comm budget 0.5
    1: _runs({"method": "full", "budget": 1.0}, {}, *({"method": m} for m in BASELINES),
             {"budget": 1.0, "comm_budget": 0.5}),
    # score_every cost, subnets and budget curves, LoRA, baselines under the comm budget
    2: _runs({"score_every": 4}, {"score_every": 10}, {"subnets": 26}, {"budget": 0.4},
             {"budget": 1.0, "lora_rank": 4}, {"lora_rank": 4}, {"subnets": 38}, {"budget": 0.8},
             *({"method": m, "budget": 1.0, "comm_budget": 0.5} for m in BASELINES)),
    # baselines along the budget, score pairs
    3: _runs(*({"method": m, "budget": b} for m in BASELINES for b in (0.4, 0.8)),
             {"backward_score": "fisher"}, {"backward_score": "gradient_magnitude"},
             {"forward_score": "weight_magnitude"}, {"backward_score": "fisher", "forward_score": "random"},
             {"backward_score": "random", "forward_score": "random"}),
}
KEY_FIELDS = (*DEFAULT, "seed", "tag")


def _key(row: dict) -> tuple:
    return tuple(row.get(k, DEFAULT.get(k)) for k in KEY_FIELDS)


def use_smoke_sizes() -> None:
    """Shrink everything (pretraining, fine-tuning, test images) so the whole pipeline runs in minutes, and
    keep its files apart from the results (the pretrained checkpoints are cached by their sizes anyway)."""
    global CACHE, TEST_PER_CLASS
    PRETRAIN.update(per_class=SMOKE["pretrain_per_class"], epochs=SMOKE["pretrain_epochs"])
    FINETUNE.update(per_class=SMOKE["per_class"], epochs=SMOKE["epochs"], batch_size=SMOKE["batch_size"])
    CACHE = REPO / ".cache" / "fashion-smoke"
    TEST_PER_CLASS = SMOKE["test_per_class"]


TEST_PER_CLASS: int | None = None  # None: every official test image of the classes


def pretrained(seed: int) -> Path:
    """A timm state dict pretrained on classes 0-4 for ``seed`` (cached; named by every setting that shapes it)."""
    settings = {"model": MODEL, "kwargs": KWARGS, **PRETRAIN, "seed": seed, "version": 1}
    path = CACHE / f"pretrained-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]}.pt"
    if path.exists():
        return path
    torch.manual_seed(seed)
    dm = FashionMNISTDataModule(classes=PRETRAIN["classes"], train_per_class=PRETRAIN["per_class"],
                                batch_size=PRETRAIN["batch_size"], seed=seed + 1000)
    dm.setup()
    vit = train_classifier(dm, MODEL, KWARGS, PRETRAIN["epochs"], PRETRAIN["lr"], reshuffle_each_epoch=True)
    print(f"pretrained seed {seed}: {top1(vit, dm):.2f}% on the test images of classes 0-4", flush=True)
    save_state_dict(vit, path)
    return path


def top1(net: torch.nn.Module, dm: FashionMNISTDataModule) -> float:
    """Percent correct on every test image of the data module's classes (the full model, eval mode); with
    ``--smoke`` on the first ``TEST_PER_CLASS`` x classes of them."""
    if TEST_PER_CLASS is None:
        return held_out_top1(net, dm.test_dataloader(), len(dm.val_set))
    n = min(len(dm.val_set), TEST_PER_CLASS * dm.num_classes)
    picks = list(range(0, len(dm.val_set), max(1, len(dm.val_set) // n)))[:n]  # spread over the classes
    subset = torch.utils.data.Subset(dm.val_set, picks)
    return held_out_top1(net, torch.utils.data.DataLoader(subset, batch_size=250), len(picks))


class OneCycleClassifier(ViTClassifier):
    """ViTClassifier with a one-cycle learning rate (10% warm-up, then annealing to ~0) over the fit.

    The pilot with a constant learning rate gave a seed SD of 3.9 points for full fine-tuning (the last
    step lands anywhere in a noisy trajectory; one seed ended 8 points low); annealing removes that."""

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, self.hparams.lr, pct_start=0.1,
                                                    total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _lr(spec: dict) -> float:
    return FINETUNE["lora_lr"] if spec["lora_rank"] else FINETUNE["lr"]


def ops_sha(ops: torch.Tensor) -> str:
    """A short hash of a schedule's ops: two runs with the same hash executed the same schedule."""
    return hashlib.sha256(ops.to(torch.int8).contiguous().numpy().tobytes()).hexdigest()[:16]


def finetune(spec: dict, seed: int, checkpoint: Path, dm: FashionMNISTDataModule, root: Path) -> dict:
    """One fine-tune on the seed's shared subset and micro-batches; returns the run's row."""
    from lightning.pytorch import Trainer, seed_everything

    from lightning_d2ft.callback import D2FTCallback

    kw = dict(budget=spec["budget"], subnets=spec["subnets"], backward_score=spec["backward_score"],
              forward_score=spec["forward_score"], method=spec["method"], comm_budget=spec["comm_budget"],
              score_every=spec["score_every"], capacity=spec["capacity"], forward_mix=spec["forward_mix"],
              cache_dir=CACHE / "scores", seed=seed, progress=False, lora_rank=spec["lora_rank"])
    devices = spec["devices"]
    # a schedule for `devices` tensor-parallel ranks, executed here in one process (tp_schedule.py)
    callback = TensorParallelSchedule(devices=devices, **kw) if devices > 1 else D2FTCallback(**kw)
    seed_everything(seed, verbose=False)  # the same head initialisation for every method of this seed
    module = OneCycleClassifier(model=MODEL, num_classes=dm.num_classes, subnets=spec["subnets"],
                           checkpoint=str(checkpoint), lr=_lr(spec), model_kwargs=KWARGS)
    trainer = Trainer(accelerator="cpu", devices=1, strategy="d2ft", max_epochs=FINETUNE["epochs"], limit_val_batches=0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[callback], default_root_dir=root, deterministic=True)
    start = time.perf_counter()
    trainer.fit(module, dm)
    seconds = time.perf_counter() - start
    s = callback.schedule
    m = s.metrics()
    per_mb_full = (s.ops == Op.FULL).sum(1)
    return {"top1": top1(module.net, dm), "ops_sha": ops_sha(s.ops), "schedule_devices": s.num_devices,
            "compute_fraction": s.compute_fraction, "wire_fraction": m.get("wire_fraction"),
            "forward_only_share": s.op_counts()["FORWARD_ONLY"] / max(1, int(s.scheduled.sum()) * s.num_micro_batches),
            "workload_variance": s.workload_variance, "lockstep_fraction": s.lockstep_fraction,
            "step_compute_min": float(s.step_loads.sum(1).min() / s.step_loads.sum(1).mean()),
            "untrained_micro_batches": int((per_mb_full == 0).sum()),
            "never_full_subnets": m["never_full_subnets"], "distinct_full_sets": m["distinct_full_sets"],
            "ever_full_per_block": [n for n, _ in s.ever_full_per_block().values()],
            "scoring_seconds": callback.scoring_seconds, "fit_seconds": round(seconds, 1)}


def _git() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiers", default=None, help="comma-separated tiers to run, in order (default: all)")
    parser.add_argument("--seeds", default=None, help=f"default {SEEDS} ({SMOKE['seeds']} with --smoke)")
    parser.add_argument("--tag", default="v3", help="code and size label; part of a run's identity ('v2', "
                        "'v1': the earlier sweeps' tiers)")
    parser.add_argument("--runs", type=Path, default=None, help="the runs file (default: the results' runs.jsonl; "
                        "with --smoke .cache/fashion-smoke/runs.jsonl)")
    parser.add_argument("--smoke", action="store_true", help="rehearse: a few images, 1 epoch, 2 seeds, tag "
                        "'smoke', files under .cache/fashion-smoke/ (never the results)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th pending run from the i-th (parallel "
                        "processes share one runs file; each pretrained checkpoint is cached once per seed)")
    args = parser.parse_args()
    if args.smoke:
        use_smoke_sizes()
        args.tag = "smoke"
    args.runs = args.runs or (CACHE / "runs.jsonl" if args.smoke else OUT / "runs.jsonl")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else (SMOKE["seeds"] if args.smoke else SEEDS)
    tiers = TIERS_V3 if args.tag not in ("v1", "v2") else TIERS
    torch.set_num_threads(args.threads)
    # Lightning's CPU DDP-style strategies otherwise raise torch's threads to cores / processes after the first
    # fit, and two sweep processes on 2 cores then thrash (measured: a 400-step fine-tune took 11 minutes)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    args.runs.parent.mkdir(parents=True, exist_ok=True)
    done = {_key(json.loads(line)) for line in args.runs.read_text().splitlines() if line.strip()} \
        if args.runs.exists() else set()
    data: dict[int, FashionMNISTDataModule] = {}
    index, count = (int(v) for v in args.shard.split("/"))
    position = -1
    for tier in (int(t) for t in args.tiers.split(",")) if args.tiers else sorted(tiers):
        for spec in tiers[tier]:
            for seed in seeds:
                row = {**spec, "seed": seed, "tag": args.tag}
                if _key(row) in done:
                    continue
                position += 1
                if position % count != index:
                    continue
                if seed not in data:
                    data[seed] = FashionMNISTDataModule(classes=FINETUNE["classes"], batch_size=FINETUNE["batch_size"],
                                                        train_per_class=FINETUNE["per_class"], seed=seed)
                    data[seed].setup()
                row.update(finetune(spec, seed, pretrained(seed), data[seed], CACHE / "runs"), tier=tier, git=_git(),
                           finetune_images=FINETUNE["per_class"] * len(FINETUNE["classes"]),
                           finetune_epochs=FINETUNE["epochs"], width=KWARGS["embed_dim"], lr=_lr(spec))
                with args.runs.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                done.add(_key(row))
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
