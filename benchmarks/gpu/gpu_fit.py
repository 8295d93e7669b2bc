"""A Lightning fine-tune on one device: ViTClassifier + D2FTCallback(solver="dp") + D2FTStrategy, fit +
validation + checkpoint, at budget 1.0 and 0.6 on the same data; times the fit with scoring excluded.

    PYTHONPATH=. python benchmarks/gpu/gpu_fit.py                         # one GPU, ViT-S/16 224 px, bf16
    PYTHONPATH=. python benchmarks/gpu/gpu_fit.py --accelerator cpu --img-size 32 --batch 8 --samples 64 \\
        --precision 32-true --out gpu_fit_cpu_smoke.json             # tiny CPU check

On a GPU each budget runs twice: with CUDA graphs (the strategy's default there) and eagerly
(``cuda_graphs=False``); ratios are against budget 1.0 with the same executor. Data are random images with
random labels (the same tensors for both budgets; speed, not accuracy, is measured here). Fit time is the wall
time from the first to the last training batch (``on_train_start`` is
after D2FTCallback has scored and solved in ``on_fit_start``) plus validation, synchronised on CUDA.
Writes ``benchmarks/results/gpu_fit.json`` (or ``--out``). Needs torch, timm, lightning; no hydra/ortools.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/_common.py
from _common import print_table, write_json

from lightning_d2ft.app.module import ViTClassifier
from lightning_d2ft.callback import D2FTCallback
from lightning_d2ft.data.micro_batches import micro_batch_loader
from lightning_d2ft.strategy.strategy import D2FTStrategy


class FitTimer(Callback):
    """Seconds of every training epoch and of the whole fit after scoring, synchronised on CUDA."""

    def __init__(self) -> None:
        self.start = self.seconds = self.epoch_start = 0.0
        self.epochs: list[float] = []
        self.step_intervals: list[float] = []  # seconds between batch starts inside epochs 2.. (steady state)
        self._last_batch: float | None = None

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self._now()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch_start = self._now()
        self._last_batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()  # no sync: in steady state the host waits for the GPU each step anyway
        if self._last_batch is not None and trainer.current_epoch > 0:
            self.step_intervals.append(now - self._last_batch)
        self._last_batch = now

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append(self._now() - self.epoch_start)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.seconds = self._now() - self.start


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64 * 40)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default 4 on a GPU, 0 on CPU)")
    parser.add_argument("--subnets", type=int, default=74)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.6])
    parser.add_argument("--method", choices=["d2ft", "random"], default="d2ft",
                        help="the schedule's method: random data and a random-init model give d2ft few distinct op "
                             "patterns (3-5 of 40), real data nearly one per micro-batch (19 of 20 on digits); "
                             "'random' gives every micro-batch its own, so CUDA graphs capture as many as on real data")
    parser.add_argument("--executors", choices=["both", "graphs", "eager"], default="both",
                        help="on a GPU: CUDA graphs (the default executor there), eager, or both")
    parser.add_argument("--nonfinite-check", choices=["default", "at-once"], default="default",
                        help="D2FTStrategy(defer_nonfinite_check=...): the default (deferred on CUDA) or False, "
                             "which reads the flags back in every step (one host sync)")
    parser.add_argument("--bare", action="store_true",
                        help="after each fit, time one epoch of the same steps in a plain loop (no Lightning): "
                             "what the fit adds per step is Lightning's loop, hooks and logging")
    parser.add_argument("--out", default="gpu_fit.json")
    return parser.parse_args()


def fit_once(args, budget: float, graphs: bool, data: TensorDataset, val: TensorDataset, root: Path) -> dict:
    seed_everything(0)
    module = ViTClassifier(model="vit_small_patch16_224", num_classes=10, subnets=args.subnets, lr=1e-4,
                           model_kwargs={"img_size": args.img_size})
    timer = FitTimer()
    defer = False if args.nonfinite_check == "at-once" else None
    trainer = Trainer(accelerator=args.accelerator, devices=1,
                      strategy=D2FTStrategy(cuda_graphs=graphs, defer_nonfinite_check=defer),
                      precision=args.precision,
                      callbacks=[D2FTCallback(budget=budget, solver="dp", method=args.method, progress=False), timer],
                      max_epochs=args.epochs, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0)
    workers = args.workers if args.workers is not None else (4 if args.accelerator == "gpu" else 0)
    loader_kwargs = {"num_workers": workers, "pin_memory": args.accelerator == "gpu",
                     "persistent_workers": workers > 0}
    train_loader = micro_batch_loader(data, args.batch, seed=0, **loader_kwargs)
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=DataLoader(val, batch_size=args.batch,
                                                                                   **loader_kwargs))
    ckpt = root / f"budget{budget}-{graphs}.ckpt"
    trainer.save_checkpoint(ckpt, weights_only=False)
    net = module.net
    later = timer.epochs[1:] or timer.epochs
    return {"case": f"budget {budget}" + ("" if graphs else " (eager)"), "cuda_graphs": graphs,
            "fit_seconds": timer.seconds, "first_epoch_s": timer.epochs[0], "later_epoch_s": sum(later) / len(later),
            "step_ms": 1e3 * statistics.median(timer.step_intervals) if timer.step_intervals else float("nan"),
            "steps": trainer.global_step, "patterns": _patterns(trainer),
            "captures": net.graphs.captures if net.graphs is not None else 0,
            "graph_failure": net.graphs.failure if net.graphs is not None else None,
            "val_acc": float(trainer.callback_metrics.get("val/acc", float("nan"))),
            "checkpoint_mib": ckpt.stat().st_size / 2**20, "nonfinite_check": args.nonfinite_check,
            "bare_step_ms": bare_step_ms(module, trainer.strategy.schedule, train_loader, args.precision)
            if args.bare else float("nan")}


def _patterns(trainer) -> int:
    """Distinct op patterns of the fit's schedule: CUDA graphs capture each one once."""
    schedule = trainer.strategy.schedule
    return schedule.distinct_patterns if schedule is not None else 1


def bare_step_ms(module, schedule, loader, precision: str) -> float:
    """Median ms between batch starts over one epoch of the fit's own steps (same module, executor, schedule
    columns, loader, fresh optimizer of the same kind) in a plain loop: forward under autocast as Lightning's
    bf16-mixed runs it, backward, optimizer step. No Lightning, no finiteness check, no logging."""
    net, device = module.net, next(module.parameters()).device
    opt = module.configure_optimizers()
    ids = loader.sampler.micro_batch_ids(0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision.startswith("bf16") else nullcontext()
    module.train()
    starts = []
    for i, (x, y) in enumerate(loader):
        starts.append(time.perf_counter())
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        net.scheduled_ops = schedule.ops[int(ids[i])] if schedule is not None else None
        with amp:
            loss = F.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    net.scheduled_ops = None
    steady = [b - a for a, b in itertools.pairwise(starts[3:])]  # after warm-up (allocator, graph replays)
    return 1e3 * statistics.median(steady) if steady else float("nan")


def main() -> None:
    args = parse_args()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.samples, 3, args.img_size, args.img_size, generator=gen)
    labels = torch.randint(0, 10, (args.samples,), generator=gen)
    data = TensorDataset(images, labels)
    val = TensorDataset(images[: args.batch * 2], labels[: args.batch * 2])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        executors = {"both": [True, False], "graphs": [True], "eager": [False]}[args.executors]
        for graphs in (executors if args.accelerator == "gpu" else [False]):
            for budget in args.budgets:
                rows.append(fit_once(args, budget, graphs, data, val, Path(tmp)))
                print(f"  {rows[-1]['case']}: fit {rows[-1]['fit_seconds']:.2f} s", flush=True)
    for row in rows:  # against budget 1.0 with the same executor
        ref = next(r for r in rows if r["cuda_graphs"] == row["cuda_graphs"])
        row["time_ratio"] = row["fit_seconds"] / ref["fit_seconds"]
        row["later_epoch_ratio"] = row["later_epoch_s"] / ref["later_epoch_s"]
        row["step_ratio"] = row["step_ms"] / ref["step_ms"]
    device = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else "cpu"
    print(f"\nfit on {device}, {args.samples} samples x {args.epochs} epochs, batch {args.batch}, "
          f"{args.img_size}px, {args.precision}, torch {torch.__version__}")
    print_table(rows, ["case", "fit_seconds", "first_epoch_s", "later_epoch_s", "step_ms", "bare_step_ms", "steps",
                       "patterns", "captures", "time_ratio", "later_epoch_ratio", "step_ratio", "val_acc"])
    path = write_json(args.out, {"device": device, "torch": torch.__version__, "args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
