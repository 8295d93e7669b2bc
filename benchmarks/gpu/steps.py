"""The bare training-step table: plain timm eagerly, under ``torch.compile(mode="reduce-overhead")`` and under
``torch.compile`` (default), against D2FT with its per-block CUDA graphs at budget 1.0 and 0.6.

Why a bare loop beside the Lightning fits: it isolates the step (no loop, hooks or logging) and it is where
plain timm's best compile mode is found, which the fits and the targets then use (``plain timm (best)``).

One step is ``zero_grad``, forward under bf16 autocast (CUDA; fp32 in the CPU smoke), cross-entropy,
backward, fused AdamW ``step`` on the same real Fashion-MNIST batch (uint8 28 px, resized in the stem as in
the fits). ``torch.compile`` wraps the model, not the optimizer (fused AdamW is one kernel already); for
``reduce-overhead`` each step starts with ``torch.compiler.cudagraph_mark_step_begin()``. A case whose
compile or warm-up raises becomes a row with ``error`` and is left out of the timing. D2FT rows replay the
per-block graphs (``D2FTViT.use_cuda_graphs``; the CPU smoke uses the stand-in backend); ``budget 0.6``
cycles through the columns of a ``Schedule.solve(..., budget=0.6, solver="dp")`` on random scores (8
micro-batches; the fits use real scores), ``budget 1.0`` is every group FULL.

Timing: every case gets its own copy of the same initial weights and its own optimizer, and warm-up steps
(``compile_seconds``: their wall time for a compiled case, compile and graph recording included; D2FT's
captures are in ``capture_seconds``). Then ``rounds`` rounds of one synchronised step of each case,
interleaved; this pass runs once the eager and D2FT cases are warm and again after each compile mode, and
the table is saved after each pass (a compile that hangs past the step's timeout keeps the earlier table;
the last pass has every case). ``step_ms`` is the median; ``step_ratio`` the median over rounds of the
case's step over the fastest plain mode's step in the same round. ``peak_mib``: ``max_memory_allocated``
over one step after a reset, plus the free part of the D2FT graph pools (``graph_pool_mib`` is the whole
pools); what a ``reduce-overhead`` replay uses inside its own pool is not seen by the allocator's counters.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/gpu: real_data, results
import real_data
from results import PLAIN_BEST, row

from lightning_d2ft.model.cuda_graphs import BlockGraphs, StandInBackend, graph_pool_mib
from lightning_d2ft.model.vit import D2FTViT
from lightning_d2ft.ops import Op
from lightning_d2ft.schedule.schedule import Schedule

PLAIN_MODES = ("eager", "reduce-overhead", "default")


@dataclass
class Case:
    """One row of the table: how to run a step, and what was measured."""

    name: str
    mode: str
    step: Callable[[], None] | None = None
    graphs: BlockGraphs | None = None
    compile_seconds: float | None = None
    error: str | None = None
    times: list[float] = field(default_factory=list)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def new_vit(model: str, img_size: int, device: torch.device, depth: int | None = None) -> nn.Module:
    """timm's model (random init: no hub on the device), taking the raw uint8 batch; ``depth``: the smoke's."""
    torch.manual_seed(0)
    vit = timm.create_model(model, pretrained=False, num_classes=10, img_size=img_size,
                            **({"depth": depth} if depth else {}))
    real_data.resize_on_input(vit, img_size)
    return vit.to(device).train()


def amp_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (as Lightning's bf16-mixed), nothing on CPU (the smoke's 32-true)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def compiled(model: nn.Module, mode: str, smoke: bool) -> nn.Module:
    """``torch.compile`` in ``mode``; in the CPU smoke dynamo with ``backend="eager"`` (no inductor there)."""
    if mode == "eager":
        return model
    return torch.compile(model, backend="eager") if smoke else torch.compile(model, mode=mode)


def make_step(fn: Callable[[Tensor], Tensor], opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
              device: torch.device, mark: bool = False) -> Callable[[], None]:
    """One training step of ``fn`` on (x, y)."""
    def step() -> None:
        if mark:
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with amp_for(device):
            loss = F.cross_entropy(fn(x), y)
        loss.backward()
        opt.step()
    return step


def warm(case: Case, steps: int) -> None:
    """Run ``steps`` untimed steps (compile, recording, captures); an exception becomes the case's error."""
    sync()
    start = time.perf_counter()
    try:
        for _ in range(steps):
            case.step()
        sync()
    except Exception as err:  # a compile or capture failure is a result, not a crash of the session
        failed(case, err)
        return
    case.compile_seconds = time.perf_counter() - start


def failed(case: Case, err: Exception) -> None:
    """Record why ``case`` cannot run (and leave it out of the timing)."""
    case.error, case.step = f"{type(err).__name__}: {str(err)[:300]}", None
    print(f"  {case.name}: FAILED {case.error}", flush=True)


def plain_case(vit: nn.Module, mode: str, x: Tensor, y: Tensor, smoke: bool) -> Case:
    """Plain timm on its own copy of the weights, in ``mode``."""
    model = copy.deepcopy(vit)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    case = Case(f"plain timm ({mode})" if mode == "eager" else f"plain timm (compile {mode})", mode)
    try:
        fn = compiled(model, mode, smoke)
    except Exception as err:
        failed(case, err)
        return case
    case.step = make_step(fn, opt, x, y, x.device, mark=mode == "reduce-overhead" and not smoke)
    warm(case, 3)
    return case


def d2ft_columns(net: D2FTViT, budget: float, micro_batches: int = 8) -> list[Tensor]:
    """The ops columns of a budget: all FULL at 1.0, else a dp schedule on random scores."""
    if budget >= 1.0:
        return [torch.full((net.num_subnets,), int(Op.FULL))]
    scores = torch.rand(2, micro_batches, net.num_subnets, generator=torch.Generator().manual_seed(0))
    return list(Schedule.solve(scores[0], scores[1], budget=budget, devices=1, solver="dp").ops)


def d2ft_case(vit: nn.Module, budget: float, subnets: int, x: Tensor, y: Tensor) -> Case:
    """D2FT at ``budget`` with per-block CUDA graphs (the stand-in backend on CPU)."""
    net = D2FTViT(copy.deepcopy(vit), subnets=subnets).train()
    net.use_cuda_graphs(True, backend=None if x.is_cuda else StandInBackend())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    columns = d2ft_columns(net, budget)
    turn = itertools.cycle(columns)
    mode = "cuda graphs per block" if x.is_cuda else "stand-in graphs (CPU)"
    case = Case(f"budget {budget}", mode, graphs=net.graphs)
    case.step = make_step(lambda inp: net(inp, next(turn)), opt, x, y, x.device)
    warm(case, max(3, len(columns)))  # every column once: all its keys captured before timing
    return case


def time_rounds(cases: list[Case], rounds: int) -> None:
    """``rounds`` rounds of one synchronised step of each working case."""
    for _ in range(rounds):
        for case in cases:
            if case.step is None:
                continue
            sync()
            start = time.perf_counter()
            try:
                case.step()
                sync()
            except Exception as err:  # a replay that fails late: that case's row says so
                failed(case, err)
                case.times = []
                continue
            case.times.append(time.perf_counter() - start)


def peak_mib(case: Case) -> tuple[float | None, float | None]:
    """(peak MiB of one step incl. the free part of the D2FT graph pools, whole pools MiB); CUDA only."""
    if not torch.cuda.is_available() or case.step is None:
        return None, None
    torch.cuda.reset_peak_memory_stats()
    case.step()
    sync()
    pool, free = graph_pool_mib(case.graphs)
    return torch.cuda.max_memory_allocated() / 2**20 + free, pool if case.graphs is not None else None


def rows_of(cases: list[Case], model: str, batch: int, img_size: int) -> list[dict]:
    """The table's rows, and a ``plain timm (best)`` row repeating the fastest plain mode's figures."""
    best = best_case(cases)
    rows = [case_row(case, best, model, batch, img_size) for case in cases]
    if best is not None:
        rows.append(dict(rows[cases.index(best)], case=PLAIN_BEST))
    return rows


def case_row(case: Case, best: Case | None, model: str, batch: int, img_size: int) -> dict:
    """One case's row; its ratio is paired per round against ``best``."""
    peak, pool = peak_mib(case)
    ratio = statistics.median(a / b for a, b in zip(case.times, best.times)) if case.times and best else None
    graphs = case.graphs
    return row(level="step", case=case.name, model=model, batch=batch, img_size=img_size, mode=case.mode,
               step_ms=1e3 * statistics.median(case.times) if case.times else None, step_ratio=ratio,
               captures=graphs.captures if graphs is not None else None,
               capture_seconds=graphs.capture_seconds if graphs is not None else None,
               compile_seconds=case.compile_seconds if graphs is None and case.mode != "eager" else None,
               peak_mib=peak,
               graph_pool_mib=pool, steps=len(case.times),
               error=case.error or (graphs.failure if graphs is not None else None))


def inputs(model: str, batch: int, img_size: int, device: torch.device,
           depth: int | None = None) -> tuple[nn.Module, Tensor, Tensor]:
    """The initial model and one real batch (the first ``batch`` training images), on ``device``."""
    images, labels = real_data.load("train", batch)
    return new_vit(model, img_size, device, depth), images.to(device), labels.to(device)


def base_cases(vit: nn.Module, x: Tensor, y: Tensor, subnets: int, smoke: bool) -> list[Case]:
    """Plain eager, D2FT 1.0 and 0.6, warmed up (the compile modes come after: a compile that hangs or
    crashes leaves these rows saved)."""
    cases = [plain_case(vit, "eager", x, y, smoke)]
    for budget in (1.0, 0.6):
        cases.append(d2ft_case(vit, budget, subnets, x, y))
        print(f"  {cases[-1].name}: warm-up {cases[-1].compile_seconds:.1f} s, captures "
              f"{cases[-1].graphs.captures}", flush=True)
    return cases


def retime(cases: list[Case], rounds: int) -> None:
    """Forget earlier times and time every working case again, interleaved (each table is one pass)."""
    for case in cases:
        case.times = []
    time_rounds(cases, rounds)


def best_case(cases: list[Case]) -> Case | None:
    """The fastest timed plain timm case."""
    plain = [c for c in cases if c.times and c.name.startswith("plain timm")]
    return min(plain, key=lambda c: statistics.median(c.times)) if plain else None
