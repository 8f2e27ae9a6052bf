"""The column sweep's faster kernels against brute force: the k-lowest selection, the accumulated OBS losses that
the error curves now use instead of a float64 product per level, and the curve's direct fallback."""

from __future__ import annotations

import pytest
import torch

from lightning_lobs.solvers import SolverOptions, error_curve, inverse_with_damping, layer_error, solve_layer
from lightning_lobs.solvers.core import damped_hessian
from lightning_lobs.solvers.fast import ColumnSweep, lowest
from solver_refs import F64, hess, make_inputs, make_weight, solve_tol

# --------------------------------------------------------------------------- lowest(scores, k)


@pytest.mark.parametrize("seed", range(6))
def test_lowest_takes_exactly_k_of_the_lowest_first_ties_in_order(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # few distinct values, -1 (pruned before) and +inf (protected): ties everywhere
    scores = torch.randint(0, 5, (7, 9), generator=g).float()
    scores[torch.rand(7, 9, generator=g) < 0.1] = -1.0
    scores[torch.rand(7, 9, generator=g) < 0.1] = float("inf")
    flat = scores.reshape(-1)
    finite = int(torch.isfinite(flat).sum())
    for k in range(1, finite + 1):
        got = lowest(scores, k)
        assert got.shape == scores.shape and got.dtype == torch.bool
        # brute force: a stable sort takes the k lowest, equal scores in flat order
        want = torch.zeros(flat.numel(), dtype=torch.bool)
        want[sorted(range(flat.numel()), key=lambda i: (float(flat[i]), i))[:k]] = True
        assert torch.equal(got.reshape(-1), want), k


def test_lowest_on_distinct_scores_equals_topk() -> None:
    scores = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    for k in (1, 100, 4096, 8191, 8192):
        want = torch.zeros(scores.numel(), dtype=torch.bool)
        want[scores.reshape(-1).topk(k, largest=False).indices] = True
        assert torch.equal(lowest(scores, k).reshape(-1), want)


# --------------------------------------------------------------------------- the sweep's losses


def _layer(seed: int, dead: tuple[int, ...] = (), bias: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    X = make_inputs(300, 14, seed=seed, bias=bias, kind="corr", dead=dead)
    return make_weight(11, X.shape[1], seed), hess(X)


@pytest.mark.parametrize("damp", [0.01, 0.3])
@pytest.mark.parametrize("floor", [False, True])
def test_sweep_losses_are_the_error_under_the_damped_hessian(damp: float, floor: bool) -> None:
    """Summed ``err^2 / 2`` of every level = ``1/2 sum (w^ - w) H_damped (w^ - w)^T`` of the level's weights (float64
    quadratic form), with a bias column, dead inputs, a prior mask and the per-row minimum."""
    Wt, H = _layer(5, dead=(3, 8))
    opts = SolverOptions(dtype=F64, damp=damp)
    _, Hinv, used, dead = inverse_with_damping(H, opts)
    Hd, _ = damped_hessian(H, used, F64)
    g = torch.Generator().manual_seed(2)
    prior = torch.rand(11, 15, generator=g) < 0.1
    prior[:, -1] = False
    kept_by_floor = None
    if floor:
        kept_by_floor = torch.zeros(11, 14, dtype=torch.bool)
        kept_by_floor[:, 0] = True
    totals = [40, 70, 100, 125]  # all above the prior's ~15 removals
    sweep = ColumnSweep(None, 1, 4, prior, kept_by_floor)
    new, kept = sweep.run(Wt, Hinv[0], dead[0], totals)
    assert not any(sweep.filled)
    for k, total in enumerate(totals):
        assert int((~kept[k, :, :14]).sum()) == total and not bool((kept & prior).any())
        direct = layer_error(Wt, new[k], Hd)
        assert float(sweep.losses[k]) == pytest.approx(direct, rel=solve_tol(H, used), abs=solve_tol(H, used) * direct)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_error_curve_equals_the_direct_error_of_each_level(dtype: torch.dtype) -> None:
    """The curve (losses less the damping's share) against ``solve_layer``'s undamped float64 error of the same
    SparseGPT solve, level by level, with dead inputs and heavy damping; float32 within its own rounding."""
    Wt, H = _layer(7, dead=(2,))
    levels = [0.1, 0.3, 0.5, 0.7, 0.9]
    opts = SolverOptions(dtype=dtype, refit=False, damp=0.2, block_size=4)
    curve = error_curve(Wt[:, :-1].to(dtype), H, levels, bias=Wt[:, -1].to(dtype), solver=opts, sample_rows=11)
    energy = layer_error(Wt, torch.zeros_like(Wt), H)
    # float64: two routes to one solve; float32: the sweep's rounding, eps32 * cond * D as for the solves
    eps = torch.finfo(dtype).eps
    tol = solve_tol(H, 0.2) * eps / torch.finfo(F64).eps
    for s, c in zip(levels, curve.tolist()):
        res = solve_layer(Wt[:, :-1].to(dtype), H, s, "fast", bias=Wt[:, -1].to(dtype), solver=opts)
        assert c == pytest.approx(res.error / energy, rel=tol, abs=tol * float(curve.max())), s


def test_error_curve_evaluates_levels_the_sweep_filled_at_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """A level whose weights were pruned after the sweep (uncompensated, ``_fill_short``) is not covered by the
    losses: the curve evaluates it directly. Forced here by a sweep whose blocks choose nothing."""
    Wt, H = _layer(9)
    levels = [0.25, 0.5]
    opts = SolverOptions(dtype=F64, refit=False, block_size=4)
    seen: list[tuple[torch.Tensor, list[bool]]] = []
    real_run = ColumnSweep.run

    def spy(self, W, Hinv, dead, totals, tick=None):
        out = real_run(self, W, Hinv, dead, totals, tick)
        seen.append((out[0], list(self.filled)))
        return out

    monkeypatch.setattr(ColumnSweep, "_block_mask", lambda *a, **k: None)
    monkeypatch.setattr(ColumnSweep, "run", spy)
    curve = error_curve(Wt[:, :-1], H, levels, bias=Wt[:, -1], solver=opts, sample_rows=11)
    (new, filled) = seen[0]
    assert all(filled)
    energy = layer_error(Wt, torch.zeros_like(Wt), H)
    for k in range(len(levels)):
        direct = layer_error(Wt, new[k], H) / energy
        assert direct > 0
        assert float(curve[k]) == pytest.approx(direct, rel=solve_tol(H, 0.01), abs=solve_tol(H, 0.01) * direct)
