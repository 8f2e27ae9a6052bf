"""A prune is never silent: the long kernels tick per bounded amount of work, every phase reports from
inside its layers, the ETA comes from the phase's measured rate, and a layer's `secs` counts all its time.

Nothing here asserts wall time: the work between two progress events is bounded by counting events against
a lower bound of the work done, and the ETA is checked against simulated time.
"""

from __future__ import annotations

import random
import time

import pytest
import torch
from torch import nn

import lightning_lobs.engine.allocate as allocation_mod
import lightning_lobs.solvers.core as solvers_core  # the constants the kernels read at call time
from lightning_lobs import prune_model
from lightning_lobs.config import PruneProgress
from lightning_lobs.progress import PhaseProgress
from lightning_lobs.solvers import SolverOptions, error_curve, greedy_trace, solve_layer

pytestmark = pytest.mark.usefixtures("one_thread")

#: A small tick budget, so that a small layer behaves like a 512x1024 one does with the real budget.
BUDGET = 5e6


def _problem(rows: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
    return torch.randn(rows, d, generator=g, dtype=torch.float64), X.T @ X / X.shape[0]


def _trace_work_lower_bound(rows: int, d: int) -> float:
    """Flops every greedy trace does at least: each step's share of a flush, 2 x width^2 per row, width >= d - step."""
    return 2.0 * rows * sum((d - k) ** 2 for k in range(d))


def _check_fractions(fractions: list[float]) -> None:
    assert fractions, "no tick at all"
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert all(b >= a for a, b in zip(fractions, fractions[1:])), "fractions must never go back"


def test_greedy_trace_ticks_at_least_once_per_flop_budget(monkeypatch):
    monkeypatch.setattr(solvers_core, "PROGRESS_TICK_FLOPS", BUDGET)
    rows, d = 24, 192
    W, H = _problem(rows, d)
    solver = SolverOptions(dtype=torch.float64)
    fractions: list[float] = []
    ticked = greedy_trace(W, H, solver=solver, tick=fractions.append)
    # Fewer ticks than this would leave more than BUDGET flops between two of them somewhere.
    assert len(fractions) >= _trace_work_lower_bound(rows, d) / BUDGET
    _check_fractions(fractions)
    assert fractions[-1] > 0.9  # the estimate follows the work to its end
    plain = greedy_trace(W, H, solver=solver)  # the tick only watches: same sequence, same losses
    assert torch.equal(ticked.order, plain.order) and torch.equal(ticked.increments, plain.increments)


@pytest.mark.parametrize("method", ["exact", "fast", "lobs"])
def test_solve_layer_ticks_inside_the_solve_and_stays_pure(monkeypatch, method):
    monkeypatch.setattr(solvers_core, "PROGRESS_TICK_FLOPS", BUDGET)
    rows, d = 24, 192
    W, H = _problem(rows, d, seed=1)
    solver = SolverOptions(dtype=torch.float64, block_size=32, refit=True)
    fractions: list[float] = []
    res = solve_layer(W, H, 0.5, method, solver=solver, tick=fractions.append)
    _check_fractions(fractions)
    if method == "exact":
        assert len(fractions) >= _trace_work_lower_bound(rows, d) / BUDGET
    else:  # a tick per block of columns (fast) and per chunk of the refit (k^3 / 3 flops per row, k = 96 kept)
        moving = [f for f in fractions if f > 0]  # not the 0.0 after the inverse
        assert len(moving) >= (d // 32 - 1 if method == "fast" else 0) + rows * 96**3 / 3 / BUDGET - 1
    plain = solve_layer(W, H, 0.5, method, solver=solver)
    assert torch.equal(res.weight, plain.weight) and torch.equal(res.mask, plain.mask)


def test_error_curve_ticks_per_block_of_columns():
    W, H = _problem(32, 256, seed=2)
    fractions: list[float] = []
    curve = error_curve(W, H, [0.0, 0.5, 0.9], solver=SolverOptions(block_size=32), tick=fractions.append)
    sweep = [f for f in fractions if 0 < f < 1]
    assert len(sweep) == 256 // 32 - 1  # per block of columns (the levels' errors come from the sweep's losses)
    _check_fractions(fractions)
    assert torch.equal(curve, error_curve(W, H, [0.0, 0.5, 0.9], solver=SolverOptions(block_size=32)))


def _loader(d: int, batches: int = 3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(64, d, generator=g) for _ in range(batches)]


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_exact_prune_reports_progress_inside_each_layer(monkeypatch, allocation):
    """The trace runs in the allocation (global) or in the solve (uniform): either phase reports from inside it."""
    monkeypatch.setattr(solvers_core, "PROGRESS_TICK_FLOPS", BUDGET)
    rows, d = 48, 192
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, rows, bias=False))
    events: list[PruneProgress] = []
    prune_model(
        model, _loader(d), sparsity=0.5, method="exact", allocation=allocation, progress=events.append, prune_head=True
    )
    traced = "allocate" if allocation == "global" else "solve"
    inside = [e for e in events if e.phase == traced and e.done == 0]
    assert len(inside) >= _trace_work_lower_bound(rows, d) / BUDGET
    assert all(e.layer == "0" and e.fraction is not None and (e.eta is not None or e.fraction == 0) for e in inside)
    assert [e.fraction for e in inside] == sorted(e.fraction for e in inside)
    assert f"L-OBS {traced} 0/1 0 " in inside[len(inside) // 2].describe() and "%" in inside[-1].describe()
    finished = [e for e in events if e.phase == traced and e.done == 1]
    assert len(finished) == 1 and finished[0].eta == 0.0 and finished[0].fraction == 1.0
    measure = [e for e in events if e.phase == "measure"]
    assert [e.done for e in measure] == [0, 0, 1]  # a step per calibration batch


def test_eta_from_measured_rate_is_within_2x_after_a_tenth_of_the_phase():
    """Simulated time: layers of very different costs, each really taking its estimate times 0.8 to 1.25, on a
    machine doing 1e9 flops per simulated second and ticking every 2e8 flops."""
    rng = random.Random(0)
    costs = {"big": 4e11, "tiny": 1e7, "mid": 8e10, "small": 3e9, "huge": 6e11, "last": 2e10}
    now = [0.0]
    events: list[PruneProgress] = []
    truth: list[float] = []  # simulated time left in the phase at each event

    true_costs = {k: c * rng.uniform(0.8, 1.25) for k, c in costs.items()}
    end = sum(true_costs.values()) / 1e9

    def record(step: PruneProgress) -> None:
        events.append(step)
        truth.append(end - now[0])

    progress = PhaseProgress(record, clock=lambda: now[0])
    progress.begin("solve", costs)
    for key, true in true_costs.items():
        done = 0.0
        while done + 2e8 < true:
            done += 2e8
            now[0] += 2e8 / 1e9
            progress.advance(key, done / true, key)
        now[0] += (true - done) / 1e9
        progress.step(key, key)
    assert now[0] == pytest.approx(end)
    late = [(e, t) for e, t in zip(events, truth) if e.elapsed >= 0.1 * end]
    assert len(late) > 100
    for e, left in late:
        if left <= 1e-9:
            assert e.eta == pytest.approx(0.0, abs=1e-9)
        else:
            assert 0.5 * left <= e.eta <= 2.0 * left, (e, left)
    assert max(b.elapsed - a.elapsed for a, b in zip(events, events[1:])) <= 0.2 + 1e-9


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_table_seconds_count_the_time_spent_in_the_allocation(monkeypatch, method):
    """`secs` is every second a layer took: the trace (exact) or error curve (fast) in the allocation too."""
    spent: list[float] = []
    name = "greedy_trace" if method == "exact" else "error_curve"
    original = getattr(allocation_mod, name)

    def slow(*args, **kwargs):
        t0 = time.perf_counter()
        time.sleep(0.3)  # a trace that takes a while, so the solve alone cannot account for it
        out = original(*args, **kwargs)
        spent.append(time.perf_counter() - t0)
        return out

    monkeypatch.setattr(allocation_mod, name, slow)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8))
    report = prune_model(model, _loader(24), sparsity=0.5, method=method, allocation="global", prune_head=True)
    assert len(spent) == 2
    for (layer, lr), t in zip(report.layers.items(), spent):
        assert lr.seconds >= t, (layer, lr.seconds, t)
    assert report.solve_seconds >= sum(spent)


def test_calibration_reports_while_it_finishes_each_layers_hessian():
    """After the last batch every layer's Hessian is finished (d^2 work each, seconds for wide convolutions)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))
    events: list[PruneProgress] = []
    prune_model(model, _loader(16, batches=2), sparsity=0.5, progress=events.append, prune_head=True)
    calibrate = [e for e in events if e.phase == "calibrate"]
    assert [(e.done, e.total) for e in calibrate[:2]] == [(1, 2), (2, 2)]  # the batches
    layers = calibrate[2:]  # then each layer's Hessian, halfway (averaged) and done (normalised)
    assert [(e.done, e.total, e.layer) for e in layers if e.fraction is not None and e.done] == [
        (1, 3, "0"),
        (2, 3, "2"),
        (3, 3, "4"),
    ]
    assert len(layers) == 6 and [e.fraction for e in layers] == sorted(e.fraction for e in layers)
    assert layers[-1].eta == 0.0


def test_solve_eta_counts_no_work_for_a_layer_the_allocation_left_dense():
    from lightning_lobs.engine.estimates import solve_work
    from lightning_lobs.engine.plan import layer_plan

    m = nn.Linear(576, 64)
    solver = SolverOptions()

    def work(target: float, pattern: bool = False) -> float:
        return solve_work(layer_plan("l", m, target, "exact", None, None), solver, pattern, has_trace=False)

    assert work(0.0) <= 64 * 577  # nothing to solve: the ETA must not wait for a full refit
    assert work(0.5) >= 64 * (577 * 0.5) ** 3 / 3  # the refit of the kept half
    assert work(0.0, pattern=True) >= 64 * (577 * 0.5) ** 3 / 3  # an N:M pattern prunes whatever the target
