"""``Schedule.plot``: the ops heatmap, each device's load per step, and each device's epoch time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_d2ft.ops import Op

if TYPE_CHECKING:
    from lightning_d2ft.schedule.schedule import Schedule


def plot_schedule(schedule: Schedule, path: str | os.PathLike) -> Path:
    """Three panels with integer ticks and legends outside the data: ops (subnets x micro-batches), time per
    device per step (lockstep ranks wait for the slowest line), and time per device over the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator

    m = schedule.metrics()
    fig, (ax, steps, bars) = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [4, 3, 1]})
    cmap = ListedColormap(["#f0f0f0", "#7fb3d5", "#1f4e79"])
    ax.imshow(schedule.ops.T.numpy(), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=2)
    wire = f", wire {m['wire_fraction']:.2f}" if "wire_fraction" in m else ""
    never = schedule.never_full_columns.tolist()
    ax.set(xlabel="micro-batch", ylabel="subnet",
           title=f"{schedule.method}: compute {m['compute_fraction']:.2f}{wire}, {len(never)} subnets never FULL, "
                 f"{m['distinct_full_sets']} FULL set(s)")
    ax.title.set_fontsize(9)
    n_mb = schedule.num_micro_batches
    # never-FULL subnets: a red mark at the left edge of their row (they are never trained)
    ax.scatter([-0.5 - 0.01 * n_mb] * len(never), never, marker=">", s=12, color="#d62728", clip_on=False)
    ax.set_xlim(-0.5, n_mb - 0.5)
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(3)]
    handles.append(plt.Line2D([], [], marker=">", ls="", color="#d62728"))
    ax.legend(handles, [o.name for o in Op] + ["never FULL"], loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncol=4, fontsize=7)
    times = (schedule.step_loads / schedule.speeds).numpy()
    for d in range(times.shape[1]):
        steps.plot(range(times.shape[0]), times[:, d], drawstyle="steps-mid", lw=1, label=f"device {d}")
    steps.set(xlabel="micro-batch", ylabel="time (FULL subnet units)",
              title=f"per step: max/mean {m['step_max_over_mean']:.3f} (worst {m['step_max_over_mean_worst']:.2f}),"
                    f" lockstep {m['lockstep_fraction']:.2f}")
    steps.title.set_fontsize(9)
    steps.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(4, times.shape[1]), fontsize=7)
    loads = schedule.device_times.numpy()
    bars.bar(range(len(loads)), loads, color="#1f4e79")
    bars.set_xlabel("device")
    bars.set_title(f"epoch time per device\n(var {m['workload_variance']:.3f})", fontsize=9)
    for a in (ax, steps, bars):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
