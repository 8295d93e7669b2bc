"""One results file for the whole GPU session, ``$OUT/gpu_fit_real.json``, grown by each step's process.

Why one file grown row by row: the session's steps run as separate processes under their own timeouts, so
every row is written as soon as it is measured (a later step that times out loses only its own rows), and
the targets are recomputed from whatever rows are there. Rows are keyed by (level, model, batch, case):
``level`` "step" is the bare training-step table (:mod:`steps`), "fit" the Lightning fine-tune
(:mod:`fit_real`). Every row has every key of :data:`ROW_KEYS`; None where a figure does not apply or was not
measured (never an estimate).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/_common.py
from _common import print_table, write_json

ROW_KEYS = ("level", "case", "model", "batch", "img_size", "mode", "fit_seconds", "first_epoch_s", "step_ms",
            "step_ratio", "captures", "capture_seconds", "scoring_seconds", "compile_seconds", "peak_mib",
            "graph_pool_mib", "steps", "epochs", "samples", "val_acc", "checkpoint_mib", "error")
TABLE = ["level", "model", "batch", "case", "mode", "fit_seconds", "first_epoch_s", "step_ms", "step_ratio",
         "captures", "capture_seconds", "scoring_seconds", "compile_seconds", "peak_mib", "val_acc", "error"]
PLAIN_BEST = "plain timm (best)"
SMOKE_BATCHES = {64: 4, 256: 8}  # --smoke: the stand-in of each real batch size
# (name, level, model, batch, numerator case, denominator case, limit): the targets
TARGETS = [
    ("fit: budget 0.6 <= 0.80x budget 1.0 (vit_small, batch 64)", "fit", "vit_small_patch16_224", 64,
     "budget 0.6", "budget 1.0", 0.80, "fit_seconds"),
    ("fit: budget 0.6 <= 0.80x budget 1.0 (vit_small, batch 256)", "fit", "vit_small_patch16_224", 256,
     "budget 0.6", "budget 1.0", 0.80, "fit_seconds"),
    ("step in the fit: budget 0.6 <= 0.75x plain timm (best) (vit_small, batch 64)", "fit",
     "vit_small_patch16_224", 64, "budget 0.6", PLAIN_BEST, 0.75, "step_ms"),
    ("step in the fit: budget 0.6 <= 0.75x plain timm (best) (vit_small, batch 256)", "fit",
     "vit_small_patch16_224", 256, "budget 0.6", PLAIN_BEST, 0.75, "step_ms"),
    ("bare step: budget 0.6 <= 0.75x plain timm (best) (vit_small, batch 64)", "step", "vit_small_patch16_224", 64,
     "budget 0.6", PLAIN_BEST, 0.75, "step_ms"),
    ("bare step: budget 0.6 <= 0.70x plain timm (best) (vit_base, batch 64)", "step", "vit_base_patch16_224", 64,
     "budget 0.6", PLAIN_BEST, 0.70, "step_ms"),
]


def row(**fields) -> dict:
    """A row with every key of :data:`ROW_KEYS` (None where not given)."""
    unknown = set(fields) - set(ROW_KEYS)
    if unknown:
        raise KeyError(f"not a row key: {sorted(unknown)}")
    return {k: fields.get(k) for k in ROW_KEYS}


def _key(r: dict) -> tuple:
    return r["level"], r["model"], r["batch"], r["case"]


_CASES = ["plain timm (eager)", "plain timm (compile reduce-overhead)", "plain timm (compile default)", PLAIN_BEST,
          "budget 1.0", "budget 0.6"]


def _order(r: dict) -> tuple:
    """Step table before fits, then by model, batch and case."""
    case = _CASES.index(r["case"]) if r["case"] in _CASES else len(_CASES)
    return r["level"] != "step", "small" not in r["model"], r["model"], r["batch"], case, r["case"]


def load_rows(path: Path) -> list[dict]:
    """The rows already in ``path`` (none if it does not exist yet)."""
    return json.loads(path.read_text())["rows"] if path.exists() else []


def targets(rows: list[dict], smoke: bool) -> tuple[dict, dict]:
    """({target: met, or None where a row is missing}, {target: ratio or None}). A smoke run's batches are
    the stand-ins of :data:`SMOKE_BATCHES` (rehearsal only: its ratios mean nothing)."""
    met, ratios = {}, {}
    for name, level, model, batch, num, den, limit, field in TARGETS:
        want = (level, model, SMOKE_BATCHES[batch] if smoke else batch)
        found = {r["case"]: r.get(field) for r in rows if (r["level"], r["model"], r["batch"]) == want}
        a, b = found.get(num), found.get(den)
        ok = all(isinstance(v, float) and math.isfinite(v) for v in (a, b)) and b > 0
        ratios[name] = a / b if ok else None
        met[name] = ratios[name] <= limit if ok else None
    return met, ratios


def fit_step_ratios(rows: list[dict]) -> list[dict]:
    """Fill each fit row's ``step_ratio``: its median step over plain timm (best)'s in a fit of the same model
    and batch (the step table's ratios are paired per round instead, in :mod:`steps`)."""
    best = {(r["model"], r["batch"]): r["step_ms"] for r in rows if r["level"] == "fit" and r["case"] == PLAIN_BEST}
    for r in rows:
        ref = best.get((r["model"], r["batch"]))
        if r["level"] == "fit":
            r["step_ratio"] = r["step_ms"] / ref if r["step_ms"] is not None and ref else None
    return rows


def save(path: Path, new_rows: list[dict], smoke: bool, notes: dict | None = None) -> list[dict]:
    """Merge ``new_rows`` into ``path`` (replacing rows with the same key), recompute the targets, write."""
    old = json.loads(path.read_text()) if path.exists() else {}
    merged = {_key(r): r for r in old.get("rows", [])}
    merged.update({_key(r): r for r in new_rows})
    rows = fit_step_ratios(sorted(merged.values(), key=_order))
    met, ratios = targets(rows, smoke)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    write_json(str(path.resolve()), {
        "device": device, "torch": torch.__version__, "smoke": smoke,
        "notes": {**old.get("notes", {}), **(notes or {})}, "rows": rows, "targets_met": met,
        "target_ratios": ratios}, device="cuda" if torch.cuda.is_available() else "cpu")
    return rows


def show(path: Path, rows: list[dict] | None = None) -> None:
    """The table (``rows``, else every row of ``path``) and the targets so far (for the log)."""
    if not path.exists():
        print(f"{path}: no results yet")
        return
    payload = json.loads(path.read_text())
    smoke = " (SMOKE: a CPU rehearsal, its numbers mean nothing)" if payload["smoke"] else ""
    print(f"\n{path.name} on {payload['device']}, torch {payload['torch']}{smoke}")
    print_table(rows if rows is not None else payload["rows"], TABLE)
    for name, ok in payload["targets_met"].items():
        ratio = payload["target_ratios"][name]
        print(f"  {name}: {'not measured' if ok is None else ('MET' if ok else 'not met')}"
              + (f" ({ratio:.3f})" if ratio is not None else ""))
