"""When a Hydra multirun ends, one summary of its jobs in the sweep directory: ``summary.md`` (a markdown
table), ``summary.csv`` and ``summary.png`` (accuracy and compute per swept setting).

Per run: accuracy, compute, the wire (only for runs whose schedule spans 2+ tensor-parallel devices), the
FULL dynamics (subnets never FULL, distinct FULL sets, subnets ever FULL per block) and the fit time."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

__all__ = ["SweepSummary", "summarize_sweep"]
log = logging.getLogger(__name__)
COLUMNS = ("val_acc", "compute_fraction", "wire_fraction", "never_full_subnets", "distinct_full_sets",
           "ever_full_per_block", "fit_seconds")


def _column(data: dict[str, Any], name: str) -> Any:
    if name == "ever_full_per_block":  # "6 6 4 ...": block by block, from the ever_full_block_<l> keys
        blocks = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in data.items() if k.startswith("ever_full_block_"))
        return " ".join(str(int(v)) for _, v in blocks) if blocks else None
    return data.get(name)


class SweepSummary(Callback):
    """Hydra callback (registered in config.yaml under ``hydra.callbacks``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        written = summarize_sweep(sweep_dir)
        if written:
            print(f"sweep summary: {written[0]} (+ .csv, .png)")


def _overrides(sweep_dir: Path) -> list[tuple[Path, dict[str, str]]]:
    """Every job's results.json and its command-line overrides (``key: value``; Hydra's own left out)."""
    found = []
    for result in sorted(sweep_dir.rglob("results.json")):
        overrides_file = result.parent / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_file) if overrides_file.exists() else []
        found.append((result, dict(str(o).split("=", 1) for o in overrides
                                   if "=" in str(o) and not str(o).startswith("hydra."))))
    return found


def _jobs(sweep_dir: Path, found: list[tuple[Path, dict[str, str]]], shared: dict[str, str]) -> list[dict[str, Any]]:
    """One row per job; ``setting`` names only the overrides that differ between jobs (the swept ones): those
    every job shares (``shared``) say nothing about a row (the summary lists them once)."""
    rows = []
    for result, pairs in found:
        setting = " ".join(f"{k}={v}" for k, v in pairs.items() if k not in shared)
        data = json.loads(result.read_text())
        rows.append({"job": str(result.parent.relative_to(sweep_dir)), "setting": setting or "(defaults)",
                     **{c: _column(data, c) for c in COLUMNS}})
    return rows


def _shared(jobs: list[dict[str, str]]) -> dict[str, str]:
    """The overrides every job has with the same value (none when there is a single job: its row names all)."""
    if len(jobs) < 2:
        return {}
    first = jobs[0]
    return {k: v for k, v in first.items() if all(job.get(k) == v for job in jobs[1:])}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))


def summarize_sweep(sweep_dir: str | Path) -> list[Path]:
    """Write the three summary files for the jobs under ``sweep_dir`` that have a results.json."""
    sweep_dir = Path(sweep_dir)
    found = _overrides(sweep_dir)
    fixed = _shared([pairs for _, pairs in found])
    rows = _jobs(sweep_dir, found, fixed)
    if not rows:
        log.warning(f"no results.json under {sweep_dir}: no sweep summary written")
        return []
    keys = ["job", "setting", *COLUMNS]
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    common = f"Every job: `{' '.join(f'{k}={v}' for k, v in fixed.items())}`\n\n" if fixed else ""
    md = sweep_dir / "summary.md"
    md.write_text("# Sweep summary\n\n" + common + "\n".join(table) + "\n")
    with open(sweep_dir / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, sweep_dir / "summary.png")
    return [md, sweep_dir / "summary.csv", sweep_dir / "summary.png"]


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    """One row per job (its swept setting as the row's label, read horizontally however long), accuracy and
    compute as markers on one [0, 1] axis, the legend under the plot where it squeezes nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = list(range(len(rows)))[::-1]  # the first job on top, as in the table
    fig, ax = plt.subplots(figsize=(8.0, 1.2 + 0.35 * len(rows)))
    acc = [r["val_acc"] if r["val_acc"] is not None else float("nan") for r in rows]
    ax.plot(acc, y, "o", color="#1f4e79", label="validation top-1")
    ax.plot([r["compute_fraction"] for r in rows], y, "s", color="#c0504d", label="compute (fraction of full)")
    wire = [r.get("wire_fraction") for r in rows]
    if any(w is not None for w in wire):
        ax.plot([w if w is not None else float("nan") for w in wire], y, "^", color="#7f7f7f",
                label="wire (fraction of full)")
    ax.set_yticks(y, [r["setting"] for r in rows], fontsize=8)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 if len(rows) > 3 else -0.25), ncol=3, fontsize=8,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
