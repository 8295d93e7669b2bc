"""Collect the accuracy sweeps into Markdown tables (ours beside the paper's) and one PNG plot per table.

    python benchmarks/accuracy/collect.py --preset full

Reads ``benchmarks/results/accuracy/digits/runs/<preset>/<table>/**/results.json`` (and each run's
``.hydra/config.yaml``), writes ``benchmarks/results/accuracy/digits/<preset>/<table>.md|png`` and
``summary.json``. Accuracy is top-1 on the held-out validation split of digits 5-9, in percent, mean ±
standard deviation over the seeds that ran (the count is in every cell).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import yaml

ROOT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "accuracy" / "digits"
METHODS = ["d2ft", "random", "dpruning", "moe", "full"]
SCORES = ["weight_magnitude", "gradient_magnitude", "squared_gradient", "fisher", "taylor", "random"]

# What the paper reports (SPEC section 7 and ../shared/papers/); it has no digits numbers: these are its
# claims on CIFAR-10/100 and Stanford Cars with an ImageNet-pretrained ViT-S, to set beside ours.
PAPER = {
    "t1_compute": {
        "d2ft": "40% less compute for a 1-2 pt drop vs full FT (CIFAR-10/100, Cars)",
        "random": "far below D2FT at budget 0.6 (~50-55% vs ~89% top-1 on CIFAR-100)",
        "dpruning": "far below D2FT at budget 0.6 (~50-55% vs ~89% top-1 on CIFAR-100)",
        "moe": "far below D2FT at budget 0.6; workload variance 0.22-0.25 (D2FT 0.00)",
        "full": "reference (budget 1.0)",
    },
    "t2_comm": {
        "d2ft": "50% less communication for a 1-2 pt drop vs full FT",
        "random": "below D2FT", "dpruning": "below D2FT", "moe": "below D2FT",
    },
    "t3_subnets": "74 subnets beat 26 and 38 at equal budget",
    "t4_scores": "weight magnitude (backward) + Fisher (forward) is the best pair",
    "t5_lofi": "lo-fi paper: matches DDP in-distribution (DeiT, ImageNet) with no communication during training",
    "t6_lora": "D2FT-LoRA close to LoRA at budgets 0.6/0.8 (the paper's LoRA extension)",
}


def load_runs(preset: str, table: str) -> list[dict]:
    runs = []
    for result in sorted((ROOT / "runs" / preset / table).rglob("results.json")):
        cfg = yaml.safe_load((result.parent / ".hydra" / "config.yaml").read_text())
        r = json.loads(result.read_text())
        s = cfg["schedule"]
        runs.append({**r, "dir": str(result.parent), "seed": cfg["seed"], "comm_budget": s["comm_budget"],
                     "budget": s["budget"],
                     "subnets": s["subnets"], "method": s["method"], "backward_score": s["backward_score"],
                     "forward_score": s["forward_score"], "epochs": cfg["trainer"]["max_epochs"],
                     "data_parallel": cfg["trainer"].get("data_parallel", "sync"),
                     "lora_rank": s.get("lora_rank")})
    return runs


def cell(accs: list[float]) -> str:
    if not accs:
        return "-"
    mean = 100 * statistics.mean(accs)
    spread = 100 * statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f} (n={len(accs)})"


def mean(accs: list[float]) -> float | None:
    return 100 * statistics.mean(accs) if accs else None


def grouped(runs: list[dict], *keys: str) -> dict[tuple, list[float]]:
    out: dict[tuple, list[float]] = defaultdict(list)
    for r in runs:
        if r["val_acc"] is not None:
            out[tuple(r[k] for k in keys)].append(r["val_acc"])
    return out


def budget_table(runs: list[dict], key: str, table: str, title: str) -> tuple[str, dict]:
    """Rows: methods; columns: the budgets swept (``key``); full fine-tuning as its own row at 1.0."""
    acc = grouped(runs, "method", key)
    # measured fractions of all-FULL: for a communication budget the bytes the collectives really send (the
    # wire, which the budget bounds; results.json has no communication figure for a one-device schedule)
    measures = ["compute_fraction", "wire_fraction"] if key == "comm_budget" else ["compute_fraction"]
    frac = {name: defaultdict(list) for name in measures}
    for r in runs:
        for name in measures:
            if r.get(name) is not None:
                frac[name][(r["method"], r[key])].append(r[name])
    budgets = sorted({b for (_, b) in acc if b is not None})
    if key == "comm_budget" and (("full", None) in acc):
        budgets.append(None)
    head = [f"{b}" if b is not None else "none" for b in budgets]
    lines = [f"### {title}", "", "| method | " + " | ".join(f"{key} {h}" for h in head) +
             "".join(f" | {n.replace('_', ' ')} (measured, per budget)" for n in measures) + " | paper |",
             "|" + "---|" * (len(budgets) + len(measures) + 2)]
    series = {}
    for m in METHODS:
        if not any(k[0] == m for k in acc):
            continue
        cells = [cell(acc.get((m, b), [])) for b in budgets]
        fr = " | ".join(", ".join(f"{statistics.mean(frac[n][(m, b)]):.2f}" for b in budgets if frac[n].get((m, b)))
                        for n in measures)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {fr} | {PAPER[table].get(m, '')} |")
        series[m] = [(b, mean(acc.get((m, b), []))) for b in budgets if acc.get((m, b))]
    return "\n".join(lines), series


def untrained_micro_batches(runs: list[dict], budget: float = 0.6) -> str:
    """How many micro-batches a D2FT schedule leaves without any FULL pair (they never update a weight)."""
    from lightning_d2ft import Op, Schedule

    parts = []
    for r in sorted((r for r in runs if r["method"] == "d2ft" and r["budget"] == budget), key=lambda r: r["seed"]):
        s = Schedule.load(Path(r["dir"]) / "d2ft" / "schedule.pt")
        full = (s.ops[:, s.scheduled] == Op.FULL).sum(1)
        parts.append(f"seed {r['seed']}: {int((full == 0).sum())} of {s.num_micro_batches}")
    return (f"Micro-batches with no FULL pair in the D2FT budget-{budget} schedules (never trained): "
            + "; ".join(parts) + ".") if parts else ""


def subnets_table(runs: list[dict]) -> tuple[str, dict]:
    acc = grouped(runs, "subnets")
    lines = ["### Table 3: subnets at compute budget 0.6 (D2FT)", "", "| subnets | top-1 % | paper |", "|---|---|---|"]
    for k in sorted(acc):
        lines.append(f"| {k[0]} | {cell(acc[k])} | {PAPER['t3_subnets']} |")
    return "\n".join(lines), {k[0]: mean(v) for k, v in sorted(acc.items())}


def scores_table(runs: list[dict]) -> tuple[str, dict]:
    acc = grouped(runs, "backward_score", "forward_score")
    back = [s for s in SCORES if any(k[0] == s for k in acc)]
    fwd = [s for s in SCORES if any(k[1] == s for k in acc)]
    lines = ["### Table 4: score pairs at compute budget 0.6 (rows backward, columns forward)", "",
             "| backward \\ forward | " + " | ".join(fwd) + " |", "|" + "---|" * (len(fwd) + 1)]
    for b in back:
        lines.append(f"| {b} | " + " | ".join(cell(acc.get((b, f), [])) for f in fwd) + " |")
    lines += ["", f"Paper: {PAPER['t4_scores']}."]
    return "\n".join(lines), {f"{b}/{f}": mean(acc.get((b, f), [])) for b in back for f in fwd if acc.get((b, f))}


def lofi_table(runs: list[dict]) -> tuple[str, dict]:
    acc = grouped(runs, "data_parallel", "budget")
    budgets = sorted({k[1] for k in acc})
    lines = ["### Table 5: 2 data-parallel replicas, DDP (sync) vs lo-fi, D2FT inside each", "",
             "| data parallel | " + " | ".join(f"budget {b}" for b in budgets) + " | paper |",
             "|" + "---|" * (len(budgets) + 2)]
    series = {}
    for mode in ("sync", "lofi"):
        if any(k[0] == mode for k in acc):
            lines.append(f"| {mode} | " + " | ".join(cell(acc.get((mode, b), [])) for b in budgets)
                         + f" | {PAPER['t5_lofi']} |")
            series[mode] = [(b, mean(acc.get((mode, b), []))) for b in budgets if acc.get((mode, b))]
    return "\n".join(lines), series


def lora_table(runs: list[dict]) -> tuple[str, dict]:
    acc = grouped(runs, "budget")
    rank = sorted({r["lora_rank"] for r in runs})
    lines = [f"### Table 6: LoRA (rank {rank}) on subnets: D2FT-LoRA at budget < 1 vs LoRA (budget 1.0)", "",
             "| method | budget | top-1 % | paper |", "|---|---|---|---|"]
    for (b,) in sorted(acc):
        lines.append(f"| {'LoRA' if b == 1.0 else 'D2FT-LoRA'} | {b} | {cell(acc[(b,)])} | {PAPER['t6_lora']} |")
    return "\n".join(lines), {f"budget {b}": mean(v) for (b,), v in sorted(acc.items())}


def plot(table: str, series, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    if table in ("t1_compute", "t2_comm", "t5_lofi"):
        for m, pts in series.items():
            pts = [(1.0 if b is None else b, a) for b, a in pts]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xlabel("communication budget" if table == "t2_comm" else "compute budget")
        ax.legend()
    elif table in ("t3_subnets", "t6_lora"):
        ax.bar([str(k) for k in series], list(series.values()))
        ax.set_xlabel("subnets" if table == "t3_subnets" else "compute budget (1.0 = LoRA)")
    else:
        ax.barh(list(series), list(series.values()))
        ax.set_xlabel("top-1 %")
    ax.set_ylabel("top-1 %" if table != "t4_scores" else "backward/forward")
    ax.set_title(table)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="full")
    args = parser.parse_args()
    out = ROOT / args.preset
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for table in ("t1_compute", "t2_comm", "t3_subnets", "t4_scores", "t5_lofi", "t6_lora"):
        runs = load_runs(args.preset, table)
        if not runs:
            continue
        if table == "t1_compute":
            text, series = budget_table(runs, "budget", table, "Table 1: top-1 % vs compute budget")
            text += "\n\n" + untrained_micro_batches(runs)
        elif table == "t2_comm":
            text, series = budget_table(runs, "comm_budget", table,
                                        "Table 2: top-1 % vs communication budget (compute budget 1.0)")
        elif table == "t3_subnets":
            text, series = subnets_table(runs)
        elif table == "t5_lofi":
            text, series = lofi_table(runs)
        elif table == "t6_lora":
            text, series = lora_table(runs)
        else:
            text, series = scores_table(runs)
        epochs = sorted({r["epochs"] for r in runs})
        text += (f"\n\n{len(runs)} runs, {epochs} fine-tuning epochs each; digits 5-9 (scikit-learn), a ViT-S-shaped "
                 f"model pretrained here on digits 0-4. Not CIFAR/Cars: the paper's column is its claim, not ours.\n")
        (out / f"{table}.md").write_text(text)
        plot(table, series, out / f"{table}.png")
        summary[table] = {str(k): v for k, v in series.items()}
        print(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
