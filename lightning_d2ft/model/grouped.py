"""A block's Linear layers cut by head group into one Parameter per group, so that only FULL groups learn.

Why one Parameter per (block, group): a group that ran no FULL micro-batch in an optimizer step then has
``grad=None``, and every torch optimizer skips such a Parameter entirely (SGD with momentum, Adam, AdamW,
fused, foreach or for-loop): the weights, the momentum or Adam moments, the weight decay and the per-Parameter
``step`` count stay bit-identical, and the step itself only touches what trained (it shrinks with the
schedule). One Parameter per whole timm tensor would get a full-size gradient with zeros at the skipped
groups, which the optimizer steps like any other (momentum and weight decay move them).

:class:`GroupedLinear` replaces ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` of every block
(:func:`group_blocks_`). Its Parameters are ``weight_g<group>`` (and ``bias_g<group>`` for ``qkv``/``fc1``),
keyed by the global group id, in the layout of :mod:`lightning_d2ft.parallel.layout` (a block's groups
concatenate along dim 0 into what the fused kernels multiply with); the shared bias of ``proj``/``fc2`` stays
one Parameter, ``bias``, the very one timm had. Towards the outside it stays timm:

* ``forward`` is ``nn.Linear``'s on the assembled timm-layout weight, so timm's own Block (evaluation,
  inference, plain fine-tuning) runs unchanged;
* state dicts hold timm's keys and layout (``blocks.0.attn.qkv.weight``), so checkpoints stay plain timm
  and plain timm checkpoints load; a tensor-parallel rank that holds some groups only reads and writes those
  groups' rows/columns, as :func:`~lightning_d2ft.parallel.sharding.shard_state_dict` cuts them;
* ``weight`` (and ``bias`` of ``qkv``/``fc1``) read as timm's tensors, assembled (differentiable).

Sharding keeps a rank's groups and drops the others in place (:meth:`GroupedLinear.keep_groups_`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_d2ft.parallel.layout import (
    GROUPED,
    GROUPED_MODULES,
    from_groups,
    from_joined,
    group_param_name,
    to_groups,
)

__all__ = ["GroupedLinear", "group_blocks_", "grouped_modules", "join_groups", "timm_grads"]


def join_groups(tensors: Sequence[Tensor]) -> Tensor:
    """``tensors`` (groups' slices of one tensor, equal shapes) as one tensor along dim 0, detached: a view when
    they sit side by side in one buffer, in this order (as :class:`GroupedLinear` packs a block's groups), so
    a block whose FULL groups are a run of neighbours gathers them for free; a copy (``cat``) otherwise."""
    first = tensors[0].detach()
    if len(tensors) == 1:
        return first
    if _side_by_side(tensors):
        return first.as_strided((len(tensors) * first.shape[0], *first.shape[1:]), first.stride())
    return torch.cat([t.detach() for t in tensors])


def _side_by_side(tensors: Sequence[Tensor]) -> bool:
    """The tensors are contiguous, of one storage, each right after the one before."""
    first = tensors[0]
    step = first.numel() * first.element_size()
    base = first.data_ptr()
    end = first.storage_offset() * first.element_size() + len(tensors) * step
    return (first.is_contiguous() and all(t.data_ptr() == base + i * step for i, t in enumerate(tensors))
            and first.untyped_storage().nbytes() >= end)


class GroupedLinear(nn.Module):
    """timm's Linear ``key`` ("attn.qkv", "attn.proj", "mlp.fc1" or "mlp.fc2") of one block as one Parameter per
    head group (see the module docstring). ``group_ids``: the global ids of the groups this module holds, in
    order (all ``num_groups`` of them until a tensor-parallel rank drops the others)."""

    def __init__(self, linear: nn.Linear, key: str, groups: int, heads_per_group: int = 1) -> None:
        super().__init__()
        self.key, self.layout = key, GROUPED[f"{key}.weight"]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.num_groups, self.heads_per_group = groups, heads_per_group
        self.group_ids = list(range(groups))
        self.grouped_bias = linear.bias is not None and not self.layout.transposed
        trainable = linear.weight.requires_grad
        with torch.no_grad():
            for g, part in enumerate(to_groups(linear.weight.detach(), self.layout, groups, heads_per_group)):
                self.register_parameter(group_param_name("weight", g), nn.Parameter(part, requires_grad=trainable))
            if linear.bias is not None and not self.layout.transposed:
                parts = to_groups(linear.bias.detach(), GROUPED[f"{key}.bias"], groups, heads_per_group)
                for g, part in enumerate(parts):
                    self.register_parameter(group_param_name("bias", g),
                                            nn.Parameter(part, requires_grad=linear.bias.requires_grad))
        if not self.grouped_bias:  # proj/fc2: shared by the groups (added once to their summed partial outputs)
            self.register_parameter("bias", linear.bias)  # timm's very Parameter (or None)
        self._pack_()

    def _pack_(self) -> None:
        """Put the groups' Parameters of each tensor side by side in one buffer, in ``group_ids`` order (each
        Parameter stays its own leaf, a view of its rows), so that neighbouring groups join without a copy
        (:func:`join_groups`). Done again whenever the Parameters are reallocated (``to``, sharding, copies)."""
        with torch.no_grad():
            for name in self._group_tensor_names():
                params = [self._parameters[group_param_name(name, g)] for g in self.group_ids]
                first = params[0]
                if (_side_by_side(params) and first.storage_offset() == 0
                        and first.untyped_storage().nbytes() == len(params) * first.numel() * first.element_size()):
                    continue  # packed already, nothing else in the buffer: keep the addresses (CUDA graphs)
                buf = torch.cat([p.detach() for p in params])
                for p, part in zip(params, buf.chunk(len(params))):
                    p.data = part

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self._pack_()
        return out

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy and pickle give every Parameter its own memory
        super().__setstate__(state)
        self._pack_()

    def extra_repr(self) -> str:
        return (f"{self.key}: in_features={self.in_features}, out_features={self.out_features}, "
                f"groups={self.group_ids} of {self.num_groups}")

    # -- the groups' Parameters -------------------------------------------------------------------
    def weights(self, positions: Sequence[int]) -> list[nn.Parameter]:
        """The weights of the groups at ``positions`` (indices into ``group_ids``)."""
        params, ids = self._parameters, self.group_ids
        return [params[f"weight_g{ids[i]}"] for i in positions]

    def biases(self, positions: Sequence[int]) -> list[nn.Parameter] | None:
        """The per-group biases of the groups at ``positions`` (None: ``proj``/``fc2``, or no bias)."""
        if not self.grouped_bias:
            return None
        params, ids = self._parameters, self.group_ids
        return [params[f"bias_g{ids[i]}"] for i in positions]

    def group_parameters(self, positions: Sequence[int]) -> list[nn.Parameter]:
        """Every per-group Parameter of the groups at ``positions`` (weights, biases, adapters)."""
        return self.weights(positions) + (self.biases(positions) or [])

    @property
    def all_positions(self) -> list[int]:
        return list(range(len(self.group_ids)))

    @property
    def complete(self) -> bool:
        """Holds every group (not a tensor-parallel shard)."""
        return len(self.group_ids) == self.num_groups

    # -- timm's view ------------------------------------------------------------------------------
    def timm_tensor(self, name: str) -> Tensor:
        """timm's tensor ``name`` ("weight", "bias", ...) of the groups held, assembled from the groups:
        differentiable where autograd needs it, else from a view of the packed groups."""
        params = [self._parameters[f"{name}_g{g}"] for g in self.group_ids]
        layout = GROUPED[f"{self.key}.{name}"]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return from_groups(params, layout, self.heads_per_group)
        return from_joined(join_groups(params), layout, len(params) * self.heads_per_group)

    @property
    def weight(self) -> Tensor:
        """timm's weight (of the groups held), assembled from the groups."""
        return self.timm_tensor("weight")

    def __getattr__(self, name: str):
        if name == "bias" and self.__dict__.get("grouped_bias"):
            # timm's bias of qkv/fc1: the groups' biases assembled; proj/fc2 have a real one
            return self.timm_tensor("bias")
        return super().__getattr__(name)

    def forward(self, x: Tensor) -> Tensor:
        if not self.complete:
            raise RuntimeError(f"{self.key} holds head groups {self.group_ids} of {self.num_groups} (a tensor-parallel "
                               "shard): run it through D2FTViT, which sums the ranks' partial outputs")
        return F.linear(x, self.weight, self.bias)

    # -- tensor parallelism -----------------------------------------------------------------------
    def keep_groups_(self, groups: Sequence[int]) -> None:
        """Keep only the groups ``groups`` (global ids, in this order), dropping the others' Parameters."""
        groups = list(groups)
        missing = [g for g in groups if g not in self.group_ids]
        if missing or len(set(groups)) != len(groups):
            raise ValueError(f"{self.key} holds groups {self.group_ids}; cannot keep {groups}")
        for g in self.group_ids:
            if g not in groups:
                for name in self._group_tensor_names():
                    delattr(self, group_param_name(name, g))
        self.group_ids = groups
        self._pack_()  # a buffer of the kept groups only: the dropped ones' memory is freed

    def _group_tensor_names(self) -> list[str]:
        """The per-group tensors, by their timm name ("weight", "bias", ...)."""
        return ["weight"] + (["bias"] if self.grouped_bias else [])

    # -- state dicts: timm's keys and layout ------------------------------------------------------
    def _timm_tensors(self) -> dict[str, Tensor | None]:
        """timm name -> this module's tensor in timm's layout (the groups held), detached."""
        out: dict[str, Tensor | None] = {}
        for name in self._group_tensor_names():
            parts = [getattr(self, group_param_name(name, g)).detach() for g in self.group_ids]
            out[name] = from_groups(parts, GROUPED[f"{self.key}.{name}"], self.heads_per_group).contiguous()
        if not self.grouped_bias:
            out["bias"] = None if self._parameters["bias"] is None else self._parameters["bias"].detach()
        return out

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for name, t in self._timm_tensors().items():
            if name == "bias" and not self.grouped_bias and keep_vars:
                t = self._parameters["bias"]
            if t is not None:
                destination[prefix + name] = t
        for name, buf in self._buffers.items():
            if buf is not None and name not in self._non_persistent_buffers_set:
                destination[prefix + name] = buf if keep_vars else buf.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        expected = self._timm_tensors()
        expected.update({n: b for n, b in self._buffers.items() if b is not None
                         and n not in self._non_persistent_buffers_set})
        with torch.no_grad():
            for name, current in expected.items():
                if current is None:
                    continue
                key = prefix + name
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                value = state_dict[key]
                if not torch.is_tensor(value) or value.shape != current.shape:
                    shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape {shape} from checkpoint, "
                                      f"the shape in current model is {tuple(current.shape)}.")
                    continue
                self._load_tensor(name, value)
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0] not in expected:
                    unexpected_keys.append(key)

    def timm_grads(self) -> dict[str, Tensor | None]:
        """timm name -> the gradient in timm's layout (zeros at groups without one; None if no group has one)."""
        out: dict[str, Tensor | None] = {}
        for name in self._group_tensor_names():
            params = [getattr(self, group_param_name(name, g)) for g in self.group_ids]
            if all(p.grad is None for p in params):
                out[name] = None
                continue
            parts = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]
            out[name] = from_groups(parts, GROUPED[f"{self.key}.{name}"], self.heads_per_group).contiguous()
        if not self.grouped_bias and self._parameters["bias"] is not None:
            out["bias"] = self._parameters["bias"].grad
        return out

    def _load_tensor(self, name: str, value: Tensor) -> None:
        """Copy a timm-layout tensor ``name`` (the groups held, in order) into this module's tensors."""
        if name in self._buffers:
            self._buffers[name].copy_(value)
        elif name == "bias" and not self.grouped_bias:
            self._parameters["bias"].copy_(value)
        else:
            parts = to_groups(value.detach(), GROUPED[f"{self.key}.{name}"], len(self.group_ids), self.heads_per_group)
            for g, part in zip(self.group_ids, parts):
                getattr(self, group_param_name(name, g)).copy_(part)


def grouped_modules(blk: nn.Module) -> dict[str, nn.Module]:
    """The four modules of a block cut by head group, by key ("attn.qkv", ...)."""
    return {key: blk.get_submodule(key) for key in GROUPED_MODULES}


def group_blocks_(vit: nn.Module, groups: int) -> None:
    """Cut every block's ``qkv``/``proj``/``fc1``/``fc2`` into ``groups`` head groups (in place): plain Linear
    layers become :class:`GroupedLinear` s, and ones already cut another way are cut again (timm's tensors
    are the same either way). The weights are moved into the new Parameters, not kept twice."""
    heads = vit.blocks[0].attn.num_heads
    for blk in vit.blocks:
        for key, module in grouped_modules(blk).items():
            if isinstance(module, GroupedLinear):
                if module.num_groups == groups:
                    continue
                if type(module) is not GroupedLinear:
                    raise RuntimeError(f"cannot change the head groups of a block with LoRA adapters ({key}); "
                                       "choose the granularity before adding them")
                if not module.complete:
                    raise RuntimeError("cannot change the head groups of a tensor-parallel shard")
                plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                  device="meta")
                plain.weight = nn.Parameter(module.weight.detach(), requires_grad=module.weights([0])[0].requires_grad)
                if module.grouped_bias:
                    plain.bias = nn.Parameter(module.bias.detach(), requires_grad=module.biases([0])[0].requires_grad)
                elif module.bias is not None:
                    plain.bias = module.bias
                module = plain
            parent, _, name = key.rpartition(".")
            setattr(blk.get_submodule(parent), name, GroupedLinear(module, key, groups, heads // groups))


def timm_grads(module: nn.Module) -> dict[str, Tensor | None]:
    """Every gradient of ``module`` by timm's parameter names and in timm's layout (a grouped tensor's groups
    without a gradient read as zeros; None where no group has one): for tests and statistics."""
    out: dict[str, Tensor | None] = {}
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, GroupedLinear):
            out.update({prefix + k: v for k, v in m.timm_grads().items()})
        else:
            out.update({prefix + k: p.grad for k, p in m.named_parameters(recurse=False)})
    return out
