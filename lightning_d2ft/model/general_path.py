"""The general grouped path: one group op (FULL or FORWARD_ONLY) at a time through plain autograd.

It runs what the fused path of :mod:`lightning_d2ft.model.fused_path` does not model: tensor-parallel shards, LoRA
adapters (asked from the :class:`~lightning_d2ft.model.lora.GroupedLoRALinear` module itself), qk-norm, dropout,
other activations, frozen weights; the fused path also runs its FORWARD_ONLY groups through it (under
``no_grad``). Inside a block all groups that share an op are computed with one matmul per projection over the
concatenation of their Parameters (:class:`~lightning_d2ft.model.grouped.GroupedLinear`), never a Python loop
over heads; ``positions`` index the groups a module holds.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_d2ft.model.grouped import join_groups

__all__ = ["attention_groups", "mlp_groups", "observing"]

#: (module, positions, input, output) of every grouped projection while :func:`observing` (the per-sample Fisher)
Observer = Callable[[nn.Module, Sequence[int], Tensor, Tensor], None]
_observers: list[Observer] = []


@contextmanager
def observing(observer: Observer) -> Iterator[None]:
    """Within the block, every grouped projection this path computes is reported to ``observer`` as ``(the
    GroupedLinear, the positions of its groups, input, output)``: ``qkv``/``fc1`` group their output features,
    ``proj``/``fc2`` their input features, group by group in ``positions`` order (one contiguous run each)."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def _seen(module: nn.Module, positions: Sequence[int], inp: Tensor, out: Tensor) -> Tensor:
    for observer in _observers:
        observer(module, positions, inp, out)
    return out


def _cat(tensors: Sequence[Tensor] | None) -> Tensor | None:
    """The groups' slices as one tensor along dim 0: differentiable where autograd records (each FULL group gets
    its rows back), else a view of neighbouring groups where they are packed (:func:`join_groups`)."""
    if tensors is None:
        return None
    if len(tensors) == 1:
        return tensors[0]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return torch.cat(list(tensors))
    return join_groups(tensors)


def attention_groups(blk: nn.Module, h: Tensor, positions: Sequence[int]) -> Tensor:
    """Attention output of the head groups at ``positions`` through their columns of ``proj`` (no bias)."""
    attn = blk.attn
    qkv = attn.qkv
    B, N, _ = h.shape
    heads = len(positions) * qkv.heads_per_group
    y = F.linear(h, _cat(qkv.weights(positions)), _cat(qkv.biases(positions)))
    if hasattr(qkv, "group_delta"):  # LoRA adapters of these groups
        y = y + qkv.group_delta(h, positions)
    y = _seen(qkv, positions, h, y)
    q, k, v = y.view(B, N, heads, 3, attn.head_dim).permute(3, 0, 2, 1, 4).unbind(0)  # head-major rows
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        a = (q * attn.scale) @ k.transpose(-2, -1)
        o = attn.attn_drop(a.softmax(dim=-1)) @ v
    o = o.transpose(1, 2).reshape(B, N, heads * attn.head_dim)
    return _seen(attn.proj, positions, o, o @ _cat(attn.proj.weights(positions)))  # proj's columns, transposed


def mlp_groups(blk: nn.Module, h: Tensor, positions: Sequence[int]) -> Tensor:
    """MLP output of the hidden-unit slices at ``positions`` through their columns of ``fc2`` (no bias)."""
    mlp = blk.mlp
    pre = _seen(mlp.fc1, positions, h, F.linear(h, _cat(mlp.fc1.weights(positions)), _cat(mlp.fc1.biases(positions))))
    a = mlp.drop1(mlp.act(pre))
    return _seen(mlp.fc2, positions, a, a @ _cat(mlp.fc2.weights(positions)))
