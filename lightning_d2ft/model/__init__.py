"""The ViT cut into subnets, and how each op runs: fused and general paths, CUDA graphs, LoRA, export."""
