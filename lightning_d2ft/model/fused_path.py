"""Grouped execution of one block: its FULL head groups through two custom autograd Functions, its
FORWARD_ONLY groups under ``no_grad`` beside them.

A branch (attention or MLP) of a block has an input projection cut by rows (``qkv``/``fc1``) and an output
projection cut by columns (``proj``/``fc2``); every group's slice is a Parameter of its own
(:class:`~lightning_d2ft.model.grouped.GroupedLinear`), laid out so that a set of groups concatenates along
dim 0 into the rows one matmul needs.

* FULL groups: one ``cat`` per grouped tensor gathers their slices, one matmul per projection covers them
  all, attention runs once over their heads (recorded in a small local graph, so backward reuses autograd's
  attention). Backward (:class:`AttentionGroups`, :class:`MlpGroups`) computes weight gradients as whole row
  blocks (``qkv``/``fc1`` rows, ``proj``/``fc2`` stored transposed) and hands each FULL group's Parameter its
  own rows: no full-size buffer, no scatter. Nothing else gets a gradient: a FORWARD_ONLY or SHORTCUT group's
  Parameters keep ``grad=None``, which every torch optimizer skips.
* FORWARD_ONLY groups: computed first, under ``no_grad`` on the detached input, and added to the FULL output
  by its last matmul; autograd keeps nothing of them (no gathered weights, attention output or MLP
  activations saved for backward), so they cost no memory beyond the forward itself.

Gathering a set of groups' slices is free when they are neighbours (every :class:`GroupedLinear` packs its
groups side by side: a whole FULL block costs no copy), else one ``cat`` for the four weights and one for
the two biases.

:func:`fast_path_ok` says when a block can use this; otherwise :mod:`lightning_d2ft.model.vit` runs the
general grouped path, which also serves tensor parallelism and LoRA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_d2ft.model.grouped import GroupedLinear, join_groups
from lightning_d2ft.ops import Op

__all__ = ["AttentionGroups", "BlockPlan", "MlpGroups", "block_on", "block_plan", "branch_on", "fast_path_ok",
           "fused_block"]


def fast_path_ok(blk: nn.Module) -> bool:
    """True when the block has nothing the fused path does not model (LoRA, qk-norm, dropout, non-GELU,
    frozen or sharded grouped tensors); such blocks take the general grouped path instead."""
    attn, mlp = blk.attn, blk.mlp
    drops = (attn.attn_drop, attn.proj_drop, mlp.drop1, mlp.drop2)
    modules = (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)
    return (
        all(type(m) is GroupedLinear and m.complete for m in modules)
        and type(mlp.act) is nn.GELU
        and isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
        and all(d.p == 0 for d in drops)
        and all(p.requires_grad for m in modules for p in m.weights(m.all_positions))
    )


@dataclass(frozen=True)
class BlockPlan:
    """Which groups of a block (positions) run FULL and which FORWARD_ONLY, for one op pattern."""

    full: tuple[int, ...]
    forward_only: tuple[int, ...]

    @property
    def n_full(self) -> int:
        return len(self.full)

    @property
    def n_active(self) -> int:
        return len(self.full) + len(self.forward_only)


@functools.lru_cache(maxsize=4096)
def block_plan(ops: tuple[int, ...]) -> BlockPlan:
    """The :class:`BlockPlan` of a block's ops (local order)."""
    return BlockPlan(tuple(i for i, o in enumerate(ops) if o == Op.FULL),
                     tuple(i for i, o in enumerate(ops) if o == Op.FORWARD_ONLY))


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul on ``t``'s device in (None: autocast is off)."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


@dataclass(frozen=True)
class _Slices:
    """One set of a block's groups (its FULL ones, or its FORWARD_ONLY ones): the six grouped tensors of those
    groups joined along dim 0, detached, in the matmul dtype (``proj``/``fc2`` stored transposed)."""

    qkv_w: Tensor
    qkv_b: Tensor | None
    proj_w: Tensor
    fc1_w: Tensor
    fc1_b: Tensor | None
    fc2_w: Tensor


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


def _gather(blk: nn.Module, positions: tuple[int, ...], dtype: torch.dtype | None) -> _Slices:
    """The groups at ``positions``' slices of the block: views of the packed Parameters when the groups are
    neighbours (every module then holds them side by side), else one ``cat`` for all four weights and one for
    the two biases (every weight is ``[rows, dim]``), cast once to the autocast dtype."""
    attn, mlp = blk.attn, blk.mlp
    modules = (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)
    weights = [m.weights(positions) for m in modules]
    biases = [attn.qkv.biases(positions), mlp.fc1.biases(positions)]
    if positions[-1] - positions[0] == len(positions) - 1:  # neighbours (or one group): views
        w = [_cast(join_groups(ws), dtype) for ws in weights]
        b = [None if bs is None else _cast(join_groups(bs), dtype) for bs in biases]
    else:
        w = _cast(torch.cat([p.detach() for ws in weights for p in ws]), dtype)
        w = w.split([sum(p.shape[0] for p in ws) for ws in weights])
        present = [bs for bs in biases if bs is not None]
        b = [None, None]
        if present:
            joined = _cast(torch.cat([p.detach() for bs in present for p in bs]), dtype)
            it = iter(joined.split([sum(p.shape[0] for p in bs) for bs in present]))
            b = [None if bs is None else next(it) for bs in biases]
    return _Slices(w[0], b[0], w[1], w[2], b[1], w[3])


def _rows(h: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``h`` [B, N, D] as [B*N, D] in the matmul dtype."""
    h2 = h.reshape(-1, h.shape[-1])
    return h2 if dtype is None or h2.dtype == dtype else h2.to(dtype)


def _project(x: Tensor, w_t: Tensor, add: Tensor | None) -> Tensor:
    """``x @ w_t + add`` (``w_t``: the output projection's columns, stored transposed; ``add``: the shared bias,
    or the FORWARD_ONLY groups' output that already holds it)."""
    if add is None:
        return x @ w_t
    return torch.addmm(add.to(x.dtype), x, w_t)


def _split(grad: Tensor, n: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """The gradient rows of ``n`` equal groups, each a contiguous view, in the Parameters' dtype."""
    return grad.to(dtype).chunk(n, 0)


def _attend(attn: nn.Module, y: Tensor, B: int, N: int, heads: int) -> Tensor:
    """timm's attention core on head-major qkv rows ``y`` [B*N, heads*3*head_dim] -> [B, heads, N, head_dim]."""
    q, k, v = y.view(B, N, heads, 3, attn.head_dim).permute(3, 0, 2, 1, 4).unbind(0)
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def _attention_rows(attn: nn.Module, h2: Tensor, sl: _Slices, add: Tensor | None, B: int, N: int,
                    heads: int) -> Tensor:
    """The attention branch of a set of groups, no autograd: [B*N, D] (``add`` added)."""
    o = _attend(attn, F.linear(h2, sl.qkv_w, sl.qkv_b), B, N, heads)
    return _project(o.transpose(1, 2).reshape(B * N, -1), sl.proj_w, add)


def _mlp_rows(h2: Tensor, sl: _Slices, add: Tensor | None, approximate: str) -> Tensor:
    """The MLP branch of a set of groups, no autograd: [B*N, D] (``add`` added)."""
    return _project(F.gelu(F.linear(h2, sl.fc1_w, sl.fc1_b), approximate=approximate), sl.fc2_w, add)


class AttentionGroups(torch.autograd.Function):
    """Attention branch (without norm and LayerScale) of ``n`` FULL head groups, plus ``add`` (the shared
    ``proj`` bias, or the FORWARD_ONLY groups' output that already holds it, which gets no gradient).

    ``sl``: the FULL groups' gathered slices; ``params``: their Parameters (``qkv`` weights, ``qkv`` biases if
    any, ``proj`` weights; n each), which receive their rows of the weight gradients."""

    @staticmethod
    def forward(ctx, h, b_proj, add, sl: _Slices, attn: nn.Module, heads: int, n: int, *params):
        B, N, D = h.shape
        h2 = _rows(h, sl.qkv_w.dtype)
        y = F.linear(h2, sl.qkv_w, sl.qkv_b)
        with torch.enable_grad():  # a local graph, so that backward reuses autograd's attention
            leaf = y.detach().requires_grad_()
            o = _attend(attn, leaf, B, N, heads)
        o2 = o.detach().transpose(1, 2).reshape(B * N, -1)
        out = _project(o2, sl.proj_w, b_proj if add is None else add)
        ctx.graph, ctx.dims = (leaf, o), (B, N, D, heads, attn.head_dim, n, sl.qkv_b is not None, params[0].dtype)
        ctx.save_for_backward(h2, sl.qkv_w, sl.proj_w, o2)
        return out.view(B, N, D)

    @staticmethod
    def backward(ctx, grad):
        h2, w, wp, o2 = ctx.saved_tensors
        B, N, D, heads, hd, n, has_bias, dtype = ctx.dims
        g2 = grad.reshape(B * N, D)
        g_bp = g2.sum(0) if ctx.needs_input_grad[1] else None
        g2 = g2.to(wp.dtype)
        leaf, o = ctx.graph
        g_o = (g2 @ wp.t()).view(B, N, heads, hd).transpose(1, 2)
        # retain: a second backward through the same graph (gradcheck, retain_graph=True) needs it again;
        # the local graph goes with ctx when autograd frees the block's nodes
        (g_y,) = torch.autograd.grad(o, leaf, g_o, retain_graph=True)
        g_h = (g_y @ w).view(B, N, D) if ctx.needs_input_grad[0] else None
        grads = _split(g_y.t() @ h2, n, dtype)
        if has_bias:
            grads += _split(g_y.sum(0), n, dtype)
        grads += _split(o2.t() @ g2, n, dtype)
        return (g_h, g_bp, None, None, None, None, None) + grads


class MlpGroups(torch.autograd.Function):
    """MLP branch (without norm and LayerScale) of ``n`` FULL hidden-unit slices, plus ``add`` (the shared
    ``fc2`` bias, or the FORWARD_ONLY slices' output that already holds it, which gets no gradient).

    ``params``: the slices' ``fc1`` weights, ``fc1`` biases if any and ``fc2`` weights (n each)."""

    @staticmethod
    def forward(ctx, h, b2, add, sl: _Slices, approximate: str, n: int, *params):
        B, N, D = h.shape
        h2 = _rows(h, sl.fc1_w.dtype)
        pre = F.linear(h2, sl.fc1_w, sl.fc1_b)
        act = F.gelu(pre, approximate=approximate)
        out = _project(act, sl.fc2_w, b2 if add is None else add)
        ctx.dims, ctx.approximate = (B, N, D, n, sl.fc1_b is not None, params[0].dtype), approximate
        ctx.save_for_backward(h2, sl.fc1_w, sl.fc2_w, pre, act)
        return out.view(B, N, D)

    @staticmethod
    def backward(ctx, grad):
        h2, w1, w2, pre, act = ctx.saved_tensors
        B, N, D, n, has_bias, dtype = ctx.dims
        g2 = grad.reshape(B * N, D)
        g_b2 = g2.sum(0) if ctx.needs_input_grad[1] else None
        g2 = g2.to(w2.dtype)
        g_pre = torch.ops.aten.gelu_backward(g2 @ w2.t(), pre, approximate=ctx.approximate)
        g_h = (g_pre @ w1).view(B, N, D) if ctx.needs_input_grad[0] else None
        grads = _split(g_pre.t() @ h2, n, dtype)
        if has_bias:
            grads += _split(g_pre.sum(0), n, dtype)
        grads += _split(act.t() @ g2, n, dtype)
        return (g_h, g_b2, None, None, None, None) + grads


def _trained(blk: nn.Module, positions: tuple[int, ...], attention: bool) -> list[nn.Parameter]:
    """The Parameters of the groups at ``positions`` in one branch, in the order its Function returns their
    gradients: the first projection's (weights, then biases), then the second's weights."""
    first, second = (blk.attn.qkv, blk.attn.proj) if attention else (blk.mlp.fc1, blk.mlp.fc2)
    return first.group_parameters(positions) + second.weights(positions)


def branch_on(blk: nn.Module, h: Tensor, full: _Slices | None, rest: _Slices | None, n_full: int, n_rest: int,
              params: list[Tensor], n: int, attention: bool) -> Tensor:
    """One branch's output (with its shared bias, without LayerScale) on given slices: the ``n_rest``
    FORWARD_ONLY groups' (``rest``) first, under ``no_grad`` (nothing of them kept for backward), then the
    ``n_full`` FULL groups' (``full``) through the Function, which adds the former in its last matmul.

    ``params``: the tensors that receive the FULL slices' weight gradients, ``n`` equal row blocks each (the
    groups' own Parameters with ``n = n_full``, or one joined tensor per grouped tensor with ``n = 1``, as the
    CUDA-graph executor passes its static buffers)."""
    attn, mlp = blk.attn, blk.mlp
    bias = attn.proj.bias if attention else mlp.fc2.bias
    B, N, _ = h.shape
    out = None
    if rest is not None:
        with torch.no_grad():
            h2 = _rows(h.detach(), rest.qkv_w.dtype)
            if attention:
                out = _attention_rows(attn, h2, rest, bias, B, N, n_rest * attn.qkv.heads_per_group)
            else:
                out = _mlp_rows(h2, rest, bias, mlp.act.approximate)
            out = out.view(B, N, -1)
        if full is None:
            return out
    add = None if out is None else out.view(B * N, -1)
    if attention:
        heads = n_full * attn.qkv.heads_per_group
        return AttentionGroups.apply(h, bias, add, full, attn, heads, n, *params)
    return MlpGroups.apply(h, bias, add, full, mlp.act.approximate, n, *params)


def block_on(blk: nn.Module, x: Tensor, full: _Slices | None, rest: _Slices | None, n_full: int, n_rest: int,
             attn_params: list[Tensor], mlp_params: list[Tensor], n: int) -> Tensor:
    """The block on given slices (see :func:`branch_on`): ``x + ls1(attention) + ls2(mlp)``, recording autograd
    when there are FULL slices and gradients are on."""
    grad = full is not None and torch.is_grad_enabled()
    with torch.set_grad_enabled(grad):  # the residual adds below keep the stream's graph either way
        a = blk.ls1(branch_on(blk, blk.norm1(x), full, rest, n_full, n_rest, attn_params, n, attention=True))
    x = x + a
    with torch.set_grad_enabled(grad):
        m = blk.ls2(branch_on(blk, blk.norm2(x), full, rest, n_full, n_rest, mlp_params, n, attention=False))
    return x + m


def fused_block(blk: nn.Module, x: Tensor, ops: tuple[int, ...]) -> Tensor:
    """One block with the groups of ``ops`` (local order; not all SHORTCUT) through the fused kernels."""
    plan = block_plan(ops)
    grad = plan.n_full > 0 and torch.is_grad_enabled()
    dtype = _autocast_dtype(x)
    with torch.no_grad():
        if grad:
            full = _gather(blk, plan.full, dtype)
            rest = _gather(blk, plan.forward_only, dtype) if plan.forward_only else None
        else:  # nothing to record: every active group in one no-grad pass
            rest = _gather(blk, tuple(sorted(plan.full + plan.forward_only)), dtype)
    if not grad:
        return block_on(blk, x, None, rest, 0, plan.n_active, [], [], 0)
    return block_on(blk, x, full, rest, plan.n_full, len(plan.forward_only), _trained(blk, plan.full, True),
                    _trained(blk, plan.full, False), plan.n_full)
