"""Time, optimizer step, FLOPs, aten ops and memory of one training step of a ViT-S/16 under each op mix, vs
plain timm.

    PYTHONPATH=. python benchmarks/speed/ops_cost.py                                # CPU, batch 8, 224 px
    PYTHONPATH=. python benchmarks/speed/ops_cost.py --device cuda --amp bf16       # GPU, batch 64, 224 px

Cases: ``plain timm``, ``all FULL``, ``all FORWARD_ONLY``, ``half SHORTCUT`` and ``budget 0.6`` (every
micro-batch of a ``Schedule.solve(..., budget=0.6, devices=1, solver="dp")`` on random scores, 74 subnets; its
time is the mean over those columns). On CUDA these D2FT rows replay CUDA graphs (one pair per block and
FULL/active group counts, ``D2FTViT.use_cuda_graphs``), and ``... (eager)`` rows run the same mixes without
graphs; ``plain timm`` is always timm's eager step, on a plain timm copy of the same weights with its own
optimizer (``all FULL`` with graphs is every block's FULL groups replayed as graphs, so it says how much of a
ratio comes from the graphs alone). A step is forward, backward and a fused AdamW step over the model's
parameters (D2FT: one Parameter per head group, so the step only touches the groups that ran FULL, see
``lightning_d2ft.model.grouped``). The cases are timed interleaved (one step of each case per round);
``seconds`` is the median over ``--steps`` rounds and ``time_ratio`` the median over rounds of the case's time
in that round over plain timm's in the same round (paired, so the drift of a shared machine between rounds
cancels); ``optimizer_seconds`` is the ``optimizer.step()`` alone (median), ``optimizer_ratio`` its paired
median ratio to the ``all FULL`` step's in the same round. Memory: ``saved_mib``, the bytes autograd saves for
backward in one training forward (``saved_tensors_hooks``, every packed tensor summed; eager path, mean over a
case's columns), and on CUDA ``peak_mib``, ``torch.cuda.max_memory_allocated`` over one step after a reset,
plus, for graphed rows, the free part of the CUDA-graph pool (the memory a replay reuses for its
intermediates, which the allocator counts as reserved, not allocated; ``graph_pool_mib`` is the whole of the
pools, one per block, shared by the block's keys). Aten ops are counted per forward+backward
(TorchDispatchMode, views and detaches not counted) after a warm-up step. Writes
``benchmarks/results/speed/ops_cost.json`` (CPU) or ``benchmarks/results/gpu/ops_cost_cuda.json`` (CUDA)
unless ``--out`` says otherwise; without CUDA ``--device cuda`` runs on CPU and says so.

Needs only torch, timm and this package (no hydra, no ortools). Targets (issues 14 and 25), as ratios to
plain timm: GPU: all FULL <= 1.05, budget 0.6 <= 0.70, half SHORTCUT <= 0.60, all FORWARD_ONLY <= 0.45;
CPU: budget 0.6 <= 0.60; aten ops all FULL <= 1.1, budget 0.6 <= 1.3; the optimizer step at budget 0.6
<= 0.70x the all-FULL one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/_common.py
from _common import print_table, write_json

from lightning_d2ft.model.cuda_graphs import BlockGraphs, graph_pool_mib
from lightning_d2ft.model.vit import D2FTViT
from lightning_d2ft.ops import Op, count_aten_ops
from lightning_d2ft.schedule.schedule import Schedule

TARGETS = {
    "cuda": {"all FULL": 1.05, "budget 0.6": 0.70, "half SHORTCUT": 0.60, "all FORWARD_ONLY": 0.45},
    "cpu": {"budget 0.6": 0.60},
}
OP_TARGETS = {"all FULL": 1.1, "budget 0.6": 1.3}
OPTIMIZER_TARGETS = {"budget 0.6": 0.70}  # optimizer step vs the all-FULL one


def op_mixes(net: D2FTViT, micro_batches: int) -> dict[str, list[torch.Tensor | None]]:
    """Each case's ops vectors (``None``: plain timm)."""
    n, G = net.num_subnets, net.groups_per_block
    full = torch.full((n,), int(Op.FULL))
    forward_only = full.clone()
    forward_only[1:-1] = Op.FORWARD_ONLY
    half_shortcut = full.clone()
    for l in range(net.depth):  # half of every block's head groups skipped
        half_shortcut[net.subnet_index(l, 0): net.subnet_index(l, G // 2)] = Op.SHORTCUT
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(2, micro_batches, n, generator=gen)
    schedule = Schedule.solve(scores[0], scores[1], budget=0.6, devices=1, solver="dp")
    return {"plain timm": [None], "all FULL": [full], "all FORWARD_ONLY": [forward_only],
            "half SHORTCUT": [half_shortcut], "budget 0.6": list(schedule.ops)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none")
    parser.add_argument("--batch", type=int, default=None, help="default 64 on CUDA, 8 on CPU")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (one step of every case per round)")
    parser.add_argument("--subnets", type=int, default=74)
    parser.add_argument("--micro-batches", type=int, default=8, help="columns of the budget-0.6 schedule")
    parser.add_argument("--out", default=None, help="JSON file name under benchmarks/results/")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top ops of one step of plain timm and of budget 0.6")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    note = ""
    if args.device == "cuda" and not torch.cuda.is_available():
        note = "CUDA requested but not available: ran on CPU"
        print(f"NOTE: {note}", flush=True)
    device = torch.device("cuda" if args.device == "cuda" and not note else "cpu")
    batch = args.batch or (64 if device.type == "cuda" else 8)
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=args.img_size, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                            num_classes=100).to(device)
    plain = copy.deepcopy(vit)  # plain timm: the same weights, nn.Linear layers, its own optimizer
    net = D2FTViT(vit, subnets=args.subnets)  # cuts vit's blocks into one Parameter per head group
    # fused, as ViTClassifier builds it (one kernel over all weights: on CPU ~5x faster than the per-tensor loop)
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-4, fused=True)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    target = torch.randint(0, 100, (batch,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()

    graphs = BlockGraphs() if device.type == "cuda" else None

    def fwd_bwd(ops, graphed: bool = False) -> None:
        net.graphs = graphs if graphed else None
        (opt if ops is not None else opt_plain).zero_grad(set_to_none=True)
        with amp:
            y = plain(x) if ops is None else net(x, ops)
            loss = torch.nn.functional.cross_entropy(y.float(), target)
        loss.backward()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(ops, graphed: bool = False) -> tuple[float, float, float]:
        """(seconds until the host has queued the step, seconds until the device has finished it, seconds of
        the optimizer step alone)."""
        sync()
        start = time.perf_counter()
        fwd_bwd(ops, graphed)
        sync()
        before_step = time.perf_counter()
        (opt if ops is not None else opt_plain).step()
        queued = time.perf_counter() - start
        sync()
        end = time.perf_counter()
        return queued, end - start, end - before_step

    def saved_mib(ops) -> float:
        """MiB autograd saves for backward in one eager training forward of ``ops``."""
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        net.graphs = None
        with amp, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = plain(x) if ops is None else net(x, ops)
        del y
        return total / 2**20

    mixes = op_mixes(net, args.micro_batches)
    cases = {name: (columns, False) for name, columns in mixes.items()}
    if graphs is not None:  # CUDA: the D2FT rows replay CUDA graphs (the default); eager rows beside them
        cases = {"plain timm": (mixes["plain timm"], False)}
        cases.update({name: (columns, True) for name, columns in mixes.items() if name != "plain timm"})
        cases.update({f"{name} (eager)": (columns, False) for name, columns in mixes.items() if name != "plain timm"})
    rows = measure(cases, step, fwd_bwd, saved_mib, lambda: graph_pool_mib(graphs), device, args.steps)
    if graphs is not None:
        print(f"CUDA graphs: {graphs.captures} block keys captured in {graphs.capture_seconds:.2f} s, "
              f"{graphs.warmups} eager warm-ups, failure: {graphs.failure}", flush=True)
    if args.profile:
        profile(cases, step, device)
    finish(args, rows, device, batch, note, net)


def measure(cases, step, fwd_bwd, saved_mib, graph_pool, device, steps) -> list[dict]:
    """Interleaved timing (median per column, mean over a case's columns), optimizer step, op counts, FLOPs,
    memory."""
    times = {name: [[] for _ in columns] for name, (columns, _) in cases.items()}
    queued = {name: [[] for _ in columns] for name, (columns, _) in cases.items()}
    stepping = {name: [[] for _ in columns] for name, (columns, _) in cases.items()}
    for _ in range(2):  # warm-up: allocator, cached index plans, lazy init, graph captures
        for columns, graphed in cases.values():
            for ops in columns:
                step(ops, graphed)
    for _ in range(steps):
        for name, (columns, graphed) in cases.items():
            for i, ops in enumerate(columns):
                host, total, optimizer = step(ops, graphed)
                queued[name][i].append(host)
                times[name][i].append(total)
                stepping[name][i].append(optimizer)
    rows = []
    for name, (columns, graphed) in cases.items():
        peak = pool = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step(columns[0], graphed)
            peak = torch.cuda.max_memory_allocated() / 2**20
            if graphed:
                pool, pool_free = graph_pool()
                peak += pool_free
        # aten ops and FLOPs of the eager execution (a graph replay dispatches almost nothing)
        ops_count = statistics.mean(count_aten_ops(lambda ops=ops: fwd_bwd(ops)) for ops in columns)
        with FlopCounterMode(display=False) as counter:
            fwd_bwd(columns[0])
        saved = statistics.mean(saved_mib(ops) for ops in columns)
        rows.append({"case": name, "seconds": statistics.mean(statistics.median(t) for t in times[name]),
                     "host_seconds": statistics.mean(statistics.median(t) for t in queued[name]),
                     "optimizer_seconds": statistics.mean(statistics.median(t) for t in stepping[name]),
                     "gflops": counter.get_total_flops() / 1e9, "aten_ops": ops_count, "saved_mib": saved,
                     "peak_mib": peak, "graph_pool_mib": pool, "columns": len(columns), "cuda_graphs": graphed})
        print(f"  {name}: {rows[-1]['seconds']:.4f} s, optimizer {rows[-1]['optimizer_seconds'] * 1e3:.1f} ms, "
              f"{ops_count:.0f} aten ops, {saved:.1f} MiB saved for backward", flush=True)
    base = rows[0]
    plain = times[base["case"]][0]
    full = next(name for name in cases if name == "all FULL")
    full_step = [statistics.mean(c[r] for c in stepping[full]) for r in range(len(plain))]
    full_saved = next(row["saved_mib"] for row in rows if row["case"] == full)
    for row in rows:
        # paired: each round's time over that round's plain timm step, median over rounds (a shared or
        # throttled machine drifts between rounds far more than within one)
        columns = times[row["case"]]
        per_round = [statistics.mean(c[r] for c in columns) / plain[r] for r in range(len(plain))]
        row["time_ratio"] = statistics.median(per_round)
        row["time_ratio_rounds"] = per_round
        optimizer_rounds = [statistics.mean(c[r] for c in stepping[row["case"]]) / full_step[r]
                            for r in range(len(plain))]
        row["optimizer_ratio"] = statistics.median(optimizer_rounds)  # vs the all-FULL step, paired
        row["optimizer_ratio_rounds"] = optimizer_rounds
        row["saved_ratio"] = row["saved_mib"] / full_saved  # vs all FULL
        row["flop_ratio"] = row["gflops"] / base["gflops"]  # budget 0.6: its first column
        row["ops_ratio"] = row["aten_ops"] / base["aten_ops"]
    return rows


def profile(cases, step, device, top: int = 12) -> None:
    """torch.profiler over one step of plain timm and of the first budget-0.6 column: the top ops by device
    (or CPU) self time and the step's summed kernel time, to tell launch-bound from compute-bound steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name in ("plain timm", "budget 0.6"):
        columns, graphed = cases[name]
        step(columns[0], graphed)
        with torch_profile(activities=activities) as prof:
            step(columns[0], graphed)
        events = prof.key_averages()
        kernel_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
        print(f"\nprofile of one step, {name}: summed device self time {kernel_us / 1e3:.2f} ms", flush=True)
        print(events.table(sort_by=sort, row_limit=top, max_name_column_width=48), flush=True)


def finish(args, rows, device, batch, note, net) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nViT-S/16 training step on {name}, batch {batch}, {args.img_size}px, amp {args.amp}, "
          f"{net.num_subnets} subnets, median of {args.steps} interleaved rounds, torch {torch.__version__}")
    print_table(rows, ["case", "seconds", "time_ratio", "optimizer_seconds", "optimizer_ratio", "saved_mib",
                       "saved_ratio", "peak_mib", "graph_pool_mib", "aten_ops", "ops_ratio", "flop_ratio"])
    by_case = {row["case"]: row for row in rows}
    targets = {f"time {case} <= {limit}": by_case[case]["time_ratio"] <= limit
               for case, limit in TARGETS[device.type].items()}
    targets.update({f"aten ops {case} <= {limit}": by_case[case]["ops_ratio"] <= limit
                    for case, limit in OP_TARGETS.items()})
    targets.update({f"optimizer step {case} <= {limit} x all FULL": by_case[case]["optimizer_ratio"] <= limit
                    for case, limit in OPTIMIZER_TARGETS.items()})
    print("targets:", targets)
    out = args.out or ("gpu/ops_cost_cuda.json" if device.type == "cuda" else "speed/ops_cost.json")
    path = write_json(out, {"device": name, "torch": torch.__version__, "note": note, "args": vars(args),
                            "optimizer": "AdamW(fused=True)", "load_average": _load_average(),
                            "memory": "saved_mib: bytes saved for backward in one eager training forward "
                                      "(saved_tensors_hooks, summed); peak_mib: torch.cuda.max_memory_allocated "
                                      "over one step after a reset, plus the free part of the CUDA-graph pool "
                                      "for graphed rows (CUDA only); graph_pool_mib: the whole pool",
                            "batch": batch, "rows": rows, "targets_met": targets})
    print(f"wrote {path}")


def _load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages when the run ended (None where unknown)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


if __name__ == "__main__":
    main()
