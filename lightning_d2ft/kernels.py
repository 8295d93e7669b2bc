"""Grouped execution of one block branch: FULL and FORWARD_ONLY head groups in one pass, few launches.

A branch (attention or MLP) of a block has an input projection cut by rows (``qkv``/``fc1``) and an output
projection cut by columns (``proj``/``fc2``); :mod:`lightning_d2ft.layout` says where each group sits.
The active groups (FULL first, then FORWARD_ONLY) are computed together:

* forward: one ``cat`` + one ``index_select`` gathers every active slice of the branch's grouped weights
  (indices cached per (branch, op pattern, device)), one matmul per projection covers FULL and
  FORWARD_ONLY rows, attention runs once for the FULL heads (recorded) and once for the others (not);
* backward (a custom :class:`torch.autograd.Function`): weight gradients only for FULL rows, input
  gradient only through FULL rows, and the gradients of all grouped tensors land in one zero buffer with
  one ``index_copy_``. FORWARD_ONLY groups get exactly zero gradient and pass none to their input.

:func:`fast_path_ok` says when a block can use this; otherwise :mod:`lightning_d2ft.partition` runs the
general (slower, per-op) grouped path, which also serves tensor parallelism and LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_d2ft.layout import GROUPED, group_indices
from lightning_d2ft.ops import Op

__all__ = ["AttentionGroups", "BranchPlan", "MlpGroups", "branch_plan", "fast_path_ok", "grouped_branch"]

_ATTN_KEYS = ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight")
_MLP_KEYS = ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight")


def fast_path_ok(blk: nn.Module) -> bool:
    """True when the block has nothing the fused path does not model (LoRA, qk-norm, dropout, non-GELU,
    frozen grouped tensors); such blocks take the general grouped path instead."""
    attn, mlp = blk.attn, blk.mlp
    drops = (attn.attn_drop, attn.proj_drop, mlp.drop1, mlp.drop2)
    tensors = [attn.qkv.weight, attn.proj.weight, mlp.fc1.weight, mlp.fc2.weight]
    return (
        type(attn.qkv) is nn.Linear
        and type(mlp.act) is nn.GELU
        and isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
        and all(d.p == 0 for d in drops)
        and all(t.requires_grad for t in tensors)
    )


@dataclass(frozen=True)
class BranchPlan:
    """Cached indices for one (branch, op pattern): ``gather`` picks the active slices (FULL first) from the
    flat concatenation of the grouped tensors, ``scatter`` puts the FULL slices' gradients back."""

    n_full: int
    n_active: int
    groups: int
    gather: Tensor
    scatter: Tensor
    shapes: tuple[torch.Size, ...]  # full shapes of the grouped tensors (None-free, in order)
    active_shapes: tuple[tuple[int, ...], ...]  # their shapes after the gather
    numel: int


def _flat_indices(shape: torch.Size, key: str, G: int, groups: list[list[int]]) -> Tensor:
    """Flat element indices of ``groups`` (a list of runs, concatenated in order) in a tensor of ``shape``."""
    layout = GROUPED[key]
    size = shape[layout.dim]
    idx = torch.cat([group_indices(size, layout, G, run) for run in groups if run])
    return torch.arange(shape.numel()).view(shape).index_select(layout.dim, idx).reshape(-1)


def branch_plan(keys: tuple[str, ...], tensors: list[Tensor], ops: tuple[int, ...]) -> BranchPlan:
    """Indices for running the groups of ``ops`` (local order) over ``tensors`` (the non-None of ``keys``)."""
    G = len(ops)
    full = [i for i, o in enumerate(ops) if o == Op.FULL]
    fwd = [i for i, o in enumerate(ops) if o == Op.FORWARD_ONLY]
    gather, scatter, active_shapes, offset = [], [], [], 0
    for key, t in zip(keys, tensors):
        gather.append(_flat_indices(t.shape, key, G, [full, fwd]) + offset)
        if full:
            scatter.append(_flat_indices(t.shape, key, G, [full]) + offset)
        dim = GROUPED[key].dim
        active_shapes.append(tuple(t.shape[d] * (len(full) + len(fwd)) // G if d == dim else t.shape[d]
                                   for d in range(t.dim())))
        offset += t.numel()
    device = tensors[0].device
    empty = torch.zeros(0, dtype=torch.long)
    return BranchPlan(len(full), len(full) + len(fwd), G, torch.cat(gather).to(device),
                      (torch.cat(scatter) if scatter else empty).to(device), tuple(t.shape for t in tensors),
                      tuple(active_shapes), offset)


def _gather(plan: BranchPlan, tensors: list[Tensor]) -> list[Tensor]:
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]).index_select(0, plan.gather)
    out, start = [], 0
    for shape in plan.active_shapes:
        n = torch.Size(shape).numel()
        out.append(flat[start:start + n].view(shape))
        start += n
    return out


def _scatter(plan: BranchPlan, pieces: list[Tensor]) -> list[Tensor]:
    """Full-size gradients (views of one zero buffer) holding ``pieces`` at the FULL groups' places."""
    buf = pieces[0].new_zeros(plan.numel)
    buf.index_copy_(0, plan.scatter, torch.cat([p.reshape(-1) for p in pieces]))
    out, start = [], 0
    for shape in plan.shapes:
        out.append(buf[start:start + shape.numel()].view(shape))
        start += shape.numel()
    return out


def _split(params: list[Tensor | None]) -> tuple[list[Tensor], list[bool]]:
    return [p for p in params if p is not None], [p is not None for p in params]


def _attend(attn: nn.Module, y: Tensor, B: int, N: int, heads: int) -> Tensor:
    """timm's attention core on qkv rows ``y`` [B*N, 3*heads*head_dim] -> [B, heads, N, head_dim]."""
    q, k, v = y.view(B, N, 3, heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


class AttentionGroups(torch.autograd.Function):
    """Attention branch (without norm and LayerScale) of the active head groups of ``plan``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, w_qkv, b_qkv, w_proj, b_proj, plan: BranchPlan, attn: nn.Module):
        B, N, D = h.shape
        h2 = h.reshape(B * N, D)
        tensors, present = _split([w_qkv, b_qkv, w_proj])
        gathered = iter(_gather(plan, tensors))
        w_a, b_a, wp_a = (next(gathered) if p else None for p in present)
        y = F.linear(h2, w_a, b_a)
        heads_per_group = attn.num_heads // plan.groups
        h_full, h_all = plan.n_full * heads_per_group, plan.n_active * heads_per_group
        r_full = 3 * h_full * attn.head_dim
        parts, ctx.graph = [], None
        if h_full:
            with torch.enable_grad():  # a local graph, so that backward reuses autograd's attention
                leaf = y[:, :r_full].detach().requires_grad_()
                o_full = _attend(attn, leaf, B, N, h_full)
            ctx.graph = (leaf, o_full)
            parts.append(o_full.detach())
        if h_all > h_full:
            parts.append(_attend(attn, y[:, r_full:], B, N, h_all - h_full))
        o = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        o2 = o.transpose(1, 2).reshape(B * N, -1)
        out = F.linear(o2, wp_a, b_proj)
        ctx.plan, ctx.dims, ctx.present = plan, (B, N, D, h_full, attn.head_dim), present
        ctx.save_for_backward(h2, w_a, wp_a, o2)
        return out.view(B, N, D)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        h2, w_a, wp_a, o2 = ctx.saved_tensors
        B, N, D, h_full, hd = ctx.dims
        g2 = grad.reshape(B * N, D)
        need = ctx.needs_input_grad
        g_bp = g2.sum(0) if need[4] else None
        if ctx.graph is None:  # no FULL group: only the shared bias learns
            return None, None, None, None, g_bp, None, None
        c_full = h_full * hd
        g_o = g2 @ wp_a[:, :c_full]
        g_wp = g2.t() @ o2[:, :c_full]
        leaf, o_full = ctx.graph
        (g_y,) = torch.autograd.grad(o_full, leaf, g_o.view(B, N, h_full, hd).transpose(1, 2))
        ctx.graph = None
        g_h = (g_y @ w_a[: g_y.shape[1]]).view(B, N, D) if need[0] else None
        pieces = [g_y.t() @ h2] + ([g_y.sum(0)] if ctx.present[1] else []) + [g_wp]
        grads = iter(_scatter(ctx.plan, pieces))
        g_w, g_b, g_wproj = (next(grads) if p else None for p in ctx.present)
        return g_h, g_w, g_b, g_wproj, g_bp, None, None


class MlpGroups(torch.autograd.Function):
    """MLP branch (without norm and LayerScale) of the active hidden-unit slices of ``plan``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, w1, b1, w2, b2, plan: BranchPlan, approximate: str):
        B, N, D = h.shape
        h2 = h.reshape(B * N, D)
        tensors, present = _split([w1, b1, w2])
        gathered = iter(_gather(plan, tensors))
        w1_a, b1_a, w2_a = (next(gathered) if p else None for p in present)
        pre = F.linear(h2, w1_a, b1_a)
        act = F.gelu(pre, approximate=approximate)
        out = F.linear(act, w2_a, b2)
        ctx.plan, ctx.dims, ctx.present, ctx.approximate = plan, (B, N, D), present, approximate
        ctx.save_for_backward(h2, w1_a, w2_a, pre, act)
        return out.view(B, N, D)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        h2, w1_a, w2_a, pre, act = ctx.saved_tensors
        B, N, D = ctx.dims
        g2 = grad.reshape(B * N, D)
        need = ctx.needs_input_grad
        g_b2 = g2.sum(0) if need[4] else None
        plan = ctx.plan
        if plan.n_full == 0:
            return None, None, None, None, g_b2, None, None
        c_full = pre.shape[1] * plan.n_full // plan.n_active
        g_act = g2 @ w2_a[:, :c_full]
        g_w2 = g2.t() @ act[:, :c_full]
        g_pre = torch.ops.aten.gelu_backward(g_act, pre[:, :c_full], approximate=ctx.approximate)
        g_h = (g_pre @ w1_a[:c_full]).view(B, N, D) if need[0] else None
        pieces = [g_pre.t() @ h2] + ([g_pre.sum(0)] if ctx.present[1] else []) + [g_w2]
        grads = iter(_scatter(plan, pieces))
        g_w1, g_b1, g_w2_full = (next(grads) if p else None for p in ctx.present)
        return g_h, g_w1, g_b1, g_w2_full, g_b2, None, None


def grouped_branch(blk: nn.Module, h: Tensor, ops: tuple[int, ...], attention: bool,
                   cache: dict) -> Tensor:
    """The branch output (shared bias included, LayerScale not) of the groups that run in ``ops``."""
    if attention:
        mod_in, mod_out, keys = blk.attn.qkv, blk.attn.proj, _ATTN_KEYS
    else:
        mod_in, mod_out, keys = blk.mlp.fc1, blk.mlp.fc2, _MLP_KEYS
    pairs = [(k, t) for k, t in zip(keys, (mod_in.weight, mod_in.bias, mod_out.weight)) if t is not None]
    cache_key = (attention, ops, tuple(t.shape for _, t in pairs), h.device)
    plan = cache.get(cache_key)
    if plan is None:
        plan = cache[cache_key] = branch_plan(tuple(k for k, _ in pairs), [t for _, t in pairs], ops)
    args = (h, mod_in.weight, mod_in.bias, mod_out.weight, mod_out.bias, plan)
    if attention:
        return AttentionGroups.apply(*args, blk.attn)
    return MlpGroups.apply(*args, blk.mlp.act.approximate)
