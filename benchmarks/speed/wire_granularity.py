"""The wire against the granularity, with and without a comm budget (README, "Our reading").

    PYTHONPATH=. python benchmarks/speed/wire_granularity.py

ViT-S (12 blocks x 6 heads) at 26/38/74 subnets and ViT-B (12 x 12) at 146, round-robin over 2 and 4
tensor-parallel ranks, 20 micro-batches, the default score kinds' shape (a backward score the same for every
micro-batch, like weight_magnitude; a forward score that varies), budget 0.6, solved by the DP: compute,
the wire (the bytes the collectives send, over all FULL) and the per-item cost model the schedule used to
report (FULL 1, FORWARD_ONLY 0.5 per subnet), then the same with comm_budget 0.5. Writes
benchmarks/results/speed/wire_granularity.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/_common.py
from _common import print_table, write_json

from lightning_d2ft import Schedule
from lightning_d2ft.ops import CostModel
from lightning_d2ft.parallel.placement import Placement

LAYOUTS = (("ViT-S 26", 12, 2), ("ViT-S 38", 12, 3), ("ViT-S 74", 12, 6), ("ViT-B 146", 12, 12))


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, depth, groups in LAYOUTS:
        n_cols = 2 + depth * groups
        blocks = torch.cat([torch.tensor([-1]), torch.arange(depth).repeat_interleave(groups), torch.tensor([-1])])
        weight = torch.rand(n_cols, generator=gen) * 10
        back, fwd = weight.expand(20, n_cols).clone(), torch.rand(20, n_cols, generator=gen) * weight
        for tp in (2, 4):
            if tp > groups:
                continue
            kw = dict(placement=Placement.round_robin(depth, groups, tp), column_blocks=blocks, budget=0.6, solver="dp")
            free = Schedule.solve(back, fwd, **kw)
            ops = free.ops[:, free.scheduled]
            capped = Schedule.solve(back, fwd, comm_budget=0.5, **kw)
            rows.append({"layout": name, "tp": tp, "compute": free.compute_fraction, "wire": free.wire_fraction,
                         "per_item_model": float(CostModel().comm(ops).sum() / ops.numel()),
                         "compute_at_comm_0.5": capped.compute_fraction, "wire_at_comm_0.5": capped.wire_fraction})
    print_table(rows, list(rows[0]))
    print(f"wrote {write_json('speed/wire_granularity.json', {'rows': rows})}")


if __name__ == "__main__":
    main()
