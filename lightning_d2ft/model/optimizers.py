"""Which optimizers keep D2FT's contract that only FULL subnets learn, checked by name.

A head group that ran no FULL micro-batch in an optimizer step has ``grad=None`` on its own Parameters
(:mod:`lightning_d2ft.model.grouped`). torch's optimizers skip such a Parameter entirely (SGD with momentum,
Adam, AdamW and the others below; fused, foreach and for-loop alike): its weights, its optimizer state
(momentum, moments, ``step``) and its weight decay stay bit-identical. That is the whole mechanism, so it
holds only for optimizers that skip a Parameter without a gradient, and while ``zero_grad`` leaves
gradients at ``None`` (its default, ``set_to_none=True``; zeros instead would be stepped like any gradient).

:func:`check_optimizer` refuses an optimizer known to move parameters without a gradient (L-BFGS flattens
every parameter's gradient, zeros for missing ones, into one update) and warns, by name, about one it does
not know (a custom or third-party ``step`` may or may not skip ``grad=None``). It also refuses torch's fused
SGD with momentum: its kernel decides "first step" from the first Parameter's momentum buffer alone, so a
Parameter whose first gradient comes after the others' (a group first FULL in a later step, as D2FT schedules
do) fails inside ``step`` (torch 2.x: ``expected Tensor as element 1 in argument 2, but got NoneType``).
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch.optim import Optimizer

__all__ = ["SKIPS_MISSING_GRADIENTS", "check_optimizer"]

#: torch optimizers whose ``step`` leaves a parameter with ``grad=None`` (and its state) untouched
SKIPS_MISSING_GRADIENTS: tuple[type[Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.Adadelta,
    torch.optim.Adamax, torch.optim.ASGD, torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop,
    torch.optim.Rprop,
)
_MOVES_EVERY_PARAMETER: dict[type[Optimizer], str] = {
    torch.optim.LBFGS: "it flattens all gradients into one update (zeros for missing ones), so every "
                       "parameter moves",
}


def _step_of(cls: type) -> object:
    return inspect.unwrap(cls.step)


def check_optimizer(optimizer: Optimizer) -> None:
    """Raise for an optimizer that would update head groups that did not run FULL; warn for one whose
    ``step`` D2FT does not know (a subclass of a known one that keeps its ``step`` is known)."""
    name = type(optimizer).__name__
    step = _step_of(type(optimizer))
    for cls, why in _MOVES_EVERY_PARAMETER.items():
        if step is _step_of(cls):
            raise ValueError(f"D2FT cannot use optimizer {name}: {why}, while only the subnets that ran FULL in "
                             "a step may change. Use one that skips parameters without a gradient: "
                             f"{', '.join(c.__name__ for c in SKIPS_MISSING_GRADIENTS)}")
    if step is _step_of(torch.optim.SGD) and any(g.get("fused") and g.get("momentum") for g in optimizer.param_groups):
        raise ValueError(f"D2FT cannot use {name}(fused=True) with momentum: torch's fused SGD kernel fails when a "
                         "parameter gets its first gradient after the others, as a subnet first run FULL in a later "
                         "step does. Use foreach=True (the default on CUDA) or fused=False")
    if any(step is _step_of(cls) for cls in SKIPS_MISSING_GRADIENTS):
        return
    warnings.warn(f"D2FT: optimizer {name} is not one D2FT knows to skip parameters whose .grad is None. Only "
                  "the subnets that ran FULL in a step must change: check that its step leaves such a parameter, "
                  "its state and its weight decay untouched (torch's SGD, Adam and AdamW do)", stacklevel=2)
