"""The empirical Fisher of every subnet from per-sample gradients, without materialising them per parameter.

``fisher`` of (micro-batch n, subnet k) is ``(1/B) sum_i ||grad_k loss_i||^2`` over the B samples of n: the
per-sample gradients squared, not the micro-batch mean gradient squared (that is ``squared_gradient``).

While it records, the model runs every block through the general grouped path
(``D2FTViT.general_path_only``), which reports each grouped projection ``y = x W_S`` of a set S of head
groups (:func:`lightning_d2ft.model.general_path.observing`): ``qkv`` and ``fc1`` group their output
features, ``proj`` and ``fc2`` their input features, one contiguous run per group. The samples of a ViT do not
interact, so the per-sample gradient of such a projection is ``G_i = sum_t x_{i,t}^T dy_{i,t}``, and its
squared norm over one group's part needs only the input ``x`` and the output gradient ``dy``:

* ``sum_{t,t'} (x_t . x_t') (dy_{t,g} . dy_{t',g})`` (Gram matrices over the tokens), or
* the per-sample gradients of the projection formed once (``B x out x in``) where that is cheaper,

and a grouped bias's per-sample gradient is ``sum_t dy_{i,t}``. The loss is assumed to be a mean over the
samples (``F.cross_entropy``'s default), so ``dy`` holds ``1/B`` of each sample's gradient. This works on one
process and on a tensor-parallel shard alike (a shard observes its own groups). The stem and the head (always
FULL, never scheduled) score 0; LoRA adapters are not scored (the scores rate the base subnets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn

from lightning_d2ft.model.general_path import observing

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from lightning_d2ft.model.vit import D2FTViT

__all__ = ["PerSampleFisher"]
_BY_OUTPUT = ("attn.qkv", "mlp.fc1")  # these group their output features; proj and fc2 their input features


@dataclass
class _Call:
    x: Tensor  # [B, T, in]
    y: Tensor  # the projection's output (its gradient is dy)
    cols: Tensor  # the subnet column of each observed group, in order
    by_output: bool
    grouped_bias: bool


class PerSampleFisher:
    """Per-subnet sums of squared per-sample gradients of the grouped projections (see the module doc)."""

    def __init__(self, net: D2FTViT) -> None:
        self.net = net
        self.num_subnets = net.num_subnets
        self._where = {id(m): (l, key) for l, blk in enumerate(net.vit.blocks)
                       for key, m in (("attn.qkv", blk.attn.qkv), ("attn.proj", blk.attn.proj),
                                      ("mlp.fc1", blk.mlp.fc1), ("mlp.fc2", blk.mlp.fc2))}
        self.calls: list[_Call] = []

    def recording(self) -> AbstractContextManager[None]:
        """The context in which the forward pass runs: every grouped projection is recorded."""
        self.calls = []
        return _Recording(self)

    def _observe(self, module: nn.Module, positions: Sequence[int], x: Tensor, y: Tensor) -> None:
        found = self._where.get(id(module))
        if found is None or not torch.is_grad_enabled():
            return
        block, key = found
        ids = [module.group_ids[p] for p in positions]
        cols = torch.tensor([self.net.subnet_index(block, g) for g in ids], device=y.device)
        self.calls.append(_Call(x, y, cols, key in _BY_OUTPUT, getattr(module, "grouped_bias", False)))

    @property
    def outputs(self) -> list[Tensor]:
        """The recorded projections' outputs (ask autograd for their gradients)."""
        return [c.y for c in self.calls]

    def sums(self, grads: list[Tensor | None]) -> Tensor:
        """``[num_subnets]`` float64: ``(1/B) sum_i ||per-sample gradient_i||^2`` per subnet, from the output
        gradients ``grads`` of the recorded projections (in :attr:`outputs` order)."""
        if not self.calls:
            raise RuntimeError("the per-sample Fisher recorded no grouped projection: the scoring pass must run "
                               "the blocks through the general grouped path (D2FTViT.general_path_only)")
        out = torch.zeros(self.num_subnets, dtype=torch.float64, device=self.calls[0].y.device)
        for call, dy in zip(self.calls, grads):
            if dy is None:
                continue
            x, dy = call.x.detach(), dy.detach()
            if x.dim() == 2:
                x, dy = x.unsqueeze(1), dy.unsqueeze(1)
            x, dy = x.reshape(x.shape[0], -1, x.shape[-1]), dy.reshape(dy.shape[0], -1, dy.shape[-1])
            batch, groups = x.shape[0], call.cols.numel()
            out.index_add_(0, call.cols, _group_sq(x, dy, call.by_output, groups).double() * batch)
            if call.grouped_bias:  # qkv/fc1 biases are the groups' own; proj/fc2's is shared (nobody's)
                per = dy.sum(1).unflatten(1, (groups, -1))  # [B, G, per]: the per-sample bias gradients
                out.index_add_(0, call.cols, per.square().sum((0, 2)).double() * batch)
        self.calls = []
        return out


class _Recording:
    """General path only, and every grouped projection observed, for the time of the block."""

    def __init__(self, owner: PerSampleFisher) -> None:
        self.owner, self._observing, self._was = owner, observing(owner._observe), False

    def __enter__(self) -> None:
        self._was, self.owner.net.general_path_only = self.owner.net.general_path_only, True
        self._observing.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._observing.__exit__(*exc)
        self.owner.net.general_path_only = self._was


def _group_sq(x: Tensor, dy: Tensor, by_output: bool, groups: int) -> Tensor:
    """``[groups]``: summed over the samples, each sample's squared gradient norm over each group's part of the
    weight of ``y = x W`` (the groups split ``dy``'s features when ``by_output``, else ``x``'s)."""
    tokens, d_in, d_out = x.shape[1], x.shape[-1], dy.shape[-1]
    if tokens * (d_in + d_out) < d_in * d_out:  # Gram matrices over the tokens: cheaper than forming G_i
        split, other = (dy, x) if by_output else (x, dy)
        g = split.unflatten(2, (groups, -1)).transpose(1, 2)  # [B, G, T, per]
        gram = g @ g.transpose(2, 3)  # [B, G, T, T]
        return (gram * (other @ other.transpose(1, 2)).unsqueeze(1)).sum((0, 2, 3))
    per_sample = x.transpose(1, 2) @ dy  # [B, in, out]: every sample's gradient of W
    grouped = per_sample.unflatten(2 if by_output else 1, (groups, -1))
    return grouped.square().sum((0, 1, 3) if by_output else (0, 2, 3))
