"""Stage 1, plan: select the layers, resolve each one's method, check weights, memory and cost before any work."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import cast

import torch
from torch import Tensor, nn

from .. import attention as _attention
from ..blocks import check_block_names, find_blocks, layers_in
from ..config import NMPattern, SolverOptions
from ..distributed import assign_layers
from ..layers import channel_last_perm, describe_layer, has_bias, num_groups, solve_cost, to_rows, weight_matrix
from ..masks import MaskSet
from ..resources import check_budget, layer_memory
from ..selection import check_prior_masks, select_layers
from ..sharding import gather, is_sharded, mesh_size
from .collective import broadcast_buffers, fail_together
from .context import RunContext
from .forward import eval_no_grad, output_heads, sample_or_whole
from .records import LayerPlan, Plan

__all__ = [
    "AUTO_EXACT_MAX_COST",
    "EXACT_COST_PER_SECOND",
    "EXACT_WARN_SECONDS",
    "make_plan",
    "resolve_method",
    "plan_cost",
]

log = logging.getLogger("lightning_lobs.pruner")  # the name users filter on (engine/report.py)

#: ``auto`` uses ``exact`` where rows * d^3 is at most this (at most about 10 s on one core at
#: :data:`EXACT_COST_PER_SECOND`; every layer of LeNet-300-100 and LeNet-5, 2.6e11 at most), else ``fast``. It was 1e12 until
#: 0.3.0, which sent GPT-2's 768 x 768 projections (3.5e11) to ``exact``: about 10 s each against SparseGPT's 0.2 s,
#: 2 min for GPT-2's twelve, alone above the default prune's target of 1.5x SparseGPT's whole pipeline (57 s;
#: issue 19), for a layer error still above ALPS's (BENCHMARKS.md).
AUTO_EXACT_MAX_COST = 3e11
#: ``exact`` work (rows * d^3) done per second on one CPU core: LeNet-300-100's 300 x 785 layer
#: (1.45e11) takes about 5 s (BENCHMARKS.md, "Cost"). Used only to warn before very long solves.
EXACT_COST_PER_SECOND = 3e10
#: An explicit ``method="exact"`` whose estimate exceeds this many seconds warns before starting.
EXACT_WARN_SECONDS = 180.0


def resolve_method(method: str, module: nn.Module) -> str:
    """``auto``: ``exact`` where rows * d^3 <= :data:`AUTO_EXACT_MAX_COST`, else ``fast``; other methods as given.

    ``auto`` never picks ``admm``: it has the lowest layer error on transformer layers, below ALPS's, but at 11-14x
    SparseGPT's time per layer (BENCHMARKS.md), and the default prune must stay within 1.5x SparseGPT's whole
    pipeline (issue 19); ``fast`` with its CG refit takes 1.6-2.7x SparseGPT's time for 0.5-0.8x its error.
    ``method="admm"`` is the tier for the lowest error.
    """
    if method != "auto":
        return method
    shape = describe_layer(module)
    rows = shape.rows // shape.groups
    return "exact" if rows * shape.matrix_cols**3 <= AUTO_EXACT_MAX_COST else "fast"


def samples_in(module: nn.Module, x: Tensor) -> int:
    """Samples in one call's input ``x``: its first dimension, or 1 for an unbatched input."""
    per_sample_dims = 1 + len(describe_layer(module).kernel)  # features, then a convolution's spatial dims
    return x.shape[0] if x.dim() > per_sample_dims else 1


def layer_plan(
    name: str, module: nn.Module, target: float, method: str, nm: NMPattern | None, prior: Tensor | None
) -> LayerPlan:
    """One layer's plan, its shape facts read from the module; ``prior`` in the weight's layout.

    A weight sharded by ``fully_shard`` is not copied: ``dense`` is then a meta tensor of the matrix's shape (no
    data) and the solve gathers the weights one layer at a time (:func:`~lightning_lobs.engine.collective.gather_layer`).
    """
    weight = cast(Tensor, module.weight)
    if is_sharded(weight):
        shape = describe_layer(module)
        dense = torch.empty((shape.rows, shape.matrix_cols), dtype=weight.dtype, device="meta")
    else:
        dense = weight_matrix(module)
    return LayerPlan(
        name=name,
        module=module,
        method=resolve_method(method, module),
        target=target,
        dense=dense,
        perm=channel_last_perm(module) if nm else None,
        prior=None if prior is None else to_rows(module, prior.to(weight.device)),
        groups=num_groups(module),
        bias_column=has_bias(module),
    )


def plan_cost(layer: LayerPlan) -> float:
    """:func:`lightning_lobs.layers.solve_cost` of a planned layer, with its resolved method."""
    return solve_cost(layer.module, layer.method)


def assign_owners(
    ctx: RunContext, layers: Mapping[str, LayerPlan], names: Sequence[str] | None = None
) -> dict[str, int]:
    """The rank that solves each of ``names`` (default: every layer), balanced by estimated cost. The memory check,
    the one pass and the walks call this one function, so they agree on whose Hessians each rank holds."""
    names = list(layers) if names is None else names
    return assign_layers({n: plan_cost(layers[n]) for n in names}, ctx.rank.world_size)


def make_plan(ctx: RunContext) -> Plan:
    """Select layers, resolve methods, check weights, memory and cost: all before any work."""
    opts = ctx.options
    if not ctx.batches:
        raise ValueError(
            "no calibration batches"
            + (f": all {ctx.empty_batches} batches were empty" if ctx.empty_batches else "")
            + "; give a dataloader with samples (and calibration_batches >= 1)."
        )
    if ctx.empty_batches:
        warnings.warn(
            f"{ctx.empty_batches} calibration batch(es) had no samples and were left out.", UserWarning, stacklevel=4
        )
    check_sharding(ctx)
    heads: dict[str, str] = {}
    if not opts.prune_head:
        with eval_no_grad(ctx.model):
            heads = output_heads(ctx.model, lambda: sample_or_whole(ctx.run_batch, ctx.batches[0]))
    selection = select_layers(ctx.model, opts.sparsity, opts.exclude, ctx.nm, keep_dense=heads)
    check_finite_parameters(ctx.model)
    modules = dict(ctx.model.named_modules())
    modules.update(_attention.projections(ctx.model))
    priors = MaskSet()  # by layer name: an attention projection's block of its Parameter's mask
    for n in selection.targets:
        prior = _attention.prior_mask(modules[n], n, ctx.masks.masks)
        if prior is not None:  # a sharded one gathered (a collective): the checks and the allocation read it whole
            priors.masks[n] = gather(prior)
    check_prior_masks(priors, {n: modules[n] for n in selection.targets}, selection.targets, opts)
    layers = {
        n: layer_plan(n, modules[n], target, opts.method, ctx.nm, priors.get(n))
        for n, target in selection.targets.items()
    }
    warn_cost(opts.method, layers)
    check_memory(ctx, layers)
    broadcast_buffers(ctx.model, ctx.rank)
    return Plan(layers=layers, explicit=frozenset(selection.explicit), skipped=dict(selection.skipped))


def check_sharding(ctx: RunContext) -> None:
    """A model with ``fully_shard`` (``DTensor``) weights is pruned by every rank of its group together, and has
    no sharded ``nn.MultiheadAttention`` (its projections are row blocks of one Parameter, not gathered whole)."""
    sharded = [(n, m) for n, m in ctx.model.named_modules() if any(is_sharded(p) for p in m.parameters(recurse=False))]
    attention = [n for n, m in sharded if isinstance(m, nn.MultiheadAttention)]
    if attention:
        raise ValueError(
            f"the nn.MultiheadAttention modules {attention} have sharded (fully_shard) parameters, whose q/k/v "
            "projections this release does not prune; prune the model before sharding it, or use DDP."
        )
    if sharded and not ctx.rank.active:
        size = max(mesh_size(p) for _, m in sharded for p in m.parameters(recurse=False))
        if size > 1:
            raise ValueError(
                f"layers {[n for n, _ in sharded[:3]]} have parameters sharded over {size} ranks (fully_shard), but "
                "this prune runs in one process: call it on every rank of the process group, with "
                "rank=RankInfo.current() (prune_model does so by itself)."
            )


def check_finite_parameters(model: nn.Module) -> None:
    """NaN/inf in any parameter is named here, before it shows up as some later layer's bad input."""
    bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise ValueError(
            f"parameters {bad} contain NaN or inf, so calibration would see non-finite activations; fix or "
            "reload those weights before pruning."
        )


def warn_cost(method: str, layers: Mapping[str, LayerPlan]) -> None:
    """An explicit ``exact`` that will take minutes says so, with the remedy, before starting."""
    if method != "exact":
        return
    cost = sum(plan_cost(l) for l in layers.values())
    seconds = cost / EXACT_COST_PER_SECOND
    if seconds > EXACT_WARN_SECONDS:
        biggest = max(layers.values(), key=plan_cost)
        warnings.warn(
            f"method='exact' will take about {seconds / 60:.0f} min on one CPU core ({len(layers)} layers; "
            f"'{biggest.name}' {tuple(biggest.dense.shape)} alone about {plan_cost(biggest) / EXACT_COST_PER_SECOND / 60:.0f} "
            "min). method='auto' uses exact only where it takes seconds and SparseGPT ('fast') elsewhere; or "
            "exclude the biggest layers.",
            UserWarning,
            stacklevel=4,
        )


def check_memory(ctx: RunContext, layers: Mapping[str, LayerPlan], blocks: bool = True) -> None:
    """Refuse a prune whose Hessians and solver workspace would not fit, on any rank, before calibrating.

    Where only ``exact``'s and the direct refit's row chunks (``SolverOptions.max_memory_bytes``) stand in the way,
    their bound is lowered to the largest that fits (:func:`fit_chunk_bound`) for this run instead, said once at INFO.
    ``blocks``: count one block's Hessians at a time where the model has blocks (both pipelines walk them); False
    (the default pipeline found that they do not chain, and holds every layer's): all of them."""
    calibration = ctx.options.calibration
    groups = pipeline_groups(ctx, layers) if blocks else []
    sequential = ctx.options.sequential or bool(groups)
    owned = None  # the one-pass pipeline sums each Hessian onto its owner (run.run_one_pass: the same assignment)
    if ctx.rank.active and not sequential:
        owners = assign_owners(ctx, layers)
        owned = {n for n, r in owners.items() if r == ctx.rank.rank}

    def check(max_bytes: int) -> None:
        solver = replace(ctx.solver, max_memory_bytes=max_bytes)
        estimates = {
            n: layer_memory(n, l.module, l.method, calibration.hessian_dtype, solver, is_sharded(l.module.weight))
            for n, l in layers.items()
        }
        check_budget(estimates, calibration.memory_budget_bytes, sequential, ctx.device, groups, owned)

    # Not on fully_shard models: reading a sharded layer's shape is a collective, and one rank's extra checks while
    # the others wait in fail_together's all_reduce would hang them all (tests/test_fsdp.py's failbudget1 run did).
    sharded = any(is_sharded(l.module.weight) for l in layers.values())
    floor = None if sharded else chunk_floor(layers, ctx.solver)
    with fail_together(ctx.rank, ctx.device, "the memory check"):  # free memory differs between ranks
        bound = fit_chunk_bound(check, ctx.solver.max_memory_bytes, floor)
    if bound != ctx.solver.max_memory_bytes:
        log.info(
            "lowered SolverOptions.max_memory_bytes from %d to %d bytes for this prune, so that exact's and the "
            "refit's row chunks fit the memory budget (the same masks, weights up to float rounding; slower).",
            ctx.solver.max_memory_bytes,
            bound,
        )
        ctx.adjusted.solver = replace(ctx.solver, max_memory_bytes=bound)


#: The smallest row chunks :func:`check_memory` lowers ``max_memory_bytes`` to: this many ``d x d`` matrices of the
#: widest layer that ``exact`` or the direct refit solves. Fewer rows per chunk leave the work to per-step overhead
#: (a 500 x 801 ``exact`` solve took 31 s in chunks of 6 rows against 10 s in its default 48, one shared core).
CHUNK_FLOOR_ROWS = 4


def chunk_floor(layers: Mapping[str, LayerPlan], solver: SolverOptions) -> int | None:
    """The least ``max_memory_bytes`` the memory check may lower to, or None when no layer's solve is chunked by it."""
    chunked = [
        l.module for l in layers.values() if l.method == "exact" or (l.method in ("lobs", "fast") and solver.refit)
    ]
    if not chunked:
        return None
    size = torch.empty((), dtype=solver.dtype).element_size()
    return CHUNK_FLOOR_ROWS * size * max(describe_layer(m).matrix_cols for m in chunked) ** 2


def fit_chunk_bound(check: Callable[[int], None], max_bytes: int, floor: int | None) -> int:
    """The largest row-chunk bound up to ``max_bytes`` that ``check`` (raising ``MemoryError``) accepts.

    ``max_bytes`` itself when it passes; else, where ``floor`` (:func:`chunk_floor`) passes, the bisected largest
    bound between them (the estimates grow with the bound); else ``check``'s error for ``floor`` (what the prune
    needs at the least, the number a user can act on), saying so.
    """
    try:
        check(max_bytes)
        return max_bytes
    except MemoryError:
        if floor is None or floor >= max_bytes:
            raise
        try:
            check(floor)
        except MemoryError as error:
            raise MemoryError(
                f"{error} (This counts exact's and the direct refit's row chunks at their smallest: "
                f"SolverOptions.max_memory_bytes={floor}.)"
            ) from None
    lo, hi = floor, max_bytes  # lo passes, hi fails
    while hi - lo > max(1, lo // 64):  # within 1.6% of the largest that fits
        mid = (lo + hi) // 2
        try:
            check(mid)
            lo = mid
        except MemoryError:
            hi = mid
    return lo


def pipeline_groups(ctx: RunContext, layers: Mapping[str, LayerPlan]) -> list[list[str]]:
    """The layers whose Hessians the block walk holds together: each block's (``sequential_unit="block"``, and the
    default pipeline), and the layers outside the blocks (before the first, after the last) as one more group.

    The blocks are those the walk would take (named or found); whether they chain is checked later, on a forward.
    Sequential mode's fallback to one layer at a time only holds fewer; the default pipeline's fallback to one pass
    holds every layer's Hessian and checks again (``check_memory(..., blocks=False)``). No blocks or
    ``sequential_unit="layer"``: none (one layer at a time, or every layer at once).
    """
    opts = ctx.options
    if opts.sequential and opts.sequential_unit != "block":
        return []
    named = opts.blocks
    names = check_block_names(ctx.model, named, layers) if named is not None else find_blocks(ctx.model, layers)
    groups = [layers_in(b, layers) for b in names]
    inside = {n for g in groups for n in g}
    outside = [n for n in layers if n not in inside]
    return [*groups, outside] if groups and outside else groups


def dense_modules(plan: Plan) -> dict[str, nn.Module]:
    """The planned layers' modules (an attention projection's stand-in too), by name."""
    return {n: l.module for n, l in plan.layers.items()}
