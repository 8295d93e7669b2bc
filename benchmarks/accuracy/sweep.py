"""The paper's experiments as Hydra multiruns over the app, then the tables (``collect.py``).

    python benchmarks/accuracy/sweep.py --preset quick   # one seed, one epoch, fewer points: < 10 min
    python benchmarks/accuracy/sweep.py --preset full    # 3 seeds: the committed tables
    python benchmarks/accuracy/sweep.py --preset full --tables t3_subnets   # one table only

Every table is one or two ``python -m lightning_d2ft -m ...`` multiruns (the bundled default: a ViT-S-shaped
model pretrained here on digits 0-4, fine-tuned on digits 5-9; see the README), one process, jobs one
after another, each under ``benchmarks/results/accuracy/digits/runs/<preset>/<table>/s<i>/<overrides>/``
(results.json, .hydra/overrides.yaml). Jobs that already have a results.json are skipped
(``skip_existing=true``), so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNS = REPO / "benchmarks" / "results" / "accuracy" / "digits" / "runs"
METRICS = "weight_magnitude,gradient_magnitude,squared_gradient,fisher,taylor,random"
# a comm budget bounds the tensor-parallel wire: one device sends nothing (refused), so 2 processes
WIRE = ["trainer=cpu2"]

# 2 processes as 2 data-parallel replicas (no tensor parallelism): DDP gradients vs lo-fi averaging
LOFI = ["trainer=cpu2", "trainer.tensor_parallel_size=1", "trainer.data_parallel=sync,lofi"]

# table -> list of multirun sweeps (each a list of overrides); seeds and epochs come from the preset
TABLES: dict[str, dict[str, list[list[str]]]] = {
    "full": {
        "t1_compute": [["schedule.method=d2ft,random,dpruning,moe", "schedule.budget=0.4,0.6,0.8"],
                       ["schedule.method=full", "schedule.budget=1.0"]],
        "t2_comm": [WIRE + ["schedule.method=d2ft,random,dpruning,moe", "schedule.budget=1.0",
                            "schedule.comm_budget=0.4,0.6,0.8"]],
        "t3_subnets": [["model.subnets=26,38,74", "schedule.budget=0.6"]],
        "t4_scores": [[f"schedule.backward_score={METRICS}", f"schedule.forward_score={METRICS}",
                       "schedule.budget=0.6"]],
        "t5_lofi": [LOFI + ["schedule.budget=0.6,1.0"]],
        "t6_lora": [["schedule.lora_rank=4", "schedule.budget=0.6,0.8,1.0"]],
    },
    "quick": {
        "t1_compute": [["schedule.method=d2ft,random,dpruning,moe", "schedule.budget=0.6"],
                       ["schedule.method=full", "schedule.budget=1.0"]],
        "t2_comm": [WIRE + ["schedule.method=d2ft,moe", "schedule.budget=1.0", "schedule.comm_budget=0.5"]],
        "t3_subnets": [["model.subnets=26,74", "schedule.budget=0.6"]],
        "t4_scores": [["schedule.backward_score=weight_magnitude,fisher", "schedule.forward_score=fisher,random",
                       "schedule.budget=0.6"]],
        "t5_lofi": [LOFI + ["schedule.budget=0.6"]],
        "t6_lora": [["schedule.lora_rank=4", "schedule.budget=0.6,1.0"]],
    },
}
PRESETS = {
    "full": ["seed=0,1,2", "trainer.max_epochs=3"],
    "quick": ["seed=0", "trainer.max_epochs=1"],
}
COMMON = ["trainer=cpu1", "trainer.log_every_n_steps=50", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def run_table(preset: str, table: str) -> None:
    """One Hydra multirun per sweep of the table; finished jobs are skipped (``skip_existing``)."""
    for i, sweep in enumerate(TABLES[preset][table]):
        own_trainer = any(o.startswith("trainer=") for o in sweep)
        common = [c for c in COMMON if not (own_trainer and c.startswith("trainer="))]
        cmd = [sys.executable, "-m", "lightning_d2ft", "-m", *common, *PRESETS[preset], *sweep, "skip_existing=true",
               f"hydra.sweep.dir={RUNS / preset / table / f's{i}'}", "hydra.sweep.subdir=${hydra.job.override_dirname}"]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="quick")
    parser.add_argument("--tables", default=None, help="comma-separated subset of " + ",".join(TABLES["full"]))
    args = parser.parse_args()
    tables = args.tables.split(",") if args.tables else list(TABLES[args.preset])
    for table in tables:
        run_table(args.preset, table)
    subprocess.run([sys.executable, str(Path(__file__).with_name("collect.py")), "--preset", args.preset], check=True)


if __name__ == "__main__":
    main()
