"""Wall time and FLOPs of one training step of a ViT-S/16 under each op mix, as ratios to plain timm.

    python benchmarks/ops_cost.py [--batch 8] [--repeats 5] [--img-size 224]

Writes benchmarks/results/ops_cost.json. Targets (issue 2): all-FULL overhead under 5% vs plain timm,
half-SHORTCUT under 0.6x of plain timm.
"""

from __future__ import annotations

import argparse

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

from _common import median_seconds, print_table, write_json
from lightning_d2ft import D2FTViT, Op


def op_mixes(net: D2FTViT) -> dict[str, torch.Tensor | None]:
    n, G = net.num_subnets, net.groups_per_block
    full = torch.full((n,), int(Op.FULL))
    forward_only = full.clone()
    forward_only[1:-1] = Op.FORWARD_ONLY
    half_shortcut = full.clone()
    for l in range(net.depth):  # half of every block's head groups skipped
        half_shortcut[net.subnet_index(l, 0) : net.subnet_index(l, G // 2)] = Op.SHORTCUT
    return {"all FULL": full, "all FORWARD_ONLY": forward_only, "half SHORTCUT": half_shortcut}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--subnets", type=int, default=74)
    args = parser.parse_args()

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=args.img_size, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                            num_classes=100)
    net = D2FTViT(vit, subnets=args.subnets)
    opt = torch.optim.SGD(vit.parameters(), lr=1e-3)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    target = torch.randint(0, 100, (args.batch,))

    def step(model, *ops):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x, *ops), target).backward()
        opt.step()

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    cases = {"plain timm": lambda: step(vit)}
    for name, ops in op_mixes(net).items():
        cases[name] = lambda ops=ops: step(net, ops)

    rows = []
    for name, fn in cases.items():
        seconds = median_seconds(fn, args.repeats)
        rows.append({"case": name, "seconds": seconds, "gflops": flops(fn) / 1e9})
        print(f"  {name}: {seconds:.3f} s", flush=True)
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["seconds"] / base["seconds"]
        row["flop_ratio"] = row["gflops"] / base["gflops"]
    print(f"\nViT-S/16 training step, batch {args.batch}, {args.img_size}px, {net.num_subnets} subnets, "
          f"median of {args.repeats}, {torch.get_num_threads()} threads")
    print_table(rows, ["case", "seconds", "gflops", "time_ratio", "flop_ratio"])
    targets = {
        "all_full_overhead_under_5pct": rows[1]["time_ratio"] < 1.05,
        "half_shortcut_under_0.6x": rows[3]["time_ratio"] < 0.6,
    }
    print("targets:", targets)
    path = write_json("ops_cost.json", {"args": vars(args), "rows": rows, "targets_met": targets})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
