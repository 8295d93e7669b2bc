"""Training forward and backward of each block, replayed as CUDA graphs keyed by the shape of its work.

Why: on a GPU a ViT-S step at batch 64 is bound by the host launching ~700 small kernels, not by the GPU
(measured on an H100: 34 ms per plain timm step, of which the kernels take ~14 ms). A D2FT schedule cuts
FLOPs but hardly cuts launches, so in eager mode its savings never turn into time: the launches must go.

What is captured: one forward and one backward graph per ``(block, n_FULL, n_active)``, not per schedule row.
On real data nearly every micro-batch has its own row of ops (19 of 20 on the digits schedule), so graphs
keyed by rows would be captured once per micro-batch and rarely replayed; keyed by the block's counts they
are bounded by the model: ``depth * G (G + 1) / 2`` (ViT-S, 74 subnets: 12 x 21 = 252), whatever the data.

How one graph serves every choice of groups with the same counts:

* per block, static buffers shared by all its keys: the block input, the output gradient, one max-size
  joined buffer per grouped tensor (``qkv`` weight/bias, ``proj`` weight, ``fc1`` weight/bias, ``fc2``
  weight; G groups' rows each) and one flat gradient buffer. Key ``(nF, nA)`` reads rows ``[0, nF)`` as the
  FULL slices and ``[nF, nA)`` as the FORWARD_ONLY ones;
* before a replay one ``torch._foreach_copy_`` copies the chosen groups' Parameters into those rows (FULL
  first, each set in group order, as the eager path joins them);
* the captured forward is the fused path's math (:func:`~lightning_d2ft.model.fused_path.block_on`) on those
  rows, cast to the autocast dtype inside the graph as eager casts them, with the FULL rows as differentiable
  leaves (``n = 1``: the fused Functions return the joined weight gradients); the captured backward is one
  ``torch.autograd.grad`` to the block input, those leaves and the block's shared Parameters (norms, the
  ``proj``/``fc2`` biases, LayerScale), copied into the flat gradient buffer;
* :class:`_BlockReplay`, one autograd node per block, replays them. Its backward returns the input gradient
  (the backward graph's static output: its only reader is the block before, which copies it before anything
  replays again), the shared Parameters' gradients and each FULL group's gradient rows as views of ONE fresh
  copy of the flat buffer (autograd may keep them as ``.grad``, so accumulation over micro-batches is exact);
  the other groups get no gradient, as in eager.
* Its forward returns the forward graph's static output, not a copy: its readers are the next block (which
  copies it into its own input buffer) or eager code whose saved tensors the backward consumes before this
  block can replay again (a replay is refused while the block's backward is pending).

Memory: the graphs of one block share a memory pool (one key of a block is live at a time: a second forward
of a block before its backward runs that block eagerly), and blocks have pools of their own (all blocks'
activations are live until the backward). Stem and head run eagerly, and so does a block with no FULL group
(all SHORTCUT is the identity; FORWARD_ONLY alone records nothing).

Capture goes through a small backend: :class:`CudaBackend` (``torch.cuda.CUDAGraph`` on a side stream into the
block's pool, an eager warm-up the first time a work shape is seen, and no ``synchronize`` + ``empty_cache``
as ``torch.cuda.graph`` does, which would force fresh ``cudaMalloc`` s on every capture), and
:class:`StandInBackend` for CPU tests, whose "capture" records the function and whose "replay" runs it again
eagerly on the static buffers and copies its results into the captured outputs, so the keys, the gathers
into static rows, the gradient routing and the refusals are exercised without a GPU. A capture that fails
(a capture-unsafe op) is reported once and every block runs eagerly from then on.

The forward is captured under the caller's autocast with ``cache_enabled=False`` (the graph casts the current
weights on every replay), the backward outside autocast, as Lightning's precision plugins run them; the
optimizer keeps updating the Parameters in place, which the gathers and the graphs read.
"""

from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Hashable, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from lightning_d2ft.model.fused_path import _autocast_dtype, _cast, _Slices, block_on, block_plan, fast_path_ok
from lightning_d2ft.ops import Op

__all__ = ["BlockGraphs", "CaptureBackend", "CudaBackend", "StandInBackend", "block_keys", "graph_pool_mib"]

#: the grouped tensors a block's groups own, in the order they are gathered: (module, tensor name)
_KINDS = (("attn.qkv", "weight"), ("attn.qkv", "bias"), ("attn.proj", "weight"),
          ("mlp.fc1", "weight"), ("mlp.fc1", "bias"), ("mlp.fc2", "weight"))


def block_keys(ops: Tensor | Sequence[Sequence[int]], groups_per_block: int) -> set[tuple[int, int, int]]:
    """The graph keys ``(block, n_FULL, n_active)`` that rows of ops (``[micro_batches, subnets]``, stem first)
    capture: one per block with a FULL group. Their number is what :class:`BlockGraphs` captures."""
    rows = torch.as_tensor(ops)
    rows = rows.reshape(-1, rows.shape[-1])[:, 1:-1]
    blocks = rows.reshape(rows.shape[0], -1, groups_per_block)
    n_full = (blocks == Op.FULL).sum(-1)
    n_active = n_full + (blocks == Op.FORWARD_ONLY).sum(-1)
    keys = set()
    for row_f, row_a in zip(n_full.tolist(), n_active.tolist()):
        keys.update((l, f, a) for l, (f, a) in enumerate(zip(row_f, row_a)) if f > 0)
    return keys


# -- backends ---------------------------------------------------------------------------------------------
class CaptureBackend(Protocol):
    """How a block's forward/backward pair is captured and replayed."""

    name: str

    def supports(self, x: Tensor) -> bool:
        """Whether blocks on ``x``'s device can be captured now."""

    def new_pool(self, device: torch.device) -> Hashable:
        """A memory pool for one block's graphs."""

    def capture_pair(self, fwd: Callable[[], None], bwd: Callable[[], None], pool: Hashable, warm_up: bool,
                     device: torch.device) -> tuple[object, object]:
        """Capture ``fwd`` then ``bwd`` (``bwd`` differentiates what ``fwd`` built) into ``pool``; returns the
        two graphs (each with ``replay()``). Both write their results into static buffers they close over.
        ``warm_up``: run both eagerly once first (a work shape not seen before); ``device``: the block's."""

    def synchronize(self) -> None:
        """Wait for the device (to time a capture)."""


class CudaBackend:
    """``torch.cuda.CUDAGraph`` s on a side stream, one pool per block."""

    name = "cuda"

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def supports(self, x: Tensor) -> bool:
        return x.is_cuda and not torch.cuda.is_current_stream_capturing()

    def new_pool(self, device: torch.device) -> Hashable:
        return torch.cuda.graph_pool_handle()

    def capture_pair(self, fwd, bwd, pool, warm_up, device):
        with torch.cuda.device(device):  # the block's device, whatever the current one
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                if warm_up:  # lazy cuBLAS/cuDNN plans and workspaces, outside the capture
                    fwd()
                    bwd()
                g_fwd, g_bwd = _capture(fwd, pool), _capture(bwd, pool)
            torch.cuda.current_stream().wait_stream(stream)
        return g_fwd, g_bwd

    def synchronize(self) -> None:
        torch.cuda.synchronize()


def _capture(fn: Callable[[], None], pool: Hashable) -> torch.cuda.CUDAGraph:
    """One graph of ``fn`` into ``pool``. If ``fn`` raises, that error is the one raised (ending the invalidated
    capture raises one of its own, which would hide the cause)."""
    graph = torch.cuda.CUDAGraph()
    graph.capture_begin(pool, capture_error_mode="thread_local")
    try:
        fn()
    except BaseException:
        try:
            graph.capture_end()
        except Exception:  # the capture is invalid anyway; fn's error says why
            pass
        raise
    graph.capture_end()
    return graph


class _Rerun:
    """The stand-in's "graph": replay runs the function again."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.replay = fn


class StandInBackend:
    """For CPU tests: "capture" records the functions, "replay" runs them again eagerly on the static buffers.

    It has the CUDA graphs' semantics that the executor relies on: a replay reads only the static buffers and
    writes only static buffers, so a missing gather, a wrong row or a gradient read from the wrong place shows
    up as a wrong number on CPU. ``pools`` counts the pools asked for, ``warm_ups`` the warm-ups.
    """

    name = "stand-in"

    def __init__(self) -> None:
        self.pools = 0
        self.warm_ups = 0

    def supports(self, x: Tensor) -> bool:
        return True

    def new_pool(self, device: torch.device) -> Hashable:
        self.pools += 1
        return ("stand-in pool", self.pools)

    def capture_pair(self, fwd, bwd, pool, warm_up, device):
        if warm_up:
            self.warm_ups += 1
            fwd()
            bwd()
        fwd()
        bwd()
        built = [False]  # whether a forward "replay" built the graph the next backward consumes

        def replay_fwd() -> None:
            fwd()
            built[0] = True

        def replay_bwd() -> None:
            # a CUDA backward graph re-reads the activations in the pool, so it can replay again (retain_graph)
            # until the forward replays; here the eager graph is consumed, so rebuild it from the same buffers
            if not built[0]:
                fwd()
            bwd()
            built[0] = False

        return _Rerun(replay_fwd), _Rerun(replay_bwd)

    def synchronize(self) -> None:
        pass


# -- per-block state --------------------------------------------------------------------------------------
@dataclass
class _Key:
    """The graphs of one ``(n_FULL, n_active)`` of one block."""

    fwd: object
    bwd: object
    shared_has: tuple[bool, ...]  # which shared Parameters the backward gives a gradient
    used: int  # elements of the flat gradient buffer the backward writes (from its start)
    rows: list[torch.Size]  # the shapes of the FULL rows' joined gradients, per grouped tensor, after the shared


class _Block:
    """Static buffers, pool and graphs of one block (for one input signature)."""

    def __init__(self, blk: nn.Module, x: Tensor, signature: tuple, pool: Hashable) -> None:
        self.blk, self.signature, self.pool = blk, signature, pool
        modules = {"attn.qkv": blk.attn.qkv, "attn.proj": blk.attn.proj, "mlp.fc1": blk.mlp.fc1,
                   "mlp.fc2": blk.mlp.fc2}
        self.groups = len(blk.attn.qkv.group_ids)
        # the grouped tensors present (no qkv/fc1 bias without biases), and each one's per-group Parameters
        self.kinds = [(m, n) for m, n in _KINDS if n == "weight" or modules[m].grouped_bias]
        self.sources = [[modules[m]._parameters[f"{n}_g{g}"] for g in modules[m].group_ids] for m, n in self.kinds]
        grouped = {id(p) for ps in self.sources for p in ps}
        # the block's own Parameters (norms, proj/fc2 biases, LayerScale), by name: a capture differentiates
        # detached aliases of them (same storage), never the Parameters themselves, whose autograd nodes may
        # belong to an earlier step's graph on another stream (a capture must not wait on that stream)
        self.shared_names = [n for n, p in blk.named_parameters() if id(p) not in grouped and p.requires_grad]
        self.shared = [blk.get_parameter(n) for n in self.shared_names]
        dtype = self.sources[0][0].dtype
        self.joined = [torch.empty((len(ps) * ps[0].shape[0], *ps[0].shape[1:]), dtype=dtype, device=x.device)
                       for ps in self.sources]
        self.slots = [list(j.chunk(self.groups)) for j in self.joined]  # slot i of kind k: rows of the i-th group
        total = sum(p.numel() for p in self.shared) + sum(j.numel() for j in self.joined)
        self.flat = torch.empty(total, dtype=dtype, device=x.device)
        # shared by the block's keys: the input (zeros: a warm-up reads real numbers), the output (allocated by
        # the first capture, in the output's dtype), the output gradient (the engine casts it to the output's
        # dtype) and the input gradient. Graphs copy into them: a key's own outputs would stay allocated, and
        # with every key's held, the memory would grow with the keys (252 x 2 activations of ViT-S)
        self.x = torch.zeros_like(x).requires_grad_()
        self.out: Tensor | None = None
        self.grad_out: Tensor | None = None  # allocated beside ``out``, in its dtype
        self.grad_x = torch.empty_like(x)
        self.replays = 0  # forward replays so far: a backward checks that its activations were not overwritten
        self.keys: dict[tuple[int, int], _Key] = {}
        self.pending: Callable[[], object] | None = None  # the ctx of a replay whose backward has not run
        self._gathers: dict[tuple[int, ...], tuple[list[Tensor], list[Tensor], list[nn.Parameter]]] = {}

    def gather_lists(self, ops: tuple[int, ...]) -> tuple[list[Tensor], list[Tensor], list[nn.Parameter]]:
        """For a block's ops: (destination rows, source Parameters) of the gather, and the FULL groups'
        Parameters in the order the replay's backward returns their gradients (kind-major)."""
        got = self._gathers.get(ops)
        if got is None:
            plan = block_plan(ops)
            order = plan.full + plan.forward_only
            dst = [slots[i] for slots in self.slots for i in range(len(order))]
            src = [ps[g] for ps in self.sources for g in order]
            trained = [ps[g] for ps in self.sources for g in plan.full]
            got = self._gathers[ops] = (dst, src, trained)
        return got


class _BlockReplay(torch.autograd.Function):
    """One autograd node per block: forward replays the key's forward graph, backward its backward graph."""

    @staticmethod
    def forward(ctx, state: _Block, key: _Key, n_full: int, x: Tensor, *params: Tensor) -> Tensor:
        state.x.copy_(x)  # the groups' rows were gathered before (no_grad)
        key.fwd.replay()
        state.replays += 1
        state.pending = weakref.ref(ctx)
        ctx.state, ctx.key, ctx.n_full, ctx.replay = state, key, n_full, state.replays
        return state.out.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        state, key, n_full = ctx.state, ctx.key, ctx.n_full
        if ctx.replay != state.replays:  # retain_graph: a later forward replay overwrote these activations
            raise RuntimeError("D2FT: a second backward through a CUDA-graph replay after its block ran again; "
                               "CUDA graphs keep one set of activations per block. Use D2FTStrategy(cuda_graphs=False) "
                               "(or D2FTViT.use_cuda_graphs(False)) for backward passes with retain_graph=True")
        state.grad_out.copy_(grad)
        key.bwd.replay()
        state.pending = None
        # ONE fresh copy of the gradients this key has (autograd may keep its views as .grad)
        fresh = state.flat[: key.used].clone()
        grads: list[Tensor | None] = []
        offset = 0
        for p, has in zip(state.shared, key.shared_has):
            if has:
                grads.append(fresh[offset: offset + p.numel()].view(p.shape))
                offset += p.numel()
            else:
                grads.append(None)
        for shape in key.rows:
            numel = shape.numel()
            grads.extend(fresh[offset: offset + numel].view(shape).chunk(n_full))
            offset += numel
        return (None, None, None, state.grad_x.detach(), *grads)


# -- the executor -----------------------------------------------------------------------------------------
class BlockGraphs:
    """CUDA graphs of every block's training forward + backward, one pair per ``(block, n_FULL, n_active)``.

    :meth:`run` returns a block's output through its graphs (captured on first use), or None when the caller
    must run the block eagerly: no FULL group, a block the fused path does not model, the block's backward
    still pending, mixed parameter dtypes, or capturing failed.
    """

    def __init__(self, backend: CaptureBackend | None = None) -> None:
        self.backend: CaptureBackend = backend if backend is not None else CudaBackend()
        self.captures = 0  # (forward, backward) pairs captured so far
        self.warmups = 0  # eager warm-ups run before a capture
        self.capture_seconds = 0.0  # wall time spent capturing (warm-ups included, device synchronised)
        self.eager_runs = 0  # graphable blocks run eagerly because their backward was pending
        self.failure: str | None = None  # why capturing stopped, if it did
        self._blocks: dict[int, _Block] = {}
        self._seen_shapes: set[Hashable] = set()

    def __deepcopy__(self, memo: dict) -> BlockGraphs:
        return BlockGraphs(self.backend)  # graphs belong to one model's memory: a copy captures anew

    def __reduce__(self):
        return BlockGraphs, (self.backend,)

    def reset(self) -> None:
        """Forget every graph and buffer (the counters stay)."""
        self._blocks.clear()

    @property
    def keys(self) -> set[tuple[int, int, int]]:
        """The ``(block, n_FULL, n_active)`` captured so far."""
        return {(l, *k) for l, state in self._blocks.items() for k in state.keys}

    @property
    def pools(self) -> list[Hashable]:
        """The memory pools of the blocks' graphs (one per block captured)."""
        return [state.pool for state in self._blocks.values()]

    def supports(self, x: Tensor) -> bool:
        return self.failure is None and self.backend.supports(x)

    def summary(self) -> str:
        """One line for the end of a fit: what was captured, what it cost, what ran eagerly instead."""
        if self.failure is not None:
            return f"D2FT: CUDA-graph capture failed ({self.failure}); blocks ran eagerly"
        return (f"D2FT: {self.backend.name} graphs: {self.captures} block keys captured in "
                f"{self.capture_seconds:.2f} s ({self.warmups} eager warm-ups), {self.eager_runs} block runs eager "
                "while their backward was pending")

    def run(self, l: int, blk: nn.Module, x: Tensor, ops: tuple[int, ...]) -> Tensor | None:
        """Block ``l`` (module ``blk``) on ``x`` with its groups' ``ops`` through the graphs; None: run it eagerly."""
        plan = block_plan(ops)
        if plan.n_full == 0 or self.failure is not None or not fast_path_ok(blk):
            return None
        state = self._state(l, blk, x)
        if state is None:
            return None
        if state.pending is not None and state.pending() is not None:
            self.eager_runs += 1  # this block's activations are still waiting for their backward
            return None
        dst, src, trained = state.gather_lists(ops)
        with torch.no_grad():
            torch._foreach_copy_(dst, src)
        key = state.keys.get((plan.n_full, plan.n_active))
        if key is None:
            key = self._capture(state, plan.n_full, plan.n_active)
            if key is None:
                return None
        return _BlockReplay.apply(state, key, plan.n_full, x, *state.shared, *trained)

    # -- buffers --------------------------------------------------------------------------------------------
    def _state(self, l: int, blk: nn.Module, x: Tensor) -> _Block | None:
        state = self._blocks.get(l)
        params = list(blk.parameters())
        # the Parameters' addresses too: the gathers and graphs read them there (a move or a repack re-captures)
        signature = (id(blk), tuple(p.data_ptr() for p in params), tuple(x.shape), x.dtype, x.device,
                     _autocast_dtype(x))
        if state is not None and state.signature == signature:
            return state
        if any(p.dtype != params[0].dtype or p.device != x.device for p in params):
            return None  # one flat gradient buffer needs one dtype
        state = self._blocks[l] = _Block(blk, x, signature, self.backend.new_pool(x.device))
        return state

    # -- capture --------------------------------------------------------------------------------------------
    def _capture(self, state: _Block, n_full: int, n_active: int) -> _Key | None:
        blk, dtype = state.blk, state.signature[-1]
        full_rows = [j[: n_full * j.shape[0] // state.groups] for j in state.joined]
        rest_rows = [j[n_full * j.shape[0] // state.groups: n_active * j.shape[0] // state.groups]
                     for j in state.joined]
        leaves = [r.detach().requires_grad_() for r in full_rows]  # the FULL rows, differentiable (n = 1)
        aliases = {n: p.detach().requires_grad_() for n, p in zip(state.shared_names, state.shared)}
        by_kind = dict(zip(state.kinds, leaves))
        attn_params = [t for k, t in by_kind.items() if k[0] in ("attn.qkv", "attn.proj")]
        mlp_params = [t for k, t in by_kind.items() if k[0] in ("mlp.fc1", "mlp.fc2")]
        device_type = state.x.device.type
        live: dict[str, Tensor] = {}

        def slices(rows: list[Tensor]) -> _Slices:
            named = dict(zip(state.kinds, rows))
            return _Slices(*(_cast(named[k].detach(), dtype) if k in named else None for k in _KINDS))

        def fwd() -> None:
            autocast = torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None,
                                      cache_enabled=False)
            with torch.enable_grad(), autocast:
                with torch.no_grad():
                    full = slices(full_rows)
                    rest = slices(rest_rows) if n_active > n_full else None
                with _reparametrize_module(blk, aliases):
                    out = block_on(blk, state.x, full, rest, n_full, n_active - n_full, attn_params, mlp_params, 1)
            live["out"] = out  # what the backward differentiates (on CUDA: the one built at capture)
            with torch.no_grad():
                if state.out is None:  # the first run of the block's first key (one buffer per block)
                    state.out, state.grad_out = torch.empty_like(out), torch.empty_like(out)
                state.out.copy_(out)

        layout: list[tuple[bool, ...] | list[Tensor]] = []  # [which shared Parameters get a gradient, flat views]

        def bwd() -> None:
            with torch.autocast(device_type, enabled=False):
                grads = torch.autograd.grad(live["out"], [state.x, *leaves, *aliases.values()], state.grad_out,
                                            allow_unused=True)
            # into the flat buffer: the shared Parameters' gradients there are, then the FULL rows' (joined)
            kept = [g for g in grads[1 + len(leaves):] if g is not None] + list(grads[1: 1 + len(leaves)])
            if not layout:  # the first run (warm-up or capture) lays the buffer out
                views = list(state.flat[: sum(g.numel() for g in kept)].split([g.numel() for g in kept]))
                layout.extend([tuple(g is not None for g in grads[1 + len(leaves):]),
                               [v.view(g.shape) for v, g in zip(views, kept)]])
            with torch.no_grad():
                torch._foreach_copy_([state.grad_x, *layout[1]], [grads[0], *kept])

        shape_key = (n_full, n_active, tuple(state.x.shape), state.x.dtype, dtype, tuple(state.kinds))
        warm_up = shape_key not in self._seen_shapes
        self.backend.synchronize()
        start = time.perf_counter()
        try:
            g_fwd, g_bwd = self.backend.capture_pair(fwd, bwd, state.pool, warm_up, state.x.device)
        except Exception as err:  # a capture-unsafe op: say so once and run eagerly from now on
            self.failure = f"{type(err).__name__}: {err}"
            warnings.warn(f"D2FT: CUDA-graph capture failed ({self.failure}); training steps run eagerly",
                          stacklevel=3)
            self.reset()
            return None
        self.backend.synchronize()
        self.capture_seconds += time.perf_counter() - start
        self._seen_shapes.add(shape_key)
        self.warmups += warm_up
        self.captures += 1
        shared_has, views = layout
        rows = views[len(views) - len(leaves):]
        key = state.keys[(n_full, n_active)] = _Key(g_fwd, g_bwd, shared_has,
                                                    sum(v.numel() for v in views), [v.shape for v in rows])
        return key


def graph_pool_mib(graphs: BlockGraphs | None) -> tuple[float, float]:
    """(MiB of the blocks' CUDA-graph pools, MiB of them not held by live tensors), from the allocator's
    snapshot (CUDA only; zeros otherwise)."""
    if graphs is None or not torch.cuda.is_available():
        return 0.0, 0.0
    pools = {tuple(p) for p in graphs.pools if isinstance(p, tuple) and p and p[0] != "stand-in pool"}
    segments = [s for s in torch.cuda.memory_snapshot() if tuple(s.get("segment_pool_id", ())) in pools]
    total = sum(s["total_size"] for s in segments)
    return total / 2**20, (total - sum(s["allocated_size"] for s in segments)) / 2**20
