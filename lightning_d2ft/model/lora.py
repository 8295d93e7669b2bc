"""LoRA on subnets: a low-rank adapter per head group on its slice of ``qkv``.

Each head group g of a block gets its own pair ``A_g`` (r x dim) and ``B_g`` (3*group_dim x r), so the
op semantics carry over unchanged: a FULL subnet trains its adapter, a FORWARD_ONLY one uses it without a
gradient, a SHORTCUT one skips it. A library adapter (PEFT's ``LoraConfig`` on ``qkv``) shares one ``A``
across every head of the layer, which a FORWARD_ONLY group would still update through the FULL ones and
which tensor-parallel sharding by head group would have to replicate and all-reduce; hence our own.

:func:`add_lora_` replaces every block's ``attn.qkv`` (a :class:`~lightning_d2ft.model.grouped.GroupedLinear`) by
a :class:`GroupedLoRALinear` (the same per-group weight and bias Parameters plus per-group ``lora_A_g`` and
``lora_B_g`` and a ``lora_scale`` buffer). The checkpoint keys stay ``...attn.qkv.lora_A/lora_B/lora_scale``
(``lora_A`` [G*r, dim], group-major rows, ``lora_B`` [3*attn_dim, r], rows laid out like ``qkv.weight``; see
:mod:`lightning_d2ft.parallel.layout`), so they shard, checkpoint and resume like every other block tensor.
The module computes its own adapter output, for all groups (``forward``, so a whole FULL block runs timm's
own modules) or for selected groups (:meth:`GroupedLoRALinear.group_delta`, for the grouped path).
:func:`merge_lora` folds them into ``qkv.weight`` for a plain timm model.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_d2ft.model.grouped import GroupedLinear
from lightning_d2ft.parallel.layout import GROUPED, from_groups, group_param_name

if TYPE_CHECKING:
    from lightning_d2ft.model.vit import D2FTViT

__all__ = ["GroupedLoRALinear", "add_lora_", "check_lora", "has_lora", "match_lora_", "merge_lora"]
_LORA_KEY = re.compile(r"^(.*attn\.qkv)\.lora_A$")


class GroupedLoRALinear(GroupedLinear):
    """timm's ``qkv`` cut by head group plus one rank-``r`` adapter per group: ``y = W h + b + s * B_g A_g h``.

    Built from the block's :class:`GroupedLinear` (its very Parameters: nothing is copied); the adapters are
    Parameters per group too (``lora_A_g<group>`` [r, dim], ``lora_B_g<group>`` [3*group_dim, r], rows
    head-major like the group's ``qkv`` rows), so a FORWARD_ONLY group's adapter gets no gradient and no
    optimizer step. State dicts hold ``lora_A`` [G*r, dim] and ``lora_B`` [3*attn_dim, r] in timm's layout."""

    def __init__(self, base: GroupedLinear, rank: int, alpha: float, gen: torch.Generator) -> None:
        nn.Module.__init__(self)
        self.__dict__.update({k: v for k, v in base.__dict__.items() if not k.startswith("_")})
        self.group_ids = list(base.group_ids)
        for name, p in base._parameters.items():  # the same Parameters, in the same order
            self.register_parameter(name, p)
        self.rank = rank
        a = torch.empty(base.num_groups * rank, base.in_features)
        bound = 1.0 / math.sqrt(base.in_features)  # PEFT's kaiming_uniform(a=sqrt(5)) bound
        a.uniform_(-bound, bound, generator=gen)
        like = base.weights([0])[0]
        for g, part in zip(base.group_ids, a.to(like).unflatten(0, (base.num_groups, rank)).unbind(0)):
            self.register_parameter(group_param_name("lora_A", g), nn.Parameter(part.clone()))
            self.register_parameter(group_param_name("lora_B", g),
                                    nn.Parameter(torch.zeros(base.out_features // base.num_groups, rank).to(like)))
        self.register_buffer("lora_scale", torch.tensor(alpha / rank, device=like.device))
        self._pack_()

    @property
    def groups(self) -> int:
        return self.num_groups

    def _group_tensor_names(self) -> list[str]:
        return super()._group_tensor_names() + ["lora_A", "lora_B"]

    @property
    def lora_A(self) -> Tensor:
        """timm-layout ``lora_A`` [G*r, dim] of the groups held (assembled, differentiable)."""
        return torch.cat(self.adapters(self.all_positions)[0], 0)

    @property
    def lora_B(self) -> Tensor:
        """timm-layout ``lora_B`` [3*attn_dim, r] of the groups held (assembled, differentiable)."""
        return from_groups(self.adapters(self.all_positions)[1], GROUPED["attn.qkv.lora_B"], self.heads_per_group)

    def adapters(self, positions: Sequence[int]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``([A_g], [B_g])`` of the groups at ``positions``."""
        params, ids = self._parameters, [self.group_ids[i] for i in positions]
        return [params[f"lora_A_g{g}"] for g in ids], [params[f"lora_B_g{g}"] for g in ids]

    def group_parameters(self, positions: Sequence[int]) -> list[nn.Parameter]:
        a, b = self.adapters(positions)
        return super().group_parameters(positions) + a + b

    def forward(self, h: Tensor) -> Tensor:
        out = super().forward(h)
        delta = self.group_delta(h, self.all_positions)  # head-major rows: (groups, hpg, 3, hd) -> timm's (3, ...)
        delta = delta.unflatten(-1, (self.num_groups * self.heads_per_group, 3, -1)).transpose(-3, -2)
        return out + delta.flatten(-3)

    def group_delta(self, h: Tensor, positions: Sequence[int]) -> Tensor:
        """``scale * B_g A_g h`` of the groups at ``positions``, laid out like their concatenated (head-major)
        weight rows."""
        a, b = self.adapters(positions)
        u = F.linear(h, torch.cat(a, 0)).unflatten(-1, (len(positions), self.rank))  # [..., P, r]
        return torch.einsum("...pr,pdr->...pd", u, torch.stack(b)).flatten(-2) * self.lora_scale


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
        blk.attn.qkv = GroupedLoRALinear(blk.attn.qkv, rank, alpha, gen)


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
