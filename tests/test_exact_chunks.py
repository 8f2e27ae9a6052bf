"""The memory check fits ``exact``'s and the direct refit's row chunks to the budget instead of refusing."""

from __future__ import annotations

import logging
from collections import OrderedDict

import pytest
import torch
from torch import nn

from lightning_lobs import CalibrationOptions, SolverOptions, prune_model
from lightning_lobs.engine.plan import CHUNK_FLOOR_ROWS, fit_chunk_bound
from lightning_lobs.resources import layer_memory
from lightning_lobs.solvers import core, exact
from lightning_lobs.solvers.core import refit, refit_chunk, refit_workspace_bytes
from lightning_lobs.solvers.exact import greedy_trace

pytestmark = pytest.mark.usefixtures("one_thread")

F32 = torch.float32
ROWS, COLS = 128, 512  # d = 513 with the bias column: the trace's tick bound alone allows 118 rows per chunk
SQUARE = (COLS + 1) ** 2 * 4  # one (d, d) float32 matrix


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(wide=nn.Linear(COLS, ROWS)))


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(64, COLS, generator=g) for _ in range(4)]


def _peak(cap: int) -> int:
    """What the memory check counts for the one layer with row chunks bounded by ``cap``: its Hessian and solve."""
    est = layer_memory("wide", _model().wide, "exact", torch.float64, SolverOptions(max_memory_bytes=cap))
    return est.hessian_bytes + est.solve_bytes


def _tolerance(hessian: torch.Tensor, weight: torch.Tensor) -> float:
    """Float32 rounding of a refit's k x k solves: eps * d * cond(H) * max |w| (chunks change the summation order)."""
    cond = float(torch.linalg.cond(hessian.double()))
    return torch.finfo(F32).eps * hessian.shape[-1] * cond * float(weight.abs().max())


def test_refit_workspace_is_the_largest_chunk_over_every_kept_count():
    for rows, width, cap in ((500, 801, 1 << 30), (500, 801, 10 << 20), (16, 65, 1 << 30), (3, 5, 1)):
        direct = max(refit_chunk(rows, k, 4, cap) * core.REFIT_COPIES * k * k for k in range(1, width + 1)) * 4
        assert refit_workspace_bytes(rows, width, 4, cap) == direct


def test_row_chunks_change_no_trace_and_refits_only_by_rounding():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1024, 129, dtype=torch.float64, generator=g)
    X[:, -1] = 1
    H = X.T @ X
    W, b = torch.randn(96, 128, generator=g), torch.randn(96, generator=g)
    small = SolverOptions(max_memory_bytes=4 * 129 * 129 * 4)  # 4 rows per trace chunk instead of all 96
    whole, chunked = greedy_trace(W, H, bias=b), greedy_trace(W, H, bias=b, solver=small)
    assert torch.equal(whole.order, chunked.order) and torch.equal(whole.increments, chunked.increments)
    Wb = torch.cat([W, b[:, None]], 1)
    mask = torch.rand(96, 129, generator=g) > 0.6
    mask[:, -1] = True
    a, c = refit(Wb, H[None], mask), refit(Wb, H[None], mask, small)
    assert torch.equal(a == 0, c == 0)
    torch.testing.assert_close(a, c, rtol=0, atol=_tolerance(H, Wb))


def test_fit_chunk_bound_bisects_to_what_fits():
    fits = 300_000

    def check(bound: int) -> None:
        if bound > fits:
            raise MemoryError(f"{bound} does not fit")

    assert fit_chunk_bound(check, 200_000, 1000) == 200_000  # fits as given: unchanged
    bound = fit_chunk_bound(check, 1 << 30, 1000)
    assert fits * (1 - 1 / 64) <= bound <= fits
    assert fit_chunk_bound(check, 1 << 30, fits) == fits
    with pytest.raises(MemoryError, match=rf"^{fits + 1} does not fit \(.*smallest.*={fits + 1}\.\)$"):
        fit_chunk_bound(check, 1 << 30, fits + 1)  # below the floor: the error for the floor, which says so
    with pytest.raises(MemoryError, match=str(1 << 30)):  # no chunked solve: nothing to lower
        fit_chunk_bound(check, 1 << 30, None)


def test_a_budget_only_exacts_chunks_exceed_is_met_with_smaller_chunks(monkeypatch, caplog):
    floor = CHUNK_FLOOR_ROWS * SQUARE
    assert _peak(floor) < _peak(1 << 30)  # the chunks are what the budget below cuts
    budget = (_peak(floor) + _peak(1 << 30)) // 2
    batches = _batches()
    free = _model()
    ref = prune_model(
        free, batches, 0.5, "exact", calibration=CalibrationOptions(memory_budget_bytes=1 << 40), prune_head=True
    )
    used: dict[str, list[int]] = {"trace": [], "refit": []}
    real_trace, real_refit = exact.exact_trace, exact.refit

    def spy_trace(*args, **kwargs):  # the solver's options are exact_trace's sixth argument
        used["trace"].append(args[5].max_memory_bytes)
        return real_trace(*args, **kwargs)

    def spy_refit(*args, **kwargs):  # ...and refit's fourth
        used["refit"].append(args[3].max_memory_bytes)
        return real_refit(*args, **kwargs)

    monkeypatch.setattr(exact, "exact_trace", spy_trace)
    monkeypatch.setattr(exact, "refit", spy_refit)
    tight = _model()
    with caplog.at_level(logging.INFO, logger="lightning_lobs.pruner"):
        report = prune_model(
            tight, batches, 0.5, "exact", calibration=CalibrationOptions(memory_budget_bytes=budget), prune_head=True
        )
    notes = [r.getMessage() for r in caplog.records if "lowered SolverOptions.max_memory_bytes" in r.getMessage()]
    assert len(notes) == 1, notes
    bound = int(notes[0].split(" to ")[1].split()[0])
    assert floor <= bound < 1 << 30 and _peak(bound) <= budget
    assert set(used["trace"]) == {bound} and set(used["refit"]) == {bound}  # the solves got the lowered bound
    assert bound // SQUARE < exact.trace_chunk(ROWS, COLS + 1, 4, 1 << 30, 32)  # ...and it cut the chunks
    assert report.layers["wide"].method == "exact"
    assert torch.equal(tight.wide.weight == 0, free.wide.weight == 0)  # the same masks
    x = torch.cat([torch.cat(batches), torch.ones(256, 1)], 1).double()
    H = x.T @ x
    atol = _tolerance(H, torch.cat([free.wide.weight, free.wide.bias[:, None]], 1).detach())
    torch.testing.assert_close(tight.wide.weight, free.wide.weight, rtol=0, atol=atol)
    torch.testing.assert_close(tight.wide.bias, free.wide.bias, rtol=0, atol=atol)
    assert ref.layers["wide"].sparsity == report.layers["wide"].sparsity


def test_a_budget_below_the_chunk_floor_is_still_refused():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    budget = _peak(CHUNK_FLOOR_ROWS * SQUARE) - 1
    with pytest.raises(MemoryError, match=r"CalibrationOptions.memory_budget_bytes.*at their smallest"):
        prune_model(
            model, _batches(), 0.5, "exact", calibration=CalibrationOptions(memory_budget_bytes=budget), prune_head=True
        )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
