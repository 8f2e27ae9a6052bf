"""The sequential pipeline: each layer calibrated on the network with every layer before it already pruned.

The order is the forward's; the global allocation (if any) sees the dense network, one layer's Hessian at a time;
then layer by layer: calibrate on the partly pruned network, solve (on its owner rank), share, write its weights.
A block-by-block pipeline (calibrate a transformer block's layers together) replaces the per-layer loop of
:func:`run_sequential` with a per-block one; the stages it calls stay as they are.
"""

from __future__ import annotations

import time

from torch import Tensor

from ..layers import set_weight_matrix
from .allocate import allocate
from .calibrate import calibrate, drop_uncalled
from .collective import fail_together, gather_layer, share_solution
from .context import RunContext
from .records import Plan, Solution, Solved
from .solve import begin_solve, solve_owned

__all__ = ["execution_order", "run_sequential"]


def run_sequential(ctx: RunContext, plan: Plan) -> Solved:
    """Calibrate, allocate and solve the layers one after another; their new weights are written as they go."""
    plan, order = execution_order(ctx, plan)
    owners = {n: i % ctx.rank.world_size for i, n in enumerate(order)}
    hessians: dict[str, Tensor] = {}
    positions: dict[str, float] = {}
    scales: dict[str, float] = {}

    def calibrate_one(name: str) -> Tensor:
        nonlocal plan
        plan, calibration = calibrate(ctx, plan, [name], report=False)
        hessians.update(calibration.hessians)
        positions.update(calibration.positions)
        scales.update(calibration.scales)
        return hessians[name]

    # The allocation's costs on the dense network: each layer calibrated just before its costs.
    plan, _ = allocate(ctx, plan, order, owners, calibrate_one, keep_traces=False)
    begin_solve(ctx, plan, order, {})
    solutions: dict[str, Solution] = {}
    for n in order:
        calibrate_one(n)  # on the network pruned up to here
        t0 = time.perf_counter()
        layer = gather_layer(plan.layers[n])  # a sharded layer's weights gathered (fully_shard): every rank
        with fail_together(ctx.rank, ctx.device, f"solving layer '{n}'"):
            solved = solve_owned(ctx, layer, hessians[n], None, owners[n])
        solved = share_solution(solved, owners[n], ctx.rank, ctx.device, like=layer.module)
        del layer
        set_weight_matrix(plan.layers[n].module, solved.matrix)
        ctx.timings.solve += time.perf_counter() - t0
        solutions[n] = solved
        ctx.progress.step(n, n)
    return Solved(plan, tuple(order), solutions, positions, scales, written=True)


def execution_order(ctx: RunContext, plan: Plan) -> tuple[Plan, list[str]]:
    """The selected layers in the order the forward first calls them, over all calibration batches.

    Batches are run until every layer has been seen (usually one), so a layer that only a later batch
    calls (a data-dependent branch, an MoE expert) is pruned as the one-pass pipeline prunes it.
    """
    order: list[str] = []
    modules = {n: l.module for n, l in plan.layers.items()}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
        for n, m in modules.items()
    ]
    try:
        for batch in ctx.batches:
            ctx.run_batch(batch)
            if len(order) == len(modules):
                break
    finally:
        for h in handles:
            h.remove()
    return drop_uncalled(plan, [n for n in modules if n not in order]), order
