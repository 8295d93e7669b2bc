"""Two tensor-parallel ranks of unequal speed: per-rank step time with and without speed-aware schedules.

    python benchmarks/speed/heterogeneous.py [--steps 12] [--warmup 3] [--budget 0.6]

Rank 1 is slowed on purpose: it is pinned to CPU core 1, which it shares with a busy-loop process, while
rank 0 has core 0 to itself (needs 2 cores). A short calibration (the same matmuls timed on each rank)
measures the speed ratio. Then three D2FT fits at the same budget on the same model and data:

- ``equal``: round-robin placement and equal knapsack capacities (what ignores the devices);
- ``capacities``: round-robin placement, capacities proportional to the measured speeds (``D2FTCallback(speeds=...)``);
- ``placement``: ``speed_aware`` placement (head groups in proportion to speed) and the same capacities.

Per rank: *busy* time per step = step wall time minus the time spent inside tensor-parallel collectives
(where a fast rank waits for a slow one). The spread (max - min busy) / mean is 0 for a balanced step;
the step time itself is what a user waits for. Writes ``benchmarks/results/speed/heterogeneous.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/_common.py
from _common import print_table, write_json
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_d2ft import D2FTCallback, D2FTStrategy
from lightning_d2ft.app.module import ViTClassifier
from lightning_d2ft.data.digits import DigitsDataModule
from lightning_d2ft.parallel.placement import speed_aware

VIT = dict(img_size=32, patch_size=8, embed_dim=384, depth=12, num_heads=6)  # ViT-S width and depth: 74 subnets
SLOW_CORE, FAST_CORE = 1, 0


def _calibrate() -> float:
    """Seconds for a fixed matmul workload on this process's core."""
    a = torch.randn(256, 256)
    start = time.perf_counter()
    for _ in range(200):
        a = torch.tanh(a @ a)
    return time.perf_counter() - start


def _pin(rank: int) -> None:
    """One thread, on the slow core for rank 1 and the fast core otherwise."""
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {SLOW_CORE if rank == 1 else FAST_CORE})


class PerRank(Callback):
    """Pins each rank to its core, measures its speed, then step and collective times per step."""

    def __init__(self, out: Path, name: str) -> None:
        self.out, self.name = out, name
        self.steps: list[float] = []
        self.comm: list[float] = []

    def setup(self, trainer, pl_module, stage):
        _pin(trainer.global_rank)

    def on_fit_start(self, trainer, pl_module):
        tp = trainer.strategy.tp
        inner = tp.sum_across
        self._in_comm = 0.0

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            self._in_comm += time.perf_counter() - start
            return out

        tp.sum_across = timed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        dist.barrier()  # start every step together, so one step's straggling does not leak into the next
        self._in_comm, self._start = 0.0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(time.perf_counter() - self._start)
        self.comm.append(self._in_comm)

    def on_train_end(self, trainer, pl_module):
        (self.out / f"{self.name}.rank{trainer.global_rank}.json").write_text(
            json.dumps({"steps": self.steps, "comm": self.comm}))


class CalibrationDone(Exception):
    """Stops the calibration run (an Exception, so the spawn launcher reports it rather than waiting)."""


class Calibrate(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def setup(self, trainer, pl_module, stage):
        _pin(trainer.global_rank)
        _calibrate()  # warm up
        seconds = statistics.median(_calibrate() for _ in range(3))
        (self.out / f"calibration.rank{trainer.global_rank}.json").write_text(json.dumps(seconds))
        raise CalibrationDone  # calibration only: no fit


def _trainer(out: Path, strategy: D2FTStrategy, callbacks: list, steps: int) -> Trainer:
    return Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, limit_train_batches=steps,
                   limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=out)


def _module() -> ViTClassifier:
    seed_everything(0)
    return ViTClassifier(num_classes=10, subnets=74, lr=1e-4, model_kwargs=VIT)


def _data() -> DigitsDataModule:
    return DigitsDataModule(img_size=VIT["img_size"], batch_size=32, seed=0, train_per_class=64)


def measure_speeds(out: Path) -> list[float]:
    """Relative speeds of the two ranks (rank 0 = 1.0) from the calibration workload."""
    try:
        _trainer(out, D2FTStrategy(start_method="spawn"), [Calibrate(out)], 1).fit(_module(), _data())
    except Exception as err:  # the workers stop on purpose after calibrating
        if "CalibrationDone" not in str(err):
            raise
    seconds = [json.loads((out / f"calibration.rank{r}.json").read_text()) for r in range(2)]
    return [seconds[0] / s for s in seconds]


def run_case(name: str, speeds: list[float], args, out: Path) -> dict:
    placement = speed_aware(speeds) if name == "placement" else None
    d2ft = D2FTCallback(budget=args.budget, speeds=None if name == "equal" else speeds,
                        cache_dir=out / "cache", progress=False)
    strategy = D2FTStrategy(start_method="spawn", placement=placement)
    _trainer(out, strategy, [d2ft, PerRank(out, name)], args.warmup + args.steps).fit(_module(), _data())
    ranks = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]
    busy = [statistics.median(s - c for s, c in zip(r["steps"][args.warmup:], r["comm"][args.warmup:]))
            for r in ranks]
    step = statistics.median(ranks[0]["steps"][args.warmup:])
    return {"case": name, "step_s": step, "busy_rank0_s": busy[0], "busy_rank1_s": busy[1],
            "busy_spread": (max(busy) - min(busy)) / statistics.mean(busy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.6)
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs 2 CPU cores (one per rank)")
    spinner = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{SLOW_CORE}}})\n"
                                                      "while True: pass"])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            speeds = measure_speeds(out)
            print(f"measured speeds (rank 0 = 1): {[round(s, 3) for s in speeds]}")
            rows = [run_case(name, speeds, args, out) for name in ("equal", "capacities", "placement")]
    finally:
        spinner.kill()
    base = rows[0]["step_s"]
    for r in rows:
        r["step_vs_equal"] = r["step_s"] / base
    print_table(rows, ["case", "step_s", "step_vs_equal", "busy_rank0_s", "busy_rank1_s", "busy_spread"])
    path = write_json("speed/heterogeneous.json", {"args": vars(args), "speeds": speeds, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
