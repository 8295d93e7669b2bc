"""Which timm ViTs can be cut into subnets, and how finely: the supported-model check and the valid subnet
counts (groups per block that split both the heads and the MLP hidden units evenly)."""

from __future__ import annotations

from torch import nn

from lightning_d2ft.model.grouped import GroupedLinear

__all__ = ["check_supported", "resolve_groups_per_block", "valid_groups_per_block", "valid_subnet_counts"]

_NUM_EXTRA_SUBNETS = 2  # stem and head


def check_supported(vit: nn.Module) -> None:
    """Raise a TypeError naming what is unsupported unless ``vit`` is a timm ViT we can partition exactly."""
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise TypeError(
            f"D2FTViT wraps a timm VisionTransformer (e.g. timm.create_model('vit_small_patch16_224')); "
            f"got {type(vit).__module__}.{type(vit).__name__}, which is not a supported transformer."
        )
    for i, blk in enumerate(vit.blocks):
        problems = []
        if type(blk) is not Block:
            problems.append(f"block type {type(blk).__name__} (only timm's pre-norm Block is supported)")
        else:
            attn, mlp = blk.attn, blk.mlp
            if type(attn) is not Attention:
                problems.append(f"attention type {type(attn).__name__} (only timm.layers.Attention)")
            elif getattr(attn, "gate", None) is not None or not isinstance(attn.norm, nn.Identity):
                problems.append("gated attention or scale_attn_norm (they mix all heads before proj)")
            if type(mlp) is not Mlp or not isinstance(mlp.fc1, (nn.Linear, GroupedLinear)):
                problems.append(f"MLP type {type(mlp).__name__} (only timm.layers.Mlp with Linear layers)")
            elif not isinstance(mlp.norm, nn.Identity):
                problems.append("scale_mlp_norm (it mixes all hidden units before fc2)")
            if not isinstance(blk.drop_path1, nn.Identity) or not isinstance(blk.drop_path2, nn.Identity):
                problems.append("drop_path_rate > 0 (stochastic depth masks whole branches; set drop_path_rate=0)")
        if problems:
            raise TypeError(f"{type(vit).__name__} block {i} is not supported: " + "; ".join(problems))
    heads = {blk.attn.num_heads for blk in vit.blocks}
    if len(heads) != 1:
        raise TypeError(f"all blocks must have the same number of heads, got {sorted(heads)}")


def _divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


def valid_groups_per_block(vit: nn.Module) -> list[int]:
    """Groups-per-block values G that split both the heads and the MLP hidden units evenly."""
    blk = vit.blocks[0]
    hidden = blk.mlp.fc1.out_features
    return [g for g in _divisors(blk.attn.num_heads) if hidden % g == 0]


def valid_subnet_counts(vit: nn.Module) -> list[int]:
    """Total subnet counts (blocks x G + stem + head) this model can be cut into."""
    return [len(vit.blocks) * g + _NUM_EXTRA_SUBNETS for g in valid_groups_per_block(vit)]


def _as_set(values: list[int]) -> str:
    """``{14, 38}``: a set of allowed values, not a range."""
    return "{" + ", ".join(str(v) for v in values) + "}"


def resolve_groups_per_block(vit: nn.Module, subnets: int | None, groups_per_block: int | None) -> int:
    """Turn ``subnets`` (a total count, or G) / ``groups_per_block`` into G, or explain the valid choices."""
    valid_g = valid_groups_per_block(vit)
    valid_n = valid_subnet_counts(vit)
    depth, heads = len(vit.blocks), vit.blocks[0].attn.num_heads
    choices = (
        f"for this model ({depth} blocks x {heads} heads) use subnets = one of {_as_set(valid_n)} (the total count: "
        f"{depth} blocks x groups per block + stem + head) or groups_per_block = one of {_as_set(valid_g)}"
    )
    if subnets is not None and groups_per_block is not None:
        raise ValueError(f"give either subnets or groups_per_block, not both; {choices}")
    if groups_per_block is not None:
        if groups_per_block not in valid_g:
            raise ValueError(f"groups_per_block={groups_per_block} does not divide the heads evenly; {choices}")
        return groups_per_block
    if subnets is None:
        return valid_g[-1]  # finest granularity: one head per subnet, the paper's best setting
    if isinstance(subnets, bool) or not isinstance(subnets, int):
        raise TypeError(f"subnets must be an int, got {subnets!r}; {choices}")
    if subnets in valid_n:  # a total count wins over a groups-per-block reading
        return (subnets - _NUM_EXTRA_SUBNETS) // depth
    if subnets in valid_g:
        return subnets
    raise ValueError(f"subnets={subnets} is not valid; {choices}")
