"""`make demo` until the fine-tuning app exists: partition a ViT-S/16, run each op mix, print the costs."""

from __future__ import annotations

import time

import torch
from timm.models.vision_transformer import VisionTransformer

from lightning_d2ft import CostModel, D2FTViT, Op


def main() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=10)
    net = D2FTViT(vit, subnets=74)
    print(f"ViT-S/16 (64px): {net.num_subnets} subnets = {net.depth} blocks x {net.groups_per_block} groups "
          f"({net.heads_per_group} head each) + stem + head")
    x = torch.randn(8, 3, 64, 64)
    cost = CostModel()
    for name, op in [("FULL", Op.FULL), ("FORWARD_ONLY", Op.FORWARD_ONLY), ("SHORTCUT", Op.SHORTCUT)]:
        ops = torch.full((net.num_subnets,), int(op))
        ops[0] = ops[-1] = Op.FULL
        start = time.perf_counter()
        net(x, ops).sum().backward()
        seconds = time.perf_counter() - start
        print(f"  all blocks {name:13s} cost model {cost.compute([int(op)]).item():.2f}  step {seconds:.3f} s")


if __name__ == "__main__":
    main()
