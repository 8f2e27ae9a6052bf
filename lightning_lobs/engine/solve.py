"""Stage 4, solve: OBS on every layer at its target, each rank solving the layers it owns."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ..config import NMPattern, SolverOptions
from ..layers import from_rows
from ..sharding import is_sharded
from ..solvers import GreedyTrace, Tick, solve_layer
from .collective import fail_together, gather_layer, share_solution
from .context import RunContext
from .estimates import solve_work
from .records import LayerPlan, Plan, Solution

__all__ = ["begin_solve", "solve_all", "solve_one", "solve_owned", "solve_sharded"]


def begin_solve(ctx: RunContext, plan: Plan, order: Sequence[str], traces: Mapping[str, GreedyTrace]) -> None:
    """Start the solve phase's progress, each layer counted by its estimated work."""
    pattern = ctx.nm is not None
    ctx.progress.begin("solve", {n: solve_work(plan.layers[n], ctx.solver, pattern, n in traces) for n in order})


def solve_all(
    ctx: RunContext,
    plan: Plan,
    order: Sequence[str],
    owners: Mapping[str, int],
    hessians: Mapping[str, Tensor],
    traces: dict[str, GreedyTrace],
) -> dict[str, Solution]:
    """Every layer's solution on every rank: this rank's share solved, then every share broadcast from its owner.

    Nothing is written into the model (the commit does that, once every solve succeeded).
    """
    begin_solve(ctx, plan, order, traces)
    if any(is_sharded(plan.layers[n].module.weight) for n in order):
        return solve_sharded(ctx, plan, order, owners, hessians, traces)
    solved: dict[str, Solution] = {}
    with fail_together(ctx.rank, ctx.device, "solving the layers"):
        for n in order:
            t0 = time.perf_counter()
            solved[n] = solve_owned(ctx, plan.layers[n], hessians[n], traces.pop(n, None), owners[n])
            ctx.timings.solve += time.perf_counter() - t0
            ctx.progress.step(n, n)
    t0 = time.perf_counter()
    shared = {n: share_solution(solved[n], owners[n], ctx.rank, ctx.device) for n in order}
    ctx.timings.solve += time.perf_counter() - t0
    return shared


def solve_sharded(
    ctx: RunContext,
    plan: Plan,
    order: Sequence[str],
    owners: Mapping[str, int],
    hessians: Mapping[str, Tensor],
    traces: dict[str, GreedyTrace],
) -> dict[str, Solution]:
    """:func:`solve_all` for a model with ``fully_shard`` weights: one layer at a time, every rank gathers its
    weight, the owner solves, the result is broadcast and each rank keeps only its shard of it, so no rank holds
    more than one whole layer (and its solution) at once."""
    shared: dict[str, Solution] = {}
    for n in order:
        t0 = time.perf_counter()
        layer = gather_layer(plan.layers[n])  # a collective: every rank, in order
        with fail_together(ctx.rank, ctx.device, f"solving layer '{n}'"):
            solved = solve_owned(ctx, layer, hessians[n], traces.pop(n, None), owners[n])
        shared[n] = share_solution(solved, owners[n], ctx.rank, ctx.device, like=layer.module)
        del layer, solved  # the whole matrices, before the next layer's
        ctx.timings.solve += time.perf_counter() - t0
        ctx.progress.step(n, n)
    return shared


# ---- THE RANK LOOP's body: the one place that decides who solves a layer.
def solve_owned(ctx: RunContext, layer: LayerPlan, hessian: Tensor, trace: GreedyTrace | None, owner: int) -> Solution:
    """The layer's solution on its owner rank; elsewhere a placeholder of the right shapes that
    :func:`~lightning_lobs.engine.collective.share_solution` fills in from the owner."""
    if owner != ctx.rank.rank:
        dense = layer.dense
        mask = torch.ones(layer.module.weight.shape, dtype=torch.bool, device=dense.device)
        return Solution(torch.zeros_like(dense), mask, 0.0, 0.0, 0.0)
    n = layer.name
    tick = lambda f: ctx.progress.advance(n, min(f, 1.0 - 1e-9), n)  # noqa: E731
    solved = solve_one(layer, hessian, ctx.nm, ctx.solver, trace, tick)
    # before sharing, so that every rank reports it
    return replace(solved, seconds=solved.seconds + ctx.timings.before_solve.get(n, 0.0))


def solve_one(
    layer: LayerPlan,
    hessian: Tensor,
    nm: NMPattern | None,
    solver: SolverOptions,
    trace: GreedyTrace | None = None,
    tick: Tick | None = None,
) -> Solution:
    """OBS on one layer: the solver's input in the solve's precision and column order, its result in the layer's."""
    t0 = time.perf_counter()
    W = layer.dense
    if W.dtype not in (torch.float32, torch.float64):  # bf16/fp16 weights: solve in the solver's precision
        W = W.to(solver.dtype)
    bias_col = layer.bias_column
    weight, bias = (W[:, :-1], W[:, -1]) if bias_col else (W, None)
    H = hessian.to(W.device)
    prior = layer.prior
    perm = layer.perm
    if perm is not None:
        perm = perm.to(W.device)
        full = torch.cat([perm, torch.tensor([weight.shape[1]], device=W.device)]) if bias_col else perm
        weight = weight[:, perm]
        H = H[:, full][:, :, full]
        if prior is not None:
            prior = prior[:, perm]
        trace = None  # traces are computed on the unpermuted columns
    res = solve_layer(
        weight,
        H,
        None if nm else layer.target,
        layer.method,
        bias=bias,
        pattern=nm,
        solver=solver,
        prior_mask=prior,
        trace=trace,
        tick=tick,
    )
    new_w, mask2 = res.weight, res.mask
    if perm is not None:
        inv = torch.argsort(perm)
        new_w, mask2 = new_w[:, inv], mask2[:, inv]
    matrix = torch.cat([new_w, res.bias.unsqueeze(1)], dim=1) if bias_col else new_w
    return Solution(matrix, from_rows(layer.module, mask2), res.error, res.damp, time.perf_counter() - t0)
