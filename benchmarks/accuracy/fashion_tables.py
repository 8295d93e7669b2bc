"""Tables from the Fashion-MNIST runs file: paired differences against full fine-tuning, 95% t-intervals.

    python benchmarks/accuracy/fashion_tables.py [--tag v3]   # writes tables-<tag>.md and summary-<tag>.json

Every row compares a setting with full fine-tuning *of the same seed* (same pretrained checkpoint, subset,
micro-batches, head initialisation): mean of (top1 - full top1) over the seeds that have both, with a
95% t-interval (mean +- t(0.975, n-1) * SD / sqrt(n)). Only seeds with both runs count.

Runs that record their ops' hash (``ops_sha``, tag ``v3`` on) get the issue-27 tables; where two settings ran
identical schedules on every seed the table says "identical schedules" instead of an interval (a tie by
construction is not a finding), and a comparison against D2FT gets a verdict: "resolved" when the 95%
interval excludes 0, a "tie" when it lies within +-0.5 point, "not resolved" otherwise. Tags ``v2`` and
``v1`` keep their tables (their ``random``/``dpruning``/``moe`` are today's ``*_fo`` ablations, and their
``fisher`` is today's ``squared_gradient``).
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


# -- v3 (issue 27): keys added since v2 read as their defaults ------------------------------------------
V3 = {**DEFAULT, "devices": 1, "capacity": "step", "forward_mix": 0.5}
TRAIN_OR_SKIP = ("random", "dpruning", "moe")
ABLATIONS = ("random_fo", "dpruning_fo", "moe_fo")


def _select(runs: list[dict], over: dict) -> dict[int, dict]:
    want = {**V3, **over}
    return {r["seed"]: r for r in runs if all(r.get(k, V3[k]) == want[k] for k in V3)}


def paired_v3(runs: list[dict], setting: dict, ref: dict, ref_runs: list[dict] | None = None) -> dict | None:
    """``setting`` - ``ref`` (overrides of V3) over shared seeds, with the seeds whose ops were identical;
    ``ref_runs``: where ``ref`` comes from (default: ``runs``; another tag for a before/after comparison)."""
    a, b = _select(runs, setting), _select(runs if ref_runs is None else ref_runs, ref)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s]["top1"] - b[s]["top1"] for s in seeds]
    mean, half = interval(diffs)
    same = [s for s in seeds if a[s].get("ops_sha") and a[s].get("ops_sha") == b[s].get("ops_sha")]
    rows = [a[s] for s in seeds]

    def avg(key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.fmean(values) if values else None

    return {"n": len(seeds), "top1": statistics.fmean(r["top1"] for r in rows), "diff": mean, "half": half,
            "worse_seeds": sum(d < 0 for d in diffs), "identical_seeds": len(same),
            "never_full": avg("never_full_subnets"), "full_sets": avg("distinct_full_sets"),
            "compute": avg("compute_fraction"), "wire": avg("wire_fraction"), "fo_share": avg("forward_only_share")}


def _diff_cell(c: dict) -> str:
    if c["identical_seeds"] == c["n"]:
        return f"identical schedules ({c['n']} seeds)"
    cell = f"{c['diff']:+.2f} ± {c['half']:.2f}"
    return cell + (f" ({c['identical_seeds']} seeds identical)" if c["identical_seeds"] else "")


def verdict(c: dict) -> str:
    """Against D2FT: resolved when the interval excludes 0, a tie within +-0.5, else not resolved."""
    if c["identical_seeds"] == c["n"]:
        return "identical schedules: a tie by construction"
    if math.isnan(c["half"]):
        return "one seed: no interval"
    low, high = c["diff"] - c["half"], c["diff"] + c["half"]
    if low > 0:
        return "resolved: D2FT worse" if c.get("against_d2ft") else "resolved: higher"
    if high < 0:
        return "resolved: D2FT better" if c.get("against_d2ft") else "resolved: lower"
    if -0.5 <= low and high <= 0.5:
        return "tie (within ±0.5)"
    return "not resolved"


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "" if v is None else format(v, spec)


def table_v3(runs: list[dict], title: str, rows: list[tuple[str, dict]], ref: dict | None = None,
             ref_name: str = "full", against_d2ft: bool = False) -> tuple[str, list[dict]]:
    """A table of ``setting - ref`` rows; ``ref`` None: full fine-tuning."""
    head = (f"| setting | seeds | top-1 % | paired diff vs {ref_name} (95% CI) | seeds worse | verdict | compute | "
            "wire | FORWARD_ONLY share | never-FULL subnets | distinct FULL sets |")
    lines = [f"### {title}", "", head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    out = []
    for name, over in rows:
        c = paired_v3(runs, over, ref if ref is not None else FULL)
        if c is None:
            lines.append(f"| {name} | 0 | not run | | | | | | | | |")
            continue
        c["against_d2ft"] = against_d2ft
        lines.append(f"| {name} | {c['n']} | {c['top1']:.2f} | {_diff_cell(c)} | {c['worse_seeds']} | {verdict(c)} | "
                     f"{_fmt(c['compute'], '.3f')} | {_fmt(c['wire'], '.3f')} | {_fmt(c['fo_share'])} | "
                     f"{_fmt(c['never_full'], '.1f')} | {_fmt(c['full_sets'], '.1f')} |")
        out.append({"table": title, "setting": name, **over, **c, "verdict": verdict(c)})
    return "\n".join(lines) + "\n", out


def tables_v3(runs: list[dict]) -> tuple[str, list[dict]]:
    methods = [("D2FT", "d2ft")] + [(m, m) for m in (*TRAIN_OR_SKIP, *ABLATIONS)]
    specs: list[tuple] = []
    for b in (0.6, 0.4):
        specs.append((f"Table 1 (budget {b}): D2FT, the train-or-skip baselines and their _fo ablations vs full "
                      "(74 subnets, one device)", [(n, {"method": m, "budget": b}) for n, m in methods], None, "full",
                      False))
        specs.append((f"Table 2 (budget {b}): each baseline against D2FT (baseline - D2FT; the target: D2FT at or "
                      "above every train-or-skip baseline)",
                      [(m, {"method": m, "budget": b}) for m in (*TRAIN_OR_SKIP, *ABLATIONS)], {"budget": b}, "D2FT",
                      True))
    for b in (0.6, 0.4):
        specs.append((f"Table 3 (budget {b}): schedules solved for 1, 2 and 4 tensor-parallel devices (executed in "
                      "one process) vs full",
                      [(f"D2FT, {d} device(s)", {"budget": b, "devices": d}) for d in (1, 2, 4)], None, "full", False))
        for d in (2, 4):
            specs.append((f"Table 3b (budget {b}): MoE against D2FT solved for {d} devices (MoE - D2FT; MoE's ops do "
                          "not depend on devices)", [(m, {"method": m, "budget": b}) for m in ("moe", "moe_fo")],
                          {"budget": b, "devices": d}, f"D2FT@{d}", True))
    specs += [
        ("Table 4: the paper's capacity (one per device over the table, FULL floor 0.5 per step) vs full",
         [(f"capacity={c} @ {b}", {"capacity": c, "budget": b}) for b in (0.6, 0.4) for c in ("step", "epoch")],
         None, "full", False),
        ("Table 4b: capacity='epoch' against 'step' (epoch - step)",
         [(f"epoch @ {b}", {"capacity": "epoch", "budget": b}) for b in (0.6, 0.4)], None, "step", False),
        ("Table 5: forward_mix (budget 0.6) vs full",
         [(f"forward_mix={x}", {"forward_mix": x}) for x in (0.0, 0.5, 1.0)], None, "full", False),
        ("Table 5b: forward_mix against the default 0.5",
         [(f"forward_mix={x}", {"forward_mix": x}) for x in (0.0, 1.0)], {}, "forward_mix=0.5", False),
        ("Table 6: fisher (per-sample) and squared_gradient (the old 'fisher'), budget 0.6, backward / forward",
         [(f"{b} / {f}", {"backward_score": b, "forward_score": f}) for b, f in (
             ("weight_magnitude", "fisher"), ("weight_magnitude", "squared_gradient"), ("fisher", "fisher"),
             ("squared_gradient", "fisher"))], None, "full", False),
        ("Table 6b: squared_gradient against fisher in either role (budget 0.6)",
         [("forward squared_gradient", {"forward_score": "squared_gradient"}),
          ("backward squared_gradient", {"backward_score": "squared_gradient"})], {}, "fisher", False),
        ("Table 7: communication budget 0.5 on the wire (compute 1.0, 2 devices) vs full",
         [("D2FT", {"budget": 1.0, "comm_budget": 0.5, "devices": 2})], None, "full", False),
    ]
    md, rows = [], []
    for title, spec, ref, ref_name, against in specs:
        if ref is not None and ref_name == "step":
            ref = None
        text, got = table_v3(runs, title, spec, ref, ref_name, against)
        if title.startswith("Table 4b"):  # epoch against step of the same budget
            text, got = "", []
            for name, over in spec:
                t, g = table_v3(runs, f"{title}, budget {over['budget']}", [(name, over)], {"budget": over["budget"]},
                                "step", False)
                text, got = text + t, got + g
        md.append(text)
        rows += got
    return "\n".join(md), rows


def targets_v3(rows: list[dict]) -> str:
    """The issue-27 targets, measured: D2FT at 0.6 within 1 point of full, and at or above every train-or-skip
    baseline (resolved or a tie within +-0.5)."""
    lines = ["| target (budget 0.6, 74 subnets) | measured | holds? |", "|---|---|---|"]
    d2ft = next((r for r in rows if r["table"].startswith("Table 1 (budget 0.6)") and r["setting"] == "D2FT"), None)
    if d2ft:
        ok = d2ft["diff"] >= -1.0
        lines.append(f"| D2FT within 1 point of full (paired mean) | {_diff_cell(d2ft)} | {'yes' if ok else 'no'} |")
    for r in rows:
        if r["table"].startswith("Table 2 (budget 0.6)") and r["setting"] in TRAIN_OR_SKIP:
            v, name = r["verdict"], r["setting"]
            holds = "yes" if ("D2FT better" in v or v.startswith("tie")) else \
                "no" if "D2FT worse" in v else "unresolved"
            lines.append(f"| D2FT at or above {name} ({name} - D2FT) | {_diff_cell(r)}: {v} | {holds} |")
    return "\n".join(lines) + "\n"


#: issue 25's before/after rows: (name, today's setting, the v2 setting it reruns). v2's ``fisher`` is today's
#: ``squared_gradient`` and v2's baselines are today's ``*_fo`` ablations; v2's comm-budget row has no equivalent
#: (v2 bounded a per-item model on one device; today one device sends nothing on the wire)
ISSUE_25 = [
    ("full fine-tuning", FULL, FULL),
    ("D2FT 0.6 (squared_gradient)", {"forward_score": "squared_gradient"}, {}),
    ("random_fo (v2 random)", {"method": "random_fo"}, {"method": "random"}),
    ("dpruning_fo, squared_gradient (v2 dpruning)", {"method": "dpruning_fo", "forward_score": "squared_gradient"},
     {"method": "dpruning"}),
    ("moe_fo, squared_gradient (v2 moe)", {"method": "moe_fo", "forward_score": "squared_gradient"},
     {"method": "moe"}),
]


def table_before_after(runs: list[dict], before: list[dict], tag: str, before_tag: str) -> str:
    """Issue 25: each v2 tier-1 row rerun with only the optimizer semantics changed, paired by seed."""
    lines = [f"### Issue 25: only FULL subnets learn ({tag} - {before_tag}, paired by seed)", "",
             f"| setting | seeds | top-1 % {tag} | top-1 % {before_tag} | paired diff (95% CI) | verdict |",
             "|---|---|---|---|---|---|"]
    for name, now, then in ISSUE_25:
        c = paired_v3(runs, now, then, before)
        if c is None:
            lines.append(f"| {name} | 0 | not run | | | |")
            continue
        c["identical_seeds"] = 0  # other code: equal ops do not make equal runs
        then_top1 = c["top1"] - c["diff"]
        lines.append(f"| {name} | {c['n']} | {c['top1']:.2f} | {then_top1:.2f} | {_diff_cell(c)} | {verdict(c)} |")
    lines.append(f"| comm budget 0.5 | | | | no equivalent: {before_tag} bounded a per-item model on one device; "
                 "today one device sends nothing | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=OUT / "runs.jsonl")
    parser.add_argument("--tag", default=None, help="code version label (default: the most frequent in the file)")
    parser.add_argument("--out", type=Path, default=None, help="where tables-<tag>.md and summary-<tag>.json go "
                        "(default: next to the runs file)")
    args = parser.parse_args()
    runs = [json.loads(line) for line in args.runs.read_text().splitlines() if line.strip()]
    tags = [r.get("tag") for r in runs]
    tag = args.tag or max(set(tags), key=tags.count)
    everything, runs = runs, [r for r in runs if r.get("tag") == tag]
    out = args.out or args.runs.parent
    if any("ops_sha" in r for r in runs):
        md, rows = tables_v3(runs)
        md = "### Targets (issue 27)\n\n" + targets_v3(rows) + "\n" + md
        v2 = [r for r in everything if r.get("tag") == "v2"]
        if v2:
            md += "\n" + table_before_after(runs, v2, tag, "v2")
    else:
        md, rows = tables(runs)
    head = f"## Fashion-MNIST accuracy (runs tagged `{tag}`, {len(runs)} runs)\n\n{full_sd(runs)}\n\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tables-{tag}.md").write_text(head + md)
    (out / f"summary-{tag}.json").write_text(json.dumps({"tag": tag, "full_sd": full_sd(runs), "rows": rows},
                                                        indent=1))
    print(head + md)


if __name__ == "__main__":
    main()
