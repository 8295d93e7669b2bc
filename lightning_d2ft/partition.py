"""Cutting a timm ViT into subnets and running each one as FULL, FORWARD_ONLY or SHORTCUT.

A subnet is one group of attention heads of one block plus the matching 1/G slice of that block's MLP
hidden units (SPEC section 2). Subnet 0 is the stem (patch embedding, cls token, position embedding),
subnets ``1 .. depth*G`` are the blocks' groups in order (block-major), and the last subnet is the head
(final norm and classifier). Stem and head always run FULL.

Execution is grouped: inside a block, all groups that share an op are computed with one matmul per
projection over the union of their rows/columns (never a Python loop over heads), FULL groups with
autograd, FORWARD_ONLY groups under ``no_grad`` on a detached input, SHORTCUT groups not at all.

Shared pieces of a block (LayerNorms, the biases of ``proj``/``fc2``, LayerScale) belong to the block:
they get a gradient when at least one group of the block is FULL, they run under ``no_grad`` when the
block only has FORWARD_ONLY groups, and they are skipped with the rest of the branch when every group
of the block is SHORTCUT (the block is then the identity).

Tensor parallelism plugs in through :class:`TensorParallel`: a rank holds only its own groups of each
block (a narrowed copy of the timm model, see :func:`shard_vit`), computes its partial branch output,
and the strategy's collectives sum the partials across ranks.
"""

from __future__ import annotations

import copy
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_d2ft.layout import group_indices, grouped_dim
from lightning_d2ft.ops import Op
from lightning_d2ft.placement import groups_of_rank

__all__ = [
    "D2FTViT", "TensorParallel", "check_supported", "find_d2ft", "shard_state_dict", "shard_vit", "unshard_state_dict",
    "valid_subnet_counts",
]

_NUM_EXTRA_SUBNETS = 2  # stem and head


class TensorParallel(Protocol):
    """The two collectives a tensor-parallel block needs (Megatron's f and g operators).

    ``active`` lists, per rank, whether that rank has anything to contribute; every rank computes it from
    the shared schedule, so all ranks agree on which collective runs and who sends bytes.
    """

    rank: int
    world: int

    def reduce_partial(self, partial: Tensor | None, like: Tensor, active: Sequence[bool]) -> Tensor:
        """Forward: sum the partial branch outputs of all ranks. Backward: identity."""

    def copy_to_ranks(self, h: Tensor, active: Sequence[bool]) -> Tensor:
        """Forward: identity. Backward: sum the input gradients of the ranks with FULL groups."""


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
            if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear):
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


def find_d2ft(module: nn.Module) -> D2FTViT:
    """The one D2FTViT inside a LightningModule (or any module), with a clear error otherwise."""
    found = [m for m in module.modules() if isinstance(m, D2FTViT)]
    if len(found) != 1:
        raise TypeError(
            f"D2FT needs exactly one D2FTViT inside {type(module).__name__} (wrap your timm ViT: "
            f"self.net = D2FTViT(vit, subnets=74)); found {len(found)}"
        )
    return found[0]


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


def resolve_groups_per_block(vit: nn.Module, subnets: int | None, groups_per_block: int | None) -> int:
    """Turn ``subnets`` (a total count, or G) / ``groups_per_block`` into G, or explain the valid choices."""
    valid_g = valid_groups_per_block(vit)
    valid_n = valid_subnet_counts(vit)
    depth, heads = len(vit.blocks), vit.blocks[0].attn.num_heads
    choices = (
        f"for this model ({depth} blocks x {heads} heads) use subnets in {valid_n} (total count) "
        f"or groups_per_block in {valid_g}"
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


class D2FTViT(nn.Module):
    """A timm VisionTransformer cut into subnets; ``forward(x, ops)`` runs each subnet as its op says.

    Wraps the model without copying weights: ``net.vit`` is the very module passed in, so a plain timm
    checkpoint of it is always available. ``subnets`` is the total count (26/38/74 for ViT-S/16) or the
    number of head groups per block; ``groups_per_block`` names the latter explicitly.
    """

    def __init__(self, vit: nn.Module, subnets: int | None = None, *, groups_per_block: int | None = None) -> None:
        super().__init__()
        check_supported(vit)
        self.vit = vit
        self.depth = len(vit.blocks)
        self.num_heads = vit.blocks[0].attn.num_heads
        # group_owner[l, g] = tensor-parallel rank holding group g of block l; all 0 when unsharded.
        self.register_buffer("group_owner", torch.zeros(0, dtype=torch.long), persistent=False)
        self.tp: TensorParallel | None = None
        self.regroup_(subnets, groups_per_block=groups_per_block)
        self.full_shapes: dict[str, torch.Size] | None = None  # the unsharded vit's shapes, once sharded
        self.scheduled_ops: Tensor | None = None  # set per micro-batch by D2FTCallback; used in training

    def regroup_(self, subnets: int | None = None, *, groups_per_block: int | None = None) -> None:
        """Change the granularity (before sharding): the total subnet count, or the groups per block."""
        if self.tp is not None:
            raise RuntimeError("cannot change the granularity of a sharded D2FTViT")
        self.groups_per_block = resolve_groups_per_block(self.vit, subnets, groups_per_block)
        self.num_subnets = self.depth * self.groups_per_block + _NUM_EXTRA_SUBNETS
        self.group_owner = torch.zeros(self.depth, self.groups_per_block, dtype=torch.long)

    def shard_(self, owner: Tensor, tp: TensorParallel) -> None:
        """Keep only rank ``tp.rank``'s head groups (in place); ``owner[l, g]`` is the rank of each group."""
        if self.tp is not None:
            raise RuntimeError("this D2FTViT is already sharded")
        if tuple(owner.shape) != (self.depth, self.groups_per_block):
            raise ValueError(f"placement must be [{self.depth}, {self.groups_per_block}], got {tuple(owner.shape)}")
        self.full_shapes = {k: v.shape for k, v in self.vit.state_dict().items()}
        self.vit = shard_vit(self.vit, self.groups_per_block, groups_of_rank(owner, tp.rank))
        self.group_owner = owner.clone().to(self.group_owner.device)
        self.tp = tp

    # -- indexing -------------------------------------------------------------------------------
    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.groups_per_block

    def subnet_index(self, block: int, group: int) -> int:
        """Index of (block, group) in an ops vector."""
        return 1 + block * self.groups_per_block + group

    def block_slice(self, block: int) -> slice:
        """The ops-vector slice holding block ``block``'s groups."""
        start = self.subnet_index(block, 0)
        return slice(start, start + self.groups_per_block)

    def subnet_blocks(self) -> Tensor:
        """Block index of every subnet (-1 for the stem and the head)."""
        blocks = torch.arange(self.depth).repeat_interleave(self.groups_per_block)
        return torch.cat([torch.tensor([-1]), blocks, torch.tensor([-1])])

    # -- ops ------------------------------------------------------------------------------------
    def check_ops(self, ops: Tensor | Sequence[int] | None) -> list[int]:
        """Validate an ops vector and return it as a plain list (branching on Python ints is cheapest)."""
        if ops is None:
            return [int(Op.FULL)] * self.num_subnets
        ops_t = torch.as_tensor(ops)
        if ops_t.dim() != 1 or ops_t.numel() != self.num_subnets:
            raise ValueError(
                f"ops must be a 1-D sequence of {self.num_subnets} Op values (one per subnet), "
                f"got shape {tuple(ops_t.shape)}"
            )
        if ops_t.is_floating_point() or ops_t.dtype == torch.bool:
            raise TypeError(f"ops must hold integer Op values, got dtype {ops_t.dtype}")
        values = ops_t.tolist()
        bad = sorted({v for v in values if v not in (Op.SHORTCUT, Op.FORWARD_ONLY, Op.FULL)})
        if bad:
            raise ValueError(f"ops holds values {bad} that are not Op values {[int(o) for o in Op]}")
        if values[0] != Op.FULL or values[-1] != Op.FULL:
            raise ValueError("the stem (subnet 0) and the head (last subnet) always run Op.FULL")
        return values

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor, ops: Tensor | Sequence[int] | None = None) -> Tensor:
        """Run with ``ops`` (one Op per subnet). Without ``ops``: the micro-batch's scheduled ops in training
        mode when a schedule is attached, the whole model otherwise (inference always uses every subnet)."""
        if ops is None and self.training and self.scheduled_ops is not None:
            ops = self.scheduled_ops
        ops_list = self.check_ops(ops)
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        G = self.groups_per_block
        for l, blk in enumerate(vit.blocks):
            x = self._block(l, blk, x, ops_list[1 + l * G : 1 + (l + 1) * G])
        x = vit.norm(x)
        return vit.forward_head(x)

    def _block(self, l: int, blk: nn.Module, x: Tensor, block_ops: list[int]) -> Tensor:
        x = x + self._branch(l, blk, x, block_ops, attention=True)
        return x + self._branch(l, blk, x, block_ops, attention=False)

    def _branch(self, l: int, blk: nn.Module, x: Tensor, block_ops: list[int], attention: bool) -> Tensor | int:
        """One residual branch (attention or MLP) of block ``l``; returns 0 when every group is SHORTCUT."""
        if max(block_ops) == Op.SHORTCUT:
            return 0
        any_full = Op.FULL in block_ops
        with torch.set_grad_enabled(any_full and torch.is_grad_enabled()):
            norm = blk.norm1 if attention else blk.norm2
            h = norm(x)
            owners = self.group_owner[l].tolist() if self.tp is not None else None
            if self.tp is not None and any_full:
                h = self.tp.copy_to_ranks(h, self._ranks_with(owners, block_ops, (Op.FULL,)))
            partial = self._local_partial(blk, h, block_ops, owners, attention)
            if self.tp is not None:
                active = self._ranks_with(owners, block_ops, (Op.FULL, Op.FORWARD_ONLY))
                partial = self.tp.reduce_partial(partial, h, active)
            if attention:
                out = blk.attn.proj_drop(_add_bias(partial, blk.attn.proj.bias))
                return blk.ls1(out)
            out = blk.mlp.drop2(_add_bias(partial, blk.mlp.fc2.bias))
            return blk.ls2(out)

    def _ranks_with(self, owners: list[int], block_ops: list[int], wanted: tuple[Op, ...]) -> list[bool]:
        active = [False] * self.tp.world
        for owner, op in zip(owners, block_ops):
            if op in wanted:
                active[owner] = True
        return active

    def _local_partial(
        self, blk: nn.Module, h: Tensor, block_ops: list[int], owners: list[int] | None, attention: bool
    ) -> Tensor | None:
        """Sum over this rank's active groups of their branch output (without the shared bias)."""
        local_ops = block_ops if owners is None else [op for op, o in zip(block_ops, owners) if o == self.tp.rank]
        run = _attention_groups if attention else _mlp_groups
        partial = None
        for op in (Op.FULL, Op.FORWARD_ONLY):
            positions = [i for i, o in enumerate(local_ops) if o == op]
            if not positions:
                continue
            if op == Op.FULL:
                out = run(blk, h, positions, len(local_ops))
            else:
                with torch.no_grad():
                    out = run(blk, h.detach(), positions, len(local_ops))
            partial = out if partial is None else partial + out
        return partial


def _add_bias(partial: Tensor, bias: Tensor | None) -> Tensor:
    return partial if bias is None else partial + bias


def _select(weight: Tensor, dim: int, positions: list[int], n_groups: int) -> Tensor:
    """Rows/columns of ``weight`` belonging to the groups at ``positions``, viewed group-wise on ``dim``."""
    if len(positions) == n_groups:
        return weight
    first, last = positions[0], positions[-1]
    if last - first + 1 == len(positions):  # contiguous run: a view, no gather
        return weight.narrow(dim, first, len(positions))
    index = torch.tensor(positions, device=weight.device)
    return weight.index_select(dim, index)


def _attention_groups(blk: nn.Module, h: Tensor, positions: list[int], n_groups: int) -> Tensor:
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
    if hasattr(attn.qkv, "lora_A"):
        qkv = qkv + _lora_qkv(attn.qkv, h, positions, n_groups)
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


def _lora_qkv(qkv: nn.Module, h: Tensor, positions: list[int], n_groups: int) -> Tensor:
    """The groups' adapter outputs ``scale * B_g A_g h``, laid out like their ``qkv`` rows (see lora.py)."""
    a, b = qkv.lora_A, qkv.lora_B
    r, D = b.shape[1], h.shape[-1]
    group_dim = b.shape[0] // (3 * n_groups)
    a = _select(a.view(n_groups, r, D), 0, positions, n_groups).reshape(-1, D)  # [P*r, D]
    b = _select(b.view(3, n_groups, group_dim, r), 1, positions, n_groups)  # [3, P, group_dim, r]
    u = F.linear(h, a).unflatten(-1, (len(positions), r))  # [B, N, P, r]
    return torch.einsum("...pr,tpdr->...tpd", u, b).flatten(-3) * qkv.lora_scale


def _mlp_groups(blk: nn.Module, h: Tensor, positions: list[int], n_groups: int) -> Tensor:
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


# -- tensor-parallel sharding -----------------------------------------------------------------------
def shard_index(key: str, full_shape: Sequence[int], groups_per_block: int,
                groups: list[list[int]]) -> tuple[int, Tensor] | None:
    """(dim, indices) that cut ``key``'s full tensor down to the groups a rank owns; None if replicated."""
    found = grouped_dim(key)
    if found is None:
        return None
    block, layout = found
    return layout.dim, group_indices(full_shape[layout.dim], layout, groups_per_block, groups[block])


def shard_state_dict(full: dict[str, Tensor], groups_per_block: int, groups: list[list[int]]) -> dict[str, Tensor]:
    """Cut a full (timm-layout) state dict down to one rank's head groups."""
    out = {}
    for key, value in full.items():
        cut = shard_index(key, value.shape, groups_per_block, groups)
        out[key] = value if cut is None else value.index_select(cut[0], cut[1].to(value.device))
    return out


def unshard_state_dict(shapes: dict[str, Sequence[int]], groups_per_block: int,
                       shards: list[tuple[list[list[int]], dict[str, Tensor]]]) -> dict[str, Tensor]:
    """Assemble full tensors of ``shapes`` from per-rank shards ``[(groups, state_dict), ...]``.

    Replicated tensors are taken from the first shard (they are identical on every rank).
    """
    full: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        first = shards[0][1][key]
        if shard_index(key, shape, groups_per_block, shards[0][0]) is None:
            full[key] = first.detach().clone()
            continue
        out = first.new_zeros(tuple(shape))
        for groups, sd in shards:
            dim, idx = shard_index(key, shape, groups_per_block, groups)
            out.index_copy_(dim, idx.to(out.device), sd[key].detach())
        full[key] = out
    return full


def shard_vit(vit: nn.Module, groups_per_block: int, groups: list[list[int]]) -> nn.Module:
    """A copy of ``vit`` whose block l keeps only head groups ``groups[l]`` (for one tensor-parallel rank).

    The result is still a timm VisionTransformer (narrowed ``qkv``/``proj``/``fc1``/``fc2``, fewer heads),
    so :class:`D2FTViT` runs it as it is. Replicated pieces (stem, norms, biases, head) are copied whole.
    """
    check_supported(vit)
    if len(groups) != len(vit.blocks) or any(not owned for owned in groups):
        raise ValueError("every rank must own at least one head group of every block")
    sharded = shard_state_dict(vit.state_dict(), groups_per_block, groups)
    local = copy.deepcopy(vit)
    for l, (blk, owned) in enumerate(zip(local.blocks, groups)):
        attn, mlp = blk.attn, blk.mlp
        for parent, name, path in ((attn, "qkv", "attn.qkv"), (attn, "proj", "attn.proj"),
                                   (mlp, "fc1", "mlp.fc1"), (mlp, "fc2", "mlp.fc2")):
            out_f, in_f = sharded[f"blocks.{l}.{path}.weight"].shape
            old = getattr(parent, name)
            with torch.device("meta"):
                new = nn.Linear(in_f, out_f, bias=old.bias is not None, dtype=old.weight.dtype)
            new = new.to_empty(device=old.weight.device)
            for pname, p in old.named_parameters(recurse=False):  # frozen or not, and LoRA adapters
                if pname in ("weight", "bias"):
                    getattr(new, pname).requires_grad_(p.requires_grad)
                else:
                    shape = sharded[f"blocks.{l}.{path}.{pname}"].shape
                    new.register_parameter(pname, nn.Parameter(p.new_empty(shape), requires_grad=p.requires_grad))
            for bname, buf in old.named_buffers(recurse=False):
                new.register_buffer(bname, buf.clone())
            setattr(parent, name, new)
        attn.num_heads = attn.num_heads // groups_per_block * len(owned)
        attn.attn_dim = attn.num_heads * attn.head_dim
    local.load_state_dict(sharded)
    return local
