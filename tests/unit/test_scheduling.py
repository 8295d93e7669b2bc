"""Schedule.solve: the DP agrees with OR-Tools, capacities hold, balance, baselines, errors, files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lightning_d2ft import CostModel, Op, Schedule
from lightning_d2ft.files import StaleFileError


def _scores(seed: int, n_mb: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)  # continuous values: ties have probability zero
    return torch.from_numpy(rng.uniform(0.01, 10, (n_mb, n_cols))), torch.from_numpy(rng.uniform(0.01, 10, (n_mb, n_cols)))


def _check_capacities(s: Schedule, cost: CostModel, subnet_costs: torch.Tensor | None, comm_budget: float | None):
    unit = subnet_costs if subnet_costs is not None else torch.ones(s.ops.shape[1], dtype=torch.float64)
    for d, cap in enumerate(s.info["capacities"]):
        cols = s.placement == d
        # integer cost units, as both solvers see them (1/1000 of a FULL subnet)
        w = {Op.FULL: torch.round(unit[cols] * cost.full * 1000), Op.FORWARD_ONLY: torch.round(unit[cols] * cost.forward_only * 1000)}
        ops = s.ops[:, cols]
        used = sum(float(((ops == op).double() * w[op]).sum()) for op in w)
        assert used <= cap * 1000 + 1e-6
        if comm_budget is not None:
            comm = float(cost.comm(ops).sum())
            assert comm <= comm_budget * ops.numel() * cost.comm_full + 1e-6
    assert (s.ops[:, ~s.scheduled] == Op.FULL).all()


instances = st.fixed_dictionaries({
    "seed": st.integers(0, 10_000),
    "n_mb": st.integers(1, 5),
    "n_cols": st.integers(3, 9),
    "devices": st.integers(1, 3),
    "budget": st.floats(0.05, 1.0),
    "comm_budget": st.none() | st.floats(0.1, 1.0),
    "forward_mix": st.floats(0.0, 1.0),
    "costs": st.none() | st.lists(st.sampled_from([0.5, 1.0, 1.5, 2.0]), min_size=9, max_size=9),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances)
def test_dp_matches_ortools_and_respects_every_capacity(inst):
    n_cols = inst["n_cols"] + 2
    devices = min(inst["devices"], inst["n_cols"])
    back, fwd = _scores(inst["seed"], inst["n_mb"], n_cols)
    costs = None if inst["costs"] is None else torch.tensor([1.0] + inst["costs"][: n_cols - 2] + [1.0])
    comm = inst["comm_budget"]
    if comm is not None:  # at least one FULL pair per device (smaller budgets are rejected, see below)
        comm = max(comm, 1.0 / ((inst["n_cols"] // devices) * inst["n_mb"]))
    kw = dict(budget=inst["budget"], devices=devices, comm_budget=comm,
              forward_mix=inst["forward_mix"], subnet_costs=costs)
    dp = Schedule.solve(back, fwd, solver="dp", **kw)
    ort = Schedule.solve(back, fwd, solver="ortools", **kw)
    for a, b in zip(dp.info["objective"], ort.info["objective"]):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    for s in (dp, ort):
        _check_capacities(s, s.cost, costs, comm)


@given(st.integers(0, 1000), st.integers(1, 6), st.integers(1, 4), st.floats(0.0, 1.0))
@settings(max_examples=25, deadline=None)
def test_budget_one_is_all_full_and_budget_near_zero_has_no_full(seed, n_mb, devices, mix):
    back, fwd = _scores(seed, n_mb, 14)
    full = Schedule.solve(back, fwd, budget=1.0, devices=devices, forward_mix=mix)
    assert (full.ops == Op.FULL).all() and full.compute_fraction == 1.0
    tiny = Schedule.solve(back, fwd, budget=1e-6, devices=devices, forward_mix=mix)
    assert not (tiny.ops[:, tiny.scheduled] == Op.FULL).any()


def test_d2ft_is_balanced_and_moe_is_not():
    torch.manual_seed(0)
    n_mb, n_cols = 64, 74
    # realistic scores: some subnets matter more than others for every micro-batch
    subnet_weight = torch.rand(n_cols).pow(3) * 10
    back = subnet_weight * torch.rand(n_mb, n_cols).add(0.5)
    fwd = subnet_weight * torch.rand(n_mb, n_cols).add(0.5)
    d2ft = Schedule.solve(back, fwd, budget=0.6, devices=4)
    moe = Schedule.solve(back, fwd, budget=0.6, devices=4, method="moe")
    assert d2ft.workload_variance < 1e-4
    assert moe.workload_variance > 0.01
    assert d2ft.compute_fraction == pytest.approx(0.6, abs=0.01)
    for method in ("random", "dpruning", "moe"):  # same budget, same interface
        base = Schedule.solve(back, fwd, budget=0.6, devices=4, method=method)
        assert base.compute_fraction == pytest.approx(d2ft.compute_fraction, abs=0.02)
        assert base.method == method
    assert (Schedule.solve(back, fwd, devices=4, method="full").ops == Op.FULL).all()


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
    tight = Schedule.solve(back, fwd, budget=0.9, devices=2, speeds=[1.0, 3.0])
    assert tight.compute_fraction == pytest.approx(0.9, abs=0.02)  # the whole budget is spent
    assert (tight.ops[:, tight.placement == 1] == Op.FULL).all()  # the fast device runs all it holds


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
    # 4 micro-batches x 3 scheduled subnets on the smaller device: one FULL pair needs comm 1/12
    with pytest.raises(ValueError, match=r"comm_budget=0.05 is below 0.0833.*\[0.0833, 1\]"):
        Schedule.solve(back, fwd, devices=2, comm_budget=0.05)
    assert (Schedule.solve(back, fwd, devices=2, comm_budget=1 / 12).ops == Op.FULL).sum() >= 2 + 2 * 4


def test_save_load_plot_and_corruption(tmp_path):
    back, fwd = _scores(4, 16, 14)
    s = Schedule.solve(back, fwd, budget=0.6, devices=2)
    path = s.save(tmp_path / "s.sched")
    loaded = Schedule.load(path)
    assert torch.equal(loaded.ops, s.ops) and loaded.info["objective"] == s.info["objective"]
    assert loaded.compute_fraction == s.compute_fraction
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
    assert s.comm_fraction == 0.5  # while per item, half the subnets are silent


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
    kw = dict(
        budget=draw(st.floats(0.01, 1.0)), devices=devices,
        method=draw(st.sampled_from(["d2ft", "d2ft", "random", "dpruning", "moe", "full"])),
        solver=draw(st.sampled_from(["dp", "dp", "ortools"])),
        comm_budget=draw(st.none() | st.floats(1.0 / n_mb, 1.0)),  # >= one FULL pair per device
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
    if kw["method"] in ("d2ft", "random"):  # dpruning and moe pick whole columns and may round by one
        assert s.compute_fraction <= kw["budget"] + 1e-9
    if kw["method"] == "d2ft" and kw["comm_budget"] is not None:
        assert s.comm_fraction <= kw["comm_budget"] + 1e-9
    if kw["budget"] == 1.0 and kw["comm_budget"] is None:
        assert (s.ops == Op.FULL).all()
