"""Schedule: settings and errors of solve, per-step and per-epoch balance, coverage, files, the plot, fuzz."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lightning_d2ft import Op, Schedule
from lightning_d2ft.io import StaleFileError
from lightning_d2ft.parallel.placement import Placement


def _scores(seed: int, n_mb: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)  # continuous values: ties have probability zero
    return torch.from_numpy(rng.uniform(0.01, 10, (n_mb, n_cols))), torch.from_numpy(rng.uniform(0.01, 10, (n_mb,
                                                                                                            n_cols)))


@given(st.integers(0, 1000), st.integers(1, 6), st.integers(1, 4), st.floats(0.0, 1.0))
@settings(max_examples=25, deadline=None)
def test_budget_one_is_all_full_and_budget_near_zero_has_no_full(seed, n_mb, devices, mix):
    back, fwd = _scores(seed, n_mb, 14)
    full = Schedule.solve(back, fwd, budget=1.0, devices=devices, forward_mix=mix)
    assert (full.ops == Op.FULL).all() and full.compute_fraction == 1.0
    tiny = Schedule.solve(back, fwd, budget=1e-6, devices=devices, forward_mix=mix)
    assert not (tiny.ops[:, tiny.scheduled] == Op.FULL).any()


def _realistic(n_mb: int, n_cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)  # some subnets matter more than others for every micro-batch
    subnet_weight = torch.rand(n_cols).pow(3) * 10
    return subnet_weight * torch.rand(n_mb, n_cols).add(0.5), subnet_weight * torch.rand(n_mb, n_cols).add(0.5)


def test_d2ft_balances_every_step_and_the_epoch_and_moe_does_neither():
    back, fwd = _realistic(64, 74)
    d2ft = Schedule.solve(back, fwd, budget=0.6, devices=4)
    moe = Schedule.solve(back, fwd, budget=0.6, devices=4, method="moe")
    assert d2ft.workload_variance < 1e-4 and moe.workload_variance > 0.005
    assert d2ft.compute_fraction == pytest.approx(0.6, abs=0.01)
    per_row = d2ft.micro_batch_compute_fractions  # what the strategy logs per step
    assert per_row.shape == (64,) and float(per_row.mean()) == pytest.approx(d2ft.compute_fraction, abs=1e-12)
    m = d2ft.metrics()
    assert m["step_max_over_mean"] == pytest.approx(1.0) and m["step_max_over_mean_worst"] == pytest.approx(1.0)
    assert m["lockstep_fraction"] == pytest.approx(0.6, abs=0.01)  # 18 subnets per device: 8 FULL + 7 FO
    assert moe.metrics()["step_max_over_mean_worst"] > 1.1 and moe.lockstep_fraction > d2ft.lockstep_fraction
    for text in ("max/mean load 1.000", "lockstep time 0.600", "workload variance 0.0000", "solve", "check"):
        assert text in d2ft.summary()


def test_distinct_patterns_counts_the_distinct_rows_each_a_cuda_graph_capture():
    back, fwd = _realistic(16, 26, seed=1)
    s = Schedule.solve(back, fwd, budget=0.6, devices=1, solver="dp")
    assert s.distinct_patterns == len({tuple(row) for row in s.ops.tolist()}) > 1
    assert Schedule.solve(back, fwd, budget=1.0, devices=1).distinct_patterns == 1  # all FULL: one row
    repeated = Schedule.solve(back[:1].repeat(5, 1), fwd[:1].repeat(5, 1), budget=0.6, devices=1, solver="dp")
    assert repeated.distinct_patterns == 1 and "1 distinct op pattern |" in repeated.summary()


def test_epoch_capacity_pools_the_table_but_its_floor_starves_no_micro_batch():
    # scores scaled per micro-batch (like a loss-weighted score): with one pooled capacity per device the
    # high-loss micro-batches take the extra FULL work, and lockstep ranks wait on every unbalanced step; the
    # floor keeps FULL work in every (device, micro-batch), so no micro-batch goes untrained (issue 16's
    # starvation: before the floor, 5 of these 32 micro-batches had no FULL pair)
    back, fwd = _realistic(32, 26, seed=3)
    scale = torch.logspace(-2, 2, 32).unsqueeze(1)
    epoch = Schedule.solve(back * scale, fwd, budget=0.6, devices=2, capacity="epoch", solver="dp")
    step = Schedule.solve(back * scale, fwd, budget=0.6, devices=2)
    assert epoch.workload_variance < 1e-3 and epoch.metrics()["micro_batches_without_full"] == 0
    full = epoch.ops == Op.FULL
    for d in range(2):
        assert (full[:, epoch.placement == d].sum(1) >= 1).all()  # every (device, micro-batch)
    assert epoch.metrics()["step_max_over_mean_worst"] > 1.0 + 1e-6  # what pooling does to lockstep steps
    per_mb = full[:, epoch.scheduled].sum(1)
    assert per_mb[-8:].float().mean() > per_mb[:8].float().mean()  # the pooled FULL work follows the scores
    assert step.metrics()["micro_batches_without_full"] == 0
    assert step.metrics()["step_max_over_mean_worst"] == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 1000), st.integers(1, 8), st.integers(3, 14), st.integers(1, 3), st.floats(0.01, 1.0),
       st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 1e6]))
def test_no_micro_batch_goes_without_full_work_unless_the_budget_forces_it(seed, n_mb, n_free, devices, budget,
                                                                             mix, skew):
    devices = min(devices, n_free)
    back, fwd = _scores(seed, n_mb, n_free + 2)
    back[0] *= 1 + skew  # one micro-batch far above the rest must not take the others' FULL work
    s = Schedule.solve(back, fwd, budget=budget, devices=devices, forward_mix=mix)
    fewest, most = n_free // devices, -(-n_free // devices)  # subnets on the smallest and largest device
    # a device's FULL share per step: all of the budget (mix 0) down to the least that still spends it (mix 1)
    full_share = budget - mix * (budget - max(0.0, (budget - 0.4) / 0.6))
    full = s.ops[:, s.scheduled] == Op.FULL
    owner = s.placement[s.scheduled]
    if full_share * fewest >= 1 + 1e-6:  # the budget allows one FULL subnet per device and step: all get one
        for d in range(devices):
            assert full[:, owner == d].any(1).all(), f"device {d} leaves a micro-batch without FULL work"
    elif full_share * most < 1 - 1e-6:  # the budget forces it: no device can afford a FULL subnet
        assert not full.any()


def test_solve_takes_a_placement_with_its_speeds():
    back, fwd = _realistic(8, 2 + 4 * 6)
    owner = torch.tensor([[0, 1, 0, 1, 1, 1]] * 4)  # rank 1 holds 4 of 6 groups in every block
    placement = Placement(owner, speeds=(1.0, 2.0))
    s = Schedule.solve(back, fwd, placement=placement)
    assert s.num_devices == 2 and torch.equal(s.placement, placement.column_devices())
    assert s.speeds.tolist() == [1.0, 2.0]
    assert s.metrics()["step_max_over_mean_worst"] == pytest.approx(1.0, abs=0.1)
    assert torch.equal(Schedule.solve(back, fwd, placement=owner, speeds=[1.0, 2.0]).ops, s.ops)  # owner table
    legacy = Schedule.solve(back, fwd, placement=placement.column_devices(), devices=2, speeds=[1.0, 2.0])
    assert torch.equal(legacy.ops, s.ops)  # per-column devices, as before
    with pytest.raises(ValueError, match="devices=3 but the placement has 2 ranks"):
        Schedule.solve(back, fwd, placement=placement, devices=3)
    with pytest.raises(ValueError, match="covers 26 subnets .* the scores have 10"):
        Schedule.solve(back[:, :10], fwd[:, :10], placement=placement)


def test_d2ft_prefers_high_scores():
    back, fwd = _scores(1, 32, 20)
    s = Schedule.solve(back, fwd, budget=0.5, devices=2)
    cols = s.scheduled
    full = s.ops[:, cols] == Op.FULL
    assert back[:, cols][full].mean() > back[:, cols][~full].mean()
    fo = s.ops[:, cols] == Op.FORWARD_ONLY
    sc = s.ops[:, cols] == Op.SHORTCUT
    assert fwd[:, cols][fo].mean() > fwd[:, cols][sc].mean()


def test_heterogeneous_speeds_equalise_time():
    back, fwd = _scores(2, 40, 26)
    s = Schedule.solve(back, fwd, budget=0.5, devices=2, speeds=[1.0, 2.0])
    loads = s.device_loads
    assert loads[1] / loads[0] == pytest.approx(2.0, rel=0.02)
    assert s.workload_variance < 1e-3


def test_budget_one_is_all_full_on_unequal_devices_too():
    # found by the fuzz test: the slow device's speed share (1/3 of all work) is below its all-FULL load
    # (1/2), and what the fast device could not take was dropped instead of going back to the slow one
    back, fwd = _scores(3, 6, 10)
    s = Schedule.solve(back, fwd, budget=1.0, devices=2, speeds=[1.0, 2.0])
    assert (s.ops == Op.FULL).all() and s.compute_fraction == 1.0
    for capacity in ("epoch", "step"):
        tight = Schedule.solve(back, fwd, budget=0.9, devices=2, speeds=[1.0, 3.0], capacity=capacity)
        assert (tight.ops[:, tight.placement == 1] == Op.FULL).all()  # the fast device runs all it holds
        if capacity == "epoch":
            assert tight.compute_fraction == pytest.approx(0.9, abs=0.02)  # the whole budget is spent
        else:  # per step, the slow device's 3.2 units on 4 subnets fit 2 FULL + 2 FORWARD_ONLY = 2.8
            assert tight.compute_fraction == pytest.approx((4 + 2.8) / 8)


def test_communication_budget_caps_comm():
    back, fwd = _scores(3, 30, 26)
    s = Schedule.solve(back, fwd, budget=0.8, devices=2, comm_budget=0.5)
    assert s.comm_fraction <= 0.5 + 1e-9
    assert s.compute_fraction <= 0.8 + 1e-9


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, float("nan")])
def test_budget_outside_unit_interval_is_rejected(budget):
    back, fwd = _scores(0, 4, 8)
    with pytest.raises(ValueError, match=r"budget must be .* in \(0, 1\]"):
        Schedule.solve(back, fwd, budget=budget)


def test_bad_inputs_give_clear_errors():
    back, fwd = _scores(0, 4, 8)
    nan = back.clone()
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="backward_scores holds 1 NaN"):
        Schedule.solve(nan, fwd)
    with pytest.raises(ValueError, match="differ in shape"):
        Schedule.solve(back, fwd[:, :5])
    with pytest.raises(ValueError, match="at most 6 devices"):
        Schedule.solve(back, fwd, devices=7)
    with pytest.raises(ValueError, match="unknown solver 'cplex'"):
        Schedule.solve(back, fwd, solver="cplex")
    with pytest.raises(ValueError, match="unknown method"):
        Schedule.solve(back, fwd, method="greedy")
    with pytest.raises(ValueError, match=">= 0"):
        Schedule.solve(-back, fwd)
    with pytest.raises(ValueError, match="comm_budget"):
        Schedule.solve(back, fwd, comm_budget=2.0)
    with pytest.raises(ValueError, match="speeds"):
        Schedule.solve(back, fwd, devices=2, speeds=[1.0, 0.0])
    # 3 scheduled subnets on the smaller device: one FULL pair per step needs comm 1/3
    with pytest.raises(ValueError, match=r"comm_budget=0.3 is below 0.333.*\[0.333, 1\]"):
        Schedule.solve(back, fwd, devices=2, comm_budget=0.3)
    assert ((Schedule.solve(back, fwd, devices=2, comm_budget=1 / 3).ops == Op.FULL).sum(1) >= 2 + 2).all()
    with pytest.raises(ValueError, match=r"comm_budget .* cannot be combined with capacity='epoch'"):
        Schedule.solve(back, fwd, devices=2, comm_budget=0.5, capacity="epoch")
    with pytest.raises(ValueError, match="on one device nothing is sent"):
        Schedule.solve(back, fwd, devices=1, comm_budget=0.5)
    with pytest.raises(ValueError, match=r"full_floor must be a number \(0, 1\]"):
        Schedule.solve(back, fwd, capacity="epoch", full_floor=0.0)
    with pytest.raises(ValueError, match="moe_capacity_factor must be a number >= 1"):
        Schedule.solve(back, fwd, method="moe", moe_capacity_factor=0.5)
    with pytest.raises(ValueError, match=r"unknown capacity 'batch'; choose one of \['step', 'epoch'\]"):
        Schedule.solve(back, fwd, capacity="batch")
    with pytest.raises(ValueError, match="(?i)validate must be true or false"):
        Schedule.solve(back, fwd, validate="yes")


def test_save_load_plot_and_corruption(tmp_path):
    back, fwd = _scores(4, 16, 14)
    s = Schedule.solve(back, fwd, budget=0.6, devices=2)
    path = s.save(tmp_path / "s.sched")
    loaded = Schedule.load(path)
    assert torch.equal(loaded.ops, s.ops) and loaded.info["objective"] == s.info["objective"]
    assert loaded.compute_fraction == s.compute_fraction
    assert loaded.metrics() == pytest.approx(s.metrics())
    png = s.plot(tmp_path / "s.png")
    assert png.stat().st_size > 1000
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(StaleFileError, match="checksum"):
        Schedule.load(path)
    path.write_bytes(raw.replace(b"d2ft", b"d3ft", 1))  # edited
    with pytest.raises(StaleFileError):
        Schedule.load(path)


def test_wire_fraction_groups_a_rank_s_subnets_of_a_block():
    # 1 block, 4 groups on 2 ranks (round-robin: groups 0,2 -> rank 0; 1,3 -> rank 1)
    ops = torch.tensor([[Op.FULL, Op.FULL, Op.FULL, Op.SHORTCUT, Op.SHORTCUT, Op.FULL]])
    s = Schedule(ops=ops, placement=torch.tensor([-1, 0, 1, 0, 1, -1]), speeds=torch.ones(2),
                 column_blocks=torch.tensor([-1, 0, 0, 0, 0, -1]))
    assert s.wire_fraction == 1.0  # each rank has one FULL subnet in the block: both send both messages
    assert s.comm_fraction == s.wire_fraction  # the one communication figure (per item, half were silent)


# -- fuzz: a valid instance solves to a valid schedule; one injected fault gives a clear error ------
_FAULTS = {
    "nan_score": lambda b, f, kw: (_poke(b, float("nan")), f, kw),
    "inf_score": lambda b, f, kw: (b, _poke(f, float("inf")), kw),
    "negative_score": lambda b, f, kw: (_poke(b, -1.0), f, kw),
    "shape_mismatch": lambda b, f, kw: (b, f[:, :-1], kw),
    "empty": lambda b, f, kw: (b[:0], f[:0], kw),
    "one_dimensional": lambda b, f, kw: (b[0], f[0], kw),
    "budget_zero": lambda b, f, kw: (b, f, {**kw, "budget": 0.0}),
    "budget_above_one": lambda b, f, kw: (b, f, {**kw, "budget": 1.5}),
    "budget_nan": lambda b, f, kw: (b, f, {**kw, "budget": float("nan")}),
    "budget_bool": lambda b, f, kw: (b, f, {**kw, "budget": True}),
    "comm_budget_negative": lambda b, f, kw: (b, f, {**kw, "comm_budget": -0.2}),
    "comm_budget_tiny": lambda b, f, kw: (b, f, {**kw, "comm_budget": 1e-6}),
    "devices_zero": lambda b, f, kw: (b, f, {**kw, "devices": 0, "speeds": None}),
    "too_many_devices": lambda b, f, kw: (b, f, {**kw, "devices": b.shape[1], "speeds": None}),
    "unknown_method": lambda b, f, kw: (b, f, {**kw, "method": "greedy"}),
    "unknown_solver": lambda b, f, kw: (b, f, {**kw, "solver": "cplex"}),
    "forward_mix": lambda b, f, kw: (b, f, {**kw, "forward_mix": 1.5}),
    "speed_zero": lambda b, f, kw: (b, f, {**kw, "speeds": [0.0] * kw["devices"]}),
    "speeds_length": lambda b, f, kw: (b, f, {**kw, "speeds": [1.0] * (kw["devices"] + 1)}),
}


def _poke(a: np.ndarray, value: float) -> np.ndarray:
    a = a.copy()
    a.flat[a.size // 2] = value
    return a


@st.composite
def _fuzz_inputs(draw):
    n_mb, n_cols = draw(st.integers(1, 5)), draw(st.integers(3, 10))
    scores = st.floats(0.0, 1e3) | st.sampled_from([0.0, 1.0])  # ties and zeros on purpose
    back = draw(hnp.arrays(np.float64, (n_mb, n_cols), elements=scores))
    fwd = draw(hnp.arrays(np.float64, (n_mb, n_cols), elements=scores))
    devices = draw(st.integers(1, min(3, n_cols - 2)))
    capacity = draw(st.sampled_from(["step", "step", "epoch"]))
    comm = capacity == "step" and devices > 1  # a comm budget bounds the wire of every step, of 2+ devices
    kw = dict(capacity=capacity,
        budget=draw(st.floats(0.01, 1.0)), devices=devices,
        method=draw(st.sampled_from(["d2ft", "d2ft", "random", "dpruning", "moe", "random_fo", "dpruning_fo",
                                     "moe_fo", "full"])),
        # SCIP (epoch) may pick another of several equally good FULL sets on exact ties: see the README
        solver=draw(st.sampled_from(["dp", "ortools", "ortools"])) if capacity == "step" else "dp",
        comm_budget=draw(st.none() | st.floats(1.0 / ((n_cols - 2) // devices), 1.0)) if comm else None,
        forward_mix=draw(st.floats(0.0, 1.0)),
        speeds=draw(st.none() | st.lists(st.floats(0.1, 4.0), min_size=devices, max_size=devices)),
    )
    fault = draw(st.none() | st.sampled_from(sorted(_FAULTS)))
    if fault is not None:
        back, fwd, kw = _FAULTS[fault](back, fwd, kw)
    return back, fwd, kw, fault


FUZZ_EXAMPLES = 300


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_fuzz_inputs())
def test_fuzz_solve_returns_a_valid_schedule_or_raises_a_clear_error(case):
    back, fwd, kw, fault = case
    if fault is not None:
        with pytest.raises((ValueError, TypeError)) as err:
            Schedule.solve(back, fwd, **kw)
        assert len(str(err.value)) > 20, "the message must say what was wrong"
        return
    s = Schedule.solve(back, fwd, **kw)
    n_mb, n_cols = back.shape
    assert s.ops.shape == (n_mb, n_cols) and s.ops.dtype == torch.long
    assert set(s.ops.unique().tolist()) <= {int(o) for o in Op}
    assert (s.ops[:, ~s.scheduled] == Op.FULL).all()
    assert torch.isfinite(s.device_loads).all() and (s.device_loads >= 0).all()
    if kw["method"] in ("d2ft", "random", "dpruning", "moe"):  # within D2FT's compute (the _fo ones round)
        assert s.compute_fraction <= kw["budget"] + 1e-9
    if kw["method"] == "d2ft" and kw["comm_budget"] is not None:
        assert s.comm_fraction <= kw["comm_budget"] + 1e-9
    if kw["budget"] == 1.0 and kw["comm_budget"] is None:
        assert (s.ops == Op.FULL).all()


def test_metrics_say_how_dynamic_the_full_set_is(tmp_path):
    """Issue 27: the demo's schedule had 40 of 72 subnets never FULL and one FULL set, and nothing said so."""
    blocks = torch.tensor([-1, 0, 0, 1, 1, 2, 2, -1])
    F, O, S = int(Op.FULL), int(Op.FORWARD_ONLY), int(Op.SHORTCUT)
    ops = torch.tensor([[F, F, O, S, O, F, S, F],
                        [F, F, S, O, O, S, F, F],
                        [F, F, O, S, S, F, S, F]])
    s = Schedule(ops=ops, placement=torch.tensor([-1, 0, 1, 0, 1, 0, 1, -1]), speeds=torch.ones(2),
                 column_blocks=blocks)
    m = s.metrics()
    assert m["never_full_subnets"] == 3 and s.never_full_columns.tolist() == [2, 3, 4]
    assert m["distinct_full_sets"] == 2  # {1, 5} twice, {1, 6} once
    assert (m["ever_full_block_0"], m["ever_full_block_1"], m["ever_full_block_2"]) == (1, 0, 2)
    assert "3 of 6 scheduled subnets never FULL, 2 distinct FULL sets over 3 micro-batches; ever FULL per " \
           "block 1/2 0/2 2/2 (block(s) [1] never trained)" in s.summary()
    static = Schedule.solve(*_realistic(8, 2 + 12), budget=0.5, devices=1, method="dpruning")
    assert static.metrics()["distinct_full_sets"] == 1 and static.metrics()["never_full_subnets"] > 0
    assert "ever_full_block_0" not in static.metrics()  # no blocks given: no per-block count

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    seen = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *args, **kw):  # the heatmap marks exactly the never-FULL rows
        heat = fig.axes[0]
        seen["rows"] = sorted({int(y) for c in heat.collections for _, y in c.get_offsets()})
        seen["title"] = heat.get_title()
        return real_savefig(fig, *args, **kw)

    plt.Figure.savefig = spy
    try:
        s.plot(tmp_path / "s.png")
    finally:
        plt.Figure.savefig = real_savefig
    assert seen["rows"] == [2, 3, 4] and "3 subnets never FULL" in seen["title"]
