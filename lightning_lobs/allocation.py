"""Spreading one overall sparsity over the layers (global allocation).

A pure function from costs to targets: the engine computes every layer's costs (its allocation stage,
:mod:`lightning_lobs.engine.allocate`) and :func:`allocate_targets` sets every layer's target sparsity
so that the requested fraction of all selected weights is removed where the summed *relative* layer error (each layer's error divided by its output energy
``1/2 sum_rows w~ H w~^T``) is smallest. How a layer's error at a given sparsity is predicted
depends on its method and on :class:`GlobalAllocation`:

* ``exact`` layers: their greedy OBS trace (each removal's loss given the earlier ones), which
  their solve then reuses. With only such layers (or ``costs="one-pass"``) the allocation is
  the pooled ranking of per-weight costs.
* ``lobs``/``fast`` layers with ``costs="curve"`` (default): an error curve measured by
  running SparseGPT at a grid of sparsities on a sample of the layer's rows (one Cholesky
  factor and one batched column sweep for all levels, :func:`~lightning_lobs.solvers.error_curve`).
  The split is then the exact minimum of the summed curves over the grid (a dynamic programme
  over the levels, see :func:`split_budget`); the excess over the budget is handed back along
  the steepest curve segments and single exchanges between layers, linear between the measured
  levels, lower the sum further where they can (:func:`_refine`).
* ``costs="one-pass"``: the one-pass ``L_q = w_q^2 / (2 [H^-1]_qq)`` pooled as for ``exact``.
  Cheap, but each cost assumes every other weight stays, so a layer with many small,
  redundant weights looks nearly free and is over-pruned (BENCHMARKS.md, "Allocation").

Floors hold in every mode: no layer beyond ``max_layer_sparsity``, and (unless
``allow_dead_rows``) every output row keeps ``SolverOptions.min_kept_per_row`` weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import as_real, describe
from .config import GlobalAllocation
from .solvers.core import RowFloor

__all__ = ["LayerCosts", "allocate_global", "allocate_targets", "check_floors", "removal_levels", "split_budget"]

#: States kept per step of :func:`split_budget`'s dynamic programme: removal counts are merged
#: in buckets of ``ceil(budget / DP_RESOLUTION)`` weights, so the split is exact whenever the
#: budget is at most this many weights and otherwise within one bucket of the optimum's count.
DP_RESOLUTION = 1 << 15


# --------------------------------------------------------------------------- the split over a grid


def split_budget(
    counts: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int, resolution: int = DP_RESOLUTION
) -> list[int]:
    """One level per layer: the smallest summed error among choices removing at least ``budget`` weights.

    ``counts[l][k]`` / ``errors[l][k]``: removals and error of layer ``l`` at its level ``k``.
    A dynamic programme over the layers keeps, for every reachable total (capped at
    ``budget``), the cheapest choice, and only the Pareto front of (total, error): exact
    when ``budget <= resolution``; above, totals are merged in buckets of
    ``ceil(budget / resolution)`` weights. Ties go to the earlier-found choice, so every
    process computes the same split. Returns each layer's level index.
    """
    if len(counts) != len(errors) or not counts:
        raise ValueError("counts and errors must be non-empty and of the same length (one entry per layer).")
    q = max(1, -(-int(budget) // int(resolution)))
    done = int(budget) // q + 1  # the bucket of totals that reach the budget
    keys = torch.zeros(1, dtype=torch.long)
    errs = torch.zeros(1, dtype=torch.float64)
    back: list[tuple[Tensor, Tensor]] = []
    for c_l, e_l in zip(counts, errors):
        c = torch.as_tensor(list(c_l), dtype=torch.long)
        e = torch.as_tensor(list(e_l), dtype=torch.float64)
        if c.numel() == 0 or c.shape != e.shape or bool((c < 0).any()) or not bool(torch.isfinite(e).all()):
            raise ValueError("every layer needs at least one level, counts >= 0 and finite errors.")
        F, K = keys.numel(), c.numel()
        nk = (keys.unsqueeze(1) + c.unsqueeze(0)).clamp_max(int(budget)).reshape(-1)
        ne = (errs.unsqueeze(1) + e.unsqueeze(0)).reshape(-1)
        parent = torch.arange(F).repeat_interleave(K)
        level = torch.arange(K).repeat(F)
        bucket = torch.where(nk >= budget, torch.full_like(nk, done), nk // q)
        # cheapest per bucket (ties: the larger total, then the first found)
        o = torch.argsort(-nk, stable=True)
        o = o[torch.argsort(ne[o], stable=True)]
        o = o[torch.argsort(bucket[o], stable=True)]
        first = torch.ones(o.numel(), dtype=torch.bool)
        first[1:] = bucket[o][1:] != bucket[o][:-1]
        o = o[first]
        # Pareto front: drop a state when one with a larger total is at most as costly
        o = o[torch.argsort(-nk[o], stable=True)]
        e_sorted = ne[o]
        best_above = torch.cat([e_sorted.new_full((1,), math.inf), e_sorted.cummin(0).values[:-1]])
        o = o[e_sorted < best_above]
        keys, errs = nk[o], ne[o]
        back.append((parent[o], level[o]))
    final = (keys >= budget).nonzero().flatten()
    if final.numel() == 0:
        raise ValueError(f"no choice of levels removes {budget} weights (the most is {int(keys.max())}).")
    state = int(final[errs[final].argmin()])
    chosen = [0] * len(counts)
    for l in range(len(counts) - 1, -1, -1):
        parents, levels = back[l]
        chosen[l] = int(levels[state])
        state = int(parents[state])
    return chosen


def _refine(
    counts: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], chosen: Sequence[int], budget: int
) -> list[int]:
    """Final per-layer removals, exactly ``budget`` in all, starting from the grid split ``chosen``.

    Each layer's error between its measured levels is taken as linear. First the excess over
    the budget is handed back where the curve segment is steepest (the most error saved per
    weight); then single exchanges move removals from the steepest segment below any layer's
    point to the flattest segment above another's while that lowers the summed error. Every
    step lowers the (interpolated) sum, so the result is never worse than the grid split.
    """
    cur = [int(counts[l][k]) for l, k in enumerate(chosen)]
    L = len(cur)

    def seg_down(l: int) -> tuple[float, int] | None:  # (slope, lowest count) of the segment below cur[l]
        c = counts[l]
        k = max((i for i in range(len(c)) if c[i] < cur[l]), default=None)
        if k is None:
            return None
        hi = min(i for i in range(len(c)) if c[i] >= cur[l])
        return (errors[l][hi] - errors[l][k]) / (c[hi] - c[k]), c[k]

    def seg_up(l: int) -> tuple[float, int] | None:  # (slope, highest count) of the segment above cur[l]
        c = counts[l]
        k = min((i for i in range(len(c)) if c[i] > cur[l]), default=None)
        if k is None:
            return None
        lo = max(i for i in range(len(c)) if c[i] <= cur[l])
        return (errors[l][k] - errors[l][lo]) / (c[k] - c[lo]), c[k]

    excess = sum(cur) - budget
    while excess > 0:
        downs = [(seg_down(l), l) for l in range(L)]
        cand = [(d[0], l, d[1]) for d, l in downs if d is not None]
        if not cand:
            break
        _, l, low = max(cand, key=lambda t: (t[0], -t[1]))
        t = min(excess, cur[l] - low)
        cur[l] -= t
        excess -= t
    for _ in range(4 * L * max(len(c) for c in counts)):
        downs = [(d[0], l, d[1]) for l in range(L) for d in [seg_down(l)] if d is not None]
        ups = [(u[0], l, u[1]) for l in range(L) for u in [seg_up(l)] if u is not None]
        best = None
        for sd, a, low in sorted(downs, key=lambda t: (-t[0], t[1]))[:2]:
            for su, b, high in sorted(ups, key=lambda t: (t[0], t[1]))[:2]:
                if a != b and sd > su * (1 + 1e-12) + 1e-300 and (best is None or sd - su > best[0]):
                    best = (sd - su, a, low, b, high)
        if best is None:
            break
        _, a, low, b, high = best
        t = min(cur[a] - low, high - cur[b])
        cur[a] -= t
        cur[b] += t
    return cur


# --------------------------------------------------------------------------- per-layer costs


@dataclass(frozen=True, eq=False)
class LayerCosts:
    """One layer's removal costs, as the split needs them (plain tensors and numbers, no module).

    ``values`` holds, when ``curve``, the layer's relative error at each of ``levels`` (removal counts); otherwise
    every weight's relative removal cost, shaped ``(rows, cols)``. ``prior`` is the ``(rows, cols)`` keep-mask of
    an earlier step (on the CPU), ``cap`` the most weights the layer may lose (:func:`removal_levels`).
    """

    rows: int
    cols: int
    """Weight columns, the bias column left out."""
    prior: Tensor | None
    cap: int
    levels: Sequence[int]
    values: Tensor
    curve: bool


def check_floors(config: GlobalAllocation, min_kept: int) -> None:
    """Refuse a configuration whose floors contradict each other (before any cost is computed)."""
    if not config.allow_dead_rows and min_kept < 1:
        raise ValueError(
            "GlobalAllocation(allow_dead_rows=False) needs SolverOptions.min_kept_per_row >= 1 (got 0): set "
            "min_kept_per_row=1, or GlobalAllocation(allow_dead_rows=True) to allow dead output rows."
        )


def removal_levels(
    rows: int, cols: int, prior: Tensor | None, min_kept: int, config: GlobalAllocation
) -> tuple[int, list[int]]:
    """The most weights a layer may lose, and the removal counts its error curve is measured at."""
    pruned = None if prior is None else ~prior
    by_sparsity = math.floor(config.max_layer_sparsity * rows * cols + 1e-9)
    cap = min(by_sparsity, RowFloor(min_kept).most_removable(rows, cols, pruned))
    forced = 0 if pruned is None else int(pruned.sum())
    cap = max(cap, forced)  # never below the layer's earlier removals
    return cap, _levels(rows * cols, forced, cap, config.sparsity_grid())


def _pin_row_minimum(costs: Tensor, min_kept: int, prior: Tensor | None) -> Tensor:
    """``costs`` with each row's ``min_kept`` costliest weights still kept (``prior`` is a keep-mask) set to +inf."""
    return RowFloor(min_kept).pin(costs, None if prior is None else ~prior)


def _levels(n_weights: int, lowest: int, highest: int, grid: Sequence[float]) -> list[int]:
    """Removal counts of a layer's curve: the grid's, within [lowest, highest], plus both ends."""
    pts = {lowest, highest}
    pts.update(c for c in (int(round(g * n_weights)) for g in grid) if lowest <= c <= highest)
    return sorted(pts)


def _cumulative_curve(costs: Tensor, levels: Sequence[int]) -> list[float]:
    """Sum of the cheapest ``c`` per-weight costs for every ``c`` in ``levels`` (prior removals are free)."""
    flat = costs.reshape(-1).double().clamp_min(0.0)
    finite = torch.sort(flat[torch.isfinite(flat)]).values
    csum = torch.cat([finite.new_zeros(1), finite.cumsum(0)])
    return [float(csum[min(c, finite.numel())]) for c in levels]


# --------------------------------------------------------------------------- the allocation


def allocate_targets(
    costs: Mapping[str, LayerCosts], sparsity: float, config: GlobalAllocation, min_kept: int
) -> dict[str, float]:
    """Every layer's target sparsity for one overall ``sparsity`` (see the module docstring), in ``costs``' order.

    With per-weight costs only (``exact`` layers, or ``costs="one-pass"``) the cheapest weights are pooled
    over the layers; with any error curve, :func:`split_budget` over the curves (per-weight costs summed into
    one), then :func:`_refine`. Floors: ``cap`` per layer and, through +inf costs, ``min_kept`` per row.
    """
    order = list(costs)
    total_n = sum(costs[n].rows * costs[n].cols for n in order)
    budget = int(round(sparsity * total_n))
    most = sum(costs[n].cap for n in order)
    if budget > most:
        raise ValueError(
            f"global sparsity {sparsity:.6g} needs {budget} of {total_n} weights removed, but with "
            f"GlobalAllocation.max_layer_sparsity={config.max_layer_sparsity} and SolverOptions.min_kept_per_row="
            f"{min_kept} at most {most} ({most / total_n:.4f}) can go: raise max_layer_sparsity (up to 1.0), lower "
            "min_kept_per_row, or lower the sparsity."
        )
    if not any(costs[n].curve for n in order):
        pooled = {n: _pin_row_minimum(costs[n].values, min_kept, costs[n].prior) for n in order}
        forced = {n: p for n in order if (p := costs[n].prior) is not None}
        return allocate_global(pooled, sparsity, forced or None, {n: costs[n].cap for n in order})
    errors: dict[str, list[float]] = {}
    for n in order:
        c = costs[n]
        if c.curve:
            errors[n] = [float(v) for v in c.values]
        else:
            errors[n] = _cumulative_curve(_pin_row_minimum(c.values, min_kept, c.prior), c.levels)
    cnts = [list(costs[n].levels) for n in order]
    errs = [errors[n] for n in order]
    chosen = split_budget(cnts, errs, budget)
    final = _refine(cnts, errs, chosen, budget)
    return {n: c / (costs[n].rows * costs[n].cols) for n, c in zip(order, final)}


# --------------------------------------------------------------------------- pooled per-weight costs


def allocate_global(
    costs: Mapping[str, Tensor],
    sparsity: float,
    forced: Mapping[str, Tensor] | None = None,
    max_removed: Mapping[str, int] | None = None,
) -> dict[str, float]:
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
