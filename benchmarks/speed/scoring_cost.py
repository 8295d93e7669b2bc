"""What the scoring pass costs, against a plain forward+backward pass and a plain training epoch.

    PYTHONPATH=. python benchmarks/speed/scoring_cost.py [--repeats 3] [--threads 1] [--vit-s16]

The default is `make demo`'s shape: ViT-S-shaped (12 blocks x 6 heads, width 192, 32 px, 8 px patches),
74 subnets, digits 5-9 in micro-batches of 32. Measured side by side in one run, interleaved, median of
``--repeats``, all over the very same micro-batches streamed through the same DataLoader:

* ``fwd_bwd``: one plain forward+backward (all FULL, no optimizer) per micro-batch;
* ``train_epoch``: a plain fine-tuning epoch (forward+backward+AdamW step) on a copy of the model;
* ``scoring``: the scoring pass the callback runs by default (``score_shared``; weight_magnitude / fisher:
  the per-sample empirical Fisher, output gradients only, no weight gradients);
* ``scoring_fisher_and_batch``: fisher beside a batch-gradient statistic (taylor / fisher: weight gradients
  and the per-sample sums in one backward);
* ``scoring_squared_gradient``: the squared mean gradient (what ``fisher`` meant before issue 27);
* ``scoring_3stats``: the pass with the three batch-gradient statistics (gradient_magnitude,
  squared_gradient, taylor);
* ``scoring_every10``: the default pass with ``score_every=10``.

Times are this process's CPU time (one torch thread; the machine is shared, and its wall time also holds the
other jobs' share of the 2 cores; the wall times are in the JSON too). Targets: scoring (the per-sample
Fisher) <= 1.5x fwd_bwd (issue 27), scoring_every10 <= 0.15x fwd_bwd
(issue 15). ``--vit-s16`` adds a ViT-S/16 row at 224 px (197 tokens; batch 8, random data). Writes
benchmarks/results/speed/scoring_cost.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/_common.py
from _common import print_table, write_json
from timm.models.vision_transformer import VisionTransformer

from lightning_d2ft import D2FTViT
from lightning_d2ft.data.digits import DigitsDataModule
from lightning_d2ft.data.micro_batches import micro_batch_loader
from lightning_d2ft.scoring.scoring_pass import score_shared, scoring_loader


def demo_setup() -> tuple[D2FTViT, torch.utils.data.DataLoader]:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=12, num_heads=6, num_classes=5)
    data = DigitsDataModule(img_size=32, batch_size=32, classes=[5, 6, 7, 8, 9], seed=0)
    data.setup()
    return D2FTViT(vit, subnets=74), data.train_dataloader()


def vit_s16_setup(n_mb: int = 8) -> tuple[D2FTViT, torch.utils.data.DataLoader]:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=10)
    x, y = torch.randn(n_mb * 8, 3, 224, 224), torch.randint(0, 10, (n_mb * 8,))
    return D2FTViT(vit, subnets=74), micro_batch_loader(torch.utils.data.TensorDataset(x, y), 8, seed=0)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time, with one torch thread
    and no loader workers, is the work done; the wall time also holds the other jobs' share of the cores."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def measure(net: D2FTViT, loader, repeats: int) -> dict:
    micro_batches = loader.sampler.micro_batches
    ids = list(range(len(micro_batches)))
    stream = lambda: scoring_loader(loader, micro_batches)  # noqa: E731 - the same loader for every case
    trained = copy.deepcopy(net)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-4)

    def fwd_bwd() -> None:
        net.train()
        for x, y in stream():
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
        net.zero_grad(set_to_none=True)

    def train_epoch() -> None:
        trained.train()
        for x, y in stream():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(trained(x), y).backward()
            opt.step()

    def scoring(stats, every=1):
        return lambda: score_shared(net, loader, micro_batches, ids[::every], stats, F.cross_entropy)

    cases = {"fwd_bwd": fwd_bwd, "train_epoch": train_epoch, "scoring": scoring(["fisher"]),
             "scoring_fisher_and_batch": scoring(["taylor", "fisher"]), "scoring_squared_gradient": scoring(["sq"]),
             "scoring_3stats": scoring(["abs", "sq", "taylor"]), "scoring_every10": scoring(["fisher"], 10)}
    fwd_bwd()  # warm-up
    times = {name: [] for name in cases}
    walls = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            wall, cpu = _timed(fn)
            times[name].append(cpu)
            walls[name].append(wall)
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["fwd_bwd"]
    return {"micro_batches": len(ids), "micro_batch_size": len(micro_batches[0]), "clock": "process CPU time",
            "seconds": med, "all_seconds": times, "all_wall_seconds": walls,
            "scoring_vs_fwd_bwd": med["scoring"] / base,
            "scoring_3stats_vs_fwd_bwd": med["scoring_3stats"] / base,
            "scoring_fisher_and_batch_vs_fwd_bwd": med["scoring_fisher_and_batch"] / base,
            "scoring_squared_gradient_vs_fwd_bwd": med["scoring_squared_gradient"] / base,
            "scoring_every10_vs_fwd_bwd": med["scoring_every10"] / base,
            "scoring_vs_train_epoch": med["scoring"] / med["train_epoch"],
            "scoring_every10_vs_train_epoch": med["scoring_every10"] / med["train_epoch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--vit-s16", action="store_true", help="add a ViT-S/16 224 px row (slow on CPU)")
    parser.add_argument("--vit-s16-micro-batches", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {"demo (width 192, 32 px, 74 subnets, digits)": measure(*demo_setup(), args.repeats)}
    if args.vit_s16:
        rows["ViT-S/16 224 px, batch 8, 74 subnets"] = measure(*vit_s16_setup(args.vit_s16_micro_batches),
                                                               args.repeats)
    table = [{"case": name, "micro_batches": r["micro_batches"], "fwd_bwd_s": r["seconds"]["fwd_bwd"],
              "train_epoch_s": r["seconds"]["train_epoch"], "scoring_s": r["seconds"]["scoring"],
              "scoring/fwd_bwd": r["scoring_vs_fwd_bwd"],
              "fisher+taylor/fwd_bwd": r["scoring_fisher_and_batch_vs_fwd_bwd"],
              "sq_grad/fwd_bwd": r["scoring_squared_gradient_vs_fwd_bwd"],
              "3stats/fwd_bwd": r["scoring_3stats_vs_fwd_bwd"],
              "every10/fwd_bwd": r["scoring_every10_vs_fwd_bwd"], "scoring/epoch": r["scoring_vs_train_epoch"]}
             for name, r in rows.items()]
    print_table(table, list(table[0]))
    targets = {name: {"scoring (per-sample fisher) <= 1.5x fwd_bwd": r["scoring_vs_fwd_bwd"] <= 1.5,
                      "every10 <= 0.15x fwd_bwd": r["scoring_every10_vs_fwd_bwd"] <= 0.15} for name, r in rows.items()}
    print(targets)
    path = write_json("speed/scoring_cost.json", {"args": vars(args), "rows": rows, "targets_met": targets,
                                            "note": "a 2-core machine shared with other jobs: process CPU time, "
                                                    "cases interleaved, median of repeats"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
