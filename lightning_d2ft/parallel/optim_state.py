"""Optimizer state between checkpoints (keyed by parameter name, independent of the world size) and one
tensor-parallel rank's optimizer.

Every head group of a block is a Parameter of its own, named after its global group id
(``...blocks.3.attn.qkv.weight_g1``, see :mod:`lightning_d2ft.parallel.layout`), and lives on exactly one
tensor-parallel rank: saving gathers each rank's groups' states under their names (a group that never ran
FULL has no state, and keeps none), the replicated parameters' state is the same on every rank; loading
picks this rank's names. So a run resumes on any tensor-parallel size with every group's moments and
``step`` count exactly as they were.

Checkpoints written before the per-group Parameters (one state per timm tensor, full size, keyed by timm's
name, with per-rank ``step`` scalars under ``"d2ft_tp"``) load too: each group gets its rows of the moments,
and the ``step`` of the rank that held it when the tensor-parallel size is the same (else the first rank's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.nn import Module
from torch.optim import Optimizer

from lightning_d2ft.parallel.layout import GROUPED, group_param, to_groups

if TYPE_CHECKING:  # the model sits above this layer: types only
    from lightning_d2ft.model.vit import D2FTViT

__all__ = ["full_optimizer_state", "load_full_optimizer_state"]
Gather = Callable[[Any], list[Any]]  # all_gather_object over the tensor-parallel group


def _cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in state.items()}


def full_optimizer_state(optimizer: Optimizer, module: Module, net: D2FTViT, prefix: str,
                         rank_groups: list[list[list[int]]] | None, gather: Gather) -> dict[str, Any]:
    """``optimizer``'s state keyed by parameter name, for every rank's head groups; ``rank_groups``: every
    tensor-parallel rank's groups (None when the model is not sharded: nothing to gather)."""
    names = {id(p): n for n, p in module.named_parameters()}
    sd = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    by_name = {names[id(p)]: sd["state"].get(i, {}) for i, p in enumerate(params)}
    group_names = [[names[id(p)] for p in pg["params"]] for pg in optimizer.param_groups]
    if rank_groups is not None:  # every group's state lives on one rank: gather them all, by name
        mine = {n: _cpu(st) for n, st in by_name.items() if group_param(n) is not None}
        for other_state, other_names in gather((mine, group_names)):
            by_name.update(other_state)
            for names_here, names_there in zip(group_names, other_names):
                seen = set(names_here)
                names_here.extend(n for n in names_there if n not in seen)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": pnames}
              for g, pnames in zip(sd["param_groups"], group_names)]
    return {"d2ft_by_name": True, "state": by_name, "param_groups": groups}


def load_full_optimizer_state(optimizer: Optimizer, saved: dict[str, Any], module: Module, net: D2FTViT,
                              groups: list[list[int]] | None, tp_rank: int, tp_size: int) -> None:
    """Load a state saved by :func:`full_optimizer_state` (or by a release before per-group Parameters) into
    this rank's optimizer (``groups``: this rank's head groups, None when not sharded)."""
    if not saved.get("d2ft_by_name"):
        optimizer.load_state_dict(saved)
        return
    names = {id(p): n for n, p in module.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, p in enumerate(params):
        name = names[id(p)]
        if name in saved["state"]:
            st = dict(saved["state"][name])
            st.pop("d2ft_tp", None)
        else:
            st = _from_whole_tensor_state(saved["state"], name, net, tp_rank, tp_size)
        if st:
            state[i] = st
    index, param_groups = 0, []
    for g, pg in zip(saved["param_groups"], optimizer.param_groups):
        param_groups.append({**g, "params": list(range(index, index + len(pg["params"])))})
        index += len(pg["params"])
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _from_whole_tensor_state(saved: dict[str, dict], name: str, net: D2FTViT, tp_rank: int,
                             tp_size: int) -> dict[str, Any]:
    """A head group's state from an older checkpoint's state of its whole timm tensor (empty if none)."""
    found = group_param(name)
    if found is None:
        return {}
    _, group, key = found
    tensor = key.rsplit(".", 1)[1]
    whole = saved.get(f"{name.rsplit('.', 1)[0]}.{tensor}")
    if not whole:
        return {}
    st = dict(whole)
    meta = st.pop("d2ft_tp", None)
    if meta is not None and len(meta["has_state"]) == tp_size:  # the same tensor-parallel size: this rank's own
        if not meta["has_state"][tp_rank]:
            return {}  # the rank that held this group had no state for it: it starts fresh, as it would have
        st.update({k: v[tp_rank] for k, v in meta["scalars"].items()})
    layout, G = GROUPED[key], net.groups_per_block
    hpg = net.num_heads // G
    return {k: (to_groups(v, layout, G, hpg)[group] if torch.is_tensor(v) and v.dim() > 0 else v)
            for k, v in st.items()}
