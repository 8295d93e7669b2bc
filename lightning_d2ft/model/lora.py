"""LoRA on subnets: a low-rank adapter per head group on its slice of ``qkv``.

Each head group g of a block gets its own pair ``A_g`` (r x dim) and ``B_g`` (3*group_dim x r), so the
op semantics carry over unchanged: a FULL subnet trains its adapter, a FORWARD_ONLY one uses it without a
gradient, a SHORTCUT one skips it. A library adapter (PEFT's ``LoraConfig`` on ``qkv``) shares one ``A``
across every head of the layer, which a FORWARD_ONLY group would still update through the FULL ones and
which tensor-parallel sharding by head group would have to replicate and all-reduce; hence our own.

:func:`add_lora_` replaces every block's ``attn.qkv`` by a :class:`GroupedLoRALinear` (the same weight and
bias Parameters plus ``lora_A`` [G*r, dim], group-major rows, ``lora_B`` [3*attn_dim, r], rows laid out
like ``qkv.weight``, and a ``lora_scale`` buffer; see :mod:`lightning_d2ft.parallel.layout`). The checkpoint keys stay
``...attn.qkv.lora_A/lora_B/lora_scale``, so they shard, checkpoint and resume like every other block
tensor. The module computes its own adapter output, for all groups (``forward``, so a whole FULL block runs
timm's own modules) or for selected groups (:meth:`GroupedLoRALinear.group_delta`, for the grouped path).
:func:`merge_lora` folds them into ``qkv.weight`` for a plain timm model.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_d2ft.model.vit import D2FTViT

__all__ = ["GroupedLoRALinear", "add_lora_", "check_lora", "has_lora", "match_lora_", "merge_lora"]
_LORA_KEY = re.compile(r"^(.*attn\.qkv)\.lora_A$")


class GroupedLoRALinear(nn.Linear):
    """timm's ``qkv`` Linear plus one rank-``r`` adapter per head group: ``y = W h + b + s * B_g A_g h``."""

    def __init__(self, base: nn.Linear, groups: int, rank: int, alpha: float, gen: torch.Generator) -> None:
        with torch.device("meta"):
            super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight, self.bias = base.weight, base.bias  # the very Parameters: nothing is copied
        self.rank = rank
        a = torch.empty(groups * rank, base.in_features)
        bound = 1.0 / math.sqrt(base.in_features)  # PEFT's kaiming_uniform(a=sqrt(5)) bound
        a.uniform_(-bound, bound, generator=gen)
        self.lora_A = nn.Parameter(a.to(base.weight))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank).to(base.weight))
        self.register_buffer("lora_scale", torch.tensor(alpha / rank, device=base.weight.device))

    @property
    def groups(self) -> int:
        return self.lora_A.shape[0] // self.rank

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(h, self.weight, self.bias) + self.group_delta(h, list(range(self.groups)), None)

    def group_delta(self, h: Tensor, positions: list[int], select: Callable | None) -> Tensor:
        """``scale * B_g A_g h`` of the groups at ``positions`` (local order), laid out like their qkv rows;
        ``select(tensor, dim, positions, n_groups)`` picks the groups' slices (None: all groups)."""
        n, r, D = self.groups, self.rank, h.shape[-1]
        a, b = self.lora_A.view(n, r, D), self.lora_B.view(3, n, -1, r)
        if select is not None:
            a, b = select(a, 0, positions, n), select(b, 1, positions, n)
        u = F.linear(h, a.reshape(-1, D)).unflatten(-1, (len(positions), r))  # [..., P, r]
        return torch.einsum("...pr,tpdr->...tpd", u, b).flatten(-3) * self.lora_scale


def has_lora(net: D2FTViT) -> bool:
    return isinstance(net.vit.blocks[0].attn.qkv, GroupedLoRALinear)


def check_lora(rank: int | None, alpha: float | None, *, rank_optional: bool = False) -> None:
    """A LoRA rank is a positive int (or None where LoRA is optional); alpha, when given, is positive."""
    if not (rank_optional and rank is None) and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"lora_rank must be a positive int{' or None' if rank_optional else ''}, got {rank!r}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"lora_alpha must be positive, got {alpha!r}")


def add_lora_(net: D2FTViT, rank: int, alpha: float | None = None, seed: int = 0) -> None:
    """Add an adapter of ``rank`` per head group to every block's ``qkv`` (B = 0, so the model is
    unchanged), and freeze everything but the adapters and the classifier head. Before sharding."""
    if net.tp is not None:
        raise RuntimeError("add LoRA before the model is sharded (D2FTCallback does)")
    if has_lora(net):
        raise RuntimeError("this D2FTViT already has LoRA adapters")
    check_lora(rank, alpha)
    alpha = float(rank if alpha is None else alpha)
    for p in net.vit.parameters():
        p.requires_grad_(False)
    for p in net.vit.get_classifier().parameters():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    for blk in net.vit.blocks:
        blk.attn.qkv = GroupedLoRALinear(blk.attn.qkv, net.groups_per_block, rank, alpha, gen)


def merge_lora(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A plain timm state dict: ``qkv.weight += scale * B_g @ A_g`` on every group's rows, adapters dropped."""
    out = {k: v for k, v in state_dict.items() if not re.search(r"\.lora_(A|B|scale)$", k)}
    for key in state_dict:
        match = _LORA_KEY.match(key)
        if match is None:
            continue
        base = match.group(1)
        a, b, scale = state_dict[key], state_dict[base + ".lora_B"], state_dict[base + ".lora_scale"]
        r = b.shape[1]
        groups, dim = a.shape[0] // r, a.shape[1]
        group_dim = b.shape[0] // (3 * groups)
        delta = torch.einsum("tgdr,grk->tgdk", b.view(3, groups, group_dim, r).double(),
                             a.view(groups, r, dim).double())
        weight = state_dict[base + ".weight"]
        out[base + ".weight"] = (weight.double() + float(scale) * delta.reshape(weight.shape)).to(weight.dtype)
    return out


def match_lora_(net: D2FTViT, state_dict: dict[str, Tensor]) -> None:
    """Give ``net`` adapters shaped like those in ``state_dict`` (a D2FT-LoRA checkpoint) if it has none,
    so that the checkpoint loads: D2FTCallback adds them in the processes that train, not elsewhere."""
    b = next((v for k, v in state_dict.items() if k.endswith("blocks.0.attn.qkv.lora_B")), None)
    if b is None or has_lora(net):
        return
    scale = next(v for k, v in state_dict.items() if k.endswith("blocks.0.attn.qkv.lora_scale"))
    rank = b.shape[1]
    add_lora_(net, rank, alpha=float(scale) * rank)
