"""Time the schedule's solvers: the default (OR-Tools + DP check) against the DP alone, the OR-Tools
formulations on the per-step sub-problems, and the scoring pass against a training epoch.

    python benchmarks/speed/schedule_solvers.py [--quick] [--no-scoring]

Part 1 (targets, issue 18): 74 subnets, budget 0.6, capacity "step", one run per size: the default
``Schedule.solve`` (OR-Tools' knapsack solver per (device, micro-batch) and level, then the DP re-solves
and the objectives are compared) and ``solver="dp"``, on 1,024 x 2 and 16,384 x 8 (and the other two).
Part 2: the exact OR-Tools formulations on the same per-step sub-problems (knapsack solver, CP-SAT,
SCIP MIP), microseconds per sub-problem and level, and the epoch-capacity SCIP MIPs vs the DP.
Part 3: the scoring pass (all micro-batches, and every 10th) and the solve, as a fraction of one plain
fine-tuning epoch over the same micro-batches (ViT-S/16, 224px, batch 8, CPU).
Writes benchmarks/results/speed/schedule_solvers.json. Timings on a shared machine are noisy: ratios are
measured side by side in one run.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/_common.py
from _common import RESULTS, machine, print_table, write_json
from timm.models.vision_transformer import VisionTransformer

from lightning_d2ft import D2FTViT, Schedule
from lightning_d2ft.ops import CostModel
from lightning_d2ft.schedule.capacity import device_budgets
from lightning_d2ft.schedule.knapsack import _knapsack_solvers, _ks, make_rows
from lightning_d2ft.scoring.scores import compute_scores

TARGETS = {(1024, 2): 1.0, (16384, 8): 30.0}


def realistic_scores(n_mb: int, n_cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    subnet = torch.rand(n_cols, generator=gen).pow(2) * 10 + 0.1
    return (subnet * torch.rand(n_mb, n_cols, generator=gen).add(0.5),
            subnet * torch.rand(n_mb, n_cols, generator=gen).add(0.5))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def solver_rows(sizes: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for n_mb, d in sizes:
        back, fwd = realistic_scores(n_mb, 74, seed=n_mb)
        default, default_s = timed(functools.partial(Schedule.solve, back, fwd, budget=0.6, devices=d))
        dp, dp_s = timed(functools.partial(Schedule.solve, back, fwd, budget=0.6, devices=d, solver="dp"))
        m = default.metrics()
        limit = TARGETS.get((n_mb, d))
        rows.append({
            "micro_batches": n_mb, "devices": d, "default_s": default_s,
            "ortools_solve_s": default.info["solve_seconds"], "dp_check_s": default.info["check_seconds"],
            "dp_alone_s": dp_s, "dp_solve_s": dp.info["solve_seconds"],
            "dp_speedup_solve": default.info["solve_seconds"] / dp.info["solve_seconds"],
            "dp_speedup_total": default_s / dp_s,
            "same_ops": bool(torch.equal(default.ops, dp.ops)), "compute": m["compute_fraction"],
            "step_max_over_mean": m["step_max_over_mean_worst"], "lockstep": m["lockstep_fraction"],
            "target_s": limit if limit else "-", "met": (default_s <= limit) if limit else "-",
        })
        print(f"  {n_mb} x 74 x {d}: default {default_s:.3f} s, dp {dp_s:.3f} s", flush=True)
    return rows


def _cpsat(profits: np.ndarray, weights: np.ndarray, capacity: int) -> np.ndarray:
    from ortools.sat.python import cp_model

    model = cp_model.CpModel()
    x = [model.new_bool_var("") for _ in profits]
    model.add(sum(int(w) * xi for w, xi in zip(weights, x)) <= capacity)
    model.maximize(sum(int(p) * xi for p, xi in zip(profits, x)))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    assert solver.solve(model) == cp_model.OPTIMAL
    return np.array([solver.value(xi) for xi in x], dtype=bool)


def _scip(values: np.ndarray, weights: np.ndarray, capacity: int) -> np.ndarray:
    from lightning_d2ft.schedule.knapsack import _mip

    return _mip(values, weights, capacity, values.size, None, "outer")


def formulation_rows(n_rows: int) -> list[dict]:
    """The outer level of ``n_rows`` per-step sub-problems (36 subnets of one device, 1,024 x 2 instance)."""
    back, fwd = realistic_scores(1024, 74, seed=1024)
    cols = torch.arange(1, 73, 2)
    unit = torch.ones(36, dtype=torch.float64)
    budget = device_budgets(1, torch.zeros(36, dtype=torch.long), torch.ones(1, dtype=torch.float64), unit,
                            CostModel(), 0.6, None, None, 0.5)[0]
    rows = make_rows(back[:n_rows, cols].double(), fwd[:n_rows, cols].double(), unit, budget, CostModel(), True)
    solvers = _knapsack_solvers(None)
    picks = {}
    out = []
    for name, solve in [
        ("knapsack_solver", lambda r: _ks(solvers, rows.value_out[r].tolist(), rows.w_full, budget.outer_capacity,
                                          10**9, "o")),
        ("cp_sat", lambda r: _cpsat(rows.value_out[r], rows.w_full, budget.outer_capacity)),
        ("scip_mip", lambda r: _scip(rows.back[r], rows.w_full, budget.outer_capacity)),
    ]:
        sel, s = timed(lambda solve=solve: [solve(r) for r in range(n_rows)])
        picks[name] = np.array(sel)
        out.append({"formulation": name, "sub_problems": n_rows, "us_per_sub_problem": s / n_rows * 1e6,
                    "same_objective_as_knapsack_solver": bool(np.allclose(
                        (rows.back * picks[name]).sum(1), (rows.back * picks["knapsack_solver"]).sum(1)))})
        print(f"  {name}: {s / n_rows * 1e6:.0f} us per sub-problem", flush=True)
    return out


def epoch_rows(n_mb: int, devices: int) -> list[dict]:
    back, fwd = realistic_scores(n_mb, 74, seed=n_mb)
    kw = dict(budget=0.6, devices=devices, capacity="epoch")
    ort, ort_s = timed(lambda: Schedule.solve(back, fwd, **kw))
    dp, dp_s = timed(lambda: Schedule.solve(back, fwd, solver="dp", **kw))
    return [{"micro_batches": n_mb, "devices": devices, "capacity": "epoch", "ortools_scip_s": ort_s,
             "scip_solve_s": ort.info["solve_seconds"], "dp_check_s": ort.info["check_seconds"], "dp_s": dp_s,
             "speedup": ort.info["solve_seconds"] / dp.info["solve_seconds"]}]


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
    _, solve = timed(lambda: Schedule.solve(full.backward, full.forward, budget=0.6, devices=2))
    return {"micro_batches": n_mb, "batch": batch, "img_size": img, "epoch_s": epoch,
            "scoring_s": full.seconds, "scoring_every10_s": sampled.seconds, "solve_s": solve,
            "scoring_fraction_of_epoch": full.seconds / epoch, "scoring_every10_fraction": sampled.seconds / epoch,
            "solve_fraction_of_epoch": solve / epoch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,024 micro-batches only")
    parser.add_argument("--no-scoring", action="store_true", help="skip part 3 (a ViT-S training epoch)")
    args = parser.parse_args()
    sizes = [(1024, 2), (1024, 8)] + ([] if args.quick else [(16384, 2), (16384, 8)])
    rows = solver_rows(sizes)
    print("\nPart 1: default (OR-Tools + DP check) vs DP, 74 subnets, budget 0.6, capacity per step")
    print_table(rows, ["micro_batches", "devices", "default_s", "ortools_solve_s", "dp_check_s", "dp_alone_s",
                       "dp_speedup_solve", "dp_speedup_total", "same_ops", "step_max_over_mean", "target_s", "met"])
    forms = formulation_rows(64)
    print("\nPart 2a: OR-Tools formulations, outer level of 64 per-step sub-problems (36 subnets each)")
    print_table(forms, ["formulation", "sub_problems", "us_per_sub_problem", "same_objective_as_knapsack_solver"])
    epoch = epoch_rows(1024, 2)
    print("\nPart 2b: capacity='epoch' (SCIP MIPs per device) vs DP")
    print_table(epoch, ["micro_batches", "devices", "ortools_scip_s", "scip_solve_s", "dp_check_s", "dp_s", "speedup"])
    cost = None
    if args.no_scoring:  # keep the last measured part 3, labelled as such
        previous = RESULTS / "speed" / "schedule_solvers.json"
        if previous.exists() and json.loads(previous.read_text()).get("scoring"):
            cost = {**json.loads(previous.read_text())["scoring"], "from_previous_run": True}
    else:
        cost = scoring_vs_epoch(n_mb=10 if args.quick else 20, batch=8, img=224)
    if cost is not None:
        print("\nPart 3: scoring and solving vs one plain fine-tuning epoch (ViT-S/16, 224px, batch 8, CPU)")
        print_table([cost], ["micro_batches", "epoch_s", "scoring_s", "scoring_fraction_of_epoch",
                             "scoring_every10_fraction", "solve_fraction_of_epoch"])
    targets = {
        "default_1024x2_le_1s": next(r["met"] for r in rows if (r["micro_batches"], r["devices"]) == (1024, 2)),
        "default_16384x8_le_30s": next((r["met"] for r in rows if (r["micro_batches"], r["devices"]) == (16384, 8)),
                                       "not run"),
        "dp_10x_faster_than_ortools_solve": all(r["dp_speedup_solve"] >= 10 for r in rows),
        "same_ops": all(r["same_ops"] for r in rows),
    }
    print("targets:", targets)
    payload = {"machine": machine(), "args": vars(args), "solvers": rows, "formulations": forms,
               "epoch_capacity": epoch, "scoring": cost, "targets_met": targets}
    print(f"wrote {write_json('speed/schedule_solvers.json', payload)}")


if __name__ == "__main__":
    main()
