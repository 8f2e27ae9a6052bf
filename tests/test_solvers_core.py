"""The per-row minimum (``SolverOptions.min_kept_per_row``, :class:`~lightning_lobs.solvers.core.RowFloor`):
every method keeps it, lowers the sparsity only where it must, and compensates every removal."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import replace

import pytest
import torch

from lightning_lobs.solvers import METHODS, RowFloor
from solver_refs import (
    LIT64,
    OPT64,
    assert_close,
    fast_update_reference,
    hess,
    make_inputs,
    make_weight,
    pruned_count,
    run,
    solve_tol,
    subset_cost,
)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m", [1, 2])
def test_min_kept_per_row_holds_and_lowers_only_what_it_must(method, m):
    rows, d = 4, 6
    X = make_inputs(40, d, seed=141, bias=True, kind="corr")
    H = hess(X)
    Wt = make_weight(rows, d + 1, 141)
    Wt[1] *= 1e-3  # a row every ranking wants to empty first
    opts = replace(OPT64, min_kept_per_row=m)
    for s in (0.3, 0.5, 0.7, 0.9):
        allowed = rows * (d - m)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res, full, mask = run(Wt, H, s, method, bias=True, options=opts)
        assert pruned_count(res.mask) == min(round(s * rows * d), allowed), (
            s,
            pruned_count(res.mask),
        )
        assert bool((res.mask.sum(1) >= m).all()), res.mask
        assert any("min_kept_per_row" in str(w.message) for w in caught) == (round(s * rows * d) > allowed)
        assert (full[~mask] == 0).all()


@pytest.mark.parametrize("method", ["lobs", "exact"])
def test_min_kept_per_row_changes_nothing_where_no_row_empties(method):
    """lobs' layer-wide ranking and exact's per-row split only change where a row would empty."""
    compared = constrained = 0
    for seed in range(8):
        X = make_inputs(40, 6, seed=150 + seed, bias=seed % 2 == 0, kind="corr")
        H = hess(X)
        Wt = make_weight(4, X.shape[1], 150 + seed)
        Wt[seed % 4] *= 0.05 if seed >= 4 else 1.0
        free, _, free_mask = run(Wt, H, 0.7, method, bias=seed % 2 == 0, options=OPT64)
        kept, full, mask = run(
            Wt,
            H,
            0.7,
            method,
            bias=seed % 2 == 0,
            options=replace(OPT64, min_kept_per_row=1),
        )
        assert bool((kept.mask.sum(1) >= 1).all())
        if bool((free.mask.sum(1) >= 1).all()):
            assert torch.equal(kept.mask, free.mask)
            assert_close(kept.weight, free.weight, H=H)
            compared += 1
        else:  # the constraint binds: a feasible, hence no better, solution
            assert kept.error >= free.error * (1 - solve_tol(H))
            constrained += 1
    assert compared >= 2 and constrained >= 1, (compared, constrained)


@pytest.mark.parametrize("block", [1, 3, 128])
def test_fast_min_kept_per_row_keeps_every_removal_compensated(block):
    """The protected weights move quotas between blocks, never add an uncompensated removal:
    the result is SparseGPT's update for its own mask, and the count is exact."""
    X = make_inputs(50, 8, seed=161, kind="corr")
    H = hess(X)
    Wt = make_weight(5, 8, 161)
    Wt[2] *= 1e-3
    opts = replace(LIT64, min_kept_per_row=1, block_size=block)
    for s in (0.6, 0.8, 0.85):
        res, full, mask = run(Wt, H, s, "fast", options=opts)
        assert pruned_count(mask) == round(s * 40) and bool((mask.sum(1) >= 1).all())
        assert_close(full, fast_update_reference(Wt, H, mask), H=H)


def test_exact_min_kept_split_is_the_best_capped_greedy_split():
    """exact with a per-row minimum = per-row greedy traces + the best split with c_r <= d - m."""
    for seed in range(6):
        rows, d, m = 3, 4, 1
        X = make_inputs(15, d, seed=170 + seed, kind="corr" if seed % 2 else "iid")
        H = hess(X)
        Wt = make_weight(rows, d, 170 + seed)
        Wt[seed % rows] *= 0.01
        curves = []
        for r in range(rows):
            S: list[int] = []
            curve = [subset_cost(Wt[r], X, frozenset())]
            for _ in range(d):
                q = min(
                    (c for c in range(d) if c not in S),
                    key=lambda c: subset_cost(Wt[r], X, frozenset(S + [c])),
                )
                S.append(q)
                curve.append(subset_cost(Wt[r], X, frozenset(S)))
            curves.append(curve)
        for k in (6, 8, 9):
            best = min(
                sum(curves[r][c[r]] for r in range(rows))
                for c in itertools.product(range(d - m + 1), repeat=rows)
                if sum(c) == k
            )
            res, _, mask = run(
                Wt,
                H,
                k / (rows * d),
                "exact",
                options=replace(OPT64, min_kept_per_row=m),
            )
            assert pruned_count(mask) == k and bool((mask.sum(1) >= m).all())
            assert abs(res.error - best) <= solve_tol(H) * best, (
                seed,
                k,
                res.error,
                best,
            )


# --------------------------------------------------------------------------- RowFloor itself


def _floor_case(seed, rows=5, cols=7):
    g = torch.Generator().manual_seed(seed)
    costs = torch.rand(rows, cols, generator=g, dtype=torch.float64)
    pruned_before = torch.rand(rows, cols, generator=g) < 0.3
    pruned_before[0] = True  # a row an earlier mask emptied: it stays empty
    return costs, pruned_before


@pytest.mark.parametrize("per_row", [0, 1, 3, 9])
@pytest.mark.parametrize("with_prior", [False, True])
def test_row_floor_keeps_each_rows_costliest_weights_not_pruned_before(per_row, with_prior):
    costs, pruned_before = _floor_case(70 + per_row)
    prior = pruned_before if with_prior else None
    kept = RowFloor(per_row).kept_by_floor(costs, prior)
    if per_row == 0:
        assert kept is None
        return
    for r in range(costs.shape[0]):
        alive = [c for c in range(costs.shape[1]) if prior is None or not bool(prior[r, c])]
        expect = sorted(alive, key=lambda c: -float(costs[r, c]))[:per_row]
        assert sorted(kept[r].nonzero().flatten().tolist()) == sorted(expect), r
    pinned = RowFloor(per_row).pin(costs, prior)
    assert torch.equal(torch.isinf(pinned), kept) and torch.equal(pinned[~kept], costs[~kept])


@pytest.mark.parametrize("per_row", [0, 2, 9])
def test_row_floor_counts_and_lowers_the_sparsity_only_where_it_must(per_row):
    costs, pruned_before = _floor_case(80)
    rows, cols = costs.shape
    floor = RowFloor(per_row)
    expect = [max(cols - per_row, int(pruned_before[r].sum())) for r in range(rows)]
    assert floor.removable_per_row(rows, cols, pruned_before).tolist() == expect
    assert floor.most_removable(rows, cols, None) == rows * max(cols - per_row, 0)
    most = sum(expect)
    reachable = most / (rows * cols)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert floor.limit_sparsity(reachable, rows, cols, pruned_before, "fast") == reachable
    if per_row == 0:
        assert floor.limit_sparsity(0.99, rows, cols, pruned_before, "fast") == 0.99
        return
    with pytest.warns(RuntimeWarning, match=f"fast: sparsity 0.99 would leave fewer than min_kept_per_row={per_row}"):
        assert floor.limit_sparsity(0.99, rows, cols, pruned_before, "fast") == most / (rows * cols)
