"""Training forward and backward of one ops pattern, replayed as two CUDA graphs.

Why: on a GPU a ViT-S step at batch 64 is bound by the host launching ~700 small kernels, not by the GPU
(measured on an H100: 34 ms per plain timm step, of which the kernels take ~14 ms). A D2FT schedule cuts
FLOPs but hardly cuts launches, so in eager mode its savings never turn into time. A schedule has a fixed
set of op patterns (one per micro-batch column), so each pattern is captured once and then replayed with
one launch per direction.

How (the recipe of ``torch.cuda.make_graphed_callables``, with three changes):

* all patterns share one graph memory pool and one set of static buffers (input, output gradient, one
  flat parameter-gradient buffer), so a new pattern costs graph nodes, not another copy of the activations;
  this is safe because patterns run one at a time: a forward replay is refused (the caller runs eagerly)
  while another pattern's backward is still pending;
* the parameter gradients leave the graph as one copy (``cat``) of the parameters this pattern trains, so a
  later replay never overwrites a ``.grad`` that autograd took over (gradient accumulation over several
  micro-batches is exact), and the others (head groups not FULL in it) get ``None``;
* the eager warm-up before a capture (lazy cuBLAS/cuDNN plans, index tensors) runs only when the pattern
  brings a block shape not seen before (``shape_keys``), and captures skip ``torch.cuda.graph``'s
  synchronize + ``empty_cache``, which would force fresh ``cudaMalloc`` s on every new pattern.

The forward is captured under the caller's autocast with ``cache_enabled=False`` (the graph casts the
current weights on every replay), the backward outside autocast, as Lightning's precision plugins run
them; the optimizer keeps updating the parameters in place, which the graphs read.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Hashable

import torch
from torch import Tensor, nn

__all__ = ["PatternGraphs"]


@dataclass
class _Captured:
    fwd: torch.cuda.CUDAGraph
    bwd: torch.cuda.CUDAGraph
    out: Tensor  # the forward graph's output (in the pool)
    grad_out: Tensor  # the backward graph's input: the output's gradient
    has_grad: tuple[bool, ...]  # which trainable parameters this pattern gives a gradient


class _Replay(torch.autograd.Function):
    """One autograd node: forward replays the pattern's forward graph, backward its backward graph."""

    @staticmethod
    def forward(ctx, graphs: PatternGraphs, cap: _Captured, *params: Tensor) -> Tensor:
        cap.fwd.replay()  # reads the static input, which ``run`` has filled
        ctx.graphs, ctx.cap = graphs, cap
        graphs._pending = weakref.ref(ctx)
        return cap.out.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        graphs, cap = ctx.graphs, ctx.cap
        cap.grad_out.copy_(grad)
        cap.bwd.replay()
        graphs._pending = None
        # a fresh buffer of the gradients this pattern has (autograd may keep its views as .grad): the copy
        # shrinks with the schedule, and the other parameters get None (the optimizer skips them)
        trained = [v for v, g in zip(graphs._flat_views, cap.has_grad) if g]
        if not trained:
            return (None, None) + (None,) * len(cap.has_grad)
        parts = iter(torch.cat([v.reshape(-1) for v in trained]).split([v.numel() for v in trained]))
        grads = tuple(next(parts).view(s) if g else None for s, g in zip(graphs._shapes, cap.has_grad))
        return (None, None) + grads


class PatternGraphs:
    """CUDA graphs of ``forward(x)`` + backward, one pair per pattern key, for the trainable ``params``.

    ``run`` returns the output of a replay, or None when the caller must run eagerly (another pattern's
    backward pending, more than ``max_patterns`` patterns, or the input does not fit the static buffers).
    """

    def __init__(self, max_patterns: int = 1024) -> None:
        self.max_patterns = max_patterns
        self.captures = 0  # patterns captured so far
        self.warmups = 0  # eager warm-ups run before a capture
        self.failure: str | None = None  # why capturing stopped, if it did
        self._graphs: dict[Hashable, _Captured] = {}
        self._seen_shapes: set[Hashable] = set()
        self._signature: tuple | None = None
        self._pending: Callable[[], object] | None = None
        self._pool = None
        self._stream: torch.cuda.Stream | None = None
        self._grad_out: Tensor | None = None

    def __deepcopy__(self, memo: dict) -> PatternGraphs:
        return PatternGraphs(self.max_patterns)  # graphs belong to one model's memory: a copy captures anew

    def __reduce__(self):
        return PatternGraphs, (self.max_patterns,)

    def reset(self) -> None:
        """Forget every graph and buffer (the parameters or the input shape changed)."""
        failure, limit = self.failure, self.max_patterns
        self.__init__(limit)
        self.failure = failure

    def run(self, forward: Callable[[Tensor], Tensor], key: Hashable, shape_keys: set[Hashable], x: Tensor,
            params: list[nn.Parameter]) -> Tensor | None:
        """``forward(x)`` through the graphs of ``key`` (captured on first use); None: run eagerly instead."""
        if self._pending is not None and self._pending() is not None:
            return None  # another pattern's activations are still waiting for their backward
        if any(p.dtype != params[0].dtype for p in params):
            return None  # one flat gradient buffer needs one dtype
        self._ensure_buffers(x, params)
        self._x.copy_(x)
        cap = self._graphs.get(key)
        if cap is None:
            if len(self._graphs) >= self.max_patterns:
                return None
            try:
                cap = self._capture(forward, shape_keys, params)
            except Exception as err:  # a capture-unsafe op: say so once and run eagerly from now on
                self.failure = f"{type(err).__name__}: {err}"
                self.max_patterns = 0
                warnings.warn(f"D2FT: CUDA-graph capture failed ({self.failure}); training steps run eagerly",
                              stacklevel=2)
                return None
            self._graphs[key] = cap
        return _Replay.apply(self, cap, *params)

    # -- buffers --------------------------------------------------------------------------------
    def _ensure_buffers(self, x: Tensor, params: list[nn.Parameter]) -> None:
        # the parameters' addresses too: the graphs read them there (a move or a repack re-captures)
        signature = (tuple(map(id, params)), tuple(p.data_ptr() for p in params), tuple(x.shape), x.dtype, x.device,
                     _autocast_state())
        if signature == self._signature:
            return
        self.reset()
        self._signature = signature
        self._x = torch.empty_like(x)
        self._shapes = [p.shape for p in params]
        self._numels = [p.numel() for p in params]
        self._flat = torch.empty(sum(self._numels), dtype=params[0].dtype, device=x.device)
        self._flat_views = [v.view(s) for v, s in zip(self._flat.split(self._numels), self._shapes)]
        self._stream = torch.cuda.Stream(device=x.device)

    # -- capture --------------------------------------------------------------------------------
    def _capture(self, forward: Callable[[Tensor], Tensor], shape_keys: set[Hashable],
                 params: list[nn.Parameter]) -> _Captured:
        enabled, dtype = _autocast_state()
        autocast = torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        # forward under the caller's autocast, backward outside it, as Lightning's precision plugins run them
        with torch.cuda.stream(stream):
            if not shape_keys <= self._seen_shapes:
                with autocast:
                    out = forward(self._x)  # eager warm-up: lazy plans and workspaces outside the capture
                torch.autograd.grad(out, params, torch.ones_like(out), allow_unused=True)
                del out
                self._seen_shapes |= shape_keys
                self.warmups += 1
            fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            fwd.capture_begin(self._pool, capture_error_mode="thread_local")
            try:
                with autocast:
                    out = forward(self._x)
            finally:
                fwd.capture_end()
            if self._pool is None:
                self._pool = fwd.pool()
            if self._grad_out is None or self._grad_out.shape != out.shape or self._grad_out.dtype != out.dtype:
                self._grad_out = torch.empty(out.shape, dtype=out.dtype, device=out.device)
            bwd.capture_begin(self._pool, capture_error_mode="thread_local")
            try:
                grads = torch.autograd.grad(out, params, self._grad_out, allow_unused=True)
                has = [g is not None for g in grads]
                if any(has):
                    torch._foreach_copy_([v for v, h in zip(self._flat_views, has) if h],
                                         [g for g in grads if g is not None])
            finally:
                bwd.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        self.captures += 1
        return _Captured(fwd, bwd, out.detach(), self._grad_out, tuple(has))


def _autocast_state() -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
