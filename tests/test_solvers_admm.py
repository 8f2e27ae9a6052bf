"""The ``admm`` solver (ADMM with mask reselection) and the batched conjugate-gradient refit.

References: the direct per-row least-squares refit (``solvers.refit``) for CG, and brute force over every mask of
tiny layers (1x8, 2x8) for ADMM, where the optimum of the least-squares layer error is known exactly.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_lobs.config import SolverOptions, parse_pattern
from lightning_lobs.solvers import layer_error, refit, solve_layer
from lightning_lobs.solvers.admm import AdmmSolver, admm_prune
from lightning_lobs.solvers.cg import cg_refit

F64 = SolverOptions(dtype=torch.float64)


def llm_like(rows: int, d: int, seed: int, tokens: int = 256, bias: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and Hessian of correlated inputs with one outlier channel 20x larger (float64)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, d, generator=g, dtype=torch.float64) @ (
        0.3 * torch.eye(d, dtype=torch.float64) + torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    )
    X[:, int(torch.randint(d, (1,), generator=g))] *= 20.0
    if bias:
        X = torch.cat([X, torch.ones(tokens, 1, dtype=torch.float64)], dim=1)
    W = torch.randn(rows, d, generator=g, dtype=torch.float64) / d**0.5
    return W, X.T @ X / tokens


# --------------------------------------------------------------------------- the pattern is met


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_unstructured_sparsity_exact_and_rows_alive(sparsity: float) -> None:
    W, H = llm_like(12, 32, seed=1)
    res = admm_prune(W, H, sparsity, solver=F64)
    assert int((~res.mask).sum()) == round(sparsity * W.numel())
    assert bool((res.weight[~res.mask] == 0).all())
    assert bool((res.mask.sum(dim=1) >= 1).all())
    assert res.method == "admm" and res.error == pytest.approx(layer_error(W, res.weight, H), rel=1e-12)


def test_per_row_minimum_lowers_sparsity_with_warning() -> None:
    W, H = llm_like(6, 16, seed=2)
    with pytest.warns(RuntimeWarning, match="min_kept_per_row=3"):
        res = admm_prune(W, H, 0.95, solver=SolverOptions(dtype=torch.float64, min_kept_per_row=3))
    assert res.mask.sum(dim=1).tolist() == [3] * 6


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_pattern_exact(pattern: str) -> None:
    nm = parse_pattern(pattern)
    W, H = llm_like(8, 32, seed=3)
    res = admm_prune(W, H, pattern=pattern, solver=F64)
    assert bool((res.mask.reshape(8, -1, nm.m).sum(-1) == nm.n).all())
    assert bool((res.weight[~res.mask] == 0).all())


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_prior_pruned_stay_pruned_and_count(pattern: str | None) -> None:
    W, H = llm_like(8, 32, seed=4)
    g = torch.Generator().manual_seed(0)
    if pattern is None:
        prior = torch.rand(W.shape, generator=g) > 0.3
    else:  # at most 2 of every 4 pruned before
        prior = torch.ones(W.shape, dtype=torch.bool)
        prior.view(8, -1, 4)[:, :, 0] = torch.rand(8, 8, generator=g) > 0.5
    res = admm_prune(W, H, None if pattern else 0.6, pattern=pattern, prior_mask=prior, solver=F64)
    assert not bool((res.mask & ~prior).any())
    if pattern is None:
        assert int((~res.mask).sum()) == round(0.6 * W.numel())


def test_bias_moves_but_is_never_pruned_and_groups() -> None:
    W, Hb = llm_like(6, 16, seed=5, bias=True)
    b = torch.randn(6, dtype=torch.float64)
    res = admm_prune(W, Hb, 0.5, bias=b, solver=F64)
    assert res.bias is not None and not torch.equal(res.bias, b)
    full_old, full_new = torch.cat([W, b[:, None]], 1), torch.cat([res.weight, res.bias[:, None]], 1)
    assert res.error == pytest.approx(layer_error(full_old, full_new, Hb), rel=1e-12)
    # grouped Hessians: rows split into contiguous blocks, each with its own H
    W2, H2 = llm_like(8, 16, seed=6)
    _, H3 = llm_like(8, 16, seed=7)
    res = admm_prune(W2, torch.stack([H2, H3]), 0.5, solver=F64)
    assert int((~res.mask).sum()) == 64
    assert res.error == pytest.approx(layer_error(W2, res.weight, torch.stack([H2, H3])), rel=1e-12)


def test_invalid_arguments() -> None:
    W, H = llm_like(4, 8, seed=8)
    with pytest.raises(ValueError, match="contradicts"):
        admm_prune(W, H, 0.3, pattern="2:4")
    with pytest.raises(ValueError, match="sparsity is required"):
        admm_prune(W, H)
    with pytest.raises(ValueError, match="hessian must be"):
        admm_prune(W, H[:4, :4], 0.5)


# --------------------------------------------------------------------------- CG refit against the direct solve


def _damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    return H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("warm", [False, True])
def test_cg_refit_within_condition_bound_of_direct(seed: int, warm: bool) -> None:
    """Per row, |x_cg - x*| <= cond(H_KK) * rtol * |x* - w_K|: a residual of rtol |b| moves x by at most that."""
    W, H = llm_like(10, 24, seed=10 + seed)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(seed)) > 0.6
    rtol = 1e-5
    direct = refit(W, H, mask, F64)
    x0 = W + 0.1 * torch.randn(W.shape, dtype=W.dtype, generator=torch.Generator().manual_seed(99)) if warm else None
    cg = cg_refit(W, H, mask, F64, x0=x0, rtol=rtol, maxiter=10 * W.shape[1])
    assert bool((cg[~mask] == 0).all())
    Hd = _damped(H, F64.damp)
    for r in range(W.shape[0]):
        K = mask[r].nonzero().squeeze(1)
        if K.numel() == 0:
            continue
        ev = torch.linalg.eigvalsh(Hd[K][:, K])
        cond = float(ev[-1] / ev[0])
        change = (direct[r, K] - W[r, K]).norm()
        assert (cg[r, K] - direct[r, K]).norm() <= cond * rtol * change * (1 + 1e-6) + 1e-14, f"row {r}"


def test_cg_refit_tight_tolerance_equals_direct_with_groups() -> None:
    W, H1 = llm_like(8, 16, seed=20)
    _, H2 = llm_like(8, 16, seed=21)
    Hg = torch.stack([H1, H2])
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    torch.testing.assert_close(
        cg_refit(W, Hg, mask, F64, rtol=1e-13, maxiter=200), refit(W, Hg, mask, F64), rtol=1e-9, atol=1e-11
    )
    # warm-started from the answer, every row's residual is already below rtol: no step moves it
    direct = refit(W, Hg, mask, F64)
    torch.testing.assert_close(
        cg_refit(W, Hg, mask, F64, x0=direct, rtol=1e-6, maxiter=50), direct, rtol=1e-13, atol=1e-15
    )


# --------------------------------------------------------------------------- ADMM against brute force on tiny layers


def _row_optimum(w: torch.Tensor, H: torch.Tensor, allowed) -> dict:
    """Least-squares error of the best kept set of each size (or of the pattern), over every subset of one row."""
    d = w.numel()
    best: dict = {}
    for k in range(d + 1):
        for K in itertools.combinations(range(d), k):
            if not allowed(K):
                continue
            R = [j for j in range(d) if j not in K]
            S = H[R][:, R]
            if K and R:
                S = S - H[R][:, list(K)] @ torch.linalg.solve(H[list(K)][:, list(K)], H[list(K)][:, R])
            cost = 0.5 * float(w[R] @ S @ w[R]) if R else 0.0
            best[k] = min(best.get(k, math.inf), cost)
    return best


def _optimum(W: torch.Tensor, H: torch.Tensor, sparsity: float | None, pattern: str | None) -> float:
    rows, d = W.shape
    if pattern is not None:
        nm = parse_pattern(pattern)
        ok = lambda K: all(sum(1 for j in K if g * nm.m <= j < (g + 1) * nm.m) == nm.n for g in range(d // nm.m))  # noqa: E731
        return sum(min(_row_optimum(W[r], H, ok).values()) for r in range(rows))
    per = [_row_optimum(W[r], H, lambda K: True) for r in range(rows)]
    keep = rows * d - round(sparsity * rows * d)
    splits = (ks for ks in itertools.product(range(1, d + 1), repeat=rows) if sum(ks) == keep)  # one kept per row
    return min(sum(per[r][k] for r, k in enumerate(ks)) for ks in splits)


@pytest.mark.parametrize(
    "rows, sparsity, pattern", [(1, 0.5, None), (2, 0.5, None), (2, 0.7, None), (1, None, "2:4"), (2, None, "2:4")]
)
def test_admm_near_brute_force_optimum_and_beats_sparsegpt(
    rows: int, sparsity: float | None, pattern: str | None
) -> None:
    """30 seeded 1x8 / 2x8 layers (correlated inputs, one 20x channel), no damping, float64.

    Asserted: never below the optimum (it is one); exactly optimal on at least half of the seeds; within 2x of it on
    at least 85%; no worse than SparseGPT (``fast``) on at least 85%. (Measured when written: optimal on 18-22 of
    30, within 2x on 28-30, no worse than ``fast`` on 28-30; ``fast`` was up to 190x the optimum.)
    """
    opts = SolverOptions(dtype=torch.float64, damp=0.0)
    ratios: list[float] = []
    wins = 0
    for seed in range(30):
        W, H = llm_like(rows, 8, seed)
        best = _optimum(W, H, sparsity, pattern)
        got = admm_prune(W, H, sparsity, pattern=pattern, solver=opts).error
        sgpt = solve_layer(W, H, sparsity, method="fast", pattern=pattern, solver=opts).error
        assert got >= best * (1 - 1e-9) - 1e-15, f"seed {seed}: below the brute-force optimum"
        ratios.append(got / best if best > 0 else (1.0 if got <= 1e-15 else math.inf))
        wins += got <= sgpt * (1 + 1e-9) + 1e-15
    assert sum(r <= 1 + 1e-6 for r in ratios) >= 15, ratios
    assert sum(r <= 2.0 for r in ratios) >= 26, ratios
    assert wins >= 26


def test_zero_sparsity_returns_the_dense_weights_and_ticks() -> None:
    W, H = llm_like(4, 8, seed=9)
    res = admm_prune(W, H, 0.0, solver=F64)
    assert bool(res.mask.all()) and torch.allclose(res.weight, W, rtol=0, atol=1e-15) and res.error < 1e-25
    seen: list[float] = []
    admm_prune(W, H, 0.5, solver=F64, tick=seen.append)
    assert seen and seen[-1] == 1.0 and all(0.0 <= a <= b <= 1.0 for a, b in zip(seen, seen[1:]))
    with pytest.raises(ValueError, match="iterations must be an int"):
        AdmmSolver(iterations=-1)
    # fewer iterations is a valid (if worse) solve: still the exact pattern
    quick = AdmmSolver(iterations=3, refit_iterations=0).prune(W, H, 0.5, solver=F64)
    assert int((~quick.mask).sum()) == 16 and bool((quick.weight[~quick.mask] == 0).all())


def test_dead_inputs_go_first_and_conv_shapes_round_trip() -> None:
    W, H = llm_like(6, 12, seed=30)
    H[3, :] = 0.0  # input 3 was always zero: its weights cost nothing to remove
    H[:, 3] = 0.0
    res = admm_prune(W, H, 1 / 12, solver=SolverOptions(dtype=torch.float64, min_kept_per_row=0))
    assert not bool(res.mask[:, 3].any()) and int((~res.mask).sum()) == 6
    conv = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, Hc = llm_like(4, 18, seed=31)
    out = admm_prune(conv, Hc, 0.5, solver=F64)
    assert out.weight.shape == conv.shape and out.mask.shape == conv.shape and int((~out.mask).sum()) == 36


def test_default_float32_beats_sparsegpt_on_a_wider_layer() -> None:
    """The library's default precision (float32 solve) on a 64x128 LLM-like layer, against ``fast`` there."""
    W, H = llm_like(64, 128, seed=40, tokens=512)
    for kw in ({"sparsity": 0.7}, {"pattern": "2:4"}):
        got = admm_prune(W.float(), H.float(), **kw)
        assert got.weight.dtype == torch.float32
        assert got.error < solve_layer(W.float(), H.float(), method="fast", **kw).error


def test_two_four_fast_path_equals_topk_with_ties_and_pruned() -> None:
    from lightning_lobs.solvers.admm import _nm_keep, _topk_keep

    g = torch.Generator().manual_seed(0)
    for trial in range(10):
        x = torch.randn(20, 16, 4, generator=g).abs()
        if trial % 2:
            x = (x * 3).round()  # many ties
        x[torch.rand(x.shape, generator=g) < 0.1] = -math.inf  # prior-pruned entries
        assert torch.equal(_nm_keep(x, 2), _topk_keep(x.reshape(-1, 4), 2).reshape(x.shape))


def test_eigendecomposition_ticks_while_it_runs_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The eigendecomposition runs in a worker thread while the caller ticks: same result as with no tick."""
    import lightning_lobs.solvers.admm as admm_mod

    monkeypatch.setattr(admm_mod, "EIGH_TICK_SECONDS", 1e-4)
    W, H = llm_like(40, 64, seed=5)
    ticks: list[float] = []
    lam, Q = admm_mod.eigh_with_ticks(H, ticks.append)
    ref_lam, ref_Q = torch.linalg.eigh(H)
    assert torch.equal(lam, ref_lam) and torch.equal(Q, ref_Q)
    assert ticks and all(t == 0.0 for t in ticks)  # alive, no share of the work claimed
    with_ticks = admm_prune(W, H, 0.5, tick=lambda f: None)
    assert torch.equal(with_ticks.weight, admm_prune(W, H, 0.5).weight)
