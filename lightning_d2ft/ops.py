"""The three D2FT operations and what each one costs.

Every (micro-batch, subnet) pair gets one `Op`. The values are ordered by work, so `op > SHORTCUT`
means "the subnet runs forward" and `op == FULL` means "it also runs backward".
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Op(IntEnum):
    """What one subnet does for one micro-batch."""

    SHORTCUT = 0  #: not computed; the residual stream carries the tokens past it
    FORWARD_ONLY = 1  #: forward under ``no_grad``: changes the output, gets no gradient
    FULL = 2  #: forward and backward, like ordinary fine-tuning


@dataclass(frozen=True)
class CostModel:
    """Relative compute and communication cost of each op for one subnet (FULL = 1).

    The compute default for FORWARD_ONLY is the paper's 0.4. In FLOPs it is exactly 1/3 (forward is one
    third of forward + backward); use :meth:`flops` when comparing against a FLOP counter. Communication
    counts the partial sums a tensor-parallel rank sends: FULL sends the forward partial sum and the
    backward input gradient, FORWARD_ONLY only the forward partial sum.
    """

    full: float = 1.0
    forward_only: float = 0.4
    comm_full: float = 1.0
    comm_forward_only: float = 0.5

    def __post_init__(self) -> None:
        if not (0.0 < self.forward_only <= self.full):
            raise ValueError(f"CostModel.forward_only must be in (0, full={self.full}], got {self.forward_only}")
        if not (0.0 <= self.comm_forward_only <= self.comm_full) or self.comm_full <= 0:
            raise ValueError(
                f"CostModel communication costs need 0 <= comm_forward_only <= comm_full and comm_full > 0, "
                f"got comm_forward_only={self.comm_forward_only}, comm_full={self.comm_full}"
            )

    @classmethod
    def flops(cls) -> CostModel:
        """The FLOP-exact model: a forward pass is one third of forward + backward."""
        return cls(forward_only=1.0 / 3.0)

    def compute(self, ops: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Compute units of every entry of ``ops`` (same shape, float64)."""
        table = torch.tensor([0.0, self.forward_only, self.full], dtype=torch.float64)
        return table[torch.as_tensor(ops, dtype=torch.long)]

    def comm(self, ops: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Communication units of every entry of ``ops`` (same shape, float64)."""
        table = torch.tensor([0.0, self.comm_forward_only, self.comm_full], dtype=torch.float64)
        return table[torch.as_tensor(ops, dtype=torch.long)]


class _AtenOpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched (views and detaches are metadata, not launches: not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in ("detach", "alias", "_unsafe_view"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_aten_ops(fn: Callable[[], object]) -> int:
    """Aten ops one call of ``fn`` dispatches: a deterministic proxy for kernel launches (a CPU-side count of
    what a GPU would launch one kernel or more for), so op-count targets can be tested without a GPU."""
    with _AtenOpCounter() as counter:
        fn()
    return counter.count
