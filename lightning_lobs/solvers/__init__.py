"""Optimal Brain Surgeon solvers for one layer: pure tensor functions.

Every solver works on a weight matrix ``W`` (rows x d) and the layer-input Hessian
``H = (1/n) sum x~ x~^T`` (d x d, or groups x d x d for grouped convolutions, whose
output rows split into ``groups`` contiguous blocks). Pruning a row ``w`` to ``w^``
costs ``1/2 (w^ - w) H (w^ - w)^T``; a layer's error ``dE`` is the sum over rows.

Methods
-------
``lobs``   The L-OBS paper's rule (Dong et al. 2017): one damped ``H^-1`` per layer,
           every weight ranked once, layer-wide, by ``L_q = w_q^2 / (2 [H^-1]_qq)``.
           The removed set is then compensated jointly: the kept weights move to the
           least-squares optimum for that mask (the multi-weight OBS update,
           :func:`refit`). With ``SolverOptions(refit=False)`` the paper's literal
           sequence is used instead: the lowest-ranked are removed one after another,
           each applying the single-weight correction ``-(w_q / [H^-1]_qq) H^-1 e_q``
           with that same, stale ``H^-1``. Those corrections also move weights that were
           already removed, which the final mask then zeroes, so the literal sequence
           can end worse than no correction at all (see BENCHMARKS.md).
``exact``  Greedy OBS with exact downdates (OBC, Frantar & Alistarh 2022): every
           row removes its cheapest weight, downdates its own ``H^-1`` and repeats.
           Downdates are accumulated lazily as a low-rank factor and flushed every
           ``lazy_steps`` removals with one batched matmul, so the greedy choice stays
           exact while the memory traffic is matmul-shaped. The OBS loss of every
           removal is recorded; per-row budgets are then chosen from those losses so
           that the layer's summed error is smallest for the requested count, and the
           kept weights are refitted to the least-squares optimum for the final mask.
``fast``   SparseGPT (Frantar & Alistarh 2023): Cholesky factor of ``H^-1``, columns
           processed left to right in blocks with lazy updates, mask chosen per block;
           then, where affordable (``SolverOptions.refit``), the kept weights are
           refitted to the least-squares optimum for SparseGPT's mask.

Across layers (``lightning_lobs.allocation``): :func:`error_curve` measures a layer's
relative SparseGPT error at a grid of sparsities in one batched sweep; :func:`obs_scores`
gives the one-pass OBS costs and :func:`allocate_global` pools per-weight costs; errors
are divided by :func:`output_energy` so that layers compare relative output errors.

Unstructured solves keep ``SolverOptions.min_kept_per_row`` weights in every output row
(default 1: no dead rows): ``lobs`` ranks each row's costliest weights last, ``exact``
stops each row's trace that many steps early, ``fast`` never prunes them and moves the
block quotas so that every removal is still compensated.

All three support N:M patterns (keep N of every M consecutive input columns).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..checks import as_real, describe
from ..config import METHODS, NMPattern, SolverOptions, parse_pattern

__all__ = [
    "GreedyTrace",
    "PROGRESS_TICK_FLOPS",
    "REFIT_AUTO_MAX_FLOPS",
    "SolveResult",
    "allocate_global",
    "damped_hessian",
    "error_curve",
    "greedy_trace",
    "layer_error",
    "magnitude_mask",
    "obs_scores",
    "output_energy",
    "refit",
    "solve_layer",
    "Tick",
]

#: ``SolverOptions(refit=None)`` refits ``lobs``/``fast`` masks when the batched solve of the
#: kept submatrices costs at most this many flops (about ten seconds on 2 CPU cores).
REFIT_AUTO_MAX_FLOPS = 2e11
#: The long kernels (``exact``'s greedy trace, the refit, SparseGPT's column sweep, the error
#: curves) call their ``tick`` at least once per this many estimated floating-point operations:
#: about 0.1 s at the 2e10 flop/s one core does in the trace's batched matmuls, so even a core
#: ten times slower reports well within 2 s. Row chunks are sized for it, not only for memory.
PROGRESS_TICK_FLOPS = 2e9

#: Progress counts the refit's flops this many times: its batched k x k Cholesky solves and gathers run at about
#: a third of the flop rate of the trace's matmuls on one core (measured on 128x1152 and 256x2304 layers).
_REFIT_WORK_FACTOR = 3.0

#: Progress counts choosing ``exact``'s mask from its trace (a bisection over every row's cost curve, then single
#: moves between rows) as this much work per weight: about 0.5 s for a 512x1024 layer on one core.
_MASK_WORK_PER_WEIGHT = 2e4

#: A progress callback of the kernels: called with the fraction in [0, 1] of the call's work done.
Tick = Callable[[float], None]


def _sub_tick(tick: Optional[Tick], start: float, share: float) -> Optional[Tick]:
    """``tick`` for a part of the work that starts at fraction ``start`` and makes up ``share`` of it."""
    if tick is None:
        return None
    return lambda f: tick(start + share * min(max(f, 0.0), 1.0))


def _alive(tick: Optional[Tick], flops: float) -> None:
    """After a factorisation with no ticks inside: tick (no share of work done) when it was a tick's worth of work."""
    if tick is not None and flops >= PROGRESS_TICK_FLOPS:
        tick(0.0)


def _tick_rows(rows: int, flops_per_row: float) -> int:
    """Rows per chunk so that one chunk's work between two ticks stays within :data:`PROGRESS_TICK_FLOPS`."""
    return max(1, min(rows, int(PROGRESS_TICK_FLOPS // max(flops_per_row, 1.0))))


@dataclass
class SolveResult:
    """Outcome of :func:`solve_layer`.

    Attributes:
        weight: the pruned weight, same shape and dtype as the input weight.
        mask: bool tensor of the weight's shape, True where a weight is kept.
        bias: the updated bias when a bias was given (OBS moves it too), else None.
        error: layer-wise error ``dE = 1/2 sum_rows (w^-w) H (w^-w)^T`` with the undamped H.
        damp: relative damping finally used (higher than asked when H was singular).
        method: the method that produced the result.
    """

    weight: Tensor
    mask: Tensor
    bias: Optional[Tensor]
    error: float
    damp: float
    method: str

    @property
    def sparsity(self) -> float:
        return 1.0 - self.mask.float().mean().item()


# --------------------------------------------------------------------------- helpers


def _as_groups(hessian: Tensor) -> Tensor:
    if hessian.dim() == 2:
        return hessian.unsqueeze(0)
    if hessian.dim() == 3:
        return hessian
    raise ValueError(f"hessian must be (d, d) or (groups, d, d), got shape {tuple(hessian.shape)}.")


def _row_groups(rows: int, groups: int, device: torch.device) -> Tensor:
    return torch.arange(rows, device=device) // (rows // groups)


def damped_hessian(hessian: Tensor, damp: float, dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    """Return ``(H + damp * mean(diag H) * I, dead)`` per group with dead inputs repaired.

    A dead input (zero diagonal: the input was always 0 on the calibration data) gets
    a unit diagonal so that H stays invertible; its weights cost nothing to remove.
    """
    H = _as_groups(hessian).to(dtype).clone()
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag <= 0
    diag[dead] = 1.0
    mean = diag.mean(dim=-1, keepdim=True)
    diag += damp * mean
    return H, dead


def _inverse_with_damping(hessian: Tensor, options: SolverOptions) -> Tuple[Tensor, Tensor, float, Tensor]:
    """Damp H, escalating tenfold while it is not positive definite.

    Returns ``(H_damped, H_damped^-1, damp, dead)`` in the solver dtype.
    """
    damp = options.damp
    for attempt in range(options.max_damp_tries + 1):
        H, dead = damped_hessian(hessian, damp, options.dtype)
        L, info = torch.linalg.cholesky_ex(H)
        if not bool((info != 0).any()):
            return H, torch.cholesky_inverse(L).contiguous(), damp, dead
        if attempt == options.max_damp_tries:
            break
        new_damp = max(damp * 10.0, 1e-6)
        warnings.warn(
            f"Hessian is not positive definite with relative damping {damp:g}; retrying with {new_damp:g}. "
            "More calibration batches usually fix this.",
            RuntimeWarning,
            stacklevel=3,
        )
        damp = new_damp
    raise torch.linalg.LinAlgError(
        f"Hessian stayed singular after raising the relative damping to {damp:g}; "
        "check the calibration data for constant or NaN inputs, or raise SolverOptions.damp."
    )


def layer_error(weight_old: Tensor, weight_new: Tensor, hessian: Tensor) -> float:
    """``dE = 1/2 sum_rows (w^ - w) H (w^ - w)^T`` in float64.

    ``hessian`` is ``(d, d)`` or ``(groups, d, d)``; with groups, the ``out`` rows are split into
    ``groups`` contiguous blocks and block ``j`` uses ``hessian[j]``.  Weights may be given as
    ``(out, d)`` matrices or in their original (conv) shape.
    """
    H = _as_groups(hessian).detach().double()
    g, d = H.shape[0], H.shape[-1]
    if weight_old.shape != weight_new.shape:
        raise ValueError(f"weight shapes differ: {tuple(weight_old.shape)} vs {tuple(weight_new.shape)}")
    rows = weight_old.shape[0]
    delta = (weight_new.detach().double() - weight_old.detach().double().to(weight_new.device)).reshape(rows, -1)
    if delta.shape[1] != d:
        raise ValueError(f"weight has {delta.shape[1]} columns but the hessian is {d} x {d}")
    if rows % g:
        raise ValueError(f"{rows} output rows cannot be split into {g} groups")
    delta = delta.to(H.device).reshape(g, rows // g, d)
    return 0.5 * float(torch.einsum("gri,gij,grj->", delta, H, delta))


def magnitude_mask(weight: Tensor, sparsity: float, pattern: Optional[NMPattern] = None, frozen: int = 0) -> Tensor:
    """Keep-mask of the largest-magnitude weights (layer-wide, or N:M per group of columns)."""
    scores = weight.abs().float().clone()
    if frozen:
        scores[:, -frozen:] = math.inf
    return _mask_from_scores(scores, sparsity, pattern, frozen)


def _mask_from_scores(scores: Tensor, sparsity: float, pattern: Optional[NMPattern], frozen: int) -> Tensor:
    """Prune the lowest scores: ``sparsity`` of the prunable entries layer-wide, or N:M per row."""
    rows, d = scores.shape
    dp = d - frozen
    mask = torch.ones_like(scores, dtype=torch.bool)
    if pattern is not None:
        grouped = scores[:, :dp].reshape(rows, dp // pattern.m, pattern.m)
        drop = grouped.topk(pattern.m - pattern.n, dim=-1, largest=False).indices
        sub = torch.ones_like(grouped, dtype=torch.bool).scatter_(-1, drop, False)
        mask[:, :dp] = sub.reshape(rows, dp)
        return mask
    flat = scores[:, :dp].reshape(-1)
    k = max(int(round(sparsity * rows * dp)), int(torch.isneginf(flat).sum()))
    if k > 0:
        drop = flat.topk(k, largest=False).indices
        sub = torch.ones_like(flat, dtype=torch.bool)
        sub[drop] = False
        mask[:, :dp] = sub.reshape(rows, dp)
    return mask


def _row_chunk(rows: int, d: int, element_size: int, max_bytes: int, copies: int = 1) -> int:
    return max(1, min(rows, max_bytes // max(1, copies * d * d * element_size)))


def refit(
    weight: Tensor, hessian: Tensor, mask: Tensor, solver: Optional[SolverOptions] = None, tick: Optional[Tick] = None
) -> Tensor:
    """Least-squares optimum of the kept weights for a fixed mask (the joint OBS update).

    For each row solves ``min (w^ - w) H (w^ - w)^T`` subject to ``w^ = 0`` where the
    mask is False, i.e. ``H_KK w^_K = (H w)_K`` on the row's kept columns K only (so the
    cost falls with sparsity). Columns kept in every row (a bias column, say) simply take
    part in the solve. H is damped as in the solvers. The solve is for the change
    ``w^_K - w_K = H_KK^-1 H_KR w_R``, which only the removed weights drive: a kept weight
    of any magnitude (a bias 1e20 times the others) cannot swamp it in rounding. ``tick``
    (optional) is called with the fraction of the work done after each chunk of rows.
    """
    solver = solver or SolverOptions()
    H, _ = damped_hessian(hessian, solver.damp, solver.dtype)
    G, d = H.shape[0], H.shape[-1]
    rows = weight.shape[0]
    gidx = _row_groups(rows, G, weight.device)
    H = H.to(weight.device)
    W = weight.to(solver.dtype)
    keep = mask.to(torch.bool)
    per = rows // G
    removed = W.masked_fill(keep, 0)
    HW = torch.cat([removed[g * per : (g + 1) * per] @ H[g] for g in range(G)])  # H symmetric: rows of (H w_R)^T
    counts = keep.sum(dim=1)
    out = torch.zeros_like(W)
    # Rows with similar kept counts share a padded system size.
    by_count = torch.argsort(counts, descending=True)
    # The work done so far, for the ticks: each row's Cholesky costs about k^3.
    done_work = torch.cat([counts.new_zeros(1, dtype=torch.float64), counts[by_count].double().pow(3).cumsum(0)])
    start = 0
    while start < rows:
        k = int(counts[by_count[start]])
        if k == 0:
            break
        chunk = max(1, solver.max_memory_bytes // (3 * k * k * W.element_size()))
        chunk = min(chunk, _tick_rows(rows, k**3 / 3 + 2 * k * k))  # Cholesky and the gather, per row
        sel = by_count[start : start + chunk]
        start += chunk
        R = sel.numel()
        idx = torch.argsort((~keep[sel]).to(torch.int8), dim=1, stable=True)[:, :k]  # kept columns first
        valid = torch.arange(k, device=W.device).unsqueeze(0) < counts[sel].unsqueeze(1)
        # Broadcast indices gather each row's kept block without materialising an (R, k, k) index;
        # rows with fewer kept columns are padded with an identity block.
        A = H[gidx[sel].view(R, 1, 1), idx.unsqueeze(2), idx.unsqueeze(1)]
        vf = valid.to(W.dtype)
        A.mul_(vf.unsqueeze(2)).mul_(vf.unsqueeze(1))
        A.diagonal(dim1=1, dim2=2).add_(1.0 - vf)
        b = (HW[sel].gather(1, idx) * valid).unsqueeze(2)
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info != 0).any()):
            # Masked damped H is PD in exact arithmetic; fall back to a least-squares solve.
            sol = torch.linalg.lstsq(A, b).solution
        else:
            sol = torch.cholesky_solve(b, L)
        out[sel] = torch.zeros(R, d, dtype=W.dtype, device=W.device).scatter_(1, idx, sol.squeeze(2) * valid)
        if tick is not None and start < rows:
            tick(float(done_work[start] / done_work[-1]))
    return out.add_(W.masked_fill(~keep, 0)).to(weight.dtype)


def _refit_flops(mask: Tensor) -> float:
    kept = mask.sum(dim=1).double()
    return float((kept**3).sum()) / 3.0


def _wants_refit(options: SolverOptions, mask: Tensor) -> bool:
    if options.refit is not None:
        return options.refit
    return _refit_flops(mask) <= REFIT_AUTO_MAX_FLOPS


# --------------------------------------------------------------------------- allocation across layers


def _single_removal_costs(W: Tensor, Hinv: Tensor, dead: Tensor) -> Tensor:
    """``L_q = w_q^2 / (2 [H^-1]_qq)`` per weight of ``W`` (rows, D), in W's dtype; dead inputs cost 0."""
    gidx = _row_groups(W.shape[0], Hinv.shape[0], W.device)
    hdiag = torch.diagonal(Hinv, dim1=-2, dim2=-1)[gidx].to(W.dtype)
    return (W.square() / (2 * hdiag)).masked_fill(dead[gidx], 0.0)


def obs_scores(
    weight: Tensor, hessian: Tensor, *, bias: Optional[Tensor] = None, solver: Optional[SolverOptions] = None
) -> Tensor:
    """One-pass OBS cost ``L_q = w_q^2 / (2 [H^-1]_qq)`` of removing each weight alone.

    Same shapes as :func:`solve_layer` (``hessian`` includes the bias column when ``bias``
    is given); H is damped as in the solvers. Weights on dead inputs cost 0. Returns a
    float64 tensor of the weight's shape.
    """
    solver = solver or SolverOptions()
    x = _prepare(weight, hessian, 0.0, bias, None, None)
    _, Hinv, _, dead = _inverse_with_damping(x.H.to(x.W.device), solver)
    return _single_removal_costs(x.W.double(), Hinv, dead)[:, : x.d].reshape(x.shape)


def output_energy(weight: Tensor, hessian: Tensor, *, bias: Optional[Tensor] = None) -> float:
    """``1/2 sum_rows w~ H w~^T``: half the mean squared output of the layer (undamped H).

    Dividing a layer's errors by it makes them relative, hence comparable across layers.
    """
    x = _prepare(weight, hessian, 0.0, bias, None, None)
    return layer_error(x.W, torch.zeros_like(x.W), x.H)  # the error of removing every weight


def allocate_global(
    costs: Mapping[str, Tensor],
    sparsity: float,
    forced: Optional[Mapping[str, Tensor]] = None,
    max_removed: Optional[Mapping[str, int]] = None,
) -> Dict[str, float]:
    """Per-layer sparsities that remove ``sparsity`` of all weights at the smallest pooled cost.

    ``costs`` maps each layer to a per-weight removal cost (already comparable across
    layers, e.g. :func:`obs_scores` divided by :func:`output_energy`); ``+inf`` marks a
    weight that must stay. The cheapest ``round(sparsity * N)`` weights over all layers are
    chosen (ties broken in layer order); ``forced`` keep-masks' pruned weights are always
    among them. A layer gives at most ``max_removed[name]`` weights (its cheapest ones;
    never fewer than its forced ones) and always keeps at least its most expensive weight,
    so no layer's sparsity reaches 1. Raises ValueError when the caps leave too few weights.
    """
    number = as_real(sparsity)
    if number is None or not (0.0 <= number < 1.0):
        raise ValueError(f"sparsity must be a float in [0, 1), got {describe(sparsity)}.")
    sparsity = float(number)
    if not costs:
        raise ValueError("costs is empty: give at least one layer.")
    names = list(costs)
    flat = []
    for n in names:
        c = costs[n].detach().reshape(-1).double().cpu()
        if bool(torch.isnan(c).any()) or bool(torch.isneginf(c).any()) or bool((c < 0).any()):
            raise ValueError(f"costs[{n!r}] must be >= 0 (+inf: never removed), without NaN.")
        c = c.clone()
        if forced is not None and n in forced:
            c.masked_fill_(~forced[n].reshape(-1).to(torch.bool).cpu(), -1.0)  # already pruned: first
        c[int(c.argmax())] = math.inf  # the layer's survivor
        if max_removed is not None and n in max_removed:
            cap = max(int(max_removed[n]), int((c < 0).sum()))
            if cap < c.numel():
                c[torch.argsort(c, stable=True)[cap:]] = math.inf
        flat.append(c)
    sizes = [c.numel() for c in flat]
    allc = torch.cat(flat)
    available = int(torch.isfinite(allc).sum())
    total = int(round(sparsity * sum(sizes)))
    if total > available:
        raise ValueError(
            f"sparsity {sparsity:.6g} asks for {total} of {sum(sizes)} weights but only {available} may go "
            "(per-layer caps, weights that must stay, one survivor per layer); lower the sparsity or relax the caps."
        )
    chosen = torch.zeros(allc.numel(), dtype=torch.bool)
    if total > 0:
        chosen[torch.argsort(allc, stable=True)[:total]] = True  # stable: ties go in layer order
    counts = [int(part.sum()) for part in torch.split(chosen, sizes)]
    return {n: counts[i] / sizes[i] for i, n in enumerate(names)}


# --------------------------------------------------------------------------- lobs


def _lobs_mask(
    W: Tensor,
    Hinv: Tensor,
    dead: Tensor,
    sparsity: float,
    pattern: Optional[NMPattern],
    frozen: int,
    forced: Optional[Tensor],
    protected: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The paper's one-pass ranking: ``(keep-mask, L_q scores)``, every weight ranked layer-wide.

    ``protected`` weights (the per-row minimum) rank last and are never pruned.
    """
    scores = _single_removal_costs(W, Hinv, dead)
    if forced is not None:
        scores = scores.masked_fill(forced, -math.inf)
    if frozen:
        scores[:, -frozen:] = math.inf
    ranked = scores
    if protected is not None:
        ranked = scores.clone()
        ranked[:, : protected.shape[1]].masked_fill_(protected, math.inf)
    return _mask_from_scores(ranked, sparsity, pattern, frozen), scores


def _lobs_sequential(W: Tensor, Hinv: Tensor, mask: Tensor, scores: Tensor) -> Tensor:
    """The paper's literal updates: removals in rank order, each corrected with the same, stale ``H^-1``."""
    rows = W.shape[0]
    gidx = _row_groups(rows, Hinv.shape[0], W.device)
    pruned = ~mask
    # Per-row removal order: that row's pruned weights by ascending L_q (the global rank order).
    order_key = torch.where(pruned, scores, torch.full_like(scores, math.inf))
    order = order_key.argsort(dim=1)
    counts = pruned.sum(dim=1)
    arange = torch.arange(rows, device=W.device)
    W = W.clone()
    for t in range(int(counts.max().item()) if rows else 0):
        q = order[:, t]
        active = (t < counts).to(W.dtype)
        hqq = Hinv[gidx, q, q]
        coef = active * W[arange, q] / hqq
        W -= coef.unsqueeze(1) * Hinv[gidx, q, :]
    return W * mask


# --------------------------------------------------------------------------- exact


def _compact_in_place(Hinv: Tensor, keep: Tensor) -> Tensor:
    """``Hinv[r][keep[r]][:, keep[r]]`` for every row r, written over the front of ``Hinv``'s own storage.

    A fresh (R, w, w) tensor would cost more in page faults than the copy itself; row r's result ends
    before row r + 1's source begins (w < dc), and each row's source is read into a buffer first.
    """
    R, dc, _ = Hinv.shape
    width = keep.shape[1]
    flat = Hinv.reshape(-1)  # a view: Hinv is contiguous
    rows_buf = torch.empty(width, dc, dtype=Hinv.dtype, device=Hinv.device)
    for r in range(R):
        torch.index_select(Hinv[r], 0, keep[r], out=rows_buf)
        torch.index_select(rows_buf, 1, keep[r], out=flat[r * width * width : (r + 1) * width * width].view(width, width))
    return flat[: R * width * width].view(R, width, width)


#: One greedy step's fixed cost (Python and small kernels, about 100 us) in flops of the trace's matmuls; shared
#: by the chunk's rows, it is what makes the narrow last steps of a trace slower than their width suggests.
_STEP_OVERHEAD_FLOPS = 2e6


def _step_work(width: int, rows: int) -> float:
    """Estimated work per row of one greedy step at ``width`` columns, in units of half a flop (a flush's share is
    ``width^2``, the pending-downdate reads about ``16 width``)."""
    return float(width) ** 2 + 16.0 * width + _STEP_OVERHEAD_FLOPS / (2.0 * rows)


def _trace_work(d: int, steps: int, lazy: int, frozen: int, shrink: float, rows: int = 1) -> float:
    """Sum over the steps of :func:`_greedy_trace` of :func:`_step_work`, for unstructured chunks of ``rows`` rows."""
    dc, work, j = d, 0.0, 0
    for step in range(steps):
        work += _step_work(dc, rows)
        j += 1
        if j == lazy or step == steps - 1:
            width = d - frozen - (step + 1)
            if step < steps - 1 and width <= shrink * dc:
                dc = width
            j = 0
    return max(work, 1.0)


def _greedy_trace(
    W: Tensor,
    Hinv: Tensor,
    dead: Tensor,
    steps: int,
    pattern: Optional[NMPattern],
    frozen: int,
    lazy: int,
    forced: Optional[Tensor] = None,
    shrink: float = 0.75,
    tick: Optional[Tick] = None,
) -> Tuple[Tensor, Tensor]:
    """Run greedy OBS on a chunk of rows; ``Hinv`` (R, d, d) is each row's own copy of H^-1.

    Every row removes one weight per step. Downdates wait in a low-rank factor ``U`` and
    are flushed every ``lazy`` steps with one batched matmul. Only candidate columns
    (neither removed nor blocked) matter from then on: their block of the downdated
    inverse is self-contained, so at a flush, once the candidates have shrunk below
    ``shrink`` of the current width, every row's state is compacted to them. That
    makes the total work about a third of keeping full d x d matrices.

    Returns ``(order, increments)``: the original column removed at each step and the
    OBS loss ``w_q^2 / (2 [H^-1]_qq)`` of that removal (dead inputs cost 0). ``tick`` is called
    after every flush but the last with the estimated fraction of the work done (a flush costs
    the square of the current width).
    """
    R, d = W.shape
    dtype, device = W.dtype, W.device
    rows = torch.arange(R, device=device)
    W = W.clone()
    diag = torch.diagonal(Hinv, dim1=1, dim2=2).clone()
    blocked = torch.zeros(R, d, dtype=torch.bool, device=device)
    if frozen:
        blocked[:, d - frozen :] = True
    cost = (~dead).to(dtype)  # (R, d): removing a dead input costs nothing
    colmap = torch.arange(d, device=device).expand(R, d).contiguous()
    order = torch.empty(R, steps, dtype=torch.long, device=device)
    increments = torch.empty(R, steps, dtype=dtype, device=device)
    groupmap = None
    if pattern is not None:
        dp = d - frozen
        per_group = pattern.m - pattern.n
        group_id = torch.cat([torch.arange(dp, device=device) // pattern.m, torch.full((frozen,), -1, device=device)])
        groupmap = group_id.expand(R, d).contiguous()
        group_count = torch.zeros(R, dp // pattern.m, dtype=torch.long, device=device)
    U = torch.zeros(R, lazy, d, dtype=dtype, device=device)  # pending downdates, one row vector per removal
    tiny = torch.finfo(dtype).tiny
    # Work is counted as the square of the columns held per step (a flush's cost); the total follows the
    # compaction schedule of unstructured rows (N:M rows compact sooner, so their fraction ends below 1).
    total_work = _trace_work(d, steps, lazy, frozen, shrink, R)
    work = 0.0
    j = 0
    for step in range(steps):
        dc = W.shape[1]
        loss = W.square().div_(diag).mul_(cost).masked_fill_(blocked, math.inf)
        if forced is not None:  # weights pruned earlier go first, at no cost to the allocation
            loss.masked_fill_(forced & ~blocked, -1.0)
        q = loss.argmin(dim=1)
        row = Hinv.view(R * dc, dc).index_select(0, rows * dc + q)  # H^-1 row q before pending downdates
        if j:
            coeff = U[:, :j, :].gather(2, q.view(R, 1, 1).expand(R, j, 1))  # (R, j, 1)
            row.sub_(torch.bmm(coeff.transpose(1, 2), U[:, :j, :]).squeeze(1))
        hqq = row.gather(1, q.unsqueeze(1)).squeeze(1).clamp_min_(tiny)
        wq = W.gather(1, q.unsqueeze(1)).squeeze(1)
        order[:, step] = colmap.gather(1, q.unsqueeze(1)).squeeze(1)
        increments[:, step] = wq.square() / (2 * hqq) * cost.gather(1, q.unsqueeze(1)).squeeze(1)
        W.addcmul_((wq / hqq).unsqueeze(1), row, value=-1.0)
        u = row.div_(hqq.sqrt().unsqueeze(1))
        U[:, j, :] = u
        diag.addcmul_(u, u, value=-1.0)
        q1 = q.unsqueeze(1)
        W.scatter_(1, q1, 0.0)
        blocked.scatter_(1, q1, True)
        diag.scatter_(1, q1, 1.0)  # keeps the loss finite; the column is blocked from now on
        if groupmap is not None:
            gq = groupmap.gather(1, q1).squeeze(1)
            group_count[rows, gq] += 1
            full = group_count[rows, gq] >= per_group
            if bool(full.any()):  # block the rest of every group that just reached its quota
                blocked |= full.unsqueeze(1) & (groupmap == gq.unsqueeze(1))
        j += 1
        work += _step_work(dc, R)
        if j == lazy or step == steps - 1:
            width = int((~blocked).sum(dim=1).max())
            if step < steps - 1 and width <= shrink * dc:
                # Compact every row to its candidates (then kept-but-blocked columns as padding; stable keeps
                # the order) before the flush, so the flush only updates the block that is still needed.
                keep = torch.argsort(blocked.to(torch.int8), dim=1, stable=True)[:, :width]
                Hinv = _compact_in_place(Hinv, keep)
                Uk = U[:, :j, :].gather(2, keep.unsqueeze(1).expand(R, j, width))
                Hinv.baddbmm_(Uk.transpose(1, 2), Uk, alpha=-1)
                W, diag, blocked, cost, colmap = (t.gather(1, keep) for t in (W, diag, blocked, cost, colmap))
                if forced is not None:
                    forced = forced.gather(1, keep)
                if groupmap is not None:
                    groupmap = groupmap.gather(1, keep)
                U = torch.zeros(R, lazy, width, dtype=dtype, device=device)
            else:
                Hinv.baddbmm_(U[:, :j, :].transpose(1, 2), U[:, :j, :], alpha=-1)
                U.zero_()
            j = 0
            if tick is not None and step < steps - 1:
                tick(min(work / total_work, 1.0))
    return order, increments


def _allocate(increments: Tensor, total: int) -> Tensor:
    """Per-row removal counts c_r with sum c_r = total and a small sum_r C_r(c_r).

    ``C_r(c)`` is the cumulative OBS loss of the first c greedy removals of row r. A
    Lagrangian search finds the points of every row's lower convex hull that share one
    slope (optimal when the curves are convex); the remaining few removals go to the
    cheapest next steps between the two bracketing slopes, and single moves between rows
    then repair non-convex curves. Not guaranteed optimal for strongly non-convex curves.
    """
    R, S = increments.shape
    inc = increments.double().clamp_min(0)
    C = torch.cat([inc.new_zeros(R, 1), inc.cumsum(dim=1)], dim=1)  # (R, S+1)
    c_axis = torch.arange(S + 1, device=inc.device, dtype=torch.float64)

    def counts(lam: float) -> Tensor:
        obj = C - lam * c_axis
        # argmin taking the largest c among ties: flip, argmin (first occurrence), unflip
        return S - obj.flip(1).argmin(dim=1)

    if total <= 0:
        return torch.zeros(R, dtype=torch.long, device=inc.device)
    if total >= R * S:
        return torch.full((R,), S, dtype=torch.long, device=inc.device)
    finite = inc[torch.isfinite(inc)]  # inf marks steps a row cannot take (after its forced removals)
    lo, hi = -1.0, (float(finite.max().item()) if finite.numel() else 0.0) + 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if int(counts(mid).sum()) >= total:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-15 * max(1.0, abs(hi)):
            break
    c_lo, c_hi = counts(lo), counts(hi)
    gap = total - int(c_lo.sum())
    if gap > 0:
        steps = torch.arange(S, device=inc.device).unsqueeze(0)
        seg = inc.clone()
        seg[steps < c_lo.unsqueeze(1)] = -math.inf
        seg[steps >= c_hi.unsqueeze(1)] = math.inf
        seg = seg.cummax(dim=1).values  # monotone within the segment, so picks are prefixes
        seg[steps < c_lo.unsqueeze(1)] = math.inf
        pick = seg.reshape(-1).topk(gap, largest=False).indices
        c_lo = c_lo + torch.bincount(pick // S, minlength=R)
    return _improve_allocation(C, c_lo)


def _improve_allocation(C: Tensor, counts: Tensor, max_moves: Optional[int] = None) -> Tensor:
    """Move single removals between rows while that lowers the summed cost.

    The Lagrangian split is optimal when every row's cost curve is convex; greedy OBS
    losses almost always are, and these moves repair the rare non-convex rows.
    """
    R, S1 = C.shape
    counts = counts.clone()
    rows = torch.arange(R, device=C.device)
    for _ in range(max_moves if max_moves is not None else 4 * R):
        up = torch.where(counts < S1 - 1, C[rows, (counts + 1).clamp_max(S1 - 1)] - C[rows, counts], torch.full_like(C[:, 0], math.inf))
        down = torch.where(counts > 0, C[rows, counts] - C[rows, (counts - 1).clamp_min(0)], torch.full_like(C[:, 0], -math.inf))
        r_up = int(up.argmin())
        down_other = down.clone()
        down_other[r_up] = -math.inf
        r_down = int(down_other.argmax())
        if not bool(up[r_up] < down_other[r_down] - 1e-12 * max(1.0, abs(float(down_other[r_down])))):
            break
        counts[r_up] += 1
        counts[r_down] -= 1
    return counts


def _balanced(W: Tensor, H: Tensor, frozen: int) -> Tuple[Tensor, Tensor, Tensor, float, float]:
    """``exact``'s inputs made scale-free: ``(W / t, H / s, c, s, t)``, the bias column also times ``1/c``.

    The constant (bias) input does not scale with the data, so inputs of 1e23 or 1e-20 leave its
    H diagonal 1e46 times off the others' and the float32 trace reads it as dead (or reads every
    input as noise under the damping). Rescaling the constant input by ``c`` (per group) to the
    mean diagonal of the other inputs, H by its mean diagonal ``s`` and W by its largest magnitude
    ``t`` (so that ``w^2`` cannot underflow in float32), each rounded to a power of two (exact
    in floating point), changes no OBS choice or update (the greedy
    sequence is invariant under that reparametrisation); increments scale back by ``t^2 s``, the
    solved weights by ``t`` and the bias by ``c``.
    """
    H = H.to(torch.float64)
    c = torch.ones(H.shape[0], dtype=torch.float64, device=H.device)
    if frozen:
        diag = torch.diagonal(H, dim1=-2, dim2=-1)
        inputs, const = diag[:, :-frozen].mean(dim=1), diag[:, -1]
        ok = (inputs > 0) & (const > 0) & torch.isfinite(inputs / const)
        c = torch.where(ok, _power_of_two((inputs / const.where(ok, torch.ones_like(const))).sqrt()), c)
        H = H.clone()
        H[:, -1, :] *= c.unsqueeze(1)
        H[:, :, -1] *= c.unsqueeze(1)
        W = W.clone()
        W[:, -1] /= c[_row_groups(W.shape[0], H.shape[0], W.device)].to(W.dtype)
    mean = float(torch.diagonal(H, dim1=-2, dim2=-1).mean())
    s = _power_of_two(mean) if mean > 0 and math.isfinite(mean) else 1.0
    weights = W[:, : W.shape[1] - frozen]  # the bias column, now in units of 1/c, is never squared in a cost
    big = float(weights.abs().max()) if weights.numel() else 0.0
    t = _power_of_two(big) if big > 0 and math.isfinite(big) else 1.0
    return W / t, H / s, c, s, t


def _power_of_two(x: Any) -> Any:
    """The power of two nearest ``x`` (> 0): scaling by it is exact, so a problem of scale 1 is solved unchanged."""
    if isinstance(x, Tensor):
        return torch.exp2(torch.round(torch.log2(x)))
    return 2.0 ** round(math.log2(x))


def _exact_trace(
    W: Tensor,
    Hinv: Tensor,
    dead: Tensor,
    pattern: Optional[NMPattern],
    frozen: int,
    options: SolverOptions,
    forced: Optional[Tensor],
    tick: Optional[Tick] = None,
) -> Tuple[Tensor, Tensor]:
    rows, d = W.shape
    if frozen and bool(dead[:, d - frozen :].any()):  # the bias is never removed: it must not join the dead inputs
        dead = dead.clone()
        dead[:, d - frozen :] = False
    if pattern is None and forced is None and Hinv.shape[0] == 1 and bool(dead.any()):
        # A dead input (always 0 in the calibration data) is removed first, at no cost and without moving any other
        # weight: its row and column of H^-1 are zero off the diagonal. So the greedy sequence is those removals
        # followed by the trace of the live columns alone, which is cheaper by the cube of their share.
        live = (~dead[0]).nonzero().squeeze(1)
        gone = dead[0].nonzero().squeeze(1)
        sub = Hinv[:, live][:, :, live].contiguous()
        order, inc = _exact_trace(W[:, live], sub, dead[:, live], None, frozen, options, None, tick)
        order = torch.cat([gone.expand(rows, -1), live[order]], dim=1)
        return order, torch.cat([inc.new_zeros(rows, gone.numel()), inc], dim=1)
    dp = d - frozen
    gidx = _row_groups(rows, Hinv.shape[0], W.device)
    # Unstructured rows run to the end so that per-row budgets can be chosen freely afterwards.
    steps = dp // pattern.m * (pattern.m - pattern.n) if pattern is not None else dp
    if steps == 0:
        empty = torch.empty(rows, 0, device=W.device)
        return empty.long(), empty.to(W.dtype)
    chunk = _row_chunk(rows, d, W.element_size(), options.max_memory_bytes)
    # One flush of R rows costs 2 R lazy d^2 flops: bounded so that the ticks between flushes come often enough.
    chunk = min(chunk, _tick_rows(rows, 2.0 * options.lazy_steps * d * d))
    orders, incs = [], []
    # One buffer for every chunk: a fresh (R, d, d) allocation per chunk costs about as much in page faults as
    # a flush. The trace downdates its chunk's copy in place.
    buffer = torch.empty(min(chunk, rows), d, d, dtype=Hinv.dtype, device=Hinv.device)
    for start in range(0, rows, chunk):
        sl = slice(start, start + chunk)
        idx = gidx[sl]
        Hrows = torch.index_select(Hinv, 0, idx, out=buffer[: idx.numel()])
        f = forced[sl] if forced is not None else None
        part = _sub_tick(tick, start / rows, idx.numel() / rows)
        order, inc = _greedy_trace(W[sl], Hrows, dead[idx], steps, pattern, frozen, options.lazy_steps, f, tick=part)
        orders.append(order)
        incs.append(inc)
        if tick is not None and start + idx.numel() < rows:
            tick((start + idx.numel()) / rows)
    return torch.cat(orders), torch.cat(incs)


def _exact_mask(
    order: Tensor,
    inc: Tensor,
    d: int,
    sparsity: float,
    pattern: Optional[NMPattern],
    frozen: int,
    forced: Optional[Tensor],
    min_kept: int = 0,
) -> Tensor:
    """Keep-mask from the greedy trace: per-row counts split by :func:`_allocate`.

    Unstructured rows stop ``min_kept`` steps before the end of their trace (their last
    ``min_kept`` weights stay), except where a prior mask already pruned more.
    """
    rows, steps = order.shape
    dp = d - frozen
    if steps == 0:
        return torch.ones(rows, d, dtype=torch.bool, device=order.device)
    if pattern is None and min_kept > 0:
        cap = torch.full((rows,), max(steps - min_kept, 0), dtype=torch.long, device=order.device)
        if forced is not None:
            cap = torch.maximum(cap, forced.sum(dim=1))
        inc = inc.masked_fill(torch.arange(steps, device=order.device).unsqueeze(0) >= cap.unsqueeze(1), math.inf)
    if pattern is not None:
        counts = torch.full((rows,), steps, dtype=torch.long, device=order.device)
    elif forced is None:
        counts = _allocate(inc, int(round(sparsity * rows * dp)))
    else:
        # Forced removals lead every row's trace; allocate only the steps after them.
        prior = forced.sum(dim=1)
        idx = (torch.arange(steps, device=order.device).unsqueeze(0) + prior.unsqueeze(1)).clamp_max(steps - 1)
        shifted = inc.gather(1, idx).masked_fill(idx < prior.unsqueeze(1) + torch.arange(steps, device=order.device), math.inf)
        extra = max(0, int(round(sparsity * rows * dp)) - int(prior.sum()))
        counts = prior + _allocate(shifted, extra)
    taken = torch.arange(steps, device=order.device).unsqueeze(0) < counts.unsqueeze(1)
    mask = torch.ones(rows, d, dtype=torch.bool, device=order.device)
    mask.scatter_(1, order, ~taken)
    return mask


@dataclass
class GreedyTrace:
    """The ``exact`` solver's greedy removal sequence of one layer, independent of the sparsity.

    Attributes:
        order: ``(rows, steps)`` input column removed at each greedy step of each row.
        increments: ``(rows, steps)`` OBS loss of each of those removals.
        damp: relative damping the trace was computed with.
        pattern: the N:M pattern it was computed for (None: unstructured).
    """

    order: Tensor
    increments: Tensor
    damp: float
    pattern: Optional[NMPattern] = None

    def removal_costs(self) -> Tensor:
        """Per-weight cost ``(rows, d)``: each removal's loss, made non-decreasing along its row.

        The running maximum makes every row's cheapest-k set a prefix of its greedy order,
        so pooling these costs across layers respects the greedy sequence.
        """
        rows, steps = self.order.shape
        costs = torch.zeros(rows, steps, dtype=torch.float64, device=self.order.device)
        inc = self.increments.double().clamp_min(0).cummax(dim=1).values
        return costs.scatter_(1, self.order, inc)


# --------------------------------------------------------------------------- fast


def _solve_fast_group(
    W: Tensor,
    Hinv: Tensor,
    dead: Tensor,
    totals: Sequence[int],
    pattern: Optional[NMPattern],
    frozen: int,
    block: int,
    forced: Optional[Tensor],
    protected: Optional[Tensor],
    tick: Optional[Tick] = None,
) -> Tuple[Tensor, Tensor]:
    """SparseGPT on one group's rows at ``K = len(totals)`` sparsity levels at once.

    Level ``k`` prunes ``totals[k]`` weights (unstructured; ignored with an N:M pattern):
    each block of columns prunes its share of the running quota among its lowest
    ``w^2 / [U]_qq^2`` scores. ``protected`` weights (the per-row minimum) are never
    pruned: a block then prunes at most its unprotected weights and at least what the
    later blocks could not take, so the quota is always met and every removal is
    compensated; without protected weights the blocks prune exactly SparseGPT's quotas.
    Returns ``(K, rows, d)`` pruned weights and keep-masks; the levels share one Cholesky
    factor and one column sweep. ``tick`` gets the fraction of columns done after each block.
    """
    rows, d = W.shape
    K = len(totals)
    dp = d - frozen
    if pattern is not None:
        block = -(-block // pattern.m) * pattern.m  # an N:M group never straddles two blocks
    U = torch.linalg.cholesky(Hinv, upper=True)
    _alive(tick, d**3 / 3)
    W = W.unsqueeze(0).repeat(K, 1, 1)
    mask = torch.ones(K, rows, d, dtype=torch.bool, device=W.device)
    udiag = torch.diagonal(U)
    live = (~dead).to(W.dtype)
    pruned = [0] * K
    free_col = torch.full((dp,), rows, dtype=torch.long)
    if protected is not None:
        free_col -= protected.sum(dim=0).cpu()
    free_after = torch.cat([free_col.flip(0).cumsum(0).flip(0), free_col.new_zeros(1)]).tolist()  # from column c on

    def target(k: int, cols: int) -> int:  # cumulative quota of level k after ``cols`` columns
        return int(round(totals[k] * min(cols, dp) / max(dp, 1)))

    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        W1 = W[:, :, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        prunable = max(0, min(i2, dp) - i1)
        if pattern is None and prunable > 0:
            scores = (W1.pow(2) / udiag[i1:i2].pow(2) * live[i1:i2])[:, :, :prunable]
            free = rows * prunable
            if protected is not None:
                p = protected[:, i1 : i1 + prunable]
                scores = scores.masked_fill(p, math.inf)
                free -= int(p.sum())
            f_count = 0
            if forced is not None:
                f = forced[:, i1 : i1 + prunable]
                scores = scores.masked_fill(f, -1.0)
                f_count = int(f.sum())
            for lv in range(K):
                need = totals[lv] - pruned[lv] - free_after[min(i2, dp)]  # what the later blocks cannot take
                k = min(max(target(lv, i2) - pruned[lv], f_count, need), free)
                if k > 0:
                    drop = scores[lv].reshape(-1).topk(k, largest=False).indices
                    sub = torch.ones(rows * prunable, dtype=torch.bool, device=W.device)
                    sub[drop] = False
                    mask[lv, :, i1 : i1 + prunable] = sub.reshape(rows, prunable)
                    pruned[lv] += k
        for i in range(i2 - i1):
            col = i1 + i
            if pattern is not None and col < dp and col % pattern.m == 0:
                m = pattern.m
                scores = W1[:, :, i : i + m].pow(2) / udiag[col : col + m].pow(2) * live[col : col + m]
                if forced is not None:
                    scores = scores.masked_fill(forced[:, col : col + m], -1.0)
                drop = scores.topk(m - pattern.n, dim=-1, largest=False).indices
                mask[:, :, col : col + m].scatter_(2, drop, False)
            w = W1[:, :, i]
            q = w * mask[:, :, col]
            err = (w - q) / U1[i, i]
            W1[:, :, i:] -= err.unsqueeze(2) * U1[i, i:]
            Err1[:, :, i] = err
        W[:, :, i1:i2] = W1
        W[:, :, i2:] -= Err1 @ U[i1:i2, i2:]
        if tick is not None and i2 < d:
            tick(i2 / d)
    if pattern is None:
        for lv in range(K):
            short = totals[lv] - pruned[lv]
            if short > 0:  # only when totals exceed the unprotected weights: prune the cheapest of what is left
                scores = (W[lv, :, :dp].pow(2) / udiag[:dp].pow(2) * live[:dp]).masked_fill(~mask[lv, :, :dp], math.inf)
                if protected is not None:
                    scores = scores.masked_fill(protected, math.inf)
                short = min(short, int(torch.isfinite(scores).sum()))
                drop = scores.reshape(-1).topk(short, largest=False).indices
                sub = mask[lv, :, :dp].reshape(-1).clone()
                sub[drop] = False
                mask[lv, :, :dp] = sub.reshape(rows, dp)
    return W * mask, mask


def _protected(costs: Tensor, min_kept: int, forced: Optional[Tensor]) -> Optional[Tensor]:
    """``(rows, dp)`` True on each row's ``min_kept`` costliest weights (by single-removal cost) not pruned by a prior mask."""
    if min_kept <= 0:
        return None
    rows, dp = costs.shape
    c = costs.masked_fill(forced, -math.inf) if forced is not None else costs
    idx = c.topk(min(min_kept, dp), dim=1).indices
    prot = torch.zeros(rows, dp, dtype=torch.bool, device=costs.device).scatter_(1, idx, True)
    return prot & ~forced if forced is not None else prot


def _row_limited_sparsity(sparsity: float, rows: int, dp: int, min_kept: int, forced: Optional[Tensor], method: str) -> float:
    """``sparsity``, lowered (with a warning) to the most that leaves ``min_kept`` weights in every row."""
    if min_kept <= 0 or rows * dp == 0:
        return sparsity
    per_row = torch.full((rows,), max(dp - min_kept, 0), dtype=torch.long)
    if forced is not None:
        per_row = torch.maximum(per_row, forced[:, :dp].sum(dim=1).cpu())
    most = int(per_row.sum())
    if int(round(sparsity * rows * dp)) <= most:
        return sparsity
    lowered = most / (rows * dp)
    warnings.warn(
        f"{method}: sparsity {sparsity:.6g} would leave fewer than min_kept_per_row={min_kept} weights in some of the "
        f"{rows} rows of {dp}; pruning {lowered:.6g} instead. SolverOptions(min_kept_per_row=0) allows dead rows.",
        RuntimeWarning,
        stacklevel=3,
    )
    return lowered


def _sample_rows(rows: int, groups: int, count: int, device: torch.device) -> Tensor:
    """``count`` evenly spaced row indices (all rows when there are fewer), the same on every call."""
    if count >= rows:
        return torch.arange(rows, device=device)
    return torch.linspace(0, rows - 1, count, device=device).round().long().unique()


def error_curve(
    weight: Tensor,
    hessian: Tensor,
    sparsities: Sequence[float],
    *,
    bias: Optional[Tensor] = None,
    solver: Optional[SolverOptions] = None,
    prior_mask: Optional[Tensor] = None,
    sample_rows: int = 64,
    tick: Optional[Tick] = None,
) -> Tensor:
    """Relative layer error of SparseGPT (``fast`` without the refit) at each of ``sparsities``.

    Runs on ``sample_rows`` evenly spaced rows (all rows when fewer), every level in one
    batched sweep over the columns with one Cholesky factor, and returns, per level, the
    sampled rows' error ``1/2 sum (w^ - w) H (w^ - w)^T`` divided by their output energy
    ``1/2 sum w H w^T`` (float64, shape ``(len(sparsities),)``; zeros when that energy is 0).
    Arguments as in :func:`solve_layer`; the per-row minimum ``solver.min_kept_per_row`` holds.
    ``tick`` (optional) is called with the fraction done, per block of columns and per level's error.
    """
    solver = solver or SolverOptions()
    levels = [float(v) for v in sparsities]
    if not levels or any(not (0.0 <= v <= 1.0) for v in levels):
        raise ValueError(f"sparsities must be a non-empty sequence of floats in [0, 1], got {sparsities!r}.")
    if isinstance(sample_rows, bool) or not isinstance(sample_rows, int) or sample_rows < 1:
        raise ValueError(f"sample_rows must be a positive int, got {sample_rows!r}.")
    x = _prepare(weight, hessian, 0.0, bias, None, prior_mask)
    work = x.W.to(solver.dtype)
    rows, G = work.shape[0], x.H.shape[0]
    dp = x.d
    _, Hinv, _, dead = _inverse_with_damping(x.H.to(work.device), solver)
    _alive(tick, Hinv.shape[0] * Hinv.shape[-1] ** 3)
    sel = _sample_rows(rows, G, sample_rows, work.device)
    gidx = _row_groups(rows, G, work.device)[sel]
    Hd = x.H.to(device=work.device, dtype=torch.float64)
    err = torch.zeros(len(levels), dtype=torch.float64)
    energy = 0.0
    group_list = gidx.unique().tolist()
    for i, g in enumerate(group_list):
        rs = sel[gidx == g]
        Wg = work[rs]
        f = x.forced[rs] if x.forced is not None else None
        costs = _single_removal_costs(Wg, Hinv[g : g + 1], dead[g : g + 1])[:, :dp]
        prot = _protected(costs, solver.min_kept_per_row, None if f is None else f[:, :dp])
        limit = rs.numel() * max(dp - solver.min_kept_per_row, 0)
        if f is not None:
            limit = int(torch.maximum(torch.full_like(rs, max(dp - solver.min_kept_per_row, 0)), f[:, :dp].sum(1)).sum())
        totals = [min(int(round(v * rs.numel() * dp)), limit) for v in levels]
        # The sweep and the float64 errors (2 K r d^2 flops each) take about equal shares of the group's time.
        start, share = i / len(group_list), 1 / len(group_list)
        new, _ = _solve_fast_group(
            Wg, Hinv[g], dead[g], totals, None, x.frozen, solver.block_size, f, prot, _sub_tick(tick, start, share / 2)
        )
        delta = (new - Wg.unsqueeze(0)).double()
        for k in range(len(levels)):  # one level at a time: a tick between levels
            err[k] += 0.5 * float(torch.einsum("ri,ij,rj->", delta[k], Hd[g], delta[k]))
            if tick is not None:
                tick(start + share * (0.5 + 0.5 * (k + 1) / len(levels)))
        w64 = Wg.double()
        energy += 0.5 * float(torch.einsum("ri,ij,rj->", w64, Hd[g], w64))
    if not energy > 0:
        return torch.zeros(len(levels), dtype=torch.float64)
    return err / energy


# --------------------------------------------------------------------------- entry point


@dataclass
class _LayerInputs:
    """:func:`solve_layer`'s inputs, validated: ``W`` is ``(rows, d + frozen)`` with the bias last."""

    shape: torch.Size  # the weight's original shape
    W: Tensor
    d: int  # weight columns, without the bias
    frozen: int  # 1 when the bias is the last column of W
    H: Tensor  # (groups, D, D)
    pattern: Optional[NMPattern]
    sparsity: float
    forced: Optional[Tensor]  # (rows, D) True where a prior mask pruned


def _prepare(
    weight: Tensor,
    hessian: Tensor,
    sparsity: Optional[float],
    bias: Optional[Tensor],
    pattern: Union[str, Tuple[int, int], NMPattern, None],
    prior_mask: Optional[Tensor],
) -> _LayerInputs:
    """Validate :func:`solve_layer`'s inputs; the bias becomes a frozen last column of W."""
    nm = parse_pattern(pattern)
    if nm is not None:
        if sparsity is not None and abs(sparsity - nm.sparsity) > 1e-9:
            raise ValueError(
                f"sparsity={sparsity} contradicts pattern '{nm}' (which removes {nm.sparsity:.3g}); pass only one."
            )
        sparsity = nm.sparsity
    if sparsity is None:
        raise ValueError("sparsity is required (a float in [0, 1)) unless an N:M pattern is given.")
    number = as_real(sparsity)
    if number is None or not (0.0 <= number < 1.0):
        raise ValueError(f"sparsity must be a float in [0, 1), got {describe(sparsity)}.")
    sparsity = float(number)
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims (out, in, ...), got shape {tuple(weight.shape)}.")
    shape = weight.shape
    W2 = weight.detach().reshape(shape[0], -1)
    rows, d_w = W2.shape
    frozen = 0
    if bias is not None:
        if bias.shape != (rows,):
            raise ValueError(f"bias must have shape ({rows},), got {tuple(bias.shape)}.")
        W2 = torch.cat([W2, bias.detach().reshape(rows, 1).to(W2.dtype)], dim=1)
        frozen = 1
    H = _as_groups(hessian.detach())
    groups, D = H.shape[0], H.shape[-1]
    if H.shape[-2] != D or D != W2.shape[1]:
        raise ValueError(
            f"hessian must be ({W2.shape[1]}, {W2.shape[1]}) for a weight with {d_w} input columns"
            f"{' plus a bias' if frozen else ''}, got {tuple(hessian.shape)}."
        )
    if rows % groups:
        raise ValueError(f"{rows} output rows cannot be split evenly into {groups} Hessian groups.")
    if not torch.isfinite(H).all():
        raise ValueError("hessian contains NaN or inf; check the calibration data.")
    if not torch.isfinite(W2).all():
        raise ValueError("weight (or bias) contains NaN or inf.")
    if nm is not None and d_w % nm.m:
        raise ValueError(f"pattern '{nm}' needs the input columns ({d_w}) to be a multiple of {nm.m}.")

    forced = None
    if prior_mask is not None:
        if prior_mask.shape != shape:
            raise ValueError(f"prior_mask must have the weight's shape {tuple(shape)}, got {tuple(prior_mask.shape)}.")
        forced = ~prior_mask.reshape(rows, d_w).to(torch.bool).to(W2.device)
        if frozen:
            forced = torch.cat([forced, forced.new_zeros(rows, 1)], dim=1)
        if nm is not None:
            per_group = forced[:, :d_w].reshape(rows, -1, nm.m).sum(-1)
            if bool((per_group > nm.m - nm.n).any()):
                raise ValueError(f"prior_mask prunes more than {nm.m - nm.n} of some group of {nm.m}; it cannot hold pattern '{nm}'.")
        if not bool(forced.any()):
            forced = None
    return _LayerInputs(shape, W2, d_w, frozen, H, nm, float(sparsity), forced)


def greedy_trace(
    weight: Tensor,
    hessian: Tensor,
    *,
    bias: Optional[Tensor] = None,
    pattern: Union[str, Tuple[int, int], NMPattern, None] = None,
    solver: Optional[SolverOptions] = None,
    prior_mask: Optional[Tensor] = None,
    tick: Optional[Tick] = None,
) -> GreedyTrace:
    """Run the ``exact`` solver's greedy OBS sequence once, for reuse at any sparsity.

    Arguments as in :func:`solve_layer`; ``tick`` (optional) is called with the fraction done
    at least every :data:`PROGRESS_TICK_FLOPS` of work. Pass the result as ``solve_layer(..., trace=...)``;
    :meth:`GreedyTrace.removal_costs` gives every weight's greedy removal cost.
    """
    solver = solver or SolverOptions()
    nm = parse_pattern(pattern)
    x = _prepare(weight, hessian, nm.sparsity if nm else 0.0, bias, nm, prior_mask)
    Wb, Hb, _, s, t = _balanced(x.W, x.H, x.frozen)
    work = Wb.to(solver.dtype)
    _, Hinv, damp, dead = _inverse_with_damping(Hb.to(work.device), solver)
    _alive(tick, Hinv.shape[0] * Hinv.shape[-1] ** 3)
    order, inc = _exact_trace(work, Hinv, dead, nm, x.frozen, solver, x.forced, tick)
    return GreedyTrace(order=order, increments=inc.double() * (s * t * t), damp=damp, pattern=nm)  # float64: may be 1e46


def solve_layer(
    weight: Tensor,
    hessian: Tensor,
    sparsity: Optional[float] = None,
    method: str = "exact",
    *,
    bias: Optional[Tensor] = None,
    pattern: Union[str, Tuple[int, int], NMPattern, None] = None,
    solver: Optional[SolverOptions] = None,
    prior_mask: Optional[Tensor] = None,
    trace: Optional[GreedyTrace] = None,
    tick: Optional[Tick] = None,
) -> SolveResult:
    """Prune one layer's weight with Optimal Brain Surgeon.

    Args:
        weight: ``(out, ...)`` weight; trailing dims are flattened into the d input columns
            (a conv filter ``(out, C_in/groups, *k)`` becomes ``out x C_in/groups*prod(k)``).
        hessian: ``(D, D)`` or ``(groups, D, D)`` layer-input Hessian, ``D = d + 1`` when a
            bias is given (the constant input is the last column), else ``D = d``.
        sparsity: fraction in [0, 1) of the weights to remove; implied by ``pattern`` if None.
        method: ``"lobs"``, ``"exact"`` or ``"fast"`` (see the module docstring).
        bias: optional ``(out,)`` bias; it is never pruned but OBS moves it to compensate.
        pattern: N:M pattern such as ``"2:4"`` along the input columns.
        solver: numerical solver, :class:`SolverOptions` defaults when None.
        prior_mask: keep-mask of an earlier pruning step (iterative pruning): weights it
            prunes stay pruned and count towards ``sparsity``.
        trace: ``exact`` only: a :func:`greedy_trace` of this same weight, H, bias, pattern,
            prior mask and solver, so that solving at several sparsities runs the greedy
            sequence once.
        tick: optional progress callback, called with the fraction of the work done (an
            estimate) at least every :data:`PROGRESS_TICK_FLOPS` of work in the long loops
            (the greedy trace, the column sweep, the refit). It must not raise, or the solve
            is abandoned with that exception.

    Returns:
        A :class:`SolveResult` with the pruned weight, its keep-mask and the layer error.
    """
    solver = solver or SolverOptions()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    x = _prepare(weight, hessian, sparsity, bias, pattern, prior_mask)
    shape, W2, d_w, frozen, H, nm, sparsity, forced = x.shape, x.W, x.d, x.frozen, x.H, x.pattern, x.sparsity, x.forced
    rows, groups = W2.shape[0], H.shape[0]
    if trace is not None:
        if method != "exact":
            raise ValueError(f"trace= is for method='exact' only, got method={method!r}.")
        dp = d_w // nm.m * (nm.m - nm.n) if nm is not None else d_w
        if tuple(trace.order.shape) != (rows, dp) or trace.pattern != nm:
            raise ValueError(
                f"trace does not fit this layer: its order has shape {tuple(trace.order.shape)} and pattern "
                f"{trace.pattern}, expected {(rows, dp)} and {nm}; compute it with greedy_trace() on the same inputs."
            )
    work = W2.to(solver.dtype)
    damp = solver.damp
    m_row = solver.min_kept_per_row if nm is None else 0
    sparsity = _row_limited_sparsity(sparsity, rows, d_w, m_row, forced, method)
    if sparsity == 0.0 and forced is None:
        mask2 = torch.ones_like(W2, dtype=torch.bool)
        new = work
    elif method == "exact":
        Wb, Hb, c, s, t = _balanced(W2, H, frozen)
        wb = Wb.to(solver.dtype)
        _, Hinv, damp, dead = _inverse_with_damping(Hb.to(work.device), solver)
        _alive(tick, Hinv.shape[0] * Hinv.shape[-1] ** 3)
        D = W2.shape[1]
        chunk = min(rows, _tick_rows(rows, 2.0 * solver.lazy_steps * D * D))
        trace_flops = 0.0 if trace is not None else 2.0 * rows * _trace_work(D, D - frozen, solver.lazy_steps, frozen, 0.75, chunk)
        mask_flops = _MASK_WORK_PER_WEIGHT * rows * D
        refit_flops = _REFIT_WORK_FACTOR * rows * (D * (1.0 - sparsity)) ** 3 / 3
        total = trace_flops + mask_flops + refit_flops
        if trace is None:
            order, inc = _exact_trace(wb, Hinv, dead, nm, frozen, solver, forced, _sub_tick(tick, 0.0, trace_flops / total))
            inc = inc.double() * (s * t * t)  # float64: the factor may be 1e46
        else:
            order, inc = trace.order.to(work.device), trace.increments.to(work.device)
        mask2 = _exact_mask(order, inc, W2.shape[1], sparsity, nm, frozen, forced, m_row)
        done = (trace_flops + mask_flops) / total
        if tick is not None and (trace is None or mask_flops >= PROGRESS_TICK_FLOPS):  # small masks: no extra event
            tick(done)
        new = refit(wb, Hb.to(H.dtype), mask2, replace(solver, damp=damp), _sub_tick(tick, done, 1.0 - done))
        new.mul_(t)
        if frozen:
            new[:, -1] *= c[_row_groups(rows, groups, new.device)].to(new.dtype)
        if not torch.isfinite(new).all():
            raise FloatingPointError(
                f"the {method} solve produced non-finite weights; raise SolverOptions.damp or use dtype=torch.float64."
            )
    else:
        _, Hinv, damp, dead = _inverse_with_damping(H.to(work.device), solver)  # the damped H itself is not kept
        _alive(tick, Hinv.shape[0] * Hinv.shape[-1] ** 3)
        protected = None
        if m_row > 0 and method != "exact":  # each row keeps its costliest weights by single-removal cost
            costs = _single_removal_costs(work, Hinv, dead)[:, :d_w]
            protected = _protected(costs, m_row, None if forced is None else forced[:, :d_w])
        if method == "lobs":
            mask2, scores = _lobs_mask(work, Hinv, dead, sparsity, nm, frozen, forced, protected)
            if _wants_refit(solver, mask2):
                new = refit(work, H, mask2, replace(solver, damp=damp), tick)
            else:
                new = _lobs_sequential(work, Hinv, mask2, scores)
        else:
            per = rows // groups
            outs, masks = [], []
            dp = d_w
            quota = lambda g: int(round(sparsity * g * per * dp))  # noqa: E731 - layer-wide rounding
            D = W2.shape[1]
            sweep_flops = 2.0 * rows * D * D  # the lazy block updates
            refit_flops = rows * (D * (1.0 - sparsity)) ** 3 / 3
            if not (solver.refit is True or (solver.refit is None and refit_flops <= REFIT_AUTO_MAX_FLOPS)):
                refit_flops = 0.0
            refit_flops *= _REFIT_WORK_FACTOR
            sweep_share = sweep_flops / (sweep_flops + refit_flops)
            for g in range(groups):
                sl = slice(g * per, (g + 1) * per)
                f = forced[sl] if forced is not None else None
                p = protected[sl] if protected is not None else None
                part = _sub_tick(tick, sweep_share * g / groups, sweep_share / groups)
                o, m = _solve_fast_group(
                    work[sl], Hinv[g], dead[g], [quota(g + 1) - quota(g)], nm, frozen, solver.block_size, f, p, part
                )
                outs.append(o[0])
                masks.append(m[0])
                if tick is not None and g + 1 < groups:
                    tick(sweep_share * (g + 1) / groups)
            new, mask2 = torch.cat(outs), torch.cat(masks)
            if _wants_refit(solver, mask2):
                if tick is not None:
                    tick(sweep_share)
                new = refit(work, H, mask2, replace(solver, damp=damp), _sub_tick(tick, sweep_share, 1.0 - sweep_share))
        if not torch.isfinite(new).all():
            raise FloatingPointError(
                f"the {method} solve produced non-finite weights; raise SolverOptions.damp or use dtype=torch.float64."
            )
    error = layer_error(W2, new, H)
    new = new.to(weight.dtype)
    new_bias = new[:, -1].clone() if frozen else None
    new_w = new[:, :d_w].reshape(shape).clone()
    mask = mask2[:, :d_w].reshape(shape).clone()
    return SolveResult(weight=new_w, mask=mask, bias=new_bias, error=error, damp=damp, method=method)
