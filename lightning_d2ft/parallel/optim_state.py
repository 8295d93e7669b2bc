"""Optimizer state between the full model (checkpoints) and one tensor-parallel rank's shard (training).

Checkpoints key the state by parameter name with full-size tensors, so a run resumes on any world size.
A shard may have no state yet for a parameter (its groups had no FULL step), and per-rank scalars such
as AdamW's ``step`` differ between ranks: both are recorded under ``"d2ft_tp"`` so that a resume on the
same tensor-parallel size restores every rank exactly; on another size the first rank's scalars are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.nn import Module
from torch.optim import Optimizer

from lightning_d2ft.parallel.sharding import shard_index, shard_state_dict, unshard_state_dict

if TYPE_CHECKING:  # the model sits above this layer: types only
    from lightning_d2ft.model.vit import D2FTViT

__all__ = ["full_optimizer_state", "load_full_optimizer_state"]
Gather = Callable[[Any], list[Any]]  # all_gather_object over the tensor-parallel group


def _is_sharded(name: str, shape: Any, net: D2FTViT, groups: list[list[int]]) -> bool:
    return shard_index(name, shape, net.groups_per_block, groups) is not None


def full_optimizer_state(optimizer: Optimizer, module: Module, net: D2FTViT, prefix: str,
                         rank_groups: list[list[list[int]]] | None, gather: Gather) -> dict[str, Any]:
    """``optimizer``'s state keyed by parameter name, full-size; ``rank_groups``: every tensor-parallel rank's
    groups (None when the model is not sharded)."""
    names = {id(p): n for n, p in module.named_parameters()}
    sd = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    by_name = {names[id(p)]: sd["state"].get(i, {}) for i, p in enumerate(params)}
    if rank_groups is not None:
        by_name = _unshard(by_name, module, net, prefix, rank_groups, gather)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in pg["params"]]}
              for g, pg in zip(sd["param_groups"], optimizer.param_groups)]
    return {"d2ft_by_name": True, "state": by_name, "param_groups": groups}


def _unshard(by_name: dict[str, dict], module: Module, net: D2FTViT, prefix: str,
             rank_groups: list[list[list[int]]], gather: Gather) -> dict[str, dict]:
    shapes = {prefix + k: v for k, v in net.full_shapes.items()}
    local_params = dict(module.named_parameters())
    sharded = [n for n in by_name if n in shapes and _is_sharded(n, shapes[n], net, rank_groups[0])]
    payload = {n: ({k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in by_name[n].items()},
                   tuple(local_params[n].shape)) for n in sharded}
    shards = gather(payload)  # the same names on every rank: the trainable state is the same everywhere
    out = {n: dict(st) for n, st in by_name.items()}
    for n in sharded:
        has = [bool(shards[r][n][0]) for r in range(len(shards))]
        if not any(has):
            out[n] = {}
            continue
        keys = sorted({k for r, h in enumerate(has) if h for k in shards[r][n][0]})
        entry: dict[str, Any] = {}
        scalars: dict[str, list[Any]] = {}
        for key in keys:
            values = [shards[r][n][0].get(key) if has[r] else None for r in range(len(shards))]
            sample = next(v for v in values if v is not None)
            if torch.is_tensor(sample) and sample.dim() > 0:  # e.g. exp_avg: shaped like the parameter
                parts = [(rank_groups[r], {n: v if v is not None else sample.new_zeros(shards[r][n][1])})
                         for r, v in enumerate(values)]
                entry[key] = unshard_state_dict({n: shapes[n]}, net.groups_per_block, parts)[n]
            else:  # e.g. step: one per rank
                entry[key], scalars[key] = sample, values
        entry["d2ft_tp"] = {"has_state": has, "scalars": scalars}
        out[n] = entry
    return out


def load_full_optimizer_state(optimizer: Optimizer, saved: dict[str, Any], module: Module, net: D2FTViT,
                              groups: list[list[int]] | None, tp_rank: int, tp_size: int) -> None:
    """Load a state saved by :func:`full_optimizer_state` into this rank's optimizer (``groups``: this rank's
    head groups, None when not sharded)."""
    if not saved.get("d2ft_by_name"):
        optimizer.load_state_dict(saved)
        return
    names = {id(p): n for n, p in module.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, p in enumerate(params):
        name = names[id(p)]
        st = dict(saved["state"].get(name, {}))
        meta = st.pop("d2ft_tp", None)
        if groups is not None and st and _is_sharded(name, _full_shape(net, name), net, groups):
            if meta is not None and len(meta["has_state"]) == tp_size:
                if not meta["has_state"][tp_rank]:
                    continue  # this rank had no state for it: it starts fresh, as in the saved run
                st.update({k: v[tp_rank] for k, v in meta["scalars"].items()})
            st = {k: (shard_state_dict({name: v}, net.groups_per_block, groups)[name]
                      if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in st.items()}
        if st:
            state[i] = st
    index, param_groups = 0, []
    for g, pg in zip(saved["param_groups"], optimizer.param_groups):
        param_groups.append({**g, "params": list(range(index, index + len(pg["params"])))})
        index += len(pg["params"])
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _full_shape(net: D2FTViT, name: str) -> Any:
    """The full shape of a prefixed parameter name (the suffix after ``vit.`` is a key of ``full_shapes``)."""
    for key, shape in (net.full_shapes or {}).items():
        if name.endswith("vit." + key):
            return shape
    return ()

