"""Tests of :func:`lightning_lobs.solvers.solve_layer` against brute-force float64 references.

The references (tests/solver_refs.py) are written independently of the solver code: least-squares fits go
through ``torch.linalg.lstsq`` on the calibration inputs ``X~`` themselves, the optimum mask comes from
exhaustive enumeration, and ``lobs``/``fast`` are re-implemented as plain Python loops from the algorithm
descriptions in the package docstring. The per-row minimum is tested in test_solvers_core.py, the exact
trace's bookkeeping in test_solvers_exact.py, the allocation's cost curves in test_solvers_costs.py and the
registry in test_solvers_registry.py.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import replace

import pytest
import torch

import lightning_lobs.solvers.core as solvers_core
from lightning_lobs.solvers import (
    METHODS,
    NMPattern,
    SolverOptions,
    damped_hessian,
    greedy_trace,
    layer_error,
    magnitude_mask,
    parse_pattern,
    refit,
    solve_layer,
)
from solver_refs import (
    F64,
    LIT64,
    OPT64,
    assert_close,
    fast_reference,
    fast_update_reference,
    grouped_data,
    hess,
    lobs_reference,
    ls_err,
    ls_fit,
    make_inputs,
    make_weight,
    pruned_count,
    run,
    solve_tol,
    subset_cost,
)

# =========================================================================== 1. refit


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_refit_equals_least_squares_and_multiweight_obs(bias, seed):
    rows, d, n = 5, 7, 40
    X = make_inputs(n, d, seed=seed, bias=bias, kind="corr" if seed == 2 else "iid")
    H = hess(X)
    D = X.shape[1]
    Wt = make_weight(rows, D, seed)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, D, generator=g) > 0.5
    mask[0, :d] = False  # a row with every prunable weight removed
    mask[1, :d] = True  # a row with nothing removed
    mask[2, :d] = torch.arange(d) == 3  # a row keeping a single weight
    if bias:
        mask[:, -1] = True
    got = refit(Wt, H, mask, OPT64)
    assert got.dtype == F64 and got.shape == Wt.shape
    assert (got[~mask] == 0).all()
    assert_close(got, ls_fit(Wt, X, mask), H=H)
    # multi-weight OBS: dw = -w_P (Hinv_PP)^-1 Hinv_P:
    Hinv = torch.linalg.inv(H)
    obs = Wt.clone()
    for r in range(rows):
        P = (~mask[r]).nonzero().flatten()
        if P.numel():
            obs[r] = Wt[r] - Wt[r, P] @ torch.linalg.solve(Hinv[P][:, P], Hinv[P])
    assert_close(obs[~mask], torch.zeros(int((~mask).sum()), dtype=F64), H=H, scale=float(Wt.abs().max()))
    assert_close(got, obs * mask, H=H)
    assert_close(got[1], Wt[1], H=H)  # nothing pruned -> unchanged


def test_refit_keeps_input_dtype_and_float32_solve():
    X = make_inputs(50, 6, seed=3)
    H = hess(X)
    Wt = make_weight(4, 6, 3)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    ref = ls_fit(Wt, X, mask)
    got32 = refit(Wt.float(), H, mask, SolverOptions(damp=0.0))
    assert got32.dtype == torch.float32
    assert_close(got32, ref, rtol=1e-4, atol=1e-4)


# =========================================================================== 2. results are consistent


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_result_error_and_exact_refit(method, bias, pattern):
    rows, d, n = 6, 8, 60
    X = make_inputs(n, d, seed=11, bias=bias, kind="corr")
    H = hess(X)
    Wt = make_weight(rows, X.shape[1], 11)
    s = None if pattern else 0.6
    res, full, mask = run(Wt, H, s, method, bias=bias, pattern=pattern)
    assert res.method == method and res.damp == 0.0
    assert res.weight.dtype == F64 and res.weight.shape == (rows, d) and res.mask.dtype == torch.bool
    assert (bias and res.bias.shape == (rows,)) or (not bias and res.bias is None)
    assert (full[~mask] == 0).all()
    # the reported error is the layer error of the returned weights, computed two ways
    assert_close(res.error, layer_error(Wt, full, H), H=H)
    assert_close(res.error, ls_err(Wt, full, X), H=H)
    # nothing can beat the least-squares refit on the same mask
    best = ls_err(Wt, ls_fit(Wt, X, mask), X)
    assert res.error >= best * (1 - solve_tol(H))
    if method == "exact":
        assert_close(full, refit(Wt, H, mask, OPT64), H=H)
        assert_close(full, ls_fit(Wt, X, mask), H=H)
        assert_close(res.error, best, H=H)


def test_layer_error_matches_definition():
    X = make_inputs(30, 5, seed=4, bias=True)
    H = hess(X)
    W0 = make_weight(3, 6, 4)
    W1 = make_weight(3, 6, 5)
    assert_close(layer_error(W0, W1, H), ls_err(W0, W1, X), H=H)
    assert layer_error(W0, W0, H) == 0.0
    assert_close(
        layer_error(W0.float(), W1.float(), H.float()),
        ls_err(W0.float().double(), W1.float().double(), X),
        rtol=1e-5,
        H=H,
    )


# =========================================================================== 3. exact vs exhaustive search


def _exhaustive_cases():
    """48 tiny cases: (rows, d) in {2,3} x {4,5}, with/without bias, k in {2,3,4}, two seeds each."""
    cases = []
    seed = 0
    for _rep in range(2):
        for rows, d in [(2, 4), (2, 5), (3, 4), (3, 5)]:
            for bias in (False, True):
                for k in (2, 3, 4):
                    cases.append((rows, d, bias, k, seed))
                    seed += 1
    return cases


def _exhaustive_case(rows, d, bias, k, seed):
    """Returns (exact's error, exhaustive optimum, best greedy-prefix split, exact's per-row counts, tolerance)."""
    n = 3 * (d + 1)
    X = make_inputs(n, d, seed=seed, bias=bias, kind="corr" if seed % 3 == 0 else "iid")
    H = hess(X)
    Wt = make_weight(rows, X.shape[1], seed)
    cache: list[dict] = [dict() for _ in range(rows)]

    def cost(r, S):
        S = frozenset(S)
        if S not in cache[r]:
            cache[r][S] = subset_cost(Wt[r], X, S)
        return cache[r][S]

    # exhaustive optimum over every mask with exactly k pruned (bias column never pruned)
    positions = [(r, q) for r in range(rows) for q in range(d)]
    opt = math.inf
    for comb in itertools.combinations(positions, k):
        opt = min(opt, sum(cost(r, [q for (rr, q) in comb if rr == r]) for r in range(rows)))

    # greedy OBS per row (cheapest exact removal at each step), then the best split of k over rows
    curves = []
    for r in range(rows):
        S: list[int] = []
        curve = [cost(r, S)]
        for _ in range(d):
            q = min((c for c in range(d) if c not in S), key=lambda c: cost(r, S + [c]))
            S.append(q)
            curve.append(cost(r, S))
        curves.append(curve)
    greedy_best = min(
        sum(curves[r][c[r]] for r in range(rows)) for c in itertools.product(range(d + 1), repeat=rows) if sum(c) == k
    )
    res, full, mask = run(Wt, H, k / (rows * d), "exact", bias=bias)
    assert pruned_count(mask) == k
    assert_close(res.error, ls_err(Wt, ls_fit(Wt, X, mask), X), H=H)
    return res.error, opt, greedy_best, (~mask).sum(1).tolist(), solve_tol(H)


@pytest.fixture(scope="module")
def exhaustive_results():
    return [(case, _exhaustive_case(*case)) for case in _exhaustive_cases()]


def test_exact_against_exhaustive_search(exhaustive_results):
    """exact is never below the exhaustive optimum and reaches it in most tiny cases."""
    below = [(c, r) for c, r in exhaustive_results if r[0] < r[1] * (1 - r[4])]
    assert not below, f"exact beat exhaustive search (impossible: its error bookkeeping is wrong): {below}"
    hits = sum(r[0] <= r[1] * (1 + r[4]) for _, r in exhaustive_results)
    total = len(exhaustive_results)
    assert hits >= 0.8 * total, (
        f"exact reached the exhaustive optimum in only {hits}/{total} = {hits / total:.0%} of cases"
    )


def test_exact_budget_split_is_optimal_for_greedy_traces(exhaustive_results):
    """exact = per-row greedy OBS traces + the per-row budget split with the smallest summed error."""
    bad = [(c, r) for c, r in exhaustive_results if abs(r[0] - r[2]) > r[4] * r[2]]
    assert not bad, f"{len(bad)}/{len(exhaustive_results)} cases with a suboptimal budget split " + str(
        [(c, f"exact={r[0]:.6g} best split={r[2]:.6g} counts={r[3]}") for c, r in bad]
    )


def test_exact_never_below_best_greedy_split(exhaustive_results):
    """exact is never below the best greedy-prefix split (it can only choose among those prefixes)."""
    for c, r in exhaustive_results:
        assert r[0] >= r[2] * (1 - r[4]), (c, r)


# =========================================================================== 4. exact vs magnitude + refit


# Greedy OBS is not a theorem-level improvement over magnitude + refit: on random tiny layers
# it loses in roughly 1% of unstructured cases (most of those through the budget split, see
# above) and more often for 1:4 with strongly correlated inputs. So these tests require that
# exact wins or ties in at least 90% of the cases and in total, and report every loss.


def _vs_magnitude_report(rows):
    """rows: (seed, sparsity, tolerance, exact's error, magnitude+refit's error)."""
    losses = [r for r in rows if r[-2] > r[-1] * (1 + r[2])]
    total_exact = sum(r[-2] for r in rows)
    total_mag = sum(r[-1] for r in rows)
    msg = f"exact lost to magnitude+refit in {len(losses)}/{len(rows)} cases: {losses}; totals {total_exact:.6g} vs {total_mag:.6g}"
    return losses, total_exact, total_mag, msg


@pytest.mark.parametrize("kind", ["iid", "corr", "dead"])
def test_exact_vs_magnitude_refit(kind):
    rows_out = []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        rows = int(torch.randint(3, 8, (1,), generator=g))
        d = int(torch.randint(6, 13, (1,), generator=g))
        bias = seed % 2 == 1
        dead = (1, d - 2) if kind == "dead" else ()
        X = make_inputs(3 * d, d, seed=100 + seed, bias=bias, kind="iid" if kind == "dead" else kind, dead=dead)
        H = hess(X)
        Wt = make_weight(rows, X.shape[1], 100 + seed)
        for s in (0.25, 0.5, 0.75):
            res, full, mask = run(Wt, H, s, "exact", bias=bias)
            mag = magnitude_mask(Wt, s, frozen=int(bias))
            assert pruned_count(mag) == pruned_count(mask)
            mag_err = layer_error(Wt, refit(Wt, H, mag, OPT64), H)
            rows_out.append((seed, s, solve_tol(H), res.error, mag_err))
    losses, te, tm, msg = _vs_magnitude_report(rows_out)
    assert len(losses) <= 0.1 * len(rows_out) and te < tm, msg


def _greedy_nm_reference(Wt, X, d, n, m):
    """Per-row greedy removal of the weight whose exact (lstsq) removal cost is smallest,
    among groups that have not yet lost their M-N weights."""
    rows = Wt.shape[0]
    mask = torch.ones(rows, X.shape[1], dtype=torch.bool)
    for r in range(rows):
        S: list[int] = []
        for _ in range(d // m * (m - n)):
            cand = [c for c in range(d) if c not in S and sum(1 for t in S if t // m == c // m) < m - n]
            S.append(min(cand, key=lambda c: subset_cost(Wt[r], X, frozenset(S + [c]))))
        mask[r, S] = False
    return mask


@pytest.mark.parametrize("pattern", [(2, 4), (1, 4)])
@pytest.mark.parametrize("kind", ["iid", "corr"])
def test_exact_nm_is_greedy_obs_with_group_quotas(pattern, kind):
    for seed in range(5):
        bias = seed % 2 == 0
        X = make_inputs(30, 8, seed=300 + seed, bias=bias, kind=kind)
        Wt = make_weight(3, X.shape[1], 300 + seed)
        H = hess(X)
        res, full, mask = run(Wt, H, None, "exact", bias=bias, pattern=pattern)
        assert torch.equal(mask, _greedy_nm_reference(Wt, X, 8, *pattern)), seed
        assert_close(full, ls_fit(Wt, X, mask), H=H)


@pytest.mark.parametrize("pattern", ["2:4", "1:4"])
def test_exact_nm_vs_magnitude_nm_refit(pattern):
    nm = parse_pattern(pattern)
    rows_out = []
    for kind in ("iid", "corr", "dead"):
        for seed in range(10):
            rows, d = 4, 8
            bias = seed % 2 == 0
            dead = (2, 5) if kind == "dead" else ()
            X = make_inputs(30, d, seed=200 + seed, bias=bias, kind="iid" if kind == "dead" else kind, dead=dead)
            H = hess(X)
            Wt = make_weight(rows, X.shape[1], 200 + seed)
            res, full, mask = run(Wt, H, None, "exact", bias=bias, pattern=pattern)
            mag = magnitude_mask(Wt, nm.sparsity, nm, frozen=int(bias))
            mag_err = layer_error(Wt, refit(Wt, H, mag, OPT64), H)
            rows_out.append((kind, seed, solve_tol(H), res.error, mag_err))
    losses, te, tm, msg = _vs_magnitude_report(rows_out)
    assert len(losses) <= 0.1 * len(rows_out) and te < tm, msg


# =========================================================================== 5. lobs


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("s", [0.3, 0.7])
@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_lobs_matches_loop_reference(bias, s, damp):
    rows, d = 5, 9
    X = make_inputs(40, d, seed=21, bias=bias, kind="corr")
    H = hess(X)
    Wt = make_weight(rows, X.shape[1], 21)
    k = int(round(s * rows * d))
    res, full, mask = run(Wt, H, s, "lobs", bias=bias, options=replace(LIT64, damp=damp))
    ref_w, ref_m = lobs_reference(Wt, H, k, frozen=int(bias), damp=damp)
    assert torch.equal(mask, ref_m)
    assert_close(full, ref_w, H=H)
    assert_close(res.error, ls_err(Wt, full, X), H=H)


@pytest.mark.parametrize("pattern", [(2, 4), (1, 4)])
def test_lobs_nm_matches_loop_reference(pattern):
    X = make_inputs(40, 8, seed=22, bias=True)
    H = hess(X)
    Wt = make_weight(4, 9, 22)
    res, full, mask = run(Wt, H, None, "lobs", bias=True, pattern=pattern, options=LIT64)
    ref_w, ref_m = lobs_reference(Wt, H, frozen=1, pattern=pattern)
    assert torch.equal(mask, ref_m)
    assert_close(full, ref_w, H=H)


def test_lobs_single_weight_is_exact_obs():
    """With one removal L-OBS is the exact OBS step: the refit optimum for that mask."""
    X = make_inputs(30, 6, seed=23)
    H = hess(X)
    Wt = make_weight(3, 6, 23)
    res, full, mask = run(Wt, H, 1 / 18, "lobs")
    assert pruned_count(mask) == 1
    assert_close(full, ls_fit(Wt, X, mask), H=H)
    Hinv = torch.linalg.inv(H)
    L = Wt.pow(2) / (2 * torch.diagonal(Hinv))
    assert_close(res.error, L.min(), H=H)
    assert not mask.view(-1)[L.view(-1).argmin()]


# =========================================================================== 6. fast


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pattern", [None, "2:4"])
@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_fast_update_matches_loop_reference_for_its_mask(bias, pattern, damp):
    X = make_inputs(50, 8, seed=31, bias=bias, kind="corr")
    H = hess(X)
    Wt = make_weight(5, X.shape[1], 31)
    s = None if pattern else 0.55
    for block in (1 if pattern is None else 4, 3 if pattern is None else 8, 128):
        res, full, mask = run(
            Wt, H, s, "fast", bias=bias, pattern=pattern, options=replace(LIT64, damp=damp, block_size=block)
        )
        assert_close(full, fast_update_reference(Wt, H, mask, damp), H=H)
        assert_close(res.error, ls_err(Wt, full, X), H=H)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("block", [1, 3, 4, 128])
def test_fast_unstructured_matches_full_reference(bias, block):
    X = make_inputs(50, 8, seed=32, bias=bias, kind="corr")
    H = hess(X)
    Wt = make_weight(5, X.shape[1], 32)
    res, full, mask = run(Wt, H, 0.55, "fast", bias=bias, options=replace(LIT64, block_size=block))
    ref_w, ref_m = fast_reference(Wt, H, 0.55, block, frozen=int(bias))
    assert torch.equal(mask, ref_m)
    assert_close(full, ref_w, H=H)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (2, 8)])
def test_fast_nm_matches_full_reference(bias, pattern):
    X = make_inputs(50, 16, seed=33, bias=bias, kind="corr")
    H = hess(X)
    Wt = make_weight(4, X.shape[1], 33)
    res, full, mask = run(Wt, H, None, "fast", bias=bias, pattern=pattern, options=LIT64)
    ref_w, ref_m = fast_reference(Wt, H, None, 128, frozen=int(bias), pattern=pattern)
    assert torch.equal(mask, ref_m)
    assert_close(full, ref_w, H=H)


@pytest.mark.parametrize(
    "block",
    [
        4,
        8,
        12,
        1,
        2,
        6,
    ],
)
def test_fast_nm_independent_of_block_size(block):
    """With N:M the mask is chosen from fully updated weights, so blocking must not matter."""
    X = make_inputs(50, 16, seed=34, bias=True, kind="corr")
    H = hess(X)
    Wt = make_weight(4, 17, 34)
    _, big_w, big_m = run(Wt, H, None, "fast", bias=True, pattern="2:4", options=replace(OPT64, block_size=512))
    _, w, m = run(Wt, H, None, "fast", bias=True, pattern="2:4", options=replace(OPT64, block_size=block))
    assert torch.equal(m, big_m)
    assert_close(w, big_w, H=H)


def test_fast_single_block_mask_is_global_sparsegpt_score():
    """With one block the mask is the k smallest w^2 / U_ii^2 of the original weights, layer-wide."""
    X = make_inputs(40, 7, seed=35, kind="corr")
    H = hess(X)
    Wt = make_weight(4, 7, 35)
    res, full, mask = run(Wt, H, 0.5, "fast")
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    score = Wt.pow(2) / torch.diagonal(U).pow(2)
    k = round(0.5 * 28)
    expect = torch.ones(28, dtype=torch.bool)
    expect[score.view(-1).argsort()[:k]] = False
    assert torch.equal(mask, expect.view(4, 7))


# =========================================================================== 7. N:M patterns


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", (3, 8), NMPattern(1, 2)])
def test_nm_pattern_counts(method, bias, pattern):
    nm = parse_pattern(pattern)
    d = 16
    X = make_inputs(60, d, seed=41, bias=bias, kind="corr")
    H = hess(X)
    Wt = make_weight(5, X.shape[1], 41)
    res, full, mask = run(Wt, H, None, method, bias=bias, pattern=pattern)
    zeros = (~res.mask).view(5, d // nm.m, nm.m).sum(-1)
    assert (zeros == nm.m - nm.n).all()
    assert (res.weight[~res.mask] == 0).all()
    if bias:
        assert torch.isfinite(res.bias).all() and res.bias.shape == (5,)
    assert_close(res.sparsity, nm.sparsity, rtol=0, atol=1e-7)
    # passing the matching sparsity explicitly is accepted and gives the same result
    res2, full2, _ = run(Wt, H, nm.sparsity, method, bias=bias, pattern=pattern)
    assert torch.equal(full2, full)


@pytest.mark.parametrize("method", METHODS)
def test_nm_pattern_errors(method):
    X = make_inputs(40, 6, seed=42)
    H = hess(X)
    Wt = make_weight(3, 6, 42)
    with pytest.raises(ValueError, match="multiple of 4"):
        solve_layer(Wt, H, method=method, pattern="2:4", solver=OPT64)
    X = make_inputs(40, 8, seed=42)
    with pytest.raises(ValueError, match="contradicts"):
        solve_layer(make_weight(3, 8, 42), hess(X), 0.3, method=method, pattern="2:4", solver=OPT64)
    # with a bias only the weight columns have to be a multiple of M
    Xb = make_inputs(40, 8, seed=42, bias=True)
    res = solve_layer(
        make_weight(3, 8, 42), hess(Xb), method=method, bias=torch.ones(3, dtype=F64), pattern="2:4", solver=OPT64
    )
    assert int((~res.mask).sum()) == 12


def test_parse_pattern():
    assert parse_pattern("2:4") == NMPattern(2, 4)
    assert parse_pattern((1, 4)) == NMPattern(1, 4)
    assert parse_pattern([3, 8]) == NMPattern(3, 8)
    assert parse_pattern(None) is None
    p = NMPattern(2, 4)
    assert parse_pattern(p) is p
    assert str(p) == "2:4" and p.sparsity == 0.5
    for bad in ("3:2", "x", (0, 4), "4:4", "2:4:8", "a:b", (2,), (1, 2, 3), 5, "-1:4", ""):
        with pytest.raises(ValueError):
            parse_pattern(bad)


# =========================================================================== 8. grouped Hessians


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_exact_refits_each_group_with_its_hessian(bias):
    groups, per, d = 3, 2, 6
    Xs, H3, Wt = grouped_data(groups, per, d, 51, bias)
    res, full, mask = run(Wt, H3, 0.5, "exact", bias=bias)
    assert pruned_count(mask) == round(0.5 * groups * per * d)
    total = 0.0
    for g in range(groups):
        sl = slice(g * per, (g + 1) * per)
        assert_close(full[sl], refit(Wt[sl], H3[g], mask[sl], OPT64), H=H3)
        assert_close(full[sl], ls_fit(Wt[sl], Xs[g], mask[sl]), H=H3)
        total += ls_err(Wt[sl], full[sl], Xs[g])
    assert_close(res.error, total, H=H3)
    assert_close(layer_error(Wt, full, H3), total, H=H3)
    assert_close(refit(Wt, H3, mask, OPT64), full, H=H3)


@pytest.mark.parametrize(
    "method,pattern", [("fast", None), ("fast", "2:4"), ("exact", "2:4"), ("lobs", "2:4"), ("exact", "1:4")]
)
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_equals_separate_solves(method, pattern, bias):
    groups, per, d = 2, 3, 8
    Xs, H3, Wt = grouped_data(groups, per, d, 52, bias)
    s = None if pattern else 0.5
    res, full, mask = run(Wt, H3, s, method, bias=bias, pattern=pattern)
    total = 0.0
    for g in range(groups):
        sl = slice(g * per, (g + 1) * per)
        r_g, f_g, m_g = run(Wt[sl], H3[g], s, method, bias=bias, pattern=pattern)
        assert torch.equal(mask[sl], m_g)
        assert_close(full[sl], f_g, H=H3)
        total += r_g.error
    assert_close(res.error, total, H=H3)


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_lobs_matches_loop_reference(bias):
    groups, per, d = 2, 3, 6
    Xs, H3, Wt = grouped_data(groups, per, d, 53, bias)
    res, full, mask = run(Wt, H3, 0.5, "lobs", bias=bias, options=LIT64)
    ref_w, ref_m = lobs_reference(Wt, H3, round(0.5 * groups * per * d), frozen=int(bias))
    assert torch.equal(mask, ref_m)
    assert_close(full, ref_w, H=H3)


def test_grouped_rows_must_split_evenly():
    H3 = torch.stack([hess(make_inputs(20, 4, seed=s)) for s in range(2)])
    with pytest.raises(ValueError, match="groups"):
        solve_layer(make_weight(3, 4, 0), H3, 0.5, solver=OPT64)


# =========================================================================== 9. dead inputs


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_dead_inputs_pruned_first_and_free(method, bias, damp):
    d, rows, dead = 10, 4, (0, 3, 7)
    X = make_inputs(50, d, seed=61, bias=bias, kind="corr", dead=dead)
    H = hess(X)
    Wt = make_weight(rows, X.shape[1], 61)
    Wt[:, list(dead)] *= 50.0  # large dead weights must still go first
    opts = replace(OPT64, damp=damp)
    for s in (0.3, 0.5):  # dead fraction is 0.3
        res, full, mask = run(Wt, H, s, method, bias=bias, options=opts)
        assert not mask[:, list(dead)].any(), f"dead inputs kept at sparsity {s}"
        assert pruned_count(mask) == round(s * rows * d)
        # other dead-weight values: same mask, same live weights, same error
        Wt2 = Wt.clone()
        Wt2[:, list(dead)] = make_weight(rows, len(dead), 62) * 1e-3
        res2, full2, mask2 = run(Wt2, H, s, method, bias=bias, options=opts)
        assert torch.equal(mask2, mask)
        assert_close(full2, full, H=H)
        assert_close(res2.error, res.error, H=H)
        assert_close(res.error, ls_err(Wt, full, X), H=H)


@pytest.mark.parametrize("method", METHODS)
def test_dead_inputs_nm(method):
    d, rows, dead = 8, 3, (1, 6)  # one dead input in each group of 4
    X = make_inputs(40, d, seed=63, bias=True, dead=dead)
    H = hess(X)
    Wt = make_weight(rows, d + 1, 63)
    Wt[:, list(dead)] *= 50.0
    res, full, mask = run(Wt, H, None, method, bias=True, pattern="2:4")
    assert not mask[:, list(dead)].any()


# =========================================================================== 10. validation


@pytest.mark.parametrize("method", METHODS)
def test_validation_errors(method):
    X = make_inputs(30, 5, seed=71)
    H = hess(X)
    W = make_weight(3, 5, 71)
    for bad in (1.0, -0.1, float("nan"), True, False, 1.5, float("inf"), "0.5"):
        with pytest.raises(ValueError):
            solve_layer(W, H, bad, method, solver=OPT64)
    with pytest.raises(ValueError, match="sparsity"):
        solve_layer(W, H, None, method, solver=OPT64)
    with pytest.raises(ValueError, match=r"\(5, 5\)"):
        solve_layer(W, hess(make_inputs(30, 4, seed=1)), 0.5, method, solver=OPT64)
    with pytest.raises(ValueError, match=r"\(6, 6\)"):  # a bias needs the extra column
        solve_layer(W, H, 0.5, method, bias=torch.zeros(3, dtype=F64), solver=OPT64)
    with pytest.raises(ValueError):
        solve_layer(W, H[:, :4], 0.5, method, solver=OPT64)
    with pytest.raises(ValueError):
        solve_layer(W, H.reshape(-1), 0.5, method, solver=OPT64)
    with pytest.raises(ValueError, match="bias"):
        solve_layer(
            W, hess(make_inputs(30, 5, seed=1, bias=True)), 0.5, method, bias=torch.zeros(4, dtype=F64), solver=OPT64
        )
    Hn = H.clone()
    Hn[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        solve_layer(W, Hn, 0.5, method, solver=OPT64)
    Wn = W.clone()
    Wn[0, 0] = float("inf")
    with pytest.raises(ValueError):
        solve_layer(Wn, H, 0.5, method, solver=OPT64)
    with pytest.raises(ValueError):
        solve_layer(W[0], H, 0.5, method, solver=OPT64)


def test_unknown_method_and_bad_options():
    X = make_inputs(30, 5, seed=72)
    with pytest.raises(ValueError, match="method"):
        solve_layer(make_weight(3, 5, 72), hess(X), 0.5, "obc")
    for kw in (
        dict(damp=-1.0),
        dict(damp=float("nan")),
        dict(dtype=torch.float16),
        dict(block_size=0),
        dict(lazy_steps=1.5),
    ):
        with pytest.raises(ValueError):
            SolverOptions(**kw)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="min_kept_per_row"):
            SolverOptions(min_kept_per_row=bad)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bias", [False, True])
def test_singular_hessian_warns_and_escalates_damping(method, bias):
    # +-1 inputs with a duplicated column: H holds exact values and is exactly singular
    X = make_inputs(16, 6, seed=73, kind="pm1", bias=bias)
    X[:, 1] = X[:, 0]
    H = hess(X)
    assert torch.linalg.matrix_rank(H) < H.shape[0]
    Wt = make_weight(4, X.shape[1], 73)
    with pytest.warns(RuntimeWarning, match="damping"):
        res, full, mask = run(Wt, H, 0.5, method, bias=bias)
    assert res.damp > 0
    assert torch.isfinite(full).all() and math.isfinite(res.error)
    assert pruned_count(mask) == round(0.5 * 4 * 6)
    assert_close(res.error, ls_err(Wt, full, X), H=H)


@pytest.mark.parametrize("method", METHODS)
def test_pd_hessian_does_not_warn(method):
    X = make_inputs(30, 5, seed=74)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = solve_layer(make_weight(3, 5, 74), hess(X), 0.4, method, solver=OPT64)
    assert res.damp == 0.0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("s", [0, 0.0])
def test_zero_sparsity_is_identity(method, s):
    X = make_inputs(30, 5, seed=75, bias=True)
    Wt = make_weight(3, 6, 75)
    res, full, mask = run(Wt, hess(X), s, method, bias=True)
    assert torch.equal(full, Wt) and mask.all() and res.error == 0.0


# =========================================================================== 11. sparsity accuracy


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bias", [False, True])
def test_pruned_count_is_rounded_target(method, bias):
    rows, d = 4, 5
    X = make_inputs(30, d, seed=81, bias=bias)
    H = hess(X)
    Wt = make_weight(rows, X.shape[1], 81)
    for s in (0.01, 0.05, 0.125, 0.3, 0.37, 0.5, 0.625, 0.9, 0.95, 0.99):
        res, full, mask = run(Wt, H, s, method, bias=bias)
        assert pruned_count(res.mask) == round(s * rows * d), (s, pruned_count(res.mask))
        assert (res.weight[~res.mask] == 0).all()
        if bias:
            assert mask[:, -1].all()


@pytest.mark.parametrize(
    "method",
    [
        "lobs",
        "exact",
        "fast",
    ],
)
def test_pruned_count_is_rounded_target_grouped(method):
    groups, per, d = 2, 2, 5
    Xs, H3, Wt = grouped_data(groups, per, d, 82, False)
    for s in (0.25, 0.35, 0.45):  # s * per * d = 2.5, 3.5, 4.5: per-group rounding differs from layer-wide
        res, _, mask = run(Wt, H3, s, method)
        assert pruned_count(mask) == round(s * groups * per * d), (s, pruned_count(mask))


# =========================================================================== 12. float32 stability


def test_float32_exact_is_stable():
    rows, d, n = 64, 128, 400
    X = make_inputs(n, d, seed=91, bias=True, kind="corr")
    H = hess(X)
    W = make_weight(rows, d, 91).float()
    b = torch.randn(rows, generator=torch.Generator().manual_seed(92)).float()
    r32 = solve_layer(W, H.float(), 0.9, "exact", bias=b)
    r64 = solve_layer(W.double(), H, 0.9, "exact", bias=b.double(), solver=SolverOptions(dtype=F64))
    assert r32.weight.dtype == torch.float32 and r32.bias.dtype == torch.float32
    assert int((~r32.mask).sum()) == int((~r64.mask).sum()) == round(0.9 * rows * d)
    rel = abs(r32.error - r64.error) / r64.error
    assert rel < 0.02, f"float32 error {r32.error} vs float64 {r64.error} (rel {rel:.3g})"
    # the float32 result's error is its true error, and no worse than float64's by much
    new = torch.cat([r32.weight, r32.bias.unsqueeze(1)], 1).double()
    old = torch.cat([W, b.unsqueeze(1)], 1).double()
    assert_close(r32.error, ls_err(old, new, X), rtol=1e-6, H=H)


@pytest.mark.parametrize("method", ["lobs", "fast"])
def test_float32_other_methods_track_float64(method):
    rows, d, n = 16, 64, 200
    X = make_inputs(n, d, seed=93, bias=True, kind="corr")
    H = hess(X)
    W = make_weight(rows, d, 93).float()
    b = torch.zeros(rows)
    r32 = solve_layer(W, H.float(), 0.7, method, bias=b)
    r64 = solve_layer(W.double(), H, 0.7, method, bias=b.double(), solver=SolverOptions(dtype=F64))
    assert abs(r32.error - r64.error) / r64.error < 0.02


# =========================================================================== 13. misc


@pytest.mark.parametrize("method", METHODS)
def test_conv_shaped_weight_flattens_trailing_dims(method):
    out, cin, k = 4, 2, 3
    X = make_inputs(40, cin * k * k, seed=95, bias=True)
    H = hess(X)
    Wt = make_weight(out, cin * k * k + 1, 95)
    W4 = Wt[:, :-1].reshape(out, cin, k, k)
    res4 = solve_layer(W4, H, 0.5, method, bias=Wt[:, -1], solver=OPT64)
    res2 = solve_layer(Wt[:, :-1], H, 0.5, method, bias=Wt[:, -1], solver=OPT64)
    assert res4.weight.shape == W4.shape and res4.mask.shape == W4.shape
    assert torch.equal(res4.weight.reshape(out, -1), res2.weight)
    assert torch.equal(res4.bias, res2.bias)
    assert res4.error == res2.error


def test_inputs_are_not_modified():
    X = make_inputs(30, 6, seed=96, bias=True)
    H = hess(X)
    Wt = make_weight(3, 7, 96)
    H0, W0 = H.clone(), Wt.clone()
    for m in METHODS:
        solve_layer(Wt[:, :-1], H, 0.5, m, bias=Wt[:, -1], solver=OPT64)
        refit(Wt, H, torch.rand(3, 7) > 0.5, OPT64)
        assert torch.equal(H, H0) and torch.equal(Wt, W0)


def test_damped_hessian_repairs_dead_and_damps():
    X = make_inputs(30, 5, seed=97, dead=(2,))
    H = hess(X)
    Hd, dead = damped_hessian(H, 0.1)
    assert dead.shape == (1, 5) and dead[0].tolist() == [False, False, True, False, False]
    diag = torch.diagonal(H).clone()
    diag[2] = 1.0
    expect = H.clone()
    expect.diagonal().copy_(diag + 0.1 * diag.mean())
    assert_close(Hd[0], expect, H=H)


def test_exact_lazy_steps_do_not_change_result():
    X = make_inputs(60, 12, seed=98, bias=True, kind="corr")
    H = hess(X)
    Wt = make_weight(6, 13, 98)
    base = run(Wt, H, 0.6, "exact", bias=True, options=replace(OPT64, lazy_steps=1))
    for lazy in (3, 32):
        got = run(Wt, H, 0.6, "exact", bias=True, options=replace(OPT64, lazy_steps=lazy))
        assert torch.equal(got[2], base[2])
        assert_close(got[1], base[1], H=H)
    small = run(Wt, H, 0.6, "exact", bias=True, options=replace(OPT64, max_memory_bytes=1))  # one row at a time
    assert torch.equal(small[2], base[2])
    assert_close(small[1], base[1], H=H)


# =========================================================================== 14. refit of lobs / fast masks


@pytest.mark.parametrize("method", ["lobs", "fast"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_default_refit_is_least_squares_on_the_literal_mask(method, bias, pattern):
    """By default lobs/fast keep their own mask but move the kept weights to the LS optimum for it."""
    X = make_inputs(60, 8, seed=61, bias=bias, kind="corr")
    H = hess(X)
    Wt = make_weight(5, X.shape[1], 61)
    s = None if pattern else 0.6
    lit, lit_full, lit_mask = run(Wt, H, s, method, bias=bias, pattern=pattern, options=LIT64)
    res, full, mask = run(Wt, H, s, method, bias=bias, pattern=pattern, options=OPT64)
    assert torch.equal(mask, lit_mask)
    assert_close(full, ls_fit(Wt, X, mask), H=H)  # brute-force lstsq per row
    assert_close(res.error, ls_err(Wt, full, X), H=H)
    assert res.error <= lit.error * (1 + solve_tol(H))
    # and the literal lobs sequence is measurably worse here (its stale updates leak onto removed weights)
    if method == "lobs" and pattern is None:
        assert lit.error > 1.01 * res.error


def test_refit_auto_is_direct_where_cheaper_else_cg(monkeypatch):
    X = make_inputs(60, 8, seed=62, kind="corr")
    H = hess(X)
    Wt = make_weight(5, 8, 62)
    auto = replace(OPT64, refit=None)
    on = run(Wt, H, 0.5, "fast", options=replace(OPT64, refit=True))[1]
    off = run(Wt, H, 0.5, "fast", options=LIT64)[1]
    assert not torch.allclose(on, off)
    assert torch.equal(run(Wt, H, 0.5, "fast", options=auto)[1], on)  # 5 x 8: the direct solve is cheaper
    monkeypatch.setattr(solvers_core, "DIRECT_REFIT_ROW_WORK", 1e30)  # now CG is: the same optimum, to its tolerance
    cg = run(Wt, H, 0.5, "fast", options=auto)[1]
    assert not torch.equal(cg, on)
    # a residual of rtol |b| leaves each row within cond(H_KK) <= cond(H) times rtol of its change (the CG bound)
    ev = torch.linalg.eigvalsh(H)
    bound = float(ev[-1] / ev[0]) * solvers_core.FAST_REFIT_RTOL * (on - Wt).norm(dim=1)
    assert bool(((cg - on).norm(dim=1) <= bound * (1 + 1e-9)).all())
    assert torch.equal(run(Wt, H, 0.5, "fast", options=replace(OPT64, refit=True))[1], on)


def test_refit_option_validated():
    with pytest.raises(ValueError, match="SolverOptions.refit"):
        SolverOptions(refit="yes")


# =========================================================================== 15. a greedy trace reused at several sparsities


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("prior", [False, True])
def test_greedy_trace_reused_across_sparsities(bias, prior):
    """solve_layer(trace=greedy_trace(...)) gives the very result of a fresh exact solve, at any sparsity."""
    X = make_inputs(60, 10, seed=71, bias=bias, kind="corr")
    H = hess(X)
    Wt = make_weight(4, X.shape[1], 71)
    W, b = (Wt[:, :10], Wt[:, 10]) if bias else (Wt, None)
    pm = None
    if prior:
        pm = torch.ones(4, 10, dtype=torch.bool)
        pm[0, :3] = False
        pm[2, 5] = False
        W = W * pm
    tr = greedy_trace(W, H, bias=b, solver=OPT64, prior_mask=pm)
    assert tr.order.shape == (4, 10) and tr.pattern is None
    costs = tr.removal_costs()
    assert costs.shape == (4, 10)
    # non-decreasing along each row's greedy order, so the cheapest-k of a row is a prefix of that order
    along = costs.gather(1, tr.order)
    assert torch.all(along[:, 1:] >= along[:, :-1])
    for s in (0.3, 0.5, 0.8):
        fresh = solve_layer(W, H, s, "exact", bias=b, solver=OPT64, prior_mask=pm)
        reused = solve_layer(W, H, s, "exact", bias=b, solver=OPT64, prior_mask=pm, trace=tr)
        assert torch.equal(fresh.mask, reused.mask)
        assert_close(fresh.weight, reused.weight, H=H)
        assert_close(fresh.error, reused.error, H=H)


def test_trace_must_fit():
    X = make_inputs(40, 8, seed=72, kind="corr")
    H = hess(X)
    W = make_weight(3, 8, 72)
    tr = greedy_trace(W, H, solver=OPT64)
    with pytest.raises(ValueError, match="method='exact' only"):
        solve_layer(W, H, 0.5, "fast", solver=OPT64, trace=tr)
    with pytest.raises(ValueError, match="trace does not fit"):
        solve_layer(W[:2], H, 0.5, "exact", solver=OPT64, trace=tr)
    with pytest.raises(ValueError, match="trace does not fit"):
        solve_layer(W, H, None, "exact", pattern="2:4", solver=OPT64, trace=tr)
