"""Tables from the Fashion-MNIST runs file: paired differences against full fine-tuning, 95% t-intervals.

    python benchmarks/accuracy/fashion_tables.py [--tag merged]   # writes tables.md and summary.json

Every row compares a setting with full fine-tuning *of the same seed* (same pretrained checkpoint, subset,
micro-batches, head initialisation): mean of (top1 - full top1) over the seeds that have both, with a
95% t-interval (mean +- t(0.975, n-1) * SD / sqrt(n)). Only seeds with both runs count.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from scipy.stats import t as student_t

OUT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "accuracy" / "fashion"
DEFAULT = {"method": "d2ft", "budget": 0.6, "comm_budget": None, "subnets": 74, "backward_score": "weight_magnitude",
           "forward_score": "fisher", "score_every": 1, "lora_rank": None}
SETTING = tuple(DEFAULT)
BASELINES = ("random", "dpruning", "moe")


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and 95% t half-width (nan with fewer than 2 values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, student_t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def paired(runs: list[dict], setting: dict, ref: dict) -> dict | None:
    """Paired comparison of ``setting`` (overrides of DEFAULT) with ``ref`` over shared seeds."""
    def by_seed(over: dict) -> dict[int, float]:
        want = {**DEFAULT, **over}
        return {r["seed"]: r["top1"] for r in runs if all(r.get(k) == want[k] for k in SETTING)}

    a, b = by_seed(setting), by_seed(ref)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean, half = interval(diffs)
    return {"n": len(seeds), "top1": statistics.fmean(a[s] for s in seeds), "diff": mean, "half": half,
            "worse_seeds": sum(d < 0 for d in diffs)}


FULL = {"method": "full", "budget": 1.0}


def table(runs: list[dict], title: str, rows: list[tuple[str, dict]], ref: dict = FULL,
          ref_name: str = "full") -> tuple[str, list[dict]]:
    lines = [f"### {title}", "", f"| setting | seeds | top-1 % | paired diff vs {ref_name} (95% CI) | seeds worse |",
             "|---|---|---|---|---|"]
    out = []
    for name, over in rows:
        c = paired(runs, over, ref)
        if c is None:
            lines.append(f"| {name} | 0 | not run | | |")
            continue
        lines.append(f"| {name} | {c['n']} | {c['top1']:.2f} | {c['diff']:+.2f} ± {c['half']:.2f} "
                     f"| {c['worse_seeds']} |")
        out.append({"table": title, "setting": name, **over, **c})
    return "\n".join(lines) + "\n", out


def tables(runs: list[dict]) -> tuple[str, list[dict]]:
    d = [("D2FT", {})] + [(m, {"method": m}) for m in BASELINES]
    specs = [
        ("Table 1: compute budget (74 subnets)",
         [(f"{n} @ {b}", {**o, "budget": b}) for b in (0.4, 0.6, 0.8) for n, o in d]),
        ("Table 2: communication budget 0.5 (compute budget 1.0, 74 subnets)",
         [(n, {**o, "budget": 1.0, "comm_budget": 0.5}) for n, o in d]),
        ("Table 3: subnets (D2FT, budget 0.6)", [(f"{k} subnets", {"subnets": k}) for k in (26, 38, 74)]),
        ("Table 4: score pairs (D2FT, budget 0.6; backward / forward)",
         [(f"{b} / {f}", {"backward_score": b, "forward_score": f}) for b, f in (
             ("weight_magnitude", "fisher"), ("fisher", "fisher"), ("gradient_magnitude", "fisher"),
             ("weight_magnitude", "weight_magnitude"), ("fisher", "random"), ("random", "random"))]),
        ("Table 6: score_every cost (D2FT, budget 0.6)",
         [(f"score_every={k}", {"score_every": k}) for k in (1, 4, 10)]),
    ]
    md, rows = [], []
    text, got = table(runs, "Table 1b: each baseline against D2FT at budget 0.6 (baseline - D2FT)",
                      [(m, {"method": m}) for m in BASELINES], ref={}, ref_name="D2FT")
    md.append(text)
    rows += got
    for title, spec in specs:
        text, got = table(runs, title, spec)
        md.append(text)
        rows += got
    text, got = table(runs, "Table 5: D2FT-LoRA (budget 0.6) vs LoRA (budget 1.0), rank 4",
                      [("D2FT-LoRA @ 0.6", {"lora_rank": 4})], ref={"budget": 1.0, "lora_rank": 4}, ref_name="LoRA")
    text2, got2 = table(runs, "Table 5b: LoRA vs full fine-tuning", [("LoRA @ 1.0", {"budget": 1.0, "lora_rank": 4})])
    md.insert(5, text + "\n" + text2)
    text3, got3 = table(runs, "Table 6b: score_every cost against scoring every micro-batch (D2FT, budget 0.6)",
                        [(f"score_every={k}", {"score_every": k}) for k in (4, 10)], ref={}, ref_name="score_every=1")
    md.append(text3)
    return "\n".join(md), rows + got + got2 + got3


def full_sd(runs: list[dict]) -> str:
    top = [r["top1"] for r in runs if r["method"] == "full" and r.get("lora_rank") is None]
    if len(top) < 2:
        return "full fine-tuning: fewer than 2 seeds"
    return (f"Full fine-tuning over {len(top)} seeds: mean {statistics.fmean(top):.2f}%, seed SD "
            f"{statistics.stdev(top):.2f} points (values {', '.join(f'{v:.2f}' for v in top)}).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=OUT / "runs.jsonl")
    parser.add_argument("--tag", default=None, help="code version label (default: the most frequent in the file)")
    args = parser.parse_args()
    runs = [json.loads(line) for line in args.runs.read_text().splitlines() if line.strip()]
    tags = [r.get("tag") for r in runs]
    tag = args.tag or max(set(tags), key=tags.count)
    runs = [r for r in runs if r.get("tag") == tag]
    md, rows = tables(runs)
    head = f"## Fashion-MNIST accuracy (runs tagged `{tag}`, {len(runs)} runs)\n\n{full_sd(runs)}\n\n"
    (OUT / f"tables-{tag}.md").write_text(head + md)
    (OUT / f"summary-{tag}.json").write_text(json.dumps({"tag": tag, "full_sd": full_sd(runs), "rows": rows}, indent=1))
    print(head + md)


if __name__ == "__main__":
    main()
