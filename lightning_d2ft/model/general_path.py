"""The general grouped path: one group op (FULL or FORWARD_ONLY) at a time through plain autograd.

It runs what the fused path of :mod:`lightning_d2ft.model.fused_path` does not model: tensor-parallel shards, LoRA
adapters (asked from the :class:`~lightning_d2ft.model.lora.GroupedLoRALinear` module itself), qk-norm, dropout,
other activations, frozen weights. Inside a block all groups that share an op are computed with one matmul
per projection over the union of their rows/columns, never a Python loop over heads.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_d2ft.model.lora import GroupedLoRALinear

__all__ = ["attention_groups", "mlp_groups"]


def _select(weight: Tensor, dim: int, positions: list[int], n_groups: int) -> Tensor:
    """Rows/columns of ``weight`` belonging to the groups at ``positions``, viewed group-wise on ``dim``."""
    if len(positions) == n_groups:
        return weight
    first, last = positions[0], positions[-1]
    if last - first + 1 == len(positions):  # contiguous run: a view, no gather
        return weight.narrow(dim, first, len(positions))
    return weight.index_select(dim, _index(tuple(positions), weight.device))


@functools.lru_cache(maxsize=4096)
def _index(positions: tuple[int, ...], device: torch.device) -> Tensor:
    """``positions`` as an index tensor on ``device``, built once: ``torch.tensor(..., device="cuda")`` on every
    call would copy from the host and wait for the whole GPU queue first (pytorch/pytorch#120996)."""
    return torch.tensor(positions).to(device, non_blocking=True)


def attention_groups(blk: nn.Module, h: Tensor, positions: list[int], n_groups: int) -> Tensor:
    """Attention output of the head groups at ``positions`` through their columns of ``proj`` (no bias)."""
    attn = blk.attn
    B, N, D = h.shape
    group_dim = attn.attn_dim // n_groups
    heads = len(positions) * (attn.num_heads // n_groups)
    w = _select(attn.qkv.weight.view(3, n_groups, group_dim, D), 1, positions, n_groups).reshape(-1, D)
    b = attn.qkv.bias
    if b is not None:
        b = _select(b.view(3, n_groups, group_dim), 1, positions, n_groups).reshape(-1)
    qkv = F.linear(h, w, b)
    if isinstance(attn.qkv, GroupedLoRALinear):
        qkv = qkv + attn.qkv.group_delta(h, positions, _select)
    qkv = qkv.view(B, N, 3, heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        a = (q * attn.scale) @ k.transpose(-2, -1)
        o = attn.attn_drop(a.softmax(dim=-1)) @ v
    o = o.transpose(1, 2).reshape(B, N, heads * attn.head_dim)
    w_proj = _select(attn.proj.weight.view(D, n_groups, group_dim), 1, positions, n_groups).reshape(D, -1)
    return F.linear(o, w_proj)


def mlp_groups(blk: nn.Module, h: Tensor, positions: list[int], n_groups: int) -> Tensor:
    """MLP output of the hidden-unit slices at ``positions`` through their columns of ``fc2`` (no bias)."""
    mlp = blk.mlp
    D = h.shape[-1]
    hidden = mlp.fc1.out_features // n_groups
    w1 = _select(mlp.fc1.weight.view(n_groups, hidden, D), 0, positions, n_groups).reshape(-1, D)
    b1 = mlp.fc1.bias
    if b1 is not None:
        b1 = _select(b1.view(n_groups, hidden), 0, positions, n_groups).reshape(-1)
    a = mlp.drop1(mlp.act(F.linear(h, w1, b1)))
    w2 = _select(mlp.fc2.weight.view(D, n_groups, hidden), 1, positions, n_groups).reshape(D, -1)
    return F.linear(a, w2)
