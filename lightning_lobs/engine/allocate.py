"""Stage 3, allocate: spread one overall sparsity over the layers, from each layer's measured costs.

The costs are computed here and the split is :func:`lightning_lobs.allocation.allocate_targets`, a pure function of
them. The costs stay in the engine because computing them is engine work: each rank computes the layers it owns and
broadcasts them, sequential mode calibrates each layer just before its costs, and ``exact`` layers keep their greedy
trace for their solve.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..allocation import LayerCosts, allocate_targets, check_floors, removal_levels
from ..config import GlobalAllocation, SolverOptions
from ..solvers import GreedyTrace, Tick, error_curve, greedy_trace, obs_scores, output_energy
from .collective import broadcast_costs, fail_together, gather_layer
from .context import RunContext
from .estimates import allocation_work
from .records import LayerPlan, Plan

__all__ = ["allocate", "layer_costs"]

HessianOf = Callable[[str], Tensor]
Progress = Callable[[str, float], None]


def allocate(
    ctx: RunContext,
    plan: Plan,
    order: Sequence[str],
    owners: Mapping[str, int],
    hessian_of: HessianOf,
    keep_traces: bool,
) -> tuple[Plan, dict[str, GreedyTrace]]:
    """The plan with the global allocation's targets (unchanged without one), and the ``exact`` traces kept.

    ``hessian_of`` may run a collective (sequential calibration): every rank calls it for every layer, in ``order``.
    """
    config = ctx.options.global_allocation
    if config is None:
        return plan, {}
    t0 = time.perf_counter()
    curve = config.costs == "curve" and any(plan.layers[n].method != "exact" for n in order)
    levels = len(config.sparsity_grid())
    ctx.progress.begin(
        "allocate",
        {n: allocation_work(plan.layers[n], ctx.solver, config.curve_rows, levels, curve) for n in order},
    )
    started: dict[str, float] = {}

    def on_layer(name: str, fraction: float) -> None:
        # The layer's time (its trace or curve, and its calibration in sequential mode) joins its `secs`.
        if name not in started:  # the layer starts: nothing to report yet
            started[name] = time.perf_counter()
        elif fraction >= 1.0:
            before = ctx.timings.before_solve
            before[name] = before.get(name, 0.0) + time.perf_counter() - started[name]
            ctx.progress.step(name, name)
        else:
            ctx.progress.advance(name, fraction, name)

    traces: dict[str, GreedyTrace] = {}
    targets = _targets(ctx, plan, order, owners, hessian_of, config, traces if keep_traces else None, on_layer)
    ctx.timings.solve += time.perf_counter() - t0
    return plan.with_targets(targets), traces


def _targets(  # noqa: PLR0913 - the allocate stage's inputs, split out to keep its progress bookkeeping apart
    ctx: RunContext,
    plan: Plan,
    order: Sequence[str],
    owners: Mapping[str, int],
    hessian_of: HessianOf,
    config: GlobalAllocation,
    traces: dict[str, GreedyTrace] | None,
    progress: Progress,
) -> dict[str, float]:
    """Each rank computes the costs (or curves) of the layers it owns, keeping ``exact`` traces in ``traces`` (when
    given); these are broadcast and every rank runs the same deterministic split. ``progress(name, fraction)`` hears
    when each layer's costs start (0.0), how far they are, and when they are done (1.0)."""
    solver = ctx.solver
    min_kept = solver.min_kept_per_row
    check_floors(config, min_kept)
    use_curve = config.costs == "curve" and any(plan.layers[n].method != "exact" for n in order)
    priors: dict[str, Tensor | None] = {}
    ranges: dict[str, tuple[int, list]] = {}
    for n in order:
        layer = plan.layers[n]
        priors[n] = (
            None if layer.prior is None else layer.prior.reshape(layer.rows, layer.weight_cols).to(torch.bool).cpu()
        )
        ranges[n] = removal_levels(layer.rows, layer.weight_cols, priors[n], min_kept, config)
    values: dict[str, Tensor] = {}  # exact / one-pass: per-weight costs (rows, d); curve: errors at the levels
    for n in order:
        layer = gather_layer(plan.layers[n])  # a sharded (fully_shard) layer's weights gathered: every rank, in order
        curve = use_curve and layer.method != "exact"
        tick = lambda f, n=n: progress(n, min(f, 1.0 - 1e-9))  # noqa: E731 - 1.0 only when done
        progress(n, 0.0)
        H = hessian_of(n)
        with fail_together(ctx.rank, ctx.device, f"the removal costs of layer '{n}'"):
            if owners[n] == ctx.rank.rank:
                prior = None if priors[n] is None else priors[n].to(layer.dense.device)
                levels = ranges[n][1] if curve else None
                values[n], trace = layer_costs(layer, H, solver, prior, levels, config.curve_rows, tick)
                if traces is not None and trace is not None:
                    traces[n] = trace
            else:
                values[n] = torch.zeros(
                    (len(ranges[n][1]),) if curve else (layer.rows, layer.weight_cols), dtype=torch.float64
                )
        del layer  # a gathered one, before the next layer's gather
        progress(n, 1.0)
    values = broadcast_costs(values, owners, ctx.rank, ctx.device)
    costs = {
        n: LayerCosts(
            rows=plan.layers[n].rows,
            cols=plan.layers[n].weight_cols,
            prior=priors[n],
            cap=ranges[n][0],
            levels=ranges[n][1],
            values=values[n].detach().cpu().double(),
            curve=use_curve and plan.layers[n].method != "exact",
        )
        for n in order
    }
    return allocate_targets(costs, float(ctx.options.sparsity), config, min_kept)


def _split(layer: LayerPlan) -> tuple[Tensor, Tensor | None]:
    W = layer.dense.to(torch.float64)
    return (W[:, :-1], W[:, -1]) if layer.bias_column else (W, None)


def layer_costs(  # noqa: PLR0913 - one layer's inputs to the three cost kinds
    layer: LayerPlan,
    hessian: Tensor,
    solver: SolverOptions,
    prior: Tensor | None,
    levels: Sequence[int] | None,
    curve_rows: int,
    tick: Tick | None = None,
) -> tuple[Tensor, GreedyTrace | None]:
    """A layer's costs relative to its output energy, and the greedy trace for ``exact``.

    With ``levels`` (removal counts), its error curve at them: SparseGPT on ``curve_rows`` sampled rows (for every
    method but ``exact``, ``admm`` included). Otherwise per-weight removal costs: ``exact`` layers use their greedy
    OBS sequence (each removal's loss given the earlier ones), which sees through redundant inputs; ``lobs``,
    ``fast`` and ``admm`` layers the one-pass ``L_q`` (cheaper, but it counts every copy of a duplicated input as
    free).
    """
    weight, bias = _split(layer)
    if levels is not None:
        n_weights = layer.rows * layer.weight_cols
        curve = error_curve(
            weight.to(solver.dtype),
            hessian,
            [c / n_weights for c in levels],
            bias=None if bias is None else bias.to(solver.dtype),
            solver=solver,
            prior_mask=prior,
            sample_rows=curve_rows,
            tick=tick,
        )
        return curve, None
    H = hessian.to(weight.device)
    energy = output_energy(weight, H, bias=bias)
    trace = None
    if layer.method == "exact":
        w = weight.to(solver.dtype)
        trace = greedy_trace(
            w, H, bias=None if bias is None else bias.to(solver.dtype), solver=solver, prior_mask=prior, tick=tick
        )
        scores = trace.removal_costs()
    else:
        scores = obs_scores(weight, H, bias=bias, solver=solver)
    scores = scores.reshape(weight.shape[0], -1)
    if not energy > 0:  # an all-zero layer: nothing to lose, nothing to compare against
        return torch.zeros_like(scores), trace
    return scores / energy, trace
