"""Refit of the kept weights for a fixed mask by conjugate gradients on all rows at once.

:func:`~lightning_lobs.solvers.refit` solves every row's kept block ``H_KK`` with its own Cholesky factor:
``sum_rows k^3 / 3`` flops in batched small factorisations. Here every row runs preconditioned conjugate gradients
on the same dense ``H``, with the mask zeroing the pruned coordinates, so one iteration of all rows is a single
``(rows x d) @ (d x d)`` product: GEMM speed, and ``maxiter * 2 rows d^2`` flops whatever the sparsity.

The iterate is the change ``delta`` of the kept weights, as in ``refit``: ``H_KK delta_K = (H w_R)_K``, driven only by
the removed weights ``w_R``, so a kept weight of any size cannot swamp the right-hand side in rounding. The
preconditioner is Jacobi (``1 / diag H``). A row stops moving once its residual is at most ``rtol`` times its
right-hand side; the classical bound then holds per row: ``|delta - delta*| <= cond(P H_KK) rtol |delta*|`` (in the
norm the preconditioner defines), which is what the tests check against the direct solve.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import SolverOptions
from .core import (
    FAST_REFIT_ITERATIONS,
    FAST_REFIT_RTOL,
    GEMM_TICK_FACTOR,
    RefitKind,
    Tick,
    damped_hessian,
    refit,
    refit_flops,
    refit_plan,
    sub_tick,
    tick_rows,
)

__all__ = ["cg_refit", "masked_cg", "refit_kept"]

#: Default relative residual at which a row's conjugate gradients stop.
CG_RTOL = 1e-4


def masked_cg(
    hessian: Tensor,
    weight: Tensor,
    mask: Tensor,
    *,
    x0: Tensor | None = None,
    rtol: float = CG_RTOL,
    maxiter: int | None = None,
    tick: Tick | None = None,
) -> Tensor:
    """Minimise ``(x - w) H (x - w)^T`` per row over ``x`` with ``x = 0`` where ``mask`` is False.

    Args:
        hessian: ``(G, D, D)`` symmetric positive definite (already damped); row block ``g`` uses ``hessian[g]``.
        weight: ``(G, R, D)`` the dense weights ``w``.
        mask: ``(G, R, D)`` bool, True where a weight is kept.
        x0: optional ``(G, R, D)`` warm start (its pruned entries are ignored).
        rtol: a row stops when ``|r| <= rtol |b|`` (unpreconditioned residual of the masked system).
        maxiter: most iterations (default ``D``, where CG is exact in exact arithmetic).
        tick: optional progress callback, called with the fraction of ``maxiter`` done after each iteration and,
            where one iteration's product exceeds ``GEMM_TICK_FACTOR x PROGRESS_TICK_FLOPS``, after each chunk of
            rows of it.

    Returns:
        ``x`` as a ``(G, R, D)`` tensor in ``weight``'s dtype.
    """
    keep = mask.to(weight.dtype)
    removed = weight * (1 - keep)
    b = (removed @ hessian).mul_(keep)  # H symmetric: (H w_R)^T per row
    delta = torch.zeros_like(weight) if x0 is None else (x0 - weight).mul_(keep)
    r = b - (delta @ hessian).mul_(keep) if x0 is not None else b.clone()
    dinv = keep / torch.diagonal(hessian, dim1=-2, dim2=-1).unsqueeze(-2)
    limit = rtol * torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    z = r * dinv
    p = z.clone()
    rz = torch.linalg.vecdot(r, z).unsqueeze(-1)
    steps = hessian.shape[-1] if maxiter is None else maxiter
    # Rows per product chunk, a tick after each: chunked whether or not anyone listens, so a tick changes nothing.
    chunk = tick_rows(weight.shape[-2], 2.0 * hessian.shape[0] * hessian.shape[-1] ** 2 / GEMM_TICK_FACTOR)
    # The (rows x D) passes are fused and in place (vecdot, addcmul_): beside the product they cost a third of
    # an iteration on a 768 x 3072 layer when each made a temporary.
    for it in range(steps):
        active = torch.linalg.vector_norm(r, dim=-1, keepdim=True) > limit
        if not bool(active.any()):
            break
        step_tick = sub_tick(tick, it / steps, 1.0 / steps)
        Ap = _product(p, hessian, chunk, step_tick).mul_(keep)
        pAp = torch.linalg.vecdot(p, Ap).unsqueeze(-1)
        # Converged rows (and rows with nothing left to do, pAp = 0) take no step.
        alpha = torch.where(active & (pAp > 0), rz / torch.where(pAp > 0, pAp, torch.ones_like(pAp)), 0.0)
        delta.addcmul_(alpha, p)
        r.addcmul_(alpha, Ap, value=-1.0)
        torch.mul(r, dinv, out=z)
        rz_new = torch.linalg.vecdot(r, z).unsqueeze(-1)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), 0.0)
        p.mul_(beta).add_(z)
        rz = rz_new
        if step_tick is not None:  # the same expression as the chunks' last tick: fractions never go back
            step_tick(1.0)
    return delta.add_(weight * keep)


def _product(p: Tensor, hessian: Tensor, chunk: int, tick: Tick | None) -> Tensor:
    """``p @ hessian`` for ``(G, R, D)`` ``p``, ``chunk`` rows of each group at a time, ``tick(fraction)`` after each."""
    R = p.shape[-2]
    if chunk >= R:
        return p @ hessian
    out = torch.empty_like(p)
    for start in range(0, R, chunk):
        out[:, start : start + chunk] = p[:, start : start + chunk] @ hessian
        if tick is not None:
            tick(min(start + chunk, R) / R)
    return out


def cg_refit(
    weight: Tensor,
    hessian: Tensor,
    mask: Tensor,
    solver: SolverOptions | None = None,
    *,
    x0: Tensor | None = None,
    rtol: float = CG_RTOL,
    maxiter: int | None = None,
    tick: Tick | None = None,
) -> Tensor:
    """Iterative counterpart of :func:`~lightning_lobs.solvers.refit`: same damped system, same arguments.

    ``weight`` is ``(rows, D)``, ``hessian`` ``(D, D)`` or ``(groups, D, D)`` (rows split into contiguous blocks),
    ``mask`` the keep-mask. H is damped by ``solver.damp`` as ``refit`` does; the solve runs in ``solver.dtype``.
    ``x0`` warm-starts it (a sweep's or ADMM's weights); see :func:`masked_cg` for ``rtol`` and ``maxiter``.
    """

    solver = solver or SolverOptions()
    H, _ = damped_hessian(hessian, solver.damp, solver.dtype)
    H = H.to(weight.device)
    G, D = H.shape[0], H.shape[-1]
    rows = weight.shape[0]
    if rows % G:
        raise ValueError(f"{rows} output rows cannot be split evenly into {G} Hessian groups.")
    shape = (G, rows // G, D)
    W = weight.to(solver.dtype).reshape(shape)
    start = None if x0 is None else x0.to(solver.dtype).reshape(shape)
    out = masked_cg(H, W, mask.reshape(shape).to(torch.bool), x0=start, rtol=rtol, maxiter=maxiter, tick=tick)
    return out.reshape(rows, D).to(weight.dtype)


def refit_kept(
    weight: Tensor,
    hessian: Tensor,
    mask: Tensor,
    solver: SolverOptions,
    *,
    x0: Tensor | None = None,
    tick: Tick | None = None,
) -> tuple[Tensor, RefitKind]:
    """``lobs``/``fast``'s refit of the keep-mask ``mask``: ``(weights, how)``, ``how`` from
    :func:`~lightning_lobs.solvers.core.refit_plan`.

    ``"direct"``: :func:`~lightning_lobs.solvers.core.refit` (one Cholesky per row, exact); ``"cg"``:
    :func:`cg_refit` warm-started from ``x0`` (the sweep's weights), at most ``FAST_REFIT_ITERATIONS`` steps to a
    relative residual of ``FAST_REFIT_RTOL``; ``"none"``: ``weight`` with the pruned entries zeroed.
    """
    kept = mask.to(torch.bool)
    how = refit_plan(solver, weight.shape[0], weight.shape[1], refit_flops(kept))
    if how == "direct":
        return refit(weight, hessian, kept, solver, tick), how
    if how == "cg":
        out = cg_refit(
            weight, hessian, kept, solver, x0=x0, rtol=FAST_REFIT_RTOL, maxiter=FAST_REFIT_ITERATIONS, tick=tick
        )
        return out, how
    return (weight if x0 is None else x0).masked_fill(~kept, 0), how
