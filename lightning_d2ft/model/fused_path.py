"""Grouped execution of one block branch: FULL and FORWARD_ONLY head groups in one pass, few launches.

A branch (attention or MLP) of a block has an input projection cut by rows (``qkv``/``fc1``) and an output
projection cut by columns (``proj``/``fc2``); :mod:`lightning_d2ft.parallel.layout` says where each group sits.
The active groups (FULL first, then FORWARD_ONLY) are computed together:

* forward: one ``cat`` + one ``index_select`` per block gathers every active slice of the block's six
  grouped tensors (indices cached per (op pattern, shapes, device) in a :class:`BlockPlan`), one matmul per
  projection covers FULL and FORWARD_ONLY rows, attention runs once for the FULL heads (recorded) and once
  for the others (not);
* backward (custom :class:`torch.autograd.Function` s): weight gradients only for FULL rows, input
  gradients only through FULL rows; the MLP's backward (which runs first) hands its weight gradients to the
  attention's, which puts all six into one zero buffer with one ``index_copy_`` (the attention Function
  takes the MLP's grouped Parameters as inputs for that). FORWARD_ONLY groups get exactly zero gradient
  and pass none to their input.

:func:`fast_path_ok` says when a block can use this; otherwise :mod:`lightning_d2ft.model.vit` runs the
general (slower, per-op) grouped path, which also serves tensor parallelism and LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_d2ft.ops import Op
from lightning_d2ft.parallel.layout import GROUPED

__all__ = ["AttentionGroups", "BlockPlan", "MlpGroups", "block_plan", "cached_plan", "fast_path_ok", "fused_block"]

_KEYS = ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight")


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
class BlockPlan:
    """Cached indices for one op pattern of a block: ``gather`` picks the active slices (FULL groups first)
    from the flat concatenation of the grouped tensors, ``scatter`` puts the FULL slices' gradients back;
    both count ``chunk``-element runs, so a cached plan stays small.
    ``identity``: the active slices are the tensors themselves (every group runs, one op), no gather."""

    n_full: int
    n_active: int
    groups: int
    present: tuple[bool, ...]  # which of the six grouped tensors exist (biases are optional)
    chunk: int  # the indices count runs of this many elements (the gcd of the groups' contiguous runs)
    gather: Tensor
    scatter: Tensor
    shapes: tuple[torch.Size, ...]  # full shapes of the present tensors, in order
    active_shapes: tuple[tuple[int, ...], ...]  # their shapes after the gather
    identity: bool


def _run_length(shape: torch.Size, key: str, G: int) -> int:
    """Elements of one group that sit together in a tensor of ``shape``: its slice of the grouped dim times
    every dim after it (the tensor is ``[pre, lead, G, run]`` in memory)."""
    layout = GROUPED[key]
    return shape[layout.dim] // (layout.lead * G) * math.prod(shape[layout.dim + 1:])


def _chunk_indices(shape: torch.Size, key: str, G: int, runs: list[list[int]], chunk: int) -> Tensor:
    """Indices, in ``chunk``-element units, of the groups of ``runs`` (in that order along the grouped dim)
    in a tensor of ``shape``: 1/chunk the size of element indices (a plan of ViT-S holds ~28K, not ~1.8M)."""
    layout = GROUPED[key]
    pre = math.prod(shape[: layout.dim])
    ids = torch.arange(math.prod(shape) // chunk).view(pre, layout.lead, G, -1)
    parts = [ids[:, :, run].reshape(pre, -1, ids.shape[-1]) for run in runs if run]
    return torch.cat(parts, 1).reshape(-1)


def block_plan(tensors: list[Tensor | None], ops: tuple[int, ...]) -> BlockPlan:
    """Indices for running the groups of ``ops`` (local order) over a block's six grouped ``tensors``."""
    G = len(ops)
    full = [i for i, o in enumerate(ops) if o == Op.FULL]
    fwd = [i for i, o in enumerate(ops) if o == Op.FORWARD_ONLY]
    present = [(key, t) for key, t in zip(_KEYS, tensors) if t is not None]
    chunk = math.gcd(*(_run_length(t.shape, key, G) for key, t in present))
    gather, scatter, active_shapes, offset = [], [], [], 0
    for key, t in present:
        gather.append(_chunk_indices(t.shape, key, G, [full, fwd], chunk) + offset)
        if full:
            scatter.append(_chunk_indices(t.shape, key, G, [full], chunk) + offset)
        dim = GROUPED[key].dim
        active_shapes.append(tuple(n * (len(full) + len(fwd)) // G if d == dim else n for d, n in enumerate(t.shape)))
        offset += t.numel() // chunk
    device = present[0][1].device
    identity = len(full) in (0, G) and len(full) + len(fwd) == G
    return BlockPlan(len(full), len(full) + len(fwd), G, tuple(t is not None for t in tensors), chunk,
                     torch.cat(gather).to(device),
                     torch.cat(scatter).to(device) if scatter else torch.zeros(0, dtype=torch.long, device=device),
                     tuple(t.shape for _, t in present), tuple(active_shapes), identity)


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul on ``t``'s device in (None: autocast is off)."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _gather(plan: BlockPlan, tensors: list[Tensor]) -> list[Tensor]:
    """The active slices of ``tensors`` (present ones, in order), FULL groups first: detached, and cast once
    to the autocast dtype when autocast is on (so that forward and backward matmuls agree on dtypes)."""
    dtype = _autocast_dtype(tensors[0])
    if plan.identity:
        return [t.detach() if dtype is None else t.detach().to(dtype) for t in tensors]
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]).view(-1, plan.chunk).index_select(0, plan.gather)
    flat = flat.view(-1)
    if dtype is not None:
        flat = flat.to(dtype)
    return list(flat.split([torch.Size(s).numel() for s in plan.active_shapes]))


def _rows(h: Tensor) -> Tensor:
    """``h`` [B, N, D] as [B*N, D] in the matmul dtype."""
    dtype = _autocast_dtype(h)
    h2 = h.reshape(-1, h.shape[-1])
    return h2 if dtype is None or h2.dtype == dtype else h2.to(dtype)


def _scatter(plan: BlockPlan, pieces: list[Tensor]) -> list[Tensor]:
    """Full-size gradients (views of one zero buffer) holding ``pieces`` at the FULL groups' places."""
    buf = pieces[0].new_zeros(sum(s.numel() for s in plan.shapes))
    # one dtype (a backward run under autocast gets float32 bias sums beside bfloat16 matmuls)
    flat = torch.cat([p.reshape(-1).to(buf.dtype) for p in pieces])
    buf.view(-1, plan.chunk).index_copy_(0, plan.scatter, flat.view(-1, plan.chunk))
    return [g.view(s) for g, s in zip(buf.split([s.numel() for s in plan.shapes]), plan.shapes)]


class _BlockRun:
    """What the two branch Functions of one block call share: plan, gathered slices, the MLP's gradients."""

    def __init__(self, plan: BlockPlan, gathered: list[Tensor]) -> None:
        self.plan = plan
        it = iter(gathered)
        slices = [next(it).view(s) if p else None for p, s in zip(plan.present, _pad(plan))]
        self.attn_slices, self.mlp_slices = slices[:3], slices[3:]
        self.mlp_pieces: list[Tensor] | None = None


def _pad(plan: BlockPlan) -> list[tuple[int, ...] | None]:
    it = iter(plan.active_shapes)
    return [next(it) if p else None for p in plan.present]


def _attend(attn: nn.Module, y: Tensor, B: int, N: int, heads: int) -> Tensor:
    """timm's attention core on qkv rows ``y`` [B*N, 3*heads*head_dim] -> [B, heads, N, head_dim]."""
    q, k, v = y.view(B, N, 3, heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


class AttentionGroups(torch.autograd.Function):
    """Attention branch (without norm and LayerScale) of the active head groups; its backward also returns
    the gradients of the MLP's grouped tensors (``params`` are all present grouped tensors of the block)."""

    @staticmethod
    def forward(ctx, h, b_proj, run: _BlockRun, attn: nn.Module, *params):
        B, N, D = h.shape
        h2 = _rows(h)
        w_a, b_a, wp_a = run.attn_slices
        y = F.linear(h2, w_a, b_a)
        heads_per_group = attn.num_heads // run.plan.groups
        h_full, h_all = run.plan.n_full * heads_per_group, run.plan.n_active * heads_per_group
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
        ctx.run, ctx.dims = run, (B, N, D, h_full, attn.head_dim)
        ctx.save_for_backward(h2, w_a, wp_a, o2)
        return out.view(B, N, D)

    @staticmethod
    def backward(ctx, grad):
        h2, w_a, wp_a, o2 = ctx.saved_tensors
        B, N, D, h_full, hd = ctx.dims
        run, plan = ctx.run, ctx.run.plan
        g2 = grad.reshape(B * N, D)
        g_bp = g2.sum(0) if ctx.needs_input_grad[1] else None
        n_params = len(plan.shapes)
        if ctx.graph is None:  # no FULL group: only the shared bias learns
            return (None, g_bp, None, None) + (None,) * n_params
        c_full = h_full * hd
        g_o = g2 @ wp_a[:, :c_full]
        g_wp = g2.t() @ o2[:, :c_full]
        leaf, o_full = ctx.graph
        # retain: a second backward through the same graph (gradcheck, retain_graph=True) needs it again;
        # the local graph goes with ctx when autograd frees the block's nodes
        (g_y,) = torch.autograd.grad(o_full, leaf, g_o.view(B, N, h_full, hd).transpose(1, 2), retain_graph=True)
        g_h = (g_y @ w_a[: g_y.shape[1]]).view(B, N, D) if ctx.needs_input_grad[0] else None
        pieces = [g_y.t() @ h2] + ([g_y.sum(0)] if plan.present[1] else []) + [g_wp]
        pieces += run.mlp_pieces if run.mlp_pieces is not None else _zero_mlp_pieces(plan, g_wp)
        run.mlp_pieces = None
        return (g_h, g_bp, None, None) + tuple(_scatter(plan, pieces))


def _zero_mlp_pieces(plan: BlockPlan, like: Tensor) -> list[Tensor]:
    """Zero FULL-slice gradients of the MLP's tensors (its backward did not run)."""
    shapes = [s for s, p in zip(_pad(plan)[3:], plan.present[3:]) if p]
    return [like.new_zeros(torch.Size(s).numel() * plan.n_full // plan.n_active) for s in shapes]


class MlpGroups(torch.autograd.Function):
    """MLP branch (without norm and LayerScale) of the active hidden-unit slices; its weight gradients go
    to the block's :class:`AttentionGroups` backward (which runs after this one)."""

    @staticmethod
    def forward(ctx, h, b2, run: _BlockRun, approximate: str):
        B, N, D = h.shape
        h2 = _rows(h)
        w1_a, b1_a, w2_a = run.mlp_slices
        pre = F.linear(h2, w1_a, b1_a)
        act = F.gelu(pre, approximate=approximate)
        out = F.linear(act, w2_a, b2)
        ctx.run, ctx.dims, ctx.approximate = run, (B, N, D), approximate
        ctx.save_for_backward(h2, w1_a, w2_a, pre, act)
        return out.view(B, N, D)

    @staticmethod
    def backward(ctx, grad):
        h2, w1_a, w2_a, pre, act = ctx.saved_tensors
        B, N, D = ctx.dims
        run, plan = ctx.run, ctx.run.plan
        g2 = grad.reshape(B * N, D)
        g_b2 = g2.sum(0) if ctx.needs_input_grad[1] else None
        if plan.n_full == 0:
            return None, g_b2, None, None
        c_full = pre.shape[1] * plan.n_full // plan.n_active
        g_act = g2 @ w2_a[:, :c_full]
        g_pre = torch.ops.aten.gelu_backward(g_act, pre[:, :c_full], approximate=ctx.approximate)
        g_h = (g_pre @ w1_a[:c_full]).view(B, N, D) if ctx.needs_input_grad[0] else None
        run.mlp_pieces = [g_pre.t() @ h2] + ([g_pre.sum(0)] if plan.present[4] else []) + [g2.t() @ act[:, :c_full]]
        return g_h, g_b2, None, None


def _grouped_tensors(blk: nn.Module) -> list[Tensor | None]:
    attn, mlp = blk.attn, blk.mlp
    return [attn.qkv.weight, attn.qkv.bias, attn.proj.weight, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight]


def cached_plan(blk: nn.Module, ops: tuple[int, ...], cache: dict, device: torch.device) -> BlockPlan:
    """The block's :class:`BlockPlan` for ``ops`` from ``cache`` (built on first use: a host-to-device copy,
    which is why CUDA-graph capture asks for every plan before it starts)."""
    tensors = _grouped_tensors(blk)
    key = (ops, tuple(None if t is None else t.shape for t in tensors), device)
    plan = cache.get(key)
    if plan is None:
        plan = cache[key] = block_plan(tensors, ops)
    return plan


def fused_block(blk: nn.Module, x: Tensor, ops: tuple[int, ...], cache: dict) -> Tensor:
    """One block with the groups of ``ops`` (not all FULL, not all SHORTCUT) through the fused kernels."""
    attn, mlp = blk.attn, blk.mlp
    plan = cached_plan(blk, ops, cache, x.device)
    params = [t for t in _grouped_tensors(blk) if t is not None]
    with torch.no_grad():
        run = _BlockRun(plan, _gather(plan, params))
    grad = plan.n_full > 0 and torch.is_grad_enabled()
    with torch.set_grad_enabled(grad):  # the residual adds below keep the stream's graph either way
        a = blk.ls1(AttentionGroups.apply(blk.norm1(x), attn.proj.bias, run, attn, *params))
    x = x + a
    with torch.set_grad_enabled(grad):
        m = blk.ls2(MlpGroups.apply(blk.norm2(x), mlp.fc2.bias, run, mlp.act.approximate))
    return x + m
