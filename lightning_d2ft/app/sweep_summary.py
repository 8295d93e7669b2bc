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


def _jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for result in sorted(sweep_dir.rglob("results.json")):
        overrides_file = result.parent / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_file) if overrides_file.exists() else []
        setting = " ".join(str(o) for o in overrides if "=" in str(o) and not str(o).startswith("hydra."))
        data = json.loads(result.read_text())
        rows.append({"job": str(result.parent.relative_to(sweep_dir)), "setting": setting or "(defaults)",
                     **{c: _column(data, c) for c in COLUMNS}})
    return rows


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))


def summarize_sweep(sweep_dir: str | Path) -> list[Path]:
    """Write the three summary files for the jobs under ``sweep_dir`` that have a results.json."""
    sweep_dir = Path(sweep_dir)
    rows = _jobs(sweep_dir)
    if not rows:
        log.warning(f"no results.json under {sweep_dir}: no sweep summary written")
        return []
    keys = ["job", "setting", *COLUMNS]
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    md = sweep_dir / "summary.md"
    md.write_text("# Sweep summary\n\n" + "\n".join(table) + "\n")
    with open(sweep_dir / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, sweep_dir / "summary.png")
    return [md, sweep_dir / "summary.csv", sweep_dir / "summary.png"]


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows)), 3.5))
    ax.plot(x, [r["val_acc"] if r["val_acc"] is not None else float("nan") for r in rows], "o-",
            label="validation top-1")
    ax.plot(x, [r["compute_fraction"] for r in rows], "s--", label="compute (fraction of full)")
    ax.set_xticks(list(x), [r["setting"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
