"""``exact``'s internals: the budget split across rows and the greedy trace's bookkeeping (compaction, lazy
flushes, row chunks, dead inputs first), each against a plainer run of the same algorithm."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lightning_lobs.solvers import (
    NMPattern,
    greedy_trace,
    inverse_with_damping,
)
from lightning_lobs.solvers.exact import allocate_rows
from lightning_lobs.solvers.trace import greedy_rows
from solver_refs import OPT64, hess, make_inputs, make_weight


def test_allocate_repairs_non_convex_rows():
    """A row whose second removal is cheaper than its first: the split must still find the cheapest total."""
    inc = torch.tensor([[3.0, 0.1, 100.0], [1.0, 100.0, 100.0]], dtype=torch.float64)
    assert allocate_rows(inc, 2).tolist() == [2, 0]
    assert allocate_rows(inc, 1).tolist() == [0, 1]
    assert allocate_rows(inc, 6).tolist() == [3, 3]


@pytest.mark.parametrize("pattern", [None, NMPattern(2, 4)])
@pytest.mark.parametrize("forced", [False, True])
def test_greedy_trace_compaction_and_lazy_flushes_do_not_change_the_trace(pattern, forced):
    """Compacting every row to its candidates (at every flush, or never) and the flush interval only reorder
    floating-point sums: the greedy order is the same and the losses agree to rounding."""
    X = make_inputs(80, 16, seed=51, kind="corr")
    H = hess(X).double()
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H + 0.01 * H.diagonal().mean() * torch.eye(16, dtype=H.dtype)))
    W = make_weight(7, 16, 51).double()
    dead = torch.zeros(7, 16, dtype=torch.bool)
    prior = None
    if forced:
        prior = torch.zeros(7, 16, dtype=torch.bool)
        prior[:, ::5] = True
    steps = 8 if pattern is not None else 16
    runs = []
    for lazy, shrink in ((1, 0.0), (3, 1.0), (32, 0.75), (5, 0.0)):
        runs.append(
            greedy_rows(
                W,
                Hinv.expand(7, 16, 16).contiguous(),
                dead,
                steps,
                pattern,
                0,
                lazy,
                prior,
                shrink=shrink,
            )
        )
    cond = float(torch.linalg.cond(H))
    for order, inc in runs[1:]:
        assert torch.equal(order, runs[0][0])
        assert torch.allclose(
            inc,
            runs[0][1],
            rtol=100 * cond * torch.finfo(torch.float64).eps * 16,
            atol=0,
        )


def test_exact_trace_row_chunks_share_one_buffer_without_changing_the_result():
    """Rows solved in chunks (a small ``max_memory_bytes``) reuse one buffer; each chunk starts from a clean H^-1."""
    X = make_inputs(80, 12, seed=52, kind="corr")
    H = hess(X)
    Wt = make_weight(9, 12, 52)
    whole = greedy_trace(Wt, H, solver=replace(OPT64, max_memory_bytes=1 << 30))
    chunked = greedy_trace(Wt, H, solver=replace(OPT64, max_memory_bytes=2 * 12 * 12 * 8))
    assert torch.equal(whole.order, chunked.order)
    assert torch.allclose(whole.increments, chunked.increments, rtol=1e-12, atol=0)


def test_exact_trace_removes_dead_inputs_first_and_traces_the_live_columns_alone():
    """Dead inputs go first at zero cost, then the live columns' trace: the same sequence as running the greedy
    over all columns (where the dead ones win every tie at loss 0 and move nothing)."""
    X = make_inputs(80, 12, seed=53, kind="corr", dead=(2, 7, 8), bias=True)
    H = hess(X)
    Wt = make_weight(6, 13, 53)
    trace = greedy_trace(Wt[:, :12], H, bias=Wt[:, 12], solver=OPT64)
    _, Hinv, _, dead = inverse_with_damping(H, OPT64)
    order, inc = greedy_rows(
        Wt.clone(),
        Hinv.expand(6, 13, 13).contiguous(),
        dead.expand(6, 13),
        12,
        None,
        1,
        32,
    )
    assert torch.equal(trace.order[:, :3], torch.tensor([2, 7, 8]).expand(6, 3))
    assert torch.equal(trace.order, order)
    cond = float(torch.linalg.cond(H + torch.diag((H.diagonal() == 0).to(H.dtype))))
    assert torch.allclose(
        trace.increments,
        inc,
        rtol=100 * cond * torch.finfo(torch.float64).eps * 13,
        atol=0,
    )
    assert bool((trace.increments[:, :3] == 0).all())
