"""Cutting a timm ViT into subnets and running each one as FULL, FORWARD_ONLY or SHORTCUT.

A subnet is one group of attention heads of one block plus the matching 1/G slice of that block's MLP
hidden units (SPEC section 2). Subnet 0 is the stem (patch embedding, cls token, position embedding),
subnets ``1 .. depth*G`` are the blocks' groups in order (block-major), and the last subnet is the head
(final norm and classifier). Stem and head always run FULL.

Wrapping cuts every block's ``qkv``/``proj``/``fc1``/``fc2`` into one Parameter per head group
(:mod:`lightning_d2ft.model.grouped`), so that an optimizer step changes only the groups that ran FULL in it
(the others have ``grad=None``); state dicts keep timm's keys and layout.

Execution (unsharded): in training, a block with any FULL or FORWARD_ONLY group runs each branch through the
fused grouped kernels of :mod:`lightning_d2ft.model.fused_path` (FULL groups in one matmul with a custom
backward that hands each group its own gradient rows, FORWARD_ONLY groups beside them under ``no_grad``);
without gradients (evaluation, inference) a whole FULL block runs timm's own modules. Sharded blocks and
blocks the fused path does not model (LoRA, qk-norm, dropout, ...) take the general grouped path of
:mod:`lightning_d2ft.model.general_path`: FULL groups with autograd, FORWARD_ONLY groups under ``no_grad`` on a
detached input. SHORTCUT groups never run. On a CUDA device each block's training forward and backward can be
replayed as CUDA graphs captured once per (block, FULL groups, active groups), whatever groups those are
(:meth:`D2FTViT.use_cuda_graphs`, :mod:`lightning_d2ft.model.cuda_graphs`), which removes the kernel-launch
overhead that otherwise bounds a ViT-S step on a GPU.

Shared pieces of a block (LayerNorms, the biases of ``proj``/``fc2``, LayerScale) belong to the block:
they get a gradient when at least one group of the block is FULL, they run under ``no_grad`` when the
block only has FORWARD_ONLY groups, and they are skipped with the rest of the branch when every group
of the block is SHORTCUT (the block is then the identity).

Tensor parallelism plugs in through :class:`TensorParallel`: a rank holds only its own groups of each
block (the others' Parameters are dropped in place, see :func:`shard_vit`), computes its partial branch output,
and the strategy's collectives sum the partials across ranks.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import Tensor, nn

from lightning_d2ft.model.cuda_graphs import BlockGraphs, CaptureBackend
from lightning_d2ft.model.fused_path import fast_path_ok, fused_block
from lightning_d2ft.model.general_path import attention_groups, mlp_groups
from lightning_d2ft.model.granularity import (
    _NUM_EXTRA_SUBNETS,
    check_supported,
    resolve_groups_per_block,
    valid_groups_per_block,
    valid_subnet_counts,
)
from lightning_d2ft.model.grouped import group_blocks_
from lightning_d2ft.ops import Op
from lightning_d2ft.parallel.placement import Placement
from lightning_d2ft.parallel.sharding import shard_state_dict, shard_vit, unshard_state_dict

__all__ = [
    "D2FTViT", "TensorParallel", "check_supported", "find_d2ft", "shard_state_dict", "shard_vit", "unshard_state_dict",
    "valid_groups_per_block", "valid_subnet_counts",
]

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


def find_d2ft(module: nn.Module) -> D2FTViT:
    """The one D2FTViT inside a LightningModule (or any module), with a clear error otherwise."""
    found = [m for m in module.modules() if isinstance(m, D2FTViT)]
    if len(found) != 1:
        raise TypeError(
            f"D2FT needs exactly one D2FTViT inside {type(module).__name__} (wrap your timm ViT: "
            f"self.net = D2FTViT(vit, subnets=74)); found {len(found)}"
        )
    return found[0]


class D2FTViT(nn.Module):
    """A timm VisionTransformer cut into subnets; ``forward(x, ops)`` runs each subnet as its op says.

    Wraps the model without copying weights: ``net.vit`` is the very module passed in, so a plain timm
    checkpoint of it is always available (its blocks' linear layers are cut into per-group Parameters in
    place, behind timm's forward and state-dict keys: build the optimizer after wrapping). ``subnets`` is the
    total count (26/38/74 for ViT-S/16) or the number of head groups per block; ``groups_per_block`` names
    the latter explicitly.
    """

    def __init__(self, vit: nn.Module, subnets: int | None = None, *, groups_per_block: int | None = None) -> None:
        super().__init__()
        check_supported(vit)
        self.vit = vit
        self.depth = len(vit.blocks)
        self.num_heads = vit.blocks[0].attn.num_heads
        self.placement: Placement | None = None  # which rank holds which head group, once sharded
        self.tp: TensorParallel | None = None
        self.regroup_(subnets, groups_per_block=groups_per_block)
        self.full_shapes: dict[str, torch.Size] | None = None  # the unsharded vit's shapes, once sharded
        self.scheduled_ops: Tensor | None = None  # set per micro-batch by the strategy; used in training
        self.graphs: BlockGraphs | None = None  # CUDA-graph replay of the blocks in training (use_cuda_graphs)
        # every block through the general path (its projections can be observed: the per-sample Fisher)
        self.general_path_only = False

    def use_cuda_graphs(self, enabled: bool = True, backend: CaptureBackend | None = None) -> None:
        """Replay each block's training forward+backward as CUDA graphs, one pair per (block, FULL groups, active
        groups) (see :mod:`.cuda_graphs`; ``backend``: how to capture, default CUDA; tests pass the CPU stand-in).

        Used only where it is exact and capturable: training mode with grad, unsharded, a block on the fused
        path with a FULL group and one parameter dtype. Anything else (stem, head too) runs eagerly."""
        self.graphs = BlockGraphs(backend) if enabled else None

    def regroup_(self, subnets: int | None = None, *, groups_per_block: int | None = None) -> None:
        """Change the granularity (before sharding): the total subnet count, or the groups per block."""
        if self.tp is not None:
            raise RuntimeError("cannot change the granularity of a sharded D2FTViT")
        self.groups_per_block = resolve_groups_per_block(self.vit, subnets, groups_per_block)
        self.num_subnets = self.depth * self.groups_per_block + _NUM_EXTRA_SUBNETS
        group_blocks_(self.vit, self.groups_per_block)

    def shard_(self, placement: Placement | Tensor, tp: TensorParallel) -> None:
        """Keep only rank ``tp.rank``'s head groups (in place). ``placement`` (a :class:`Placement`, or its owner
        table ``[depth, G]``) is kept as it is: the model, strategy and callback share that one object."""
        if self.tp is not None:
            raise RuntimeError("this D2FTViT is already sharded")
        placement = Placement.from_any(placement)
        if tuple(placement.owner.shape) != (self.depth, self.groups_per_block):
            raise ValueError(f"placement must be [{self.depth}, {self.groups_per_block}], got "
                             f"{tuple(placement.owner.shape)}")
        if placement.num_devices != tp.world:
            raise ValueError(f"the placement has {placement.num_devices} ranks, the tensor-parallel size is {tp.world}")
        self.full_shapes = {k: v.shape for k, v in self.vit.state_dict().items()}
        self.vit = shard_vit(self.vit, self.groups_per_block, placement.groups_of(tp.rank))
        self.placement, self.tp = placement, tp

    # -- indexing -------------------------------------------------------------------------------
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
        return self._run(x, self.check_ops(ops))

    def _run(self, x: Tensor, ops_list: list[int]) -> Tensor:
        vit = self.vit
        graphs = self.graphs if self.graphs is not None and self._graphable(x) else None
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        G = self.groups_per_block
        for l, blk in enumerate(vit.blocks):
            block_ops = ops_list[1 + l * G : 1 + (l + 1) * G]
            out = graphs.run(l, blk, x, tuple(block_ops)) if graphs is not None else None
            x = self._block(l, blk, x, block_ops) if out is None else out
        x = vit.norm(x)
        return vit.forward_head(x)

    # -- CUDA graphs ----------------------------------------------------------------------------
    def _graphable(self, x: Tensor) -> bool:
        return (self.training and torch.is_grad_enabled() and self._unsharded() and not self.general_path_only
                and self.graphs.supports(x))

    def _unsharded(self) -> bool:
        """No collectives needed: never sharded, or a tensor-parallel group of one (one device)."""
        return self.tp is None or self.tp.world == 1

    def _block(self, l: int, blk: nn.Module, x: Tensor, block_ops: list[int]) -> Tensor:
        if self._unsharded() and not self.general_path_only:
            if max(block_ops) == Op.SHORTCUT:
                return x
            fast = fast_path_ok(blk)
            if min(block_ops) == Op.FULL and not (fast and torch.is_grad_enabled()):
                return blk(x)  # timm's own block (evaluation, or what the fused path does not model)
            if fast:  # training: the FULL groups' gradients go straight to their own Parameters
                return fused_block(blk, x, tuple(block_ops))
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
            owners = self.placement.owner[l].tolist() if self.tp is not None else None
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
        run = attention_groups if attention else mlp_groups
        partial = None
        for op in (Op.FULL, Op.FORWARD_ONLY):
            positions = [i for i, o in enumerate(local_ops) if o == op]
            if not positions:
                continue
            if op == Op.FULL:
                out = run(blk, h, positions)
            else:
                with torch.no_grad():
                    out = run(blk, h.detach(), positions)
            partial = out if partial is None else partial + out
        return partial


def _add_bias(partial: Tensor, bias: Tensor | None) -> Tensor:
    return partial if bias is None else partial + bias
