"""``lobs``/``fast``'s refit: the batched CG (:func:`~lightning_lobs.solvers.cg.refit_kept`) against the direct
per-row solve (:func:`~lightning_lobs.solvers.refit`) on small layers, where both can run.

Bounds, per row with kept set K, ``b = (H w_R)_K``, ``delta* = H_KK^-1 b`` and a final residual ``|r| <= rtol |b|``:
the solution's error ``e = H_KK^-1 r`` has ``|e| <= cond(H_KK) rtol |delta*|`` and the layer error's excess
``e^T H_KK e / 2 <= rtol^2 |b|^2 / (2 lambda_min(H_KK))``. In float32 the residual itself carries rounding of about
``eps32 * d * |H| |x|``, added to both bounds.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

import lightning_lobs.solvers.cg as solvers_cg
import lightning_lobs.solvers.core as solvers_core
from lightning_lobs.config import SolverOptions
from lightning_lobs.solvers import layer_error, refit, solve_layer
from lightning_lobs.solvers.cg import cg_refit, refit_kept
from lightning_lobs.solvers.core import FAST_REFIT_RTOL, damped_hessian, refit_plan

F64 = torch.float64


def llm_like(rows: int, d: int, seed: int, tokens: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 weight and Hessian of correlated inputs with one 20x outlier channel (the benchmark's layers)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, d, generator=g, dtype=F64) @ (
        0.3 * torch.eye(d, dtype=F64) + torch.randn(d, d, generator=g, dtype=F64) / d**0.5
    )
    X[:, int(torch.randint(d, (1,), generator=g))] *= 20.0
    return torch.randn(rows, d, generator=g, dtype=F64) / d**0.5, X.T @ X / tokens


def check_rows(
    cg: torch.Tensor,
    direct: torch.Tensor,
    W: torch.Tensor,
    Hd: torch.Tensor,
    mask: torch.Tensor,
    rtol: float,
    eps: float,
) -> None:
    """Every row of ``cg`` within the CG bounds of ``direct`` (both solve with the damped ``Hd``)."""
    assert bool((cg[~mask] == 0).all())
    d = W.shape[1]
    for r in range(W.shape[0]):
        K = mask[r].nonzero().squeeze(1)
        if K.numel() == 0:
            assert bool((cg[r] == 0).all())
            continue
        A = Hd[K][:, K]
        ev = torch.linalg.eigvalsh(A)
        cond = float(ev[-1] / ev[0])
        b = Hd[K] @ (W[r] * ~mask[r])
        slack = eps * d * float(A.abs().max()) * float(direct[r].abs().max() + W[r].abs().max())  # |r| rounding
        resid = rtol * float(b.norm()) + slack
        e = cg[r, K].double() - direct[r, K]
        assert float(e.norm()) <= resid / float(ev[0]) * (1 + 1e-6), f"row {r}: cond {cond:.3g}"
        excess = 0.5 * float(e @ A @ e)
        assert excess <= 0.5 * resid**2 / float(ev[0]) * (1 + 1e-6), f"row {r}"


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cg_refit_at_the_fast_tolerance_within_bounds_of_direct(seed: int, dtype: torch.dtype) -> None:
    W, H = llm_like(12, 32, seed)
    opts = SolverOptions(dtype=dtype, damp=0.01, min_kept_per_row=0)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(seed)) > 0.6
    direct = refit(W, H, mask, replace(opts, dtype=F64))
    start = (W + 0.05 * torch.randn(W.shape, dtype=F64, generator=torch.Generator().manual_seed(7))) * mask
    # enough iterations that the residual criterion, not the cap, ends every row
    cg = cg_refit(W.to(dtype), H.to(dtype), mask, opts, x0=start.to(dtype), rtol=FAST_REFIT_RTOL, maxiter=200)
    Hd = damped_hessian(H, opts.damp)[0][0]
    eps = 0.0 if dtype == F64 else torch.finfo(dtype).eps
    check_rows(cg.double(), direct, W, Hd, mask, FAST_REFIT_RTOL, eps + torch.finfo(F64).eps)
    # and the layer error: never below the optimum, above it by the bound's excess at most
    err_d, err_c = layer_error(W, direct, Hd), layer_error(W, cg.double(), Hd)
    assert err_c >= err_d * (1 - 1e-9 - 10 * eps)


def test_refit_kept_on_singular_hessian_reaches_the_least_squares_error() -> None:
    """Rank-deficient H, no damping: CG stays in the consistent system's range and meets lstsq's layer error."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(6, 12, generator=g, dtype=F64)  # 6 tokens: H has rank 6 of 12
    H = X.T @ X / 6
    W = torch.randn(5, 12, generator=g, dtype=F64)
    mask = torch.rand(W.shape, generator=g) > 0.3  # about 8 kept per row: H_KK singular
    opts = SolverOptions(dtype=F64, damp=0.0, min_kept_per_row=0)
    direct = refit(W, H, mask, opts)  # Cholesky fails on some rows: lstsq
    rtol = 1e-10
    cg = cg_refit(W, H, mask, opts, rtol=rtol, maxiter=100)
    assert torch.isfinite(cg).all()
    # the excess over the optimum is at most rtol^2 |b|^2 / (2 lambda_min+) per row (the smallest nonzero eigenvalue:
    # the residual stays in H_KK's range), plus the rounding of two float64 routes, eps * d * |H| |w|^2 per row
    eps = torch.finfo(F64).eps
    tol = 0.0
    for r in range(W.shape[0]):
        K = mask[r].nonzero().squeeze(1)
        ev = torch.linalg.eigvalsh(H[K][:, K])
        positive = ev[ev > ev[-1] * K.numel() * eps * 100]
        b = H[K] @ (W[r] * ~mask[r])
        tol += 0.5 * (rtol * float(b.norm())) ** 2 / float(positive[0])
        tol += eps * 12 * float(H.abs().max()) * float(W[r].abs().max()) ** 2 * 100
    assert abs(layer_error(W, cg, H) - layer_error(W, direct, H)) <= tol


def test_dead_rows_dead_inputs_and_groups() -> None:
    """A row with nothing kept stays 0, a dead input (zero diagonal) is repaired as in the direct solve, 3-d H."""
    W, H1 = llm_like(8, 16, 11)
    _, H2 = llm_like(8, 16, 12)
    H = torch.stack([H1, H2])
    H[1, 3, :] = 0
    H[1, :, 3] = 0
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(5)) > 0.5
    mask[2] = False
    opts = SolverOptions(dtype=F64, damp=0.01, min_kept_per_row=0)
    direct = refit(W, H, mask, opts)
    cg = cg_refit(W, H, mask, opts, rtol=1e-12, maxiter=200)
    assert bool((cg[2] == 0).all())
    Hd = damped_hessian(H, opts.damp)[0]
    check_rows(cg[:4], direct[:4], W[:4], Hd[0], mask[:4], 1e-12, 2 * torch.finfo(F64).eps)
    check_rows(cg[4:], direct[4:], W[4:], Hd[1], mask[4:], 1e-12, 2 * torch.finfo(F64).eps)


def force_cg(monkeypatch: pytest.MonkeyPatch, uncapped: bool = True) -> None:
    """The CG refit on any layer; ``uncapped``: enough iterations that the residual, not the cap, ends every row
    (CG is exact after k steps in exact arithmetic), so that the residual bounds apply."""
    monkeypatch.setattr(solvers_core, "DIRECT_REFIT_ROW_WORK", 1e30)
    if uncapped:
        monkeypatch.setattr(solvers_cg, "FAST_REFIT_ITERATIONS", 200)


@pytest.mark.parametrize("method", ["fast", "lobs"])
@pytest.mark.parametrize("target", [0.5, 0.7, "2:4"])
def test_fast_and_lobs_with_the_cg_refit_match_the_direct_refit(
    monkeypatch: pytest.MonkeyPatch, method: str, target
) -> None:
    """Same mask (the refit never changes it), N:M kept, layer error within the CG bound of the direct refit's."""
    W, H = llm_like(16, 32, 21)
    kw = {"pattern": target} if isinstance(target, str) else {"sparsity": target}
    opts = SolverOptions(dtype=F64, min_kept_per_row=0)
    direct = solve_layer(W, H, method=method, solver=replace(opts, refit=True), **kw)
    assert refit_plan(opts, 16, 32, 1.0) == "direct"
    force_cg(monkeypatch)
    assert refit_plan(opts, 16, 32, 1.0) == "cg"
    cg = solve_layer(W, H, method=method, solver=opts, **kw)
    assert torch.equal(cg.mask, direct.mask)
    if isinstance(target, str):
        assert bool((cg.mask.reshape(16, 8, 4).sum(-1) == 2).all())
    assert bool((cg.weight[~cg.mask] == 0).all())
    Hd = damped_hessian(H, direct.damp)[0][0]
    check_rows(cg.weight, direct.weight, W, Hd, cg.mask, FAST_REFIT_RTOL, 2 * torch.finfo(F64).eps)
    none = solve_layer(W, H, method=method, solver=replace(opts, refit=False), **kw)
    # the refits minimise the error under the damped H: there, direct <= CG <= none (CG descends from the sweep)
    errors = [layer_error(W, r.weight, Hd) for r in (direct, cg, none)]
    assert errors[0] * (1 - 1e-12) <= errors[1]
    if method == "fast":  # lobs's refit=False is the paper's sequence, not the CG's start
        assert errors[1] <= errors[2] * (1 + 1e-12)


def test_fast_cg_refit_float32_and_monotone_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default float32 solve through CG: finite, error between the direct refit's and none, ticks in order."""
    W, H = llm_like(24, 64, 31)
    direct = solve_layer(W.float(), H.float(), 0.6, method="fast", solver=SolverOptions(refit=True))
    force_cg(monkeypatch, uncapped=False)  # the default cap: the error still lies between the direct refit's and none
    ticks: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cg = solve_layer(W.float(), H.float(), 0.6, method="fast", tick=ticks.append)
    none = solve_layer(W.float(), H.float(), 0.6, method="fast", solver=SolverOptions(refit=False))
    assert torch.equal(cg.mask, direct.mask)
    Hd = damped_hessian(H, direct.damp)[0][0]
    errors = [layer_error(W, r.weight.double(), Hd) for r in (direct, cg, none)]
    # float32: each error carries about eps32 * d relative rounding
    slack = 64 * torch.finfo(torch.float32).eps
    assert errors[0] * (1 - slack) <= errors[1] <= errors[2] * (1 + slack)
    assert ticks == sorted(ticks) and all(0.0 <= t <= 1.0 for t in ticks)


def test_refit_kept_none_zeroes_the_pruned_weights() -> None:
    W, H = llm_like(4, 8, 41)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    out, how = refit_kept(W, H, mask, SolverOptions(refit=False, dtype=F64))
    assert how == "none" and torch.equal(out, W * mask)
