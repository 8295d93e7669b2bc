"""The empirical Fisher of every subnet from per-sample gradients, without materialising them per parameter.

``fisher`` of (micro-batch n, subnet k) is ``(1/B) sum_i ||grad_k loss_i||^2`` over the B samples of n: the
per-sample gradients squared, not the micro-batch mean gradient squared (that is ``squared_gradient``).

Every scored grouped weight is used by one ``F.linear`` per forward (timm's modules on one process, the
grouped path's full-width views on a tensor-parallel shard), and the samples of a ViT do not interact, so
the per-sample gradient of a linear layer ``y = x W^T (+ b)`` is ``G_i = sum_t dy_{i,t}^T x_{i,t}``. Its
squared norm over a head group's rows (``qkv``, ``fc1``: rows of W) or columns (``proj``, ``fc2``) needs
only the input ``x`` and the output gradient ``dy`` of the call:

* row group g: ``sum_{t,t'} (x_t . x_t') (dy_{t,g} . dy_{t',g})`` (Gram matrices over the tokens), or
* the per-sample gradients of the layer formed once (``B x out x in``) where that is cheaper (many tokens),

and a bias's per-sample gradient is ``sum_t dy_{i,t}``. :class:`PerSampleFisher` records the calls with a
``TorchFunctionMode`` while the scoring pass runs forward, and reduces them once ``dy`` is known. The loss is
assumed to be a mean over the samples (``F.cross_entropy``'s default), so ``dy`` holds ``1/B`` of each
sample's gradient.

**What depends on the parameter layout** (the model's per-head-group layout may change): a call is matched
to a scored parameter when its weight (or bias) *is* that parameter's data (same storage, shape and
strides), and the parameter's head groups are read from its name with
:func:`lightning_d2ft.parallel.layout.grouped_dim` (``(lead, groups, per_group)`` along the grouped dim) and
its subnet columns from :class:`~lightning_d2ft.scoring.scoring_pass.SubnetIndex`'s ``pieces``. A scored
grouped parameter that no ``F.linear`` uses as a whole raises (never a silent zero). The stem and the head
(always FULL, never scheduled) score 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_d2ft.parallel.layout import GroupedDim, grouped_dim

if TYPE_CHECKING:
    from lightning_d2ft.scoring.scoring_pass import SubnetIndex

__all__ = ["PerSampleFisher"]


@dataclass
class _Tracked:
    name: str
    param: nn.Parameter
    layout: GroupedDim
    cols: Tensor  # subnet column of each local group


@dataclass
class _Call:
    x: Tensor  # [B, T, in]
    y: Tensor  # the call's output (its gradient is dy)
    weight: _Tracked | None
    bias: _Tracked | None


def _same_data(t: Tensor, p: Tensor) -> bool:
    return t is p or (t.data_ptr() == p.data_ptr() and t.shape == p.shape and t.stride() == p.stride())


class _Recorder(TorchFunctionMode):
    def __init__(self, owner: PerSampleFisher) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear and torch.is_grad_enabled():
            x = args[0] if args else kwargs["input"]
            w = args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            self.owner._record(x, w, b, out)
        return out


class PerSampleFisher:
    """Per-subnet sums of squared per-sample gradients of the scored grouped weights (see the module doc)."""

    def __init__(self, index: SubnetIndex, num_subnets: int) -> None:
        self.num_subnets = num_subnets
        self.tracked: list[_Tracked] = []
        for name, p, _, _, cols in index.pieces:
            found = grouped_dim(name)
            if found is not None and "lora_" not in name:
                self.tracked.append(_Tracked(name, p, found[1], cols))
        self.calls: list[_Call] = []

    def recording(self) -> _Recorder:
        """The context in which the forward pass runs: every matching ``F.linear`` is recorded."""
        self.calls = []
        return _Recorder(self)

    def _record(self, x: Tensor, w: Tensor, b: Tensor | None, y: Tensor) -> None:
        weight = next((t for t in self.tracked if t.layout.dim in (0, 1) and _same_data(w, t.param)), None)
        bias = None if b is None else next((t for t in self.tracked if _same_data(b, t.param)), None)
        if weight is not None or bias is not None:
            self.calls.append(_Call(x, y, weight, bias))

    @property
    def outputs(self) -> list[Tensor]:
        """The recorded calls' outputs (ask autograd for their gradients)."""
        return [c.y for c in self.calls]

    def sums(self, grads: list[Tensor | None]) -> Tensor:
        """``[num_subnets]`` float64: ``(1/B) sum_i ||per-sample gradient_i||^2`` per subnet, from the output
        gradients ``grads`` of the recorded calls (in :attr:`outputs` order)."""
        seen = {id(c.weight.param) for c in self.calls if c.weight} | {id(c.bias.param) for c in self.calls if c.bias}
        missing = [t.name for t in self.tracked if id(t.param) not in seen]
        if missing:
            raise RuntimeError(f"the per-sample Fisher found no F.linear using {missing[:4]} whole: the model's "
                               "parameter layout is not the one lightning_d2ft.scoring.per_sample reads (see there)")
        device = self.tracked[0].param.device if self.tracked else torch.device("cpu")
        out = torch.zeros(self.num_subnets, dtype=torch.float64, device=device)
        for call, dy in zip(self.calls, grads):
            if dy is None:
                continue
            x, dy = call.x.detach(), dy.detach()
            if x.dim() == 2:
                x, dy = x.unsqueeze(1), dy.unsqueeze(1)
            x, dy = x.reshape(x.shape[0], -1, x.shape[-1]), dy.reshape(dy.shape[0], -1, dy.shape[-1])
            batch = x.shape[0]
            if call.weight is not None:
                t = call.weight
                out.index_add_(0, t.cols, _weight_group_sq(x, dy, t.layout, t.cols.numel()).double() * batch)
            if call.bias is not None:
                t = call.bias
                per = dy.sum(1)  # [B, out]: the per-sample bias gradients
                groups = per.unflatten(1, (t.layout.lead, t.cols.numel(), -1))
                out.index_add_(0, t.cols, groups.square().sum((0, 1, 3)).double() * batch)
        self.calls = []
        return out


def _weight_group_sq(x: Tensor, dy: Tensor, layout: GroupedDim, groups: int) -> Tensor:
    """``[groups]``: summed over the samples, each sample's squared gradient norm over each group's rows
    (``layout.dim == 0``) or columns (1) of the weight of ``y = x W^T``."""
    tokens, d_in, d_out = x.shape[1], x.shape[-1], dy.shape[-1]
    if tokens * (d_in + d_out) < d_in * d_out:  # Gram matrices over the tokens: cheaper than forming G_i
        xx = x @ x.transpose(1, 2)  # [B, T, T]
        if layout.dim == 0:  # rows of W: group the output features
            g = dy.unflatten(2, (layout.lead, groups, -1)).permute(0, 3, 1, 2, 4).flatten(3)  # [B, G, T, lead*per]
            other = xx.unsqueeze(1)
        else:  # columns of W: group the input features
            g = x.unflatten(2, (layout.lead, groups, -1)).permute(0, 3, 1, 2, 4).flatten(3)
            other = (dy @ dy.transpose(1, 2)).unsqueeze(1)
        gram = g @ g.transpose(2, 3)  # [B, G, T, T]
        return (gram * other).sum((0, 2, 3))
    per_sample = dy.transpose(1, 2) @ x  # [B, out, in]: every sample's gradient of W
    return per_sample.unflatten(1 + layout.dim, (layout.lead, groups, -1)).square().sum(
        tuple(i for i in range(per_sample.dim() + 2) if i != 2 + layout.dim))
