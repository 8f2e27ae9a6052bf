"""ADMM pruning with mask reselection, then a conjugate-gradient refit.

The layer problem ``min_W (W - W0) H (W - W0)^T`` subject to ``W`` having the sparsity pattern is split, as in ALPS
(Meng et al., NeurIPS 2024) and Boza's ADMM (TMLR 2024), into a dense copy ``W`` and a sparse copy ``Z`` held
together by a penalty ``rho/2 |W - Z + U|^2`` with the scaled dual ``U``:

* ``W``: the ridge solve ``W (H + rho I) = W0 H + rho (Z - U)``;
* ``Z``: the projection of ``W + U`` onto the pattern (the largest entries layer-wide with each row's minimum
  kept, or the largest N of every M columns), which reselects the mask at every iteration;
* ``U += W - Z``.

``rho`` grows every few iterations, slowly while the support still moves and faster as it settles, which pulls
``W`` onto ``Z`` and freezes the mask; the loop ends once the mask has stopped changing (it does not wait for
``W = Z``: the refit makes the kept weights exact). The kept weights are then refitted to the least-squares optimum
for the final mask by preconditioned conjugate gradients on all rows at once (:mod:`.cg`), warm-started from ADMM's
sparse copy. Measured against ALPS's own code on LLM-like 768/3072-wide layers (BENCHMARKS.md): a lower layer error
at 50%, 70% and 2:4 in 0.4-0.9x its time, and 60-78% less error than SparseGPT's own code at 11-14x its time.

Everything runs in the Jacobi-scaled coordinates ``w_j sqrt(H_jj)``: there ``H`` has a unit diagonal, the
projection ranks weights by ``|w_j| sqrt(H_jj)`` (so 20x outlier input channels are not pruned by raw magnitude),
one ``rho`` fits every column, and CG's Jacobi preconditioner is the identity. One eigendecomposition
``H = Q diag(l) Q^T`` makes every ridge solve, whatever ``rho``, two matrix products: ``W = (B0 + rho (Z - U) Q)
/ (l + rho) Q^T`` with ``B0 = W0 Q diag(l)``.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..config import SolverOptions
from .cg import masked_cg
from .core import (
    GEMM_TICK_FACTOR,
    LayerInputs,
    PatternLike,
    RowFloor,
    Solution,
    SolveResult,
    Tick,
    damped_cholesky,
    layer_error,
    prepare_inputs,
    sub_tick,
    tick_rows,
)

__all__ = ["ADMM_ITERATIONS", "REFIT_ITERATIONS", "AdmmSolver", "admm_prune", "admm_work"]

#: Most ADMM iterations (each: two ``rows x d x d`` products and a projection).
ADMM_ITERATIONS = 120
#: ``rho`` at the start, relative to the unit diagonal of the scaled H.
RHO_START = 0.15
#: Iterations between two updates of ``rho``.
RHO_EVERY = 3
#: The loop stops after two updates of ``rho`` in a row in which at most this fraction of the kept entries changed.
SETTLED_CHANGE = 1e-5
#: Most conjugate-gradient iterations of the final refit, and the residual at which a row stops.
REFIT_ITERATIONS = 20
REFIT_RTOL = 1e-4
#: Iterations a solve usually runs before the mask settles, for the progress estimate: 57-63 measured on 128-512 x
#: 128-256 LLM-like layers at 50%, 70% and 2:4 (the loop stops early; ``ADMM_ITERATIONS`` is only its bound).
TYPICAL_ITERATIONS = 60
#: Flops of a symmetric eigendecomposition with eigenvectors, per ``d^3`` (Golub & Van Loan's count for the QR
#: algorithm; LAPACK's divide and conquer does less, at a lower rate than a matmul).
EIGH_FLOPS_PER_CUBE = 9.0


def admm_work(rows: int, d: int, groups: int = 1, iterations: int = TYPICAL_ITERATIONS) -> float:
    """Estimated flops of one ``admm`` solve: the eigendecomposition of every group's ``d x d`` H, two
    ``rows x d x d`` products per ADMM iteration, and one per CG iteration of the refit (at most
    :data:`REFIT_ITERATIONS`, plus its start)."""
    return EIGH_FLOPS_PER_CUBE * groups * d**3 + 2.0 * rows * d * d * (2 * iterations + REFIT_ITERATIONS + 2)


class _Projector:
    """Keep-mask of the pattern that keeps the largest ``|v| * weight_j`` (the Euclidean projection's support)."""

    def __init__(self, x: LayerInputs, column_weight: Tensor | None, floor: RowFloor) -> None:
        self.x, self.column_weight = x, column_weight  # (rows, d): 0 on dead inputs, so they go first; None: all live
        self.min_kept = floor.per_row
        pruned = x.pruned_before
        self.forced = None if pruned is None else pruned[:, : x.columns]
        removed = int(round(x.sparsity * x.rows * x.columns))
        if self.forced is not None:
            removed = max(removed, int(self.forced.sum()))
        self.keep = x.rows * x.columns - removed
        self.threshold: float | None = None

    def __call__(self, V: Tensor) -> Tensor:
        x = self.x
        rows, d = V.shape[0], x.columns
        scores = V[:, :d].abs()
        if self.column_weight is not None:
            scores.mul_(self.column_weight)
        if self.forced is not None:
            scores.masked_fill_(self.forced, -math.inf)
        mask = torch.ones_like(V, dtype=torch.bool)
        if x.pattern is not None:
            mask[:, :d] = _nm_keep(scores.reshape(rows, d // x.pattern.m, x.pattern.m), x.pattern.n).reshape(rows, d)
            return mask
        if self.min_kept > 0:  # each row's largest (allowed) entries rank above everything
            top = scores.topk(min(self.min_kept, d), dim=1).indices
            best = scores.gather(1, top)
            scores.scatter_(1, top, torch.where(best > -math.inf, math.inf, best))  # never a prior-pruned one
        sub, self.threshold = _largest(scores.reshape(-1), self.keep, self.threshold)
        mask[:, :d] = sub.reshape(rows, d)
        return mask


def _nm_keep(grouped: Tensor, n: int) -> Tensor:
    """``(rows, groups, m)`` True on the ``n`` largest of every group (``topk``'s choice where values tie).

    2:4 takes a comparison network for each group's second largest value, a few passes where ``topk`` along a
    dimension of 4 costs a third of an ADMM iteration; groups with ties at that value fall back to ``topk``.
    """
    if (n, grouped.shape[-1]) != (2, 4):
        return _topk_keep(grouped, n)
    a, b, c, e = grouped.unbind(-1)
    high = torch.minimum(torch.maximum(a, b), torch.maximum(c, e))
    second = torch.maximum(high, torch.maximum(torch.minimum(a, b), torch.minimum(c, e)))
    keep = grouped >= second.unsqueeze(-1)
    tied = keep.sum(-1) != n
    if bool(tied.any()):
        keep[tied] = _topk_keep(grouped[tied], n)
    return keep


def _topk_keep(groups: Tensor, n: int) -> Tensor:
    """``(k, m)`` True on the ``n`` largest of each row, as ``topk`` breaks ties."""
    drop = groups.topk(groups.shape[-1] - n, dim=-1, largest=False).indices
    return torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)


def _largest(flat: Tensor, keep: int, hint: float | None) -> tuple[Tensor, float | None]:
    """Mask of ``keep`` largest entries of ``flat`` and the threshold, found near ``hint`` when possible.

    A full selection (``topk``/``kthvalue``) over millions of scores costs as much as the ADMM iteration's two
    matrix products; the threshold moves little between iterations, so counting against a narrow band around the
    last one and selecting only inside the band is a few linear passes. Ties at the threshold go to the lowest index.
    """
    n = flat.numel()
    if keep <= 0:
        return torch.zeros_like(flat, dtype=torch.bool), hint
    if keep >= n:
        return torch.ones_like(flat, dtype=torch.bool), hint
    thr = None
    if hint is not None and math.isfinite(hint) and hint > 0:
        for width in (1e-3, 1e-2, 1e-1):
            lo, hi = hint * (1 - width), hint * (1 + width)
            above = int(torch.count_nonzero(flat > hi))
            if above < keep <= int(torch.count_nonzero(flat > lo)):
                band = flat[(flat > lo) & (flat <= hi)]
                thr = float(band.kthvalue(band.numel() - (keep - above) + 1).values)
                break
    if thr is None:
        thr = float(flat.kthvalue(n - keep + 1).values)
    mask = flat > thr
    missing = keep - int(torch.count_nonzero(mask))
    if missing > 0:
        mask[(flat == thr).nonzero().squeeze(1)[:missing]] = True
    return mask, thr


def _rho_factor(changed: float) -> float:
    """How much ``rho`` grows after a check: slowly while many of the kept entries still change, faster later."""
    if changed > 0.05:
        return 1.1
    if changed > 0.005:
        return 1.2
    return 1.3


@dataclass(frozen=True)
class AdmmSolver:
    """The ``admm`` method: ``solve(inputs, options, tick) -> Solution`` as the registry's solvers do.

    Attributes:
        iterations: most ADMM iterations (the loop usually stops earlier, once the mask has settled).
        refit_iterations: most CG iterations of the final refit (0: ADMM's sparse copy is returned as it is).
    """

    name = "admm"
    iterations: int = ADMM_ITERATIONS
    refit_iterations: int = REFIT_ITERATIONS

    def __post_init__(self) -> None:
        for field_name in ("iterations", "refit_iterations"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"AdmmSolver.{field_name} must be an int >= 0, got {value!r}.")

    def solve(self, inputs: LayerInputs, options: SolverOptions, tick: Tick | None) -> Solution:
        """Prune ``inputs`` to its sparsity (already lowered to the per-row minimum)."""
        x, G = inputs, inputs.groups
        rows, D, per = x.rows, x.width, x.rows // x.groups
        # The damping rule of every method: raised tenfold, with a warning, while H + damp is not positive definite
        # (the CG refit needs it; the eigendecomposition alone would not fail).
        Hd, _, damp, dead = damped_cholesky(x.H.to(x.W.device), options, stacklevel=4)
        scale = torch.diagonal(Hd, dim1=-2, dim2=-1).sqrt()  # (G, D)
        Hs = Hd / scale.unsqueeze(-1) / scale.unsqueeze(-2)
        W0 = x.W.to(options.dtype).reshape(G, per, D) * scale.unsqueeze(1)
        column_weight = None
        if bool(dead.any()):
            live = (~dead).to(options.dtype).to(x.W.device)
            column_weight = live.unsqueeze(1).expand(G, per, D).reshape(rows, D)[:, : x.columns]
        project = _Projector(x, column_weight, RowFloor.for_solve(options, x.pattern))
        if project.keep == rows * x.columns:  # nothing to prune: the dense weights are the optimum
            mask, W = torch.ones_like(W0, dtype=torch.bool), W0
        else:
            mask, W = _admm_loop(W0, Hs, project, self.iterations, tick)
        mask = mask.reshape(G, per, D)
        if self.refit_iterations > 0 and not bool(mask.all()):
            W = masked_cg(
                Hs, W0, mask, x0=W, rtol=REFIT_RTOL, maxiter=self.refit_iterations, tick=sub_tick(tick, 0.9, 0.1)
            )
        if tick is not None:
            tick(1.0)
        return Solution((W * mask / scale.unsqueeze(1)).reshape(rows, D), mask.reshape(rows, D), damp)

    def prune(
        self,
        weight: Tensor,
        hessian: Tensor,
        sparsity: float | None = None,
        *,
        pattern: PatternLike = None,
        bias: Tensor | None = None,
        prior_mask: Tensor | None = None,
        solver: SolverOptions | None = None,
        tick: Tick | None = None,
    ) -> SolveResult:
        """:func:`admm_prune` with this solver's iteration limits."""
        options = solver or SolverOptions()
        x = prepare_inputs(weight, hessian, sparsity, bias, pattern, prior_mask)
        floor = RowFloor.for_solve(options, x.pattern)
        x = replace(x, sparsity=floor.limit_sparsity(x.sparsity, x.rows, x.columns, x.pruned_before, "admm", 4))
        out = self.solve(x, options, tick)
        if not torch.isfinite(out.weight).all():
            raise FloatingPointError(
                "the admm solve produced non-finite weights; raise SolverOptions.damp or use float64."
            )
        new = out.weight.to(weight.dtype)
        return SolveResult(
            weight=new[:, : x.columns].reshape(x.shape).clone(),
            mask=out.kept[:, : x.columns].reshape(x.shape).clone(),
            bias=new[:, -1].clone() if x.bias_cols else None,
            error=layer_error(x.W, out.weight, x.H),
            damp=out.damp,
            method="admm",
        )


def admm_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float | None = None,
    *,
    pattern: PatternLike = None,
    bias: Tensor | None = None,
    prior_mask: Tensor | None = None,
    solver: SolverOptions | None = None,
    tick: Tick | None = None,
) -> SolveResult:
    """Prune one layer by ADMM with mask reselection, then refit the kept weights by conjugate gradients.

    Arguments as in :func:`~lightning_lobs.solvers.solve_layer` (``weight`` ``(out, ...)``, ``hessian`` ``(D, D)``
    or ``(groups, D, D)`` with ``D = d + 1`` when a bias is given; the bias is never pruned but moves; weights that
    ``prior_mask`` prunes stay pruned and count towards ``sparsity``; unstructured solves keep
    ``solver.min_kept_per_row`` weights per row). ``tick`` is called with the fraction of the work done. Other
    iteration limits: ``AdmmSolver(iterations=..., refit_iterations=...).prune(...)``.
    """
    return AdmmSolver().prune(
        weight, hessian, sparsity, pattern=pattern, bias=bias, prior_mask=prior_mask, solver=solver, tick=tick
    )


def _admm_loop(
    W0: Tensor, Hs: Tensor, project: _Projector, iterations: int, tick: Tick | None
) -> tuple[Tensor, Tensor]:
    """The ADMM iterations on ``(G, R, D)`` scaled weights; returns the final keep-mask and the sparse copy ``Z``."""
    G, R, D = W0.shape
    lam, Q = eigh_with_ticks(Hs, tick)
    lam = lam.clamp_min(0).unsqueeze(1)  # (G, 1, D)
    B0 = (W0 @ Q) * lam
    Qt = Q.transpose(-1, -2).contiguous()
    mask = project(W0.reshape(G * R, D)).reshape(G, R, D)
    Z = W0 * mask
    U = torch.zeros_like(W0)
    rho, settled, changed_total = RHO_START, 0, 0
    kept = max(int(mask.sum()), 1)
    # Rows per ridge solve so that a tick follows at most GEMM_TICK_FACTOR x PROGRESS_TICK_FLOPS of work; chunked
    # whether or not anyone listens, so that a tick never changes the result.
    chunk = tick_rows(R, 4.0 * G * D * D / GEMM_TICK_FACTOR)
    for it in range(iterations):
        step_tick = sub_tick(tick, 0.9 * it / iterations, 0.9 / iterations)
        W = _ridge(Z - U, Q, Qt, B0, lam, rho, chunk, step_tick)
        V = W + U
        new_mask = project(V.reshape(G * R, D)).reshape(G, R, D)
        changed_total += int(torch.count_nonzero(new_mask != mask))
        mask = new_mask
        Z = V * mask
        U = V - Z
        if step_tick is not None:
            step_tick(1.0)
        if (it + 1) % RHO_EVERY == 0:
            fraction = changed_total / kept
            settled = settled + 1 if fraction <= SETTLED_CHANGE else 0
            changed_total = 0
            rho *= _rho_factor(fraction)
            if settled >= 2:  # the refit that follows makes W = Z exactly: no need to drive rho up further
                break
    return mask, Z


#: While the eigendecomposition runs (seconds at width 3072, no ticks inside LAPACK), ``admm`` ticks every this many
#: seconds from the calling thread.
EIGH_TICK_SECONDS = 0.5


def eigh_with_ticks(H: Tensor, tick: Tick | None) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh(H)``, with ``tick(0.0)`` (alive, no share of the work done) every
    :data:`EIGH_TICK_SECONDS` while it runs and once after: it runs in a worker thread (torch releases the GIL
    inside it), the ticks come from the caller's thread. Without ``tick`` it is a plain call."""
    if tick is None:
        return torch.linalg.eigh(H)
    threads = torch.get_num_threads()

    def run() -> tuple[Tensor, Tensor]:
        torch.set_num_threads(threads)  # OpenMP's thread count is per thread: the caller's, so a tick changes nothing
        return torch.linalg.eigh(H)

    with ThreadPoolExecutor(max_workers=1) as pool:
        job = pool.submit(run)
        while True:
            try:
                lam, Q = job.result(timeout=EIGH_TICK_SECONDS)
                break
            except FutureTimeout:
                tick(0.0)
    tick(0.0)
    return lam, Q


def _ridge(
    target: Tensor, Q: Tensor, Qt: Tensor, B0: Tensor, lam: Tensor, rho: float, chunk: int, tick: Tick | None
) -> Tensor:
    """``W = (B0 + rho target Q) / (lam + rho) Q^T`` (ADMM's W step), ``chunk`` rows of each group at a time."""
    R = target.shape[1]
    if chunk >= R:
        return (target @ Q).mul_(rho).add_(B0).div_(lam + rho) @ Qt
    W = torch.empty_like(target)
    for start in range(0, R, chunk):
        rows = slice(start, start + chunk)
        W[:, rows] = (target[:, rows] @ Q).mul_(rho).add_(B0[:, rows]).div_(lam + rho) @ Qt
        if tick is not None:
            tick(min(start + chunk, R) / R)
    return W
