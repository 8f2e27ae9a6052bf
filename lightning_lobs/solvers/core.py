"""What every solver shares: the validated inputs, damping and the inverse, the layer error, the refit, masks
from scores, the per-row minimum and the progress ticks.

Names used throughout the package: ``columns`` are a row's weight columns without the bias; ``width`` the
columns of the solved matrix ``W~`` (``columns`` plus ``bias_cols``, where ``bias_cols`` is 1 when the bias is
the last column of ``W~``, which is never pruned). Masks say their polarity in their name: ``kept`` / a keep-mask
is True where a weight stays, ``pruned_before`` is True where an earlier (prior) mask pruned it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, Union

import torch
from torch import Tensor

from ..checks import as_real, describe
from ..config import NMPattern, SolverOptions, parse_pattern

#: Until 0.3, ``SolverOptions(refit=None)`` skipped the refit of ``lobs``/``fast`` masks whose direct solve cost more
#: than this many flops. Since the batched CG refit (:mod:`.cg`) it refits every mask, the direct solve only where it
#: is the cheaper of the two (:func:`refit_plan`); the constant decides nothing now and stays for imports until 0.4.
REFIT_AUTO_MAX_FLOPS = 2e11
#: The long kernels (``exact``'s greedy trace, the refit, SparseGPT's column sweep, the error
#: curves) call their ``tick`` at least once per this many estimated floating-point operations:
#: about 0.1 s at the 2e10 flop/s one core does in the trace's batched matmuls, so even a core
#: ten times slower reports well within 2 s. Row chunks are sized for it, not only for memory.
PROGRESS_TICK_FLOPS = 2e9

#: Kernels whose work between two ticks is one big GEMM (``admm``'s ridge step, the CG refit's product) tick once per
#: this many :data:`PROGRESS_TICK_FLOPS`: such products run at about 1e11 flop/s on one core (a 768 x 3072 float32
#: ``admm`` solve), five times the trace's rate, and splitting them into 2e9-flop row chunks made that solve 1.5x
#: slower (the ``d x d`` operand is packed again for every chunk). 4e10 flops stay within 2 s at 2e10 flop/s.
GEMM_TICK_FACTOR = 20.0

#: Progress counts the refit's flops this many times: its batched k x k Cholesky solves and gathers run at about
#: a third of the flop rate of the trace's matmuls on one core (measured on 128x1152 and 256x2304 layers).
REFIT_WORK_FACTOR = 3.0

#: Progress counts the CG refit's flops this many times: its ``rows x d x d`` products run at about five times the
#: trace's flop rate on one core (see :data:`GEMM_TICK_FACTOR`). With :data:`REFIT_WORK_FACTOR` it also decides
#: between the direct and the CG refit (:func:`refit_plan`): both are counted in the same units, the trace's flops.
CG_WORK_FACTOR = 0.2

#: The direct refit's work per row and weight column beyond its Cholesky factors (sorting each row's kept columns
#: first, gathering its block, solving, scattering back), in the same units: about 0.7 us per row and column on one
#: core, measured on 100x300 to 768x784 layers at 90% where the factors themselves are cheap.
DIRECT_REFIT_ROW_WORK = 1.5e4
#: The CG refit's fixed work (its iterations' small-tensor overhead, about 1 ms), in the same units.
CG_REFIT_FIXED_WORK = 2e7

#: ``lobs``/``fast``'s CG refit: a row stops at this residual relative to its right-hand side. On LLM-like 256- and
#: 768-wide layers at 50-90% and 2:4, warm-started from the sweep, that took 7-17 iterations and left the layer
#: error within 8e-5 (relative) of the direct solve's; the excess shrinks with the residual squared.
FAST_REFIT_RTOL = 3e-3
#: Most CG iterations of ``lobs``/``fast``'s refit (each one ``rows x d x d`` product): the cap, not the residual,
#: usually ends it. 8 left the layer error within 1% of the direct solve's on 768 x 768, 3072 x 768 and 768 x 3072
#: LLM-like layers at 50% and 2:4 (16: within 0.01%) and keeps ``fast`` near 2x SparseGPT's time on the widest
#: (BENCHMARKS.md). CG lowers the layer error at every iteration, so a capped refit is still better than none.
FAST_REFIT_ITERATIONS = 8

#: Progress counts choosing ``exact``'s mask from its trace (a bisection over every row's cost curve, then single
#: moves between rows) as this much work per weight: about 0.5 s for a 512x1024 layer on one core.
MASK_WORK_PER_WEIGHT = 2e4

#: A progress callback of the kernels: called with the fraction in [0, 1] of the call's work done.
Tick = Callable[[float], None]


# --------------------------------------------------------------------------- progress ticks


def sub_tick(tick: Tick | None, start: float, share: float) -> Tick | None:
    """``tick`` for a part of the work that starts at fraction ``start`` and makes up ``share`` of it."""
    if tick is None:
        return None
    return lambda f: tick(start + share * min(max(f, 0.0), 1.0))


def tick_if_long(tick: Tick | None, flops: float) -> None:
    """After a factorisation with no ticks inside: tick (no share of work done) when it was a tick's worth of work."""
    if tick is not None and flops >= PROGRESS_TICK_FLOPS:
        tick(0.0)


def tick_rows(rows: int, flops_per_row: float) -> int:
    """Rows per chunk so that one chunk's work between two ticks stays within :data:`PROGRESS_TICK_FLOPS`."""
    return max(1, min(rows, int(PROGRESS_TICK_FLOPS // max(flops_per_row, 1.0))))


# --------------------------------------------------------------------------- results


@dataclass
class SolveResult:
    """Outcome of :func:`~lightning_lobs.solvers.solve_layer`.

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
    bias: Tensor | None
    error: float
    damp: float
    method: str

    @property
    def sparsity(self) -> float:
        return 1.0 - self.mask.float().mean().item()


@dataclass(frozen=True)
class Solution:
    """What a solver returns: the solved ``(rows, width)`` matrix in the solver dtype, its keep-mask, the damping."""

    weight: Tensor
    kept: Tensor
    damp: float


# --------------------------------------------------------------------------- Hessian, damping, inverse


def as_groups(hessian: Tensor) -> Tensor:
    """``hessian`` as ``(groups, D, D)``."""
    if hessian.dim() == 2:
        return hessian.unsqueeze(0)
    if hessian.dim() == 3:
        return hessian
    raise ValueError(f"hessian must be (d, d) or (groups, d, d), got shape {tuple(hessian.shape)}.")


def row_groups(rows: int, groups: int, device: torch.device) -> Tensor:
    """The Hessian group of every output row: rows split into ``groups`` contiguous blocks."""
    return torch.arange(rows, device=device) // (rows // groups)


def damped_hessian(hessian: Tensor, damp: float, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Return ``(H + damp * mean(diag H) * I, dead)`` per group with dead inputs repaired.

    A dead input (zero diagonal: the input was always 0 on the calibration data) gets
    a unit diagonal so that H stays invertible; its weights cost nothing to remove.
    """
    H = as_groups(hessian).to(dtype).clone()
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag <= 0
    diag[dead] = 1.0
    mean = diag.mean(dim=-1, keepdim=True)
    diag += damp * mean
    return H, dead


class DampedInverse(NamedTuple):
    """:func:`inverse_with_damping`'s result (a tuple: ``H, Hinv, damp, dead = ...`` unpacks it)."""

    hessian: Tensor  # (groups, D, D) damped H in the solver dtype
    inverse: Tensor  # its inverse, contiguous
    damp: float  # the relative damping finally used
    dead: Tensor  # (groups, D) True on inputs that were always 0


def damped_cholesky(
    hessian: Tensor, options: SolverOptions, stacklevel: int = 3
) -> tuple[Tensor, Tensor, float, Tensor]:
    """``(H, L, damp, dead)``: H damped (escalating tenfold, with a warning, while it is not positive definite), its
    Cholesky factor ``L``, the relative damping finally used and the dead inputs.

    ``stacklevel`` of the escalation warning: the default points at the caller of this function's caller.
    """
    damp = options.damp
    for attempt in range(options.max_damp_tries + 1):
        H, dead = damped_hessian(hessian, damp, options.dtype)
        L, info = torch.linalg.cholesky_ex(H)
        if not bool((info != 0).any()):
            return H, L, damp, dead
        if attempt == options.max_damp_tries:
            break
        new_damp = max(damp * 10.0, 1e-6)
        warnings.warn(
            f"Hessian is not positive definite with relative damping {damp:g}; retrying with {new_damp:g}. "
            "More calibration batches usually fix this.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
        damp = new_damp
    raise torch.linalg.LinAlgError(
        f"Hessian stayed singular after raising the relative damping to {damp:g}; "
        "check the calibration data for constant or NaN inputs, or raise SolverOptions.damp."
    )


def inverse_with_damping(hessian: Tensor, options: SolverOptions, stacklevel: int = 3) -> DampedInverse:
    """Damp H, escalating tenfold while it is not positive definite (:func:`damped_cholesky`), and invert it.

    ``stacklevel`` of the escalation warning: the default points at the caller of this function's caller.
    """
    H, L, damp, dead = damped_cholesky(hessian, options, stacklevel + 1)
    return DampedInverse(H, torch.cholesky_inverse(L).contiguous(), damp, dead)


def single_removal_costs(W: Tensor, Hinv: Tensor, dead: Tensor) -> Tensor:
    """``L_q = w_q^2 / (2 [H^-1]_qq)`` per weight of ``W`` (rows, D), in W's dtype; dead inputs cost 0."""
    gidx = row_groups(W.shape[0], Hinv.shape[0], W.device)
    hdiag = torch.diagonal(Hinv, dim1=-2, dim2=-1)[gidx].to(W.dtype)
    return (W.square() / (2 * hdiag)).masked_fill(dead[gidx], 0.0)


def layer_error(weight_old: Tensor, weight_new: Tensor, hessian: Tensor) -> float:
    """``dE = 1/2 sum_rows (w^ - w) H (w^ - w)^T`` in float64.

    ``hessian`` is ``(d, d)`` or ``(groups, d, d)``; with groups, the ``out`` rows are split into
    ``groups`` contiguous blocks and block ``j`` uses ``hessian[j]``.  Weights may be given as
    ``(out, d)`` matrices or in their original (conv) shape.
    """
    H = as_groups(hessian).detach().double()
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


# --------------------------------------------------------------------------- masks from scores


def magnitude_mask(weight: Tensor, sparsity: float, pattern: NMPattern | None = None, frozen: int = 0) -> Tensor:
    """Keep-mask of the largest-magnitude weights (layer-wide, or N:M per group of columns).

    ``frozen``: how many trailing columns (a bias column) are always kept.
    """
    scores = weight.abs().float().clone()
    if frozen:
        scores[:, -frozen:] = math.inf
    return mask_from_scores(scores, sparsity, pattern, frozen)


def mask_from_scores(scores: Tensor, sparsity: float, pattern: NMPattern | None, bias_cols: int) -> Tensor:
    """Keep-mask pruning the lowest scores: ``sparsity`` of the weight columns layer-wide, or N:M per row.

    The last ``bias_cols`` columns are always kept; a ``-inf`` score is always pruned.
    """
    rows, width = scores.shape
    columns = width - bias_cols
    kept = torch.ones_like(scores, dtype=torch.bool)
    if pattern is not None:
        grouped = scores[:, :columns].reshape(rows, columns // pattern.m, pattern.m)
        drop = grouped.topk(pattern.m - pattern.n, dim=-1, largest=False).indices
        sub = torch.ones_like(grouped, dtype=torch.bool).scatter_(-1, drop, False)
        kept[:, :columns] = sub.reshape(rows, columns)
        return kept
    flat = scores[:, :columns].reshape(-1)
    k = max(int(round(sparsity * rows * columns)), int(torch.isneginf(flat).sum()))
    if k > 0:
        drop = flat.topk(k, largest=False).indices
        sub = torch.ones_like(flat, dtype=torch.bool)
        sub[drop] = False
        kept[:, :columns] = sub.reshape(rows, columns)
    return kept


def row_chunk(rows: int, width: int, element_size: int, max_bytes: int, copies: int = 1) -> int:
    """Rows per chunk so that ``copies`` ``(width, width)`` matrices per row fit in ``max_bytes``."""
    return max(1, min(rows, max_bytes // max(1, copies * width * width * element_size)))


#: The direct refit holds about this many ``k x k`` words per row of a chunk: the gathered block ``A``, its Cholesky
#: factor and the gather's temporary (RSS of a 500 x 801 float32 refit at 50%: 169 MiB over its start for chunks
#: of 90 rows keeping about 400 columns, where three such words per entry are 165 MiB).
REFIT_COPIES = 3


def refit_chunk(rows: int, kept: int, element_size: int, max_bytes: int) -> int:
    """Rows per chunk of the direct refit when the chunk's rows keep at most ``kept`` columns: ``REFIT_COPIES``
    ``(kept, kept)`` matrices per row within ``max_bytes``, and a tick between chunks (:data:`PROGRESS_TICK_FLOPS`)."""
    chunk = row_chunk(rows, kept, element_size, max_bytes, REFIT_COPIES)
    return min(chunk, tick_rows(rows, kept**3 / 3 + 2 * kept * kept))  # Cholesky and the gather, per row


def refit_workspace_bytes(rows: int, width: int, element_size: int, max_bytes: int) -> int:
    """Most bytes one chunk of :func:`refit` holds on a ``rows x width`` layer, whatever the mask: the largest
    chunk over every kept count (a chunk's rows may keep anything from 1 to ``width`` columns)."""
    # refit_chunk for every kept count at once (the budget check calls this for every layer, many times).
    kept = torch.arange(1, width + 1, dtype=torch.int64)
    square = REFIT_COPIES * kept * kept
    by_memory = (max_bytes // (square * element_size)).clamp(1, rows)
    flops = kept.double().pow(3) / 3 + 2 * kept.double().pow(2)
    by_tick = torch.floor(PROGRESS_TICK_FLOPS / flops.clamp_min(1.0)).clamp(1, rows).long()
    return int((torch.minimum(by_memory, by_tick) * square).max()) * element_size


# --------------------------------------------------------------------------- the refit


def refit(
    weight: Tensor, hessian: Tensor, mask: Tensor, solver: SolverOptions | None = None, tick: Tick | None = None
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
    G = H.shape[0]
    rows = weight.shape[0]
    gidx = row_groups(rows, G, weight.device)
    H = H.to(weight.device)
    W = weight.to(solver.dtype)
    kept = mask.to(torch.bool)
    per = rows // G
    removed = W.masked_fill(kept, 0)
    HW = torch.cat([removed[g * per : (g + 1) * per] @ H[g] for g in range(G)])  # H symmetric: rows of (H w_R)^T
    counts = kept.sum(dim=1)
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
        chunk = refit_chunk(rows, k, W.element_size(), solver.max_memory_bytes)
        sel = by_count[start : start + chunk]
        start += chunk
        out[sel] = _refit_rows(H, gidx[sel], HW[sel], kept[sel], counts[sel], k)
        if tick is not None and start < rows:
            tick(float(done_work[start] / done_work[-1]))
    return out.add_(W.masked_fill(~kept, 0)).to(weight.dtype)


def _refit_rows(H: Tensor, group: Tensor, HW: Tensor, kept: Tensor, counts: Tensor, k: int) -> Tensor:
    """The change of a chunk of rows with at most ``k`` kept columns each; row r uses ``H[group[r]]`` (damped)."""
    R, width = HW.shape
    idx = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :k]  # kept columns first
    valid = torch.arange(k, device=HW.device).unsqueeze(0) < counts.unsqueeze(1)
    # Broadcast indices gather each row's kept block without materialising an (R, k, k) index;
    # rows with fewer kept columns are padded with an identity block.
    A = H[group.view(R, 1, 1), idx.unsqueeze(2), idx.unsqueeze(1)]
    vf = valid.to(HW.dtype)
    A.mul_(vf.unsqueeze(2)).mul_(vf.unsqueeze(1))
    A.diagonal(dim1=1, dim2=2).add_(1.0 - vf)
    b = (HW.gather(1, idx) * valid).unsqueeze(2)
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        # Masked damped H is PD in exact arithmetic; fall back to a least-squares solve.
        sol = torch.linalg.lstsq(A, b).solution
    else:
        sol = torch.cholesky_solve(b, L)
    return torch.zeros(R, width, dtype=HW.dtype, device=HW.device).scatter_(1, idx, sol.squeeze(2) * valid)


def refit_flops(kept: Tensor) -> float:
    """The refit's flops for a keep-mask: a Cholesky factor of each row's kept block."""
    counts = kept.sum(dim=1).double()
    return float((counts**3).sum()) / 3.0


RefitKind = Literal["none", "direct", "cg"]


def cg_refit_flops(rows: int, width: int, iterations: int = FAST_REFIT_ITERATIONS) -> float:
    """Flops of a CG refit of ``iterations`` steps (and its start: the right-hand side and the first residual)."""
    return 2.0 * rows * width * width * (iterations + 2)


def refit_plan(options: SolverOptions, rows: int, width: int, direct_flops: float) -> RefitKind:
    """How ``lobs``/``fast`` refit a mask whose direct solve costs ``direct_flops`` (:func:`refit_flops`).

    ``refit=False``: none; ``True``: the direct per-row solve whatever it costs; None (default): the direct solve
    where its estimated time is at most the batched CG's, CG elsewhere (measured switch: BENCHMARKS.md).
    """
    if options.refit is False:
        return "none"
    if options.refit is True:
        return "direct"
    return "direct" if _direct_work(rows, width, direct_flops) <= _cg_work(rows, width) else "cg"


def _direct_work(rows: int, width: int, direct_flops: float) -> float:
    return REFIT_WORK_FACTOR * direct_flops + DIRECT_REFIT_ROW_WORK * rows * width


def _cg_work(rows: int, width: int) -> float:
    return CG_WORK_FACTOR * cg_refit_flops(rows, width) + CG_REFIT_FIXED_WORK


def refit_work(options: SolverOptions, rows: int, width: int, direct_flops: float) -> float:
    """The planned refit's work in progress units (the trace's flops): 0 when none is planned."""
    kind = refit_plan(options, rows, width, direct_flops)
    if kind == "none":
        return 0.0
    return _direct_work(rows, width, direct_flops) if kind == "direct" else _cg_work(rows, width)


def refit_planned(options: SolverOptions, flops: float) -> bool:
    """Whether ``lobs``/``fast`` refit their mask at all: unless ``SolverOptions(refit=False)``.

    ``flops`` (the direct solve's) no longer matters: where the direct solve is dear the batched CG refits instead.
    """
    del flops
    return options.refit is not False


def wants_refit(options: SolverOptions, kept: Tensor) -> bool:
    """:func:`refit_planned` for the refit of the keep-mask ``kept``."""
    return refit_planned(options, refit_flops(kept))


# --------------------------------------------------------------------------- the per-row minimum


@dataclass(frozen=True)
class RowFloor:
    """The per-row minimum: every output row keeps at least ``per_row`` of its weight columns.

    ``SolverOptions.min_kept_per_row`` (default 1: no dead rows); 0 allows dead rows. Weights an earlier mask
    pruned (``pruned_before``) stay pruned even where that leaves fewer. Every place that enforces the minimum
    asks this object: how much a row may lose, how far a sparsity must drop, which weights stay.
    """

    per_row: int

    @classmethod
    def for_solve(cls, options: SolverOptions, pattern: NMPattern | None) -> RowFloor:
        """The floor of one solve: N:M patterns keep N of every M already, so they have none."""
        return cls(options.min_kept_per_row if pattern is None else 0)

    def removable_per_row(
        self, rows: int, columns: int, pruned_before: Tensor | None, device: torch.device | None = None
    ) -> Tensor:
        """``(rows,)`` long: the most weights each row may lose (never fewer than it lost before)."""
        per_row = torch.full((rows,), max(columns - self.per_row, 0), dtype=torch.long, device=device)
        if pruned_before is not None:
            per_row = torch.maximum(per_row, pruned_before[:, :columns].sum(dim=1).to(per_row.device))
        return per_row

    def most_removable(self, rows: int, columns: int, pruned_before: Tensor | None) -> int:
        """The most weights a ``rows x columns`` layer may lose."""
        return int(self.removable_per_row(rows, columns, pruned_before).sum())

    def limit_sparsity(
        self,
        sparsity: float,
        rows: int,
        columns: int,
        pruned_before: Tensor | None,
        method: str,
        stacklevel: int = 3,
    ) -> float:
        """``sparsity``, lowered (with a warning) to the most that leaves the minimum in every row."""
        if self.per_row <= 0 or rows * columns == 0:
            return sparsity
        most = self.most_removable(rows, columns, pruned_before)
        if int(round(sparsity * rows * columns)) <= most:
            return sparsity
        lowered = most / (rows * columns)
        warnings.warn(
            f"{method}: sparsity {sparsity:.6g} would leave fewer than min_kept_per_row={self.per_row} weights in some "
            f"of the {rows} rows of {columns}; pruning {lowered:.6g} instead. SolverOptions(min_kept_per_row=0) "
            "allows dead rows.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
        return lowered

    def kept_by_floor(self, costs: Tensor, pruned_before: Tensor | None) -> Tensor | None:
        """``(rows, columns)`` True on each row's ``per_row`` costliest weights not pruned before; None: no floor."""
        if self.per_row <= 0:
            return None
        rows, columns = costs.shape
        c = costs.masked_fill(pruned_before, -math.inf) if pruned_before is not None else costs
        idx = c.topk(min(self.per_row, columns), dim=1).indices
        kept = torch.zeros(rows, columns, dtype=torch.bool, device=costs.device).scatter_(1, idx, True)
        return kept & ~pruned_before if pruned_before is not None else kept

    def pin(self, costs: Tensor, pruned_before: Tensor | None) -> Tensor:
        """``costs`` with the weights :meth:`kept_by_floor` keeps set to +inf (never removed)."""
        kept = self.kept_by_floor(costs, pruned_before)
        return costs if kept is None else costs.masked_fill(kept, math.inf)


def one_pass_floor(
    inputs: LayerInputs, options: SolverOptions, work: Tensor, Hinv: Tensor, dead: Tensor
) -> Tensor | None:
    """The per-row minimum of ``lobs``/``fast``: each row keeps its costliest weights by single-removal cost."""
    floor = RowFloor.for_solve(options, inputs.pattern)
    if floor.per_row <= 0:
        return None
    costs = single_removal_costs(work, Hinv, dead)[:, : inputs.columns]
    pruned = inputs.pruned_before
    return floor.kept_by_floor(costs, None if pruned is None else pruned[:, : inputs.columns])


# --------------------------------------------------------------------------- the inputs of a solve

PatternLike = Union[str, tuple[int, int], NMPattern, None]


@dataclass(frozen=True)
class LayerInputs:
    """A solve's inputs, validated: ``W`` is ``(rows, width)``, the bias (if any) its last column.

    Attributes:
        shape: the weight's original shape.
        W: ``(rows, width)`` weight matrix, ``width = columns + bias_cols``.
        columns: weight columns per row, without the bias.
        bias_cols: 1 when the bias is the last column of ``W`` (never pruned, moved by OBS), else 0.
        H: ``(groups, width, width)`` Hessian.
        pattern: the N:M pattern, or None (unstructured).
        sparsity: fraction of the weight columns to remove.
        pruned_before: ``(rows, width)`` True where a prior mask pruned (never on the bias); None: no prior mask
            or one that prunes nothing.
    """

    shape: torch.Size
    W: Tensor
    columns: int
    bias_cols: int
    H: Tensor
    pattern: NMPattern | None
    sparsity: float
    pruned_before: Tensor | None

    @property
    def rows(self) -> int:
        return self.W.shape[0]

    @property
    def width(self) -> int:
        return self.W.shape[1]

    @property
    def groups(self) -> int:
        return self.H.shape[0]


def prepare_inputs(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float | None,
    bias: Tensor | None,
    pattern: PatternLike,
    prior_mask: Tensor | None,
) -> LayerInputs:
    """Validate :func:`~lightning_lobs.solvers.solve_layer`'s inputs; the bias becomes the last column of W."""
    nm = parse_pattern(pattern)
    sparsity = _resolve_sparsity(sparsity, nm)
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims (out, in, ...), got shape {tuple(weight.shape)}.")
    shape = weight.shape
    W = weight.detach().reshape(shape[0], -1)
    rows, columns = W.shape
    bias_cols = 0
    if bias is not None:
        if bias.shape != (rows,):
            raise ValueError(f"bias must have shape ({rows},), got {tuple(bias.shape)}.")
        W = torch.cat([W, bias.detach().reshape(rows, 1).to(W.dtype)], dim=1)
        bias_cols = 1
    H = as_groups(hessian.detach())
    _check_hessian(H, hessian, W, columns, bias_cols)
    if not torch.isfinite(W).all():
        raise ValueError("weight (or bias) contains NaN or inf.")
    if nm is not None and columns % nm.m:
        raise ValueError(f"pattern '{nm}' needs the input columns ({columns}) to be a multiple of {nm.m}.")
    pruned_before = None
    if prior_mask is not None:
        pruned_before = _pruned_before(prior_mask, shape, W, columns, bias_cols, nm)
    return LayerInputs(shape, W, columns, bias_cols, H, nm, float(sparsity), pruned_before)


def _resolve_sparsity(sparsity: float | None, nm: NMPattern | None) -> float:
    """The sparsity asked for, or implied by the pattern; a float in [0, 1)."""
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
    return float(number)


def _check_hessian(H: Tensor, hessian: Tensor, W: Tensor, columns: int, bias_cols: int) -> None:
    """``H`` (as groups) fits ``W`` and is finite."""
    groups, D = H.shape[0], H.shape[-1]
    if H.shape[-2] != D or D != W.shape[1]:
        raise ValueError(
            f"hessian must be ({W.shape[1]}, {W.shape[1]}) for a weight with {columns} input columns"
            f"{' plus a bias' if bias_cols else ''}, got {tuple(hessian.shape)}."
        )
    if W.shape[0] % groups:
        raise ValueError(f"{W.shape[0]} output rows cannot be split evenly into {groups} Hessian groups.")
    if not torch.isfinite(H).all():
        raise ValueError("hessian contains NaN or inf; check the calibration data.")


def _pruned_before(
    prior_mask: Tensor, shape: torch.Size, W: Tensor, columns: int, bias_cols: int, nm: NMPattern | None
) -> Tensor | None:
    """``(rows, width)`` True where the keep-mask ``prior_mask`` pruned; None when it prunes nothing."""
    rows = W.shape[0]
    if prior_mask.shape != shape:
        raise ValueError(f"prior_mask must have the weight's shape {tuple(shape)}, got {tuple(prior_mask.shape)}.")
    pruned = ~prior_mask.reshape(rows, columns).to(torch.bool).to(W.device)
    if bias_cols:
        pruned = torch.cat([pruned, pruned.new_zeros(rows, 1)], dim=1)
    if nm is not None:
        per_group = pruned[:, :columns].reshape(rows, -1, nm.m).sum(-1)
        if bool((per_group > nm.m - nm.n).any()):
            raise ValueError(
                f"prior_mask prunes more than {nm.m - nm.n} of some group of {nm.m}; it cannot hold pattern '{nm}'."
            )
    return pruned if bool(pruned.any()) else None
