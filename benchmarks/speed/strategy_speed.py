"""Step time, bytes per step and peak memory per rank: plain DDP vs D2FT, on 2 CPU processes, one invocation.

    python benchmarks/speed/strategy_speed.py [--steps 16] [--warmup 3] [--batch 32] [--img-size 32]

Runs, one after another, each as a Lightning fit on 2 spawned CPU processes (gloo), over the same global
batch per step (DDP: half of it per rank; tensor-parallel: all of it on both ranks):

- ``plain DDP``: a plain timm ViT under Lightning's ``DDPStrategy`` (gradient all-reduce, counted by a DDP comm
  hook that calls the same all-reduce);
- ``plain TP``: D2FTStrategy at tensor-parallel 2 with no D2FTCallback (every subnet FULL, dense all-reduce):
  the equivalent tensor-parallel run without any D2FT machinery;
- ``D2FT 1.0`` and ``D2FT 0.6``: the same with D2FTCallback at budget 1.0 and 0.6.

Step time is the median wall time of a training step after ``warmup`` steps (rank 0; both ranks wait on
each other in every collective). Bytes are what each rank sends per step (ring all-reduce: 2(n-1)/n of
the payload; sparse all-to-all: what it sends). Peak memory is the rise of the process's resident set
(VmHWM after - VmRSS before) during fit. Writes ``benchmarks/results/speed/strategy_speed.json``. Targets
(issue 4): D2FT 1.0 within 10% of plain TP; D2FT 0.6 at most 0.7x of D2FT 1.0; D2FT 0.6 bytes at most
the schedule's wire fraction of D2FT 1.0's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/_common.py
from _common import print_table, write_json
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.strategies import DDPStrategy

from lightning_d2ft import D2FTCallback, D2FTStrategy, Schedule
from lightning_d2ft.app.module import ViTClassifier
from lightning_d2ft.data.digits import DigitsDataModule

VIT_S = dict(patch_size=8, embed_dim=384, depth=12, num_heads=6)  # ViT-S width and depth, small images


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Measure(Callback):
    """Per rank: time of every training step, bytes sent, and the resident-memory rise during fit."""

    def __init__(self, out: Path, name: str, warmup: int) -> None:
        self.out, self.name, self.warmup = out, name, warmup
        self.times: list[float] = []
        self.bytes: list[int] = []

    def on_fit_start(self, trainer, pl_module):
        torch.set_num_threads(1)  # two processes on two cores
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
        self.rss_before = _proc_kib("VmRSS")
        if not isinstance(trainer.strategy, D2FTStrategy):  # Lightning registers comm hooks on CUDA only
            self.ddp_bytes = [0]
            trainer.strategy.model.register_comm_hook(self.ddp_bytes, counting_allreduce_hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sent_before = self._sent(trainer)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self.start)
        self.bytes.append(self._sent(trainer) - self.sent_before)

    def _sent(self, trainer) -> int:
        s = trainer.strategy
        return s.comm_stats.total_bytes + s.dp_bytes if isinstance(s, D2FTStrategy) else self.ddp_bytes[0]

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        result = {"times": self.times, "bytes": self.bytes,
                  "peak_rss_rise_mib": (_proc_kib("VmHWM") - self.rss_before) / 1024}
        for cb in trainer.callbacks:
            if isinstance(cb, D2FTCallback):  # the schedule's fractions over the measured steps
                s = cb.schedule
                ran = Schedule(ops=s.ops[cb._ids[self.warmup : len(self.times)]], placement=s.placement,
                               speeds=s.speeds, column_blocks=s.column_blocks, cost=s.cost)
                result["wire_fraction"] = ran.wire_fraction
                result["compute_fraction"] = ran.compute_fraction
        (self.out / f"{self.name}.rank{rank}.json").write_text(json.dumps(result))




def counting_allreduce_hook(counter: list[int], bucket):
    """A DDP comm hook: the default all-reduce, counting the ring all-reduce bytes this rank sends."""
    buf = bucket.buffer()
    n = dist.get_world_size()
    counter[0] += buf.numel() * buf.element_size() * 2 * (n - 1) // n
    fut = dist.all_reduce(buf.div_(n), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


counting_allreduce_hook.__annotations__["return"] = torch.futures.Future[torch.Tensor]  # DDP checks the object


class PlainViT(ViTClassifier):
    """The same classifier, but training calls the unwrapped timm model (what plain DDP fine-tunes)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net.vit(x), y)


def run_case(name: str, args, out: Path) -> dict:
    seed_everything(0)
    kwargs = dict(VIT_S, img_size=args.img_size)
    ddp = name == "plain DDP"
    module = (PlainViT if ddp else ViTClassifier)(num_classes=10, subnets=74, lr=1e-4, model_kwargs=kwargs)
    batch = args.batch // 2 if ddp else args.batch  # same global batch per step
    dm = DigitsDataModule(img_size=args.img_size, batch_size=batch, seed=0, train_per_class=args.per_class)
    callbacks = [Measure(out, name, args.warmup)]
    if ddp:
        strategy = DDPStrategy(start_method="spawn")
    else:
        strategy = D2FTStrategy(tensor_parallel_size=2, start_method="spawn")
        if name.startswith("D2FT"):
            budget = float(name.split()[1])
            callbacks.insert(0, D2FTCallback(budget=budget, cache_dir=out / "cache", progress=False))
    trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1,
                      limit_train_batches=args.warmup + args.steps, limit_val_batches=0, num_sanity_val_steps=0,
                      callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=out)
    trainer.fit(module, dm)
    ranks = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]
    row = {"case": name,
           "step_s": statistics.median(ranks[0]["times"][args.warmup:]),
           "bytes_per_step": [statistics.mean(r["bytes"][args.warmup:]) for r in ranks],
           "peak_rss_rise_mib": [r["peak_rss_rise_mib"] for r in ranks]}
    if "wire_fraction" in ranks[0]:
        row["wire_fraction"] = ranks[0]["wire_fraction"]
        row["compute_fraction"] = ranks[0]["compute_fraction"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="global batch per step")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=64, help="digits kept per class (fewer: cheaper scoring)")
    args = parser.parse_args()
    cases = ["plain DDP", "plain TP", "D2FT 1.0", "D2FT 0.6"]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_case(name, args, Path(tmp)) for name in cases]
    base = rows[0]
    by = {r["case"]: r for r in rows}
    for r in rows:
        r["time_vs_ddp"] = r["step_s"] / base["step_s"]
        r["time_vs_tp"] = r["step_s"] / by["plain TP"]["step_s"]
        r["bytes_vs_ddp"] = sum(r["bytes_per_step"]) / max(sum(base["bytes_per_step"]), 1)
        r["mem_vs_ddp"] = max(r["peak_rss_rise_mib"]) / max(max(base["peak_rss_rise_mib"]), 1e-9)
        r["bytes_rank0_kib"] = r["bytes_per_step"][0] / 1024
        r["bytes_rank1_kib"] = r["bytes_per_step"][1] / 1024
        r["mem_rank0_mib"], r["mem_rank1_mib"] = r["peak_rss_rise_mib"]
    print_table(rows, ["case", "step_s", "time_vs_ddp", "time_vs_tp", "bytes_rank0_kib", "bytes_rank1_kib",
                       "bytes_vs_ddp", "mem_rank0_mib", "mem_rank1_mib", "mem_vs_ddp"])
    one, six = by["D2FT 1.0"], by["D2FT 0.6"]
    bytes_ratio = sum(six["bytes_per_step"]) / sum(one["bytes_per_step"])
    targets = {
        "d2ft_1.0_overhead_vs_plain_tp_under_10pct": one["step_s"] / by["plain TP"]["step_s"] < 1.10,
        "d2ft_0.6_time_at_most_0.7x_of_1.0": six["step_s"] / one["step_s"] <= 0.70,
        "d2ft_0.6_bytes_at_most_wire_fraction": bytes_ratio <= six["wire_fraction"] + 1e-9,
    }
    print(f"D2FT 0.6 vs 1.0: time {six['step_s'] / one['step_s']:.3f}, bytes {bytes_ratio:.3f} "
          f"(schedule wire fraction {six['wire_fraction']:.3f}, compute fraction {six['compute_fraction']:.3f})")
    print("targets met:", targets)
    path = write_json("speed/strategy_speed.json", {"args": vars(args), "rows": rows, "bytes_0.6_vs_1.0": bytes_ratio,
                                              "targets_met": targets})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
