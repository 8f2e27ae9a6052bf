"""One prune, start to end: plan -> calibrate -> allocate -> solve -> commit -> report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .. import attention as _attention
from ..config import ProgressFn, PruneOptions
from ..distributed import RankInfo
from ..masks import MaskSet
from .allocate import allocate
from .blocks import Chain
from .calibrate import calibrate
from .commit import Transaction, commit
from .context import RunContext
from .forward import eval_no_grad
from .plan import assign_owners, check_memory, make_plan
from .records import Plan, PruneReport, Solved
from .report import make_report, recalibrate_bn
from .sequential import find_chain, run_dense_blocks, run_sequential
from .solve import solve_all

__all__ = ["prune", "run", "run_one_pass"]


def prune(
    model: nn.Module,
    batches: Sequence[Any],
    options: PruneOptions,
    *,
    masks: MaskSet | None = None,
    rank: RankInfo | None = None,
    progress: ProgressFn | None = None,
    on_commit: Callable[[PruneReport], None] | None = None,
) -> PruneReport:
    """Prune ``model`` in place with OBS on the calibration ``batches``, as ``options`` say.

    ``masks`` (optional) holds masks of an earlier step: those weights stay pruned and the new
    masks are written into it. With ``rank`` in a torch.distributed group, each rank calibrates
    on its own batches, Hessians and sample counts are summed across ranks, the layer solves are
    spread over the ranks and their results broadcast, so all ranks end with identical weights
    and masks. ``progress`` receives a :class:`PruneProgress` after every layer of every phase.

    All or nothing: weights, biases, BatchNorm buffers and ``masks`` (their contents and attachment) change
    together; an exception anywhere (KeyboardInterrupt included) puts them back as they were before it
    propagates. ``on_commit(report)`` runs last inside that guarantee (a caller's own bookkeeping; if it
    raises, the prune is undone too).
    """
    if not isinstance(options, PruneOptions):
        raise TypeError(
            f"options must be a PruneOptions, got {type(options).__name__}; build one with PruneOptions(sparsity=..., ...)."
        )
    ctx = RunContext.build(model, list(batches), options, masks, rank or RankInfo.for_model(model), progress)
    return run(ctx, on_commit)


def run(ctx: RunContext, then: Callable[[PruneReport], None] | None = None) -> PruneReport:
    """All stages as one transaction: weights, BatchNorm state and masks change together or not at all.

    The masks are written last, after the report is built, then ``then(report)`` runs (the callback records its
    schedule there).
    """
    plan = make_plan(ctx)
    modules = {n: l.module for n, l in plan.layers.items()}
    with Transaction(ctx.model, modules, ctx.masks, {n: l.dense for n, l in plan.layers.items()}) as tx:
        with eval_no_grad(ctx.model), _attention.feeding(ctx.model, modules):
            solved = run_sequential(ctx, plan) if ctx.options.sequential else run_one_pass(ctx, plan)
            commit(ctx, solved)
        report = make_report(ctx, solved, tx, recalibrate_bn(ctx))
        new_masks = _attention.to_parameter_masks(
            ctx.model, modules, {n: solved.solutions[n].mask for n in solved.order}, ctx.masks.masks
        )
        tx.write_masks(new_masks)
        if then is not None:
            then(report)
        return report


def run_one_pass(ctx: RunContext, plan: Plan) -> Solved:
    """Calibrate every layer on the dense network, allocate, solve: block by block where the model's blocks chain
    (:func:`~.sequential.run_dense_blocks`: the same results, one block's Hessians alive at a time), else in one
    pass over the batches with every layer's Hessian."""
    chain = find_chain(ctx, plan)
    if isinstance(chain, Chain):
        return run_dense_blocks(ctx, plan, chain)
    check_memory(ctx, plan.layers, blocks=False)  # the plan's check counted one block's Hessians at a time
    # Owners first: each Hessian is summed onto the rank that uses it (costs and solve), freed on the others.
    owners = assign_owners(ctx, plan.layers)
    plan, calibration = calibrate(ctx, plan, list(plan.layers), owners=owners)
    order = [n for n in calibration.order if n in plan.layers]
    plan, traces = allocate(ctx, plan, order, owners, calibration.hessians.__getitem__, keep_traces=True)
    solutions = solve_all(ctx, plan, order, owners, calibration.hessians, traces)
    return Solved(plan, tuple(order), solutions, calibration.positions, calibration.scales, written=False)
