"""Time the DP and OR-Tools solvers, and the scoring pass, against what they save.

    python benchmarks/schedule_solvers.py [--quick]

Part 1: both solvers on 74 subnets x {64, 1024, 16384} micro-batches x {2, 8} devices (budget 0.6,
communication budget 0.8), same objective checked where OR-Tools finishes. OR-Tools gets a time limit
per solve and is not run at 16384 (about 9.7M booleans; see shared/notes/anchors.md B.5).
Part 2: the scoring pass (all micro-batches, and every 10th) and the DP, as a fraction of one plain
fine-tuning epoch over the same micro-batches (ViT-S/16, 224px, batch 8, CPU).
Writes benchmarks/results/schedule_solvers.json.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from _common import print_table, write_json
from lightning_d2ft import D2FTViT, Schedule
from lightning_d2ft.scores import compute_scores


def realistic_scores(n_mb: int, n_cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    subnet = torch.rand(n_cols, generator=gen).pow(2) * 10 + 0.1
    return (subnet * torch.rand(n_mb, n_cols, generator=gen).add(0.5),
            subnet * torch.rand(n_mb, n_cols, generator=gen).add(0.5))


def solver_rows(sizes: list[int], devices: list[int], ortools_limit: float, ortools_max: int) -> list[dict]:
    rows = []
    for n_mb in sizes:
        back, fwd = realistic_scores(n_mb, 74, seed=n_mb)
        for d in devices:
            kw = dict(budget=0.6, devices=d, comm_budget=0.8)
            t = time.perf_counter()
            dp = Schedule.solve(back, fwd, solver="dp", **kw)
            dp_s = time.perf_counter() - t
            row = {"micro_batches": n_mb, "devices": d, "dp_s": dp_s, "ortools_s": "not run", "speedup": "-",
                   "same_objective": "-", "compute": dp.compute_fraction, "variance": dp.workload_variance}
            if n_mb <= ortools_max:
                t = time.perf_counter()
                try:
                    ort = Schedule.solve(back, fwd, solver="ortools", ortools_time_limit=ortools_limit, **kw)
                    row["ortools_s"] = time.perf_counter() - t
                    row["speedup"] = row["ortools_s"] / dp_s
                    row["same_objective"] = all(abs(a - b) <= 1e-6 * max(1.0, abs(b))
                                                for a, b in zip(dp.info["objective"], ort.info["objective"]))
                except RuntimeError:
                    row["ortools_s"] = f"> {ortools_limit:.0f} (limit)"
                    row["speedup"] = f"> {ortools_limit / dp_s:.0f}"
            rows.append(row)
            print(f"  {n_mb} x 74 x {d}: dp {dp_s:.3f} s, ortools {row['ortools_s']}", flush=True)
    return rows


def scoring_vs_epoch(n_mb: int, batch: int, img: int) -> dict:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=img, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=10)
    net = D2FTViT(vit, subnets=74)
    data = [(torch.randn(batch, 3, img, img), torch.randint(0, 10, (batch,))) for _ in range(n_mb)]
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-4)
    t = time.perf_counter()
    for x, y in data:  # one plain fine-tuning epoch
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(vit(x), y).backward()
        opt.step()
    epoch = time.perf_counter() - t
    full = compute_scores(net, data, "weight_magnitude", "fisher", progress=False)
    sampled = compute_scores(net, data, "weight_magnitude", "fisher", sample_every=10, progress=False)
    t = time.perf_counter()
    Schedule.solve(full.backward, full.forward, budget=0.6, devices=2)
    solve = time.perf_counter() - t
    return {"micro_batches": n_mb, "batch": batch, "img_size": img, "epoch_s": epoch,
            "scoring_s": full.seconds, "scoring_every10_s": sampled.seconds, "dp_s": solve,
            "scoring_fraction_of_epoch": full.seconds / epoch, "scoring_every10_fraction": sampled.seconds / epoch,
            "dp_fraction_of_epoch": solve / epoch,
            "saved_at_budget_0.6_fraction_of_epoch": 0.4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 and 1024 micro-batches only, short limits")
    parser.add_argument("--ortools-limit", type=float, default=300.0, help="seconds per OR-Tools solve")
    args = parser.parse_args()
    sizes = [64, 1024] if args.quick else [64, 1024, 16384]
    rows = solver_rows(sizes, [2, 8], 30.0 if args.quick else args.ortools_limit, ortools_max=1024)
    print("\nSolvers, 74 subnets, budget 0.6, comm budget 0.8")
    print_table(rows, ["micro_batches", "devices", "dp_s", "ortools_s", "speedup", "same_objective", "compute", "variance"])
    cost = scoring_vs_epoch(n_mb=10 if args.quick else 20, batch=8, img=224)
    print("\nScoring and scheduling vs one plain fine-tuning epoch (ViT-S/16, 224px, batch 8, CPU)")
    print_table([cost], ["micro_batches", "epoch_s", "scoring_s", "scoring_fraction_of_epoch",
                         "scoring_every10_fraction", "dp_fraction_of_epoch"])
    big = [r for r in rows if r["micro_batches"] == 16384 and r["devices"] == 8]
    k1024 = [r for r in rows if r["micro_batches"] == 1024]
    targets = {
        "dp_10x_faster_than_ortools_at_1024": all(
            isinstance(r["speedup"], float) and r["speedup"] >= 10 or str(r["speedup"]).startswith(">") for r in k1024),
        "same_objective_where_ortools_finished": all(r["same_objective"] in (True, "-") for r in rows),
        "dp_16384x74x8_under_5s": bool(big) and big[0]["dp_s"] < 5.0,
    }
    print("targets:", targets)
    print(f"wrote {write_json('schedule_solvers.json', {'args': vars(args), 'solvers': rows, 'scoring': cost, 'targets_met': targets})}")


if __name__ == "__main__":
    main()
