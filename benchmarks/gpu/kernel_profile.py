"""Where a training step's time goes: torch.profiler over one step, its top kernels, and the share of
matmul / attention / norm+elementwise / optimizer.

The classification is by kernel name, first rule that matches wins (lower-cased substrings):

1. ``optimizer``: ``adam``, ``sgd`` (the fused AdamW kernel is ``..._fused_adam...`` / ``FusedAdamMathFunctor``;
   plain ``multi_tensor_apply`` kernels are not counted here: D2FT's gathers are ``_foreach_copy_``);
2. inductor's Triton kernels by their prefix: ``triton_tem`` (a matmul template) is ``matmul``;
   ``triton_poi`` / ``triton_per`` / ``triton_red`` (pointwise, persistent and plain reductions, where
   inductor fuses LayerNorm, GELU, residual adds and casts) are ``norm+elementwise``, and so is the loss
   (``log_softmax``, ``nll_loss``, ``cross_entropy``: its softmax is not attention);
3. ``attention``: ``flash``, ``fmha``, ``sdpa``, ``attention``, ``softmax``;
4. ``matmul``: ``gemm``, ``nvjet``, ``cutlass``, ``xmma``, ``matmul`` (cuBLAS/cuBLASLt kernel names), or
   ``mm`` / ``addmm`` / ``bmm`` as a word (``aten::addmm`` on CPU; not the ``mm`` in ``GammaBeta...``);
5. everything else is ``norm+elementwise``: LayerNorm, GELU, adds, casts, copies, reductions, memsets and
   memcpys (the rest).

Device time is each kernel's self device time (CUDA), summed over its calls in the step; on CPU (the smoke
rehearsal) the ``aten::`` ops' self CPU time stands in. Annotations (``Optimizer.step#...``, record
functions) are left out: they wrap kernels and would count them twice.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

_LOSS = ("log_softmax", "nll_loss", "cross_entropy")  # the loss's softmax is no attention
_MM = re.compile(r"(^|[^a-z])(add|baddb|b)?mm([^a-z]|$)")
CATEGORIES = ("matmul", "attention", "norm+elementwise", "optimizer")
_RULES = [("optimizer", ("adam", "sgd")),
          ("attention", ("flash", "fmha", "sdpa", "attention", "softmax")),
          ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul"))]


def classify(name: str) -> str:
    """The category of a kernel (or CPU op) name, by the rules in the module docstring."""
    low = name.lower()
    if any(s in low for s in _RULES[0][1]):
        return "optimizer"
    if low.startswith("triton_tem"):
        return "matmul"
    if low.startswith(("triton_poi", "triton_per", "triton_red")) or any(s in low for s in _LOSS):
        return "norm+elementwise"
    for category, subs in _RULES[1:]:
        if any(s in low for s in subs):
            return category
    return "matmul" if _MM.search(low) else "norm+elementwise"


def _kernels(prof: profile, on_cuda: bool) -> list[tuple[str, int, float]]:
    """(name, calls, self microseconds) of every device kernel (CUDA) or aten op (CPU) in the profile."""
    out = []
    for e in prof.key_averages():
        if getattr(e, "is_user_annotation", False):
            continue
        if on_cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        else:
            if not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        if us > 0:
            out.append((e.key, e.count, float(us)))
    return sorted(out, key=lambda k: -k[2])


def profile_step(step: Callable[[], None], on_cuda: bool, top: int = 15) -> dict:
    """One warm step, then one profiled step: its summed kernel time, top ``top`` kernels, category shares."""
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        step()
        if on_cuda:
            torch.cuda.synchronize()
    kernels = _kernels(prof, on_cuda)
    total = sum(us for _, _, us in kernels)
    shares = {c: 0.0 for c in CATEGORIES}
    for name, _, us in kernels:
        shares[classify(name)] += us / total if total else 0.0
    return {"kernel_ms": total / 1e3, "kernels": len(kernels), "launches": sum(n for _, n, _ in kernels),
            "shares": shares,
            "top": [{"name": n, "calls": c, "ms": us / 1e3, "share": us / total, "category": classify(n)}
                    for n, c, us in kernels[:top]]}


def print_profiles(profiles: dict[str, dict]) -> None:
    """The top kernels of each profiled case, then the category shares side by side."""
    for case, p in profiles.items():
        print(f"\nprofile of one step, {case}: {p['kernel_ms']:.2f} ms of kernels, {p['launches']} launches")
        print("| kernel | calls | ms | share | category |\n|---|---|---|---|---|")
        for k in p["top"]:
            print(f"| {k['name'][:90]} | {k['calls']} | {k['ms']:.3f} | {k['share']:.3f} | {k['category']} |")
    names = list(profiles)
    print("\n| category | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for c in CATEGORIES:
        print(f"| {c} | " + " | ".join(f"{profiles[n]['shares'][c]:.3f}" for n in names) + " |")
    print("| kernel ms | " + " | ".join(f"{profiles[n]['kernel_ms']:.2f}" for n in names) + " |")
