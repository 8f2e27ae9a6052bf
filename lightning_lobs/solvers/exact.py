"""``exact``: greedy OBS with exact downdates (OBC, Frantar & Alistarh 2022).

Every row removes its cheapest weight, downdates its own ``H^-1`` and repeats. Downdates are accumulated lazily as
a low-rank factor and flushed every ``lazy_steps`` removals with one batched matmul, so the greedy choice stays
exact while the memory traffic is matmul-shaped. The OBS loss of every removal is recorded; per-row budgets are
then chosen from those losses so that the layer's summed error is smallest for the requested count
(:func:`allocate_rows`), and the kept weights are refitted to the least-squares optimum for the final mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..config import NMPattern, SolverOptions, parse_pattern
from . import core
from .core import (
    MASK_WORK_PER_WEIGHT,
    REFIT_WORK_FACTOR,
    LayerInputs,
    PatternLike,
    RowFloor,
    Solution,
    Tick,
    inverse_with_damping,
    prepare_inputs,
    refit,
    refit_workspace_bytes,
    row_chunk,
    row_groups,
    sub_tick,
    tick_if_long,
    tick_rows,
)
from .trace import greedy_rows, trace_work


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
    pattern: NMPattern | None = None

    def removal_costs(self) -> Tensor:
        """Per-weight cost ``(rows, d)``: each removal's loss, made non-decreasing along its row.

        The running maximum makes every row's cheapest-k set a prefix of its greedy order,
        so pooling these costs across layers respects the greedy sequence.
        """
        rows, steps = self.order.shape
        costs = torch.zeros(rows, steps, dtype=torch.float64, device=self.order.device)
        inc = self.increments.double().clamp_min(0).cummax(dim=1).values
        return costs.scatter_(1, self.order, inc)


@dataclass(frozen=True)
class ExactSolver:
    """Greedy OBS trace, per-row budgets from its losses, then the joint refit.

    ``trace``: a :func:`greedy_trace` of the same inputs, reused instead of running the trace again.
    """

    trace: GreedyTrace | None = None
    name = "exact"

    def solve(self, inputs: LayerInputs, options: SolverOptions, tick: Tick | None) -> Solution:
        """Prune ``inputs`` to its sparsity (already lowered to the per-row minimum)."""
        work = inputs.W.to(options.dtype)
        Wb, Hb, c, s, t = balanced(inputs.W, inputs.H, inputs.bias_cols)
        wb = Wb.to(options.dtype)
        _, Hinv, damp, dead = inverse_with_damping(Hb.to(work.device), options, stacklevel=4)
        tick_if_long(tick, Hinv.shape[0] * Hinv.shape[-1] ** 3)
        trace_flops, mask_flops, refit_flops = self._work(inputs, options)
        total = trace_flops + mask_flops + refit_flops
        if self.trace is None:
            trace_tick = sub_tick(tick, 0.0, trace_flops / total)
            order, inc = exact_trace(
                wb, Hinv, dead, inputs.pattern, inputs.bias_cols, options, inputs.pruned_before, trace_tick
            )
            inc = inc.double() * (s * t * t)  # float64: the factor may be 1e46
        else:
            order, inc = self.trace.order.to(work.device), self.trace.increments.to(work.device)
        floor = RowFloor.for_solve(options, inputs.pattern)
        kept = exact_mask(order, inc, inputs, floor)
        done = (trace_flops + mask_flops) / total
        if tick is not None and (
            self.trace is None or mask_flops >= core.PROGRESS_TICK_FLOPS
        ):  # small masks: no extra event
            tick(done)
        new = refit(wb, Hb.to(inputs.H.dtype), kept, replace(options, damp=damp), sub_tick(tick, done, 1.0 - done))
        new.mul_(t)
        if inputs.bias_cols:
            new[:, -1] *= c[row_groups(inputs.rows, inputs.groups, new.device)].to(new.dtype)
        return Solution(new, kept, damp)

    def _work(self, inputs: LayerInputs, options: SolverOptions) -> tuple[float, float, float]:
        """Estimated work of the trace (none when reused), the mask choice and the refit, for the ticks."""
        rows, D, bias_cols = inputs.rows, inputs.width, inputs.bias_cols
        chunk = min(rows, tick_rows(rows, 2.0 * options.lazy_steps * D * D))
        trace_flops = 0.0
        if self.trace is None:
            trace_flops = 2.0 * rows * trace_work(D, D - bias_cols, options.lazy_steps, bias_cols, 0.75, chunk)
        mask_flops = MASK_WORK_PER_WEIGHT * rows * D
        refit_flops = REFIT_WORK_FACTOR * rows * (D * (1.0 - inputs.sparsity)) ** 3 / 3
        return trace_flops, mask_flops, refit_flops

    def check_trace(self, inputs: LayerInputs) -> None:
        """Raise ValueError when :attr:`trace` was not computed for inputs of this shape and pattern."""
        trace, nm = self.trace, inputs.pattern
        if trace is None:
            return
        steps = inputs.columns // nm.m * (nm.m - nm.n) if nm is not None else inputs.columns
        if tuple(trace.order.shape) != (inputs.rows, steps) or trace.pattern != nm:
            raise ValueError(
                f"trace does not fit this layer: its order has shape {tuple(trace.order.shape)} and pattern "
                f"{trace.pattern}, expected {(inputs.rows, steps)} and {nm}; compute it with greedy_trace() on the same "
                "inputs."
            )


def greedy_trace(
    weight: Tensor,
    hessian: Tensor,
    *,
    bias: Tensor | None = None,
    pattern: PatternLike = None,
    solver: SolverOptions | None = None,
    prior_mask: Tensor | None = None,
    tick: Tick | None = None,
) -> GreedyTrace:
    """Run the ``exact`` solver's greedy OBS sequence once, for reuse at any sparsity.

    Arguments as in :func:`~lightning_lobs.solvers.solve_layer`; ``tick`` (optional) is called with the fraction
    done at least every :data:`~lightning_lobs.solvers.PROGRESS_TICK_FLOPS` of work. Pass the result as
    ``solve_layer(..., trace=...)``; :meth:`GreedyTrace.removal_costs` gives every weight's greedy removal cost.
    """
    solver = solver or SolverOptions()
    nm = parse_pattern(pattern)
    x = prepare_inputs(weight, hessian, nm.sparsity if nm else 0.0, bias, nm, prior_mask)
    Wb, Hb, _, s, t = balanced(x.W, x.H, x.bias_cols)
    work = Wb.to(solver.dtype)
    _, Hinv, damp, dead = inverse_with_damping(Hb.to(work.device), solver)
    tick_if_long(tick, Hinv.shape[0] * Hinv.shape[-1] ** 3)
    order, inc = exact_trace(work, Hinv, dead, nm, x.bias_cols, solver, x.pruned_before, tick)
    return GreedyTrace(
        order=order, increments=inc.double() * (s * t * t), damp=damp, pattern=nm
    )  # float64: may be 1e46


# --------------------------------------------------------------------------- scale


def balanced(W: Tensor, H: Tensor, bias_cols: int) -> tuple[Tensor, Tensor, Tensor, float, float]:
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
    if bias_cols:
        diag = torch.diagonal(H, dim1=-2, dim2=-1)
        inputs, const = diag[:, :-bias_cols].mean(dim=1), diag[:, -1]
        ok = (inputs > 0) & (const > 0) & torch.isfinite(inputs / const)
        c = torch.where(ok, power_of_two((inputs / const.where(ok, torch.ones_like(const))).sqrt()), c)
        H = H.clone()
        H[:, -1, :] *= c.unsqueeze(1)
        H[:, :, -1] *= c.unsqueeze(1)
        W = W.clone()
        W[:, -1] /= c[row_groups(W.shape[0], H.shape[0], W.device)].to(W.dtype)
    mean = float(torch.diagonal(H, dim1=-2, dim2=-1).mean())
    s = power_of_two(mean) if mean > 0 and math.isfinite(mean) else 1.0
    weights = W[:, : W.shape[1] - bias_cols]  # the bias column, now in units of 1/c, is never squared in a cost
    big = float(weights.abs().max()) if weights.numel() else 0.0
    t = power_of_two(big) if big > 0 and math.isfinite(big) else 1.0
    return W / t, H / s, c, s, t


def power_of_two(x: Any) -> Any:
    """The power of two nearest ``x`` (> 0): scaling by it is exact, so a problem of scale 1 is solved unchanged."""
    if isinstance(x, Tensor):
        return torch.exp2(torch.round(torch.log2(x)))
    return 2.0 ** round(math.log2(x))


# --------------------------------------------------------------------------- the trace of a layer


def exact_trace(
    W: Tensor,
    Hinv: Tensor,
    dead: Tensor,
    pattern: NMPattern | None,
    bias_cols: int,
    options: SolverOptions,
    pruned_before: Tensor | None,
    tick: Tick | None = None,
) -> tuple[Tensor, Tensor]:
    """``(order, increments)`` of the greedy trace of every row, in chunks of rows (see :func:`greedy_rows`)."""
    rows, width = W.shape
    if bias_cols and bool(dead[:, width - bias_cols :].any()):  # the bias is never removed: it must not join the dead
        dead = dead.clone()
        dead[:, width - bias_cols :] = False
    if pattern is None and pruned_before is None and Hinv.shape[0] == 1 and bool(dead.any()):
        return _dead_first(W, Hinv, dead, bias_cols, options, tick)
    columns = width - bias_cols
    # Unstructured rows run to the end so that per-row budgets can be chosen freely afterwards.
    steps = columns // pattern.m * (pattern.m - pattern.n) if pattern is not None else columns
    if steps == 0:
        empty = torch.empty(rows, 0, device=W.device)
        return empty.long(), empty.to(W.dtype)
    gidx = row_groups(rows, Hinv.shape[0], W.device)
    chunk = trace_chunk(rows, width, W.element_size(), options.max_memory_bytes, options.lazy_steps)
    orders, incs = [], []
    # One buffer for every chunk: a fresh (R, d, d) allocation per chunk costs about as much in page faults as
    # a flush. The trace downdates its chunk's copy in place.
    buffer = torch.empty(min(chunk, rows), width, width, dtype=Hinv.dtype, device=Hinv.device)
    for start in range(0, rows, chunk):
        sl = slice(start, start + chunk)
        idx = gidx[sl]
        Hrows = torch.index_select(Hinv, 0, idx, out=buffer[: idx.numel()])
        f = pruned_before[sl] if pruned_before is not None else None
        part = sub_tick(tick, start / rows, idx.numel() / rows)
        order, inc = greedy_rows(W[sl], Hrows, dead[idx], steps, pattern, bias_cols, options.lazy_steps, f, tick=part)
        orders.append(order)
        incs.append(inc)
        if tick is not None and start + idx.numel() < rows:
            tick((start + idx.numel()) / rows)
    return torch.cat(orders), torch.cat(incs)


def trace_chunk(rows: int, width: int, element_size: int, max_bytes: int, lazy: int) -> int:
    """Rows whose ``H^-1`` copies :func:`exact_trace` holds at once: as many as fit in ``max_bytes`` (one
    ``(width, width)`` matrix each), and few enough that the ticks between flushes come often enough (one flush of
    R rows costs ``2 R lazy width^2`` flops)."""
    chunk = row_chunk(rows, width, element_size, max_bytes)
    return min(chunk, tick_rows(rows, 2.0 * lazy * width * width))


def exact_workspace_bytes(rows: int, width: int, element_size: int, max_bytes: int, lazy: int) -> int:
    """Most bytes of per-row matrices ``exact`` holds at once on a ``rows x width`` layer: its trace's chunk of
    ``H^-1`` copies, or later its refit's chunk of systems (:func:`~.core.refit_workspace_bytes`), not both."""
    trace = trace_chunk(rows, width, element_size, max_bytes, lazy) * width * width * element_size
    return max(trace, refit_workspace_bytes(rows, width, element_size, max_bytes))


def _dead_first(
    W: Tensor, Hinv: Tensor, dead: Tensor, bias_cols: int, options: SolverOptions, tick: Tick | None
) -> tuple[Tensor, Tensor]:
    """The trace of a layer with dead inputs: those first, then the trace of the live columns alone.

    A dead input (always 0 in the calibration data) is removed first, at no cost and without moving any other
    weight: its row and column of H^-1 are zero off the diagonal. So the greedy sequence is those removals
    followed by the trace of the live columns alone, which is cheaper by the cube of their share.
    """
    rows = W.shape[0]
    live = (~dead[0]).nonzero().squeeze(1)
    gone = dead[0].nonzero().squeeze(1)
    sub = Hinv[:, live][:, :, live].contiguous()
    order, inc = exact_trace(W[:, live], sub, dead[:, live], None, bias_cols, options, None, tick)
    order = torch.cat([gone.expand(rows, -1), live[order]], dim=1)
    return order, torch.cat([inc.new_zeros(rows, gone.numel()), inc], dim=1)


# --------------------------------------------------------------------------- the mask from the trace


def exact_mask(order: Tensor, inc: Tensor, inputs: LayerInputs, floor: RowFloor) -> Tensor:
    """Keep-mask ``(rows, width)`` from the greedy trace: per-row counts split by :func:`allocate_rows`.

    Unstructured rows stop ``floor.per_row`` steps before the end of their trace (their last weights stay),
    except where a prior mask already pruned more.
    """
    rows, steps = order.shape
    device = order.device
    pruned_before = inputs.pruned_before
    if steps == 0:
        return torch.ones(rows, inputs.width, dtype=torch.bool, device=device)
    step_axis = torch.arange(steps, device=device)
    if inputs.pattern is None and floor.per_row > 0:
        cap = floor.removable_per_row(rows, steps, pruned_before, device=device)
        inc = inc.masked_fill(step_axis.unsqueeze(0) >= cap.unsqueeze(1), math.inf)
    total = int(round(inputs.sparsity * rows * inputs.columns))
    if inputs.pattern is not None:
        counts = torch.full((rows,), steps, dtype=torch.long, device=device)
    elif pruned_before is None:
        counts = allocate_rows(inc, total)
    else:
        # Removals made before lead every row's trace; allocate only the steps after them.
        prior = pruned_before.sum(dim=1)
        idx = (step_axis.unsqueeze(0) + prior.unsqueeze(1)).clamp_max(steps - 1)
        shifted = inc.gather(1, idx).masked_fill(idx < prior.unsqueeze(1) + step_axis, math.inf)
        counts = prior + allocate_rows(shifted, max(0, total - int(prior.sum())))
    taken = step_axis.unsqueeze(0) < counts.unsqueeze(1)
    kept = torch.ones(rows, inputs.width, dtype=torch.bool, device=device)
    kept.scatter_(1, order, ~taken)
    return kept


def allocate_rows(increments: Tensor, total: int) -> Tensor:
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
    if total <= 0:
        return torch.zeros(R, dtype=torch.long, device=inc.device)
    if total >= R * S:
        return torch.full((R,), S, dtype=torch.long, device=inc.device)
    lo, hi = _bracket_slope(inc, C, total)
    c_lo, c_hi = _counts_at_slope(C, lo), _counts_at_slope(C, hi)
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
    return improve_allocation(C, c_lo)


def _counts_at_slope(C: Tensor, lam: float) -> Tensor:
    """Every row's count minimising ``C_r(c) - lam c``, the largest c among ties."""
    S = C.shape[1] - 1
    c_axis = torch.arange(S + 1, device=C.device, dtype=torch.float64)
    obj = C - lam * c_axis
    # argmin taking the largest c among ties: flip, argmin (first occurrence), unflip
    return S - obj.flip(1).argmin(dim=1)


def _bracket_slope(inc: Tensor, C: Tensor, total: int) -> tuple[float, float]:
    """Bisection on the slope: ``(lo, hi)`` with fewer than ``total`` removals at ``lo`` and at least at ``hi``."""
    finite = inc[torch.isfinite(inc)]  # inf marks steps a row cannot take (after its forced removals)
    lo, hi = -1.0, (float(finite.max().item()) if finite.numel() else 0.0) + 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if int(_counts_at_slope(C, mid).sum()) >= total:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-15 * max(1.0, abs(hi)):
            break
    return lo, hi


def improve_allocation(C: Tensor, counts: Tensor, max_moves: int | None = None) -> Tensor:
    """Move single removals between rows while that lowers the summed cost.

    The Lagrangian split is optimal when every row's cost curve is convex; greedy OBS
    losses almost always are, and these moves repair the rare non-convex rows.
    """
    R, S1 = C.shape
    counts = counts.clone()
    rows = torch.arange(R, device=C.device)
    for _ in range(max_moves if max_moves is not None else 4 * R):
        up = torch.where(
            counts < S1 - 1,
            C[rows, (counts + 1).clamp_max(S1 - 1)] - C[rows, counts],
            torch.full_like(C[:, 0], math.inf),
        )
        down = torch.where(
            counts > 0, C[rows, counts] - C[rows, (counts - 1).clamp_min(0)], torch.full_like(C[:, 0], -math.inf)
        )
        r_up = int(up.argmin())
        down_other = down.clone()
        down_other[r_up] = -math.inf
        r_down = int(down_other.argmax())
        if not bool(up[r_up] < down_other[r_down] - 1e-12 * max(1.0, abs(float(down_other[r_down])))):
            break
        counts[r_up] += 1
        counts[r_down] -= 1
    return counts
