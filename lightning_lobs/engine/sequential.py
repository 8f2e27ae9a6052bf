"""The sequential pipeline: each layer calibrated on the network with the layers before it already pruned.

Block by block (SparseGPT's pipeline): the blocks (:mod:`lightning_lobs.blocks`, checked on one forward by
:mod:`~.blocks`) chain, so one forward per calibration batch, stopped at the first block, catches the first block's
inputs (positional and keyword: attention masks, position ids...). Then per block: run it on the caught inputs with
Hessian hooks on its layers, solve them (each on its owner rank, then shared), write the weights, and run it again,
pruned, to produce the next block's inputs. Only one block's Hessians are alive at a time. Selected layers before the
first block (a CNN's stem) are calibrated and pruned first, on forwards stopped at the first block; layers after the
last (an lm head, a classifier) on forwards whose blocks return the last block's pruned output instead of running.
``sequential_unit="layer"``: inside a block too, each layer is calibrated after the layers before it were pruned.

The output errors of the report are measured inside the walk (:class:`_Pairs`): a dense stream runs beside the
pruned one, so no dense and pruned forward of the whole model is needed afterwards.

The global allocation needs every target before the first block is solved: its costs come from one dense block pass
first (the same walk, nothing written), one block's Hessians at a time.

A model whose blocks are not found (or do not chain) falls back to :func:`run_per_layer`: one forward over the
batches per layer, in the forward's order (:func:`execution_order`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..batchnorm import batchnorm_modules
from ..blocks import check_block_names, find_blocks
from ..layers import set_weight_matrix
from ..sharding import is_sharded
from ..solvers import GreedyTrace
from .allocate import allocate
from .blocks import BlockCall, Chain, catch_first, next_call, probe_chain, run_block, run_tail
from .calibrate import calibrate, drop_uncalled
from .collective import fail_together, gather_layer, share_solution
from .commit import load_params, param_state
from .context import RunContext
from .forward import PieceRows, batch_rows, first_sample, output_rows_match, slice_batch
from .plan import assign_owners
from .records import Plan, Solution, Solved
from .report import Comparison
from .solve import begin_solve, solve_owned, solve_sharded

__all__ = ["execution_order", "find_chain", "run_blocks", "run_dense_blocks", "run_per_layer", "run_sequential"]

log = logging.getLogger("lightning_lobs.pruner")


def run_sequential(ctx: RunContext, plan: Plan) -> Solved:
    """Block by block where the model's blocks chain, else layer by layer; new weights are written as they go."""
    chain = find_chain(ctx, plan)
    if isinstance(chain, str):
        # logged, not warned: the per-layer path is as correct, only slower (a plain MLP has no blocks to find)
        log.warning(
            "sequential=True: %s, so the block-by-block pipeline does not apply; each layer is calibrated instead "
            "on its own forward pass over the calibration batches (one pass per layer).",
            chain,
        )
        return run_per_layer(ctx, plan)
    return run_blocks(ctx, plan, chain)


def find_chain(ctx: RunContext, plan: Plan) -> Chain | str:
    """The blocks (named in ``options.blocks``, or found) checked on a forward of the first batch, or why none.

    Named blocks that do not chain are an error; found ones that do not are a reason to fall back.
    """
    layers = {n: l.module for n, l in plan.layers.items()}
    named = ctx.options.blocks
    names = check_block_names(ctx.model, named, layers) if named is not None else find_blocks(ctx.model, layers)
    if not names:
        return "no repeated blocks holding the selected layers were found in the model (blocks=[...] names them)"
    try:  # on the first sample (no whole batch's logits); a forward_fn that cannot run on one: the whole batch
        chain = probe_chain(ctx.model, lambda: _one_sample(ctx), names, layers)
    except _NotOneSample:
        chain = probe_chain(ctx.model, lambda: ctx.run_batch(ctx.batches[0]), names, layers)
    if isinstance(chain, str) and named is not None:
        raise ValueError(
            f"blocks={list(named)} do not form a chain: {chain}; name modules the forward calls one after another, "
            "each fed the previous one's output."
        )
    if isinstance(chain, str):
        return f"the blocks found ({names[0]!r} ... {names[-1]!r}) do not chain: {chain}"
    return chain


class _NotOneSample(Exception):  # noqa: N818 - not an error: the probe reruns on the whole batch
    """The model cannot run on the first calibration batch's first sample alone."""


def _one_sample(ctx: RunContext) -> Any:
    piece = first_sample(ctx.batches[0])
    try:
        out = ctx.run_batch(piece)
    except Exception as error:  # noqa: BLE001 - rerun on the whole batch by the caller
        raise _NotOneSample from error
    if piece is not ctx.batches[0] and not output_rows_match(out, 1):
        raise _NotOneSample
    return out


@dataclass(frozen=True)
class _Group:
    """One stretch of the walk: its selected layers and how to run it on calibration item ``j``."""

    name: str
    layers: tuple[str, ...]
    run: Callable[[int], Any]


@dataclass
class _Found:
    """What the block walk has solved so far."""

    solutions: dict[str, Solution] = field(default_factory=dict)
    positions: dict[str, float] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    groups: int = 0
    """Groups solved so far (turns the owner ranks)."""


class _Pairs:
    """The output errors measured inside the walk: each stretch run twice per batch, the dense stream on the dense
    weights, then the pruned stream on the pruned ones, a :class:`~.report.Comparison` hearing both (instead of a
    dense and a pruned forward of the whole model per batch afterwards)."""

    def __init__(self, plan: Plan, order: Sequence[str], found: _Found) -> None:
        self.compare = Comparison(order)
        self.compare.stop()
        self.layers, self.found = plan.layers, found
        # fully_shard layers: their plans hold no dense matrix, so this rank's dense shards are kept to restore
        self.shards = param_state({n: plan.layers[n].module for n in order if is_sharded(plan.layers[n].module.weight)})
        self.handles = [
            plan.layers[n].module.register_forward_hook(lambda mod, a, out, n=n: self.compare.layer_output(n, out))
            for n in order
        ]

    def run(self, names: Sequence[str], dense_run: Callable[[], Any], pruned_run: Callable[[], Any]) -> tuple:
        solved = [n for n in names if n in self.found.solutions]
        for n in solved:
            if n in self.shards:
                load_params({n: self.layers[n].module}, {n: self.shards[n]})
            else:
                set_weight_matrix(self.layers[n].module, self.layers[n].dense)
        self.compare.start(True, names)
        dense = dense_run()
        for n in solved:
            _write(self.layers[n].module, self.found.solutions[n])
        self.compare.start(False, names)
        pruned = pruned_run()
        self.compare.stop()
        return dense, pruned

    def release(self, names: Sequence[str]) -> None:
        """The stretch ``names`` is written and compared: its solutions' matrices (what the model now holds) go,
        so the walk keeps one copy of the dense weights (the plan's) and no second copy of the pruned ones."""
        for n in names:
            if n in self.found.solutions:
                sol = self.found.solutions[n]
                self.found.solutions[n] = replace(sol, matrix=sol.matrix.new_empty((0, sol.matrix.shape[1])))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _write(module: Any, solution: Solution) -> None:
    """The solved weights, with exact zeros where the mask prunes (what the commit leaves)."""
    set_weight_matrix(module, solution.matrix)
    weight = module.weight
    with torch.no_grad():
        weight.masked_fill_(~solution.mask.to(weight.device), 0.0)


def _walk(  # noqa: C901 - one generator: the walk's streams stay in one place
    ctx: RunContext, chain: Chain, pairs: _Pairs | None = None, reuse: bool = False, dense_feed: bool = False
) -> Generator[_Group, None, None]:
    """The groups in forward order; after each is yielded (and pruned by the caller) its pruned outputs feed on.
    With ``pairs``, a dense stream runs beside the pruned one and every stretch's outputs are compared. ``reuse``
    (nothing is written while walking: the allocation's dense walk): a block's outputs on its calibration runs
    feed the next block, instead of a second run. ``dense_feed`` (the default pipeline): each group is calibrated
    on the dense stream (the dense network's inputs), the pruned stream only feeds the comparison."""
    batches, items = ctx.batches, range(len(ctx.batches))

    def head(j: int) -> Any:
        return catch_first(chain.modules[0], lambda: ctx.run_batch(batches[j]))

    def both(names: Sequence[str], dense_run: Callable, pruned_run: Callable) -> tuple[list | None, list]:
        if pairs is None:
            return None, _timed(ctx, lambda: [pruned_run(j) for j in items])
        runs = _timed(ctx, lambda: [pairs.run(names, partial(dense_run, j), partial(pruned_run, j)) for j in items])
        pairs.release(names)
        return [d for d, _ in runs], [p for _, p in runs]

    if chain.prefix:
        yield _Group("the layers before the first block", chain.prefix, head)
    if chain.prefix:
        dense, calls = both(chain.prefix, head, head)
    else:  # nothing pruned before the first block: the dense and the pruned streams start the same
        calls = _timed(ctx, lambda: [head(j) for j in items])
        dense = None if pairs is None else calls
    dense_outs, outs = None, []
    for b, (block, layers) in enumerate(zip(chain.modules, chain.inside)):
        cache: dict[int, Any] = {}
        fed = dense if dense_feed and dense is not None else calls
        if layers:
            yield _Group(f"block {chain.blocks[b]!r}", layers, partial(_run_on, block, fed, cache if reuse else None))
        if b == len(chain.blocks) - 1 and not chain.suffix and pairs is None:
            break
        if len(cache) == len(items):
            d_out, outs = None, [cache.pop(j) for j in items]
        else:
            d_out, outs = both(layers, partial(_run_on, block, dense or [], None), partial(_run_on, block, calls, None))
        if dense is not None:
            dense, dense_outs = [next_call(c, o, chain.hidden) for c, o in zip(dense, cast(list, d_out))], d_out
        calls = [next_call(c, o, chain.hidden) for c, o in zip(calls, outs)]

    def tail(last: list, j: int) -> Any:
        return run_tail(chain.modules, lambda: ctx.run_batch(batches[j]), last[j])

    if chain.suffix:
        fed_last = dense_outs if dense_feed and dense_outs is not None else outs
        yield _Group("the layers after the last block", chain.suffix, partial(tail, fed_last))
    if pairs is not None:  # the model's output: what follows the blocks, run on both streams' last outputs
        compare = partial(_compare_tail, ctx, chain, pairs, PieceRows())
        _timed(ctx, lambda: [compare(j, (dense_outs or [])[j], outs[j]) for j in items])
        pairs.release(chain.suffix)


def _compare_tail(  # noqa: PLR0913 - the walk's state, passed rather than closed over
    ctx: RunContext, chain: Chain, pairs: _Pairs, rows: PieceRows, j: int, dense_last: Any, last: Any
) -> None:
    """The model's output on batch ``j`` from both streams' last block outputs, compared in pieces of samples
    where the batch and both outputs share their first dimension (so two whole logits tensors never exist)."""
    batch = ctx.batches[j]
    size = batch_rows(batch)
    cuts = rows.pieces(batch) if size is not None and batch_rows(dense_last) == size == batch_rows(last) else None
    for c in [None] if cuts is None else cuts:
        part = batch if c is None else slice_batch(batch, c)
        d_last, p_last = (dense_last, last) if c is None else (slice_batch(dense_last, c), slice_batch(last, c))

        def pair(part: Any = part, d_last: Any = d_last, p_last: Any = p_last) -> tuple:
            return pairs.run(
                chain.suffix,
                partial(run_tail, chain.modules, partial(ctx.run_batch, part), d_last),
                partial(run_tail, chain.modules, partial(ctx.run_batch, part), p_last),
            )

        if c is None or rows.rows is not None:
            outs = pair()
        else:  # the first piece sizes the others, or shows that the tail runs on whole batches only
            outs = rows.first(pair, c.stop - c.start)
            if outs is None:
                outs, c = pair(batch, dense_last, last), None
        pairs.compare.model_output(*outs)
        del outs
        if c is None:
            break


def _run_on(block: nn.Module, calls: Sequence[BlockCall], cache: dict[int, Any] | None, j: int) -> Any:
    out = run_block(block, calls[j])
    if cache is not None:
        cache[j] = out
    return out


def _timed(ctx: RunContext, work: Callable[[], list]) -> list:
    t0 = time.perf_counter()
    out = work()
    ctx.timings.calibration += time.perf_counter() - t0
    return out


def run_blocks(ctx: RunContext, plan: Plan, chain: Chain) -> Solved:
    """The block walk: calibrate each group (a block's layers together, or one layer at a time with
    ``sequential_unit="layer"``) on the pruned network before it, solve, write, feed the next."""
    order = _chain_order(chain, plan)
    if ctx.options.global_allocation is not None:
        plan, _, _ = _allocate_on_dense_blocks(ctx, plan, chain, order)
        order = [n for n in order if n in plan.layers]  # without those never called
    begin_solve(ctx, plan, order, {})
    found = _Found()
    # Measured inside the walk unless BatchNorm statistics are re-estimated afterwards (they change the outputs).
    inside = not (ctx.options.recalibrate_bn and batchnorm_modules(ctx.model))
    pairs = _Pairs(plan, order, found) if inside else None
    try:
        for group in _walk(ctx, chain, pairs):
            names = [n for n in group.layers if n in plan.layers]
            units = [names] if ctx.options.sequential_unit == "block" else [[n] for n in names]
            for unit in units:
                if unit:
                    plan = _prune_unit(ctx, plan, unit, group, found)
    finally:
        if pairs is not None:
            pairs.close()
    return _solved(plan, order, found, pairs, True, chain)


def _solved(  # noqa: PLR0913 - what a walk leaves behind
    plan: Plan, order: Sequence[str], found: _Found, pairs: _Pairs | None, written: bool, chain: Chain
) -> Solved:
    """A walk's result: the layers it solved, in ``order``, and the comparison made inside it (``pairs``)."""
    done = tuple(n for n in order if n in found.solutions)
    compared = None if pairs is None else pairs.compare
    return Solved(plan, done, found.solutions, found.positions, found.scales, written, compared, chain.example)


def _prune_unit(  # noqa: PLR0913 - the walk's state, and how the default pipeline differs
    ctx: RunContext,
    plan: Plan,
    names: Sequence[str],
    group: _Group,
    found: _Found,
    owners: Mapping[str, int] | None = None,
    traces: dict[str, GreedyTrace] | None = None,
    write: bool = True,
) -> Plan:
    """Calibrate ``names`` together by running ``group`` on its inputs, solve them on their owner ranks, share and
    (``write``) write the solutions. Their Hessians die on return. ``owners`` (the allocation's, whose ranks hold
    the ``exact`` ``traces``): who solves each layer; else balanced inside the group."""
    world = ctx.rank.world_size
    if owners is None:
        # Balanced inside the group, and turned by one rank per group so that blocks of one layer spread over ranks.
        owners = {n: (r + found.groups) % world for n, r in assign_owners(ctx, plan.layers, names).items()}
    found.groups += 1
    feed = (range(len(ctx.batches)), group.run)
    # Owners known before calibrating: each Hessian is summed onto the rank that solves it, freed on the others.
    plan, calibration = calibrate(ctx, plan, names, report=False, feed=feed, owners=owners)
    called = [n for n in names if n in calibration.hessians]
    t0 = time.perf_counter()
    if _solve_group(ctx, plan, called, owners, calibration.hessians, traces, found, group.name):
        t0 = time.perf_counter()  # solve_sharded counted its own time
    if write:
        for n in called:
            _write(plan.layers[n].module, found.solutions[n])
    ctx.timings.solve += time.perf_counter() - t0
    found.positions.update(calibration.positions)
    found.scales.update(calibration.scales)
    return plan


def _solve_group(  # noqa: PLR0913 - one group's solve inputs, split out of the walk's step
    ctx: RunContext,
    plan: Plan,
    called: Sequence[str],
    owners: Mapping[str, int],
    hessians: Mapping[str, Tensor],
    traces: dict[str, GreedyTrace] | None,
    found: _Found,
    name: str,
) -> bool:
    """Solve ``called`` on their owner ranks and share the solutions into ``found`` (not written yet); a group
    with ``fully_shard`` layers gathers one layer at a time (:func:`~.solve.solve_sharded`, which counts its own
    time: then True)."""
    if any(is_sharded(plan.layers[n].module.weight) for n in called):
        own = {} if traces is None else {n: traces.pop(n) for n in called if n in traces}
        found.solutions.update(solve_sharded(ctx, plan, called, owners, hessians, own))
        return True
    solved: dict[str, Solution] = {}
    with fail_together(ctx.rank, ctx.device, f"solving the layers of {name}"):
        for n in called:
            trace = None if traces is None else traces.pop(n, None)
            solved[n] = solve_owned(ctx, plan.layers[n], hessians[n], trace, owners[n])
            ctx.progress.step(n, n)
    for n in called:
        found.solutions[n] = share_solution(solved[n], owners[n], ctx.rank, ctx.device)
    return False


class _Uncalled(Exception):
    """The allocation asked for a layer that its group's calibration found never called (and left dense)."""


def _allocate_on_dense_blocks(
    ctx: RunContext, plan: Plan, chain: Chain, order: Sequence[str], keep_traces: bool = False
) -> tuple[Plan, dict[str, GreedyTrace], dict[str, int]]:
    """The global allocation's targets from costs on the dense network: one dense walk (nothing written), each
    group calibrated when the allocation first asks for one of its layers, its Hessians dropped at the next.
    ``keep_traces``: the ``exact`` layers' greedy traces too, for their solves (on the ranks that own them: the
    owners returned).

    A layer never called on the calibration batches is left dense with calibrate's warning, as the one-pass
    pipeline does; the allocation needs every layer's cost before it decides, so it starts again without it."""
    while True:
        try:
            return _allocation_walk(ctx, plan, chain, order, keep_traces)
        except _Uncalled as gone:
            plan = gone.args[0]
            order = [n for n in order if n in plan.layers]


def _allocation_walk(
    ctx: RunContext, plan: Plan, chain: Chain, order: Sequence[str], keep_traces: bool
) -> tuple[Plan, dict[str, GreedyTrace], dict[str, int]]:
    """One try of :func:`_allocate_on_dense_blocks`; raises ``_Uncalled(plan without the layer)``."""
    owners = assign_owners(ctx, plan.layers, order)
    walk = _walk(ctx, chain, reuse=True)
    held: dict[str, Tensor] = {}

    def hessian_of(name: str) -> Tensor:
        nonlocal plan
        while name not in held:
            if name not in plan.layers:
                raise _Uncalled(plan)
            group = next(walk, None)
            if group is None:
                raise RuntimeError(f"layer {name!r} is in none of the walked blocks")  # _chain_order forbids it
            names = [n for n in group.layers if n in plan.layers]
            held.clear()
            if names:
                feed = (range(len(ctx.batches)), group.run)
                plan, calibration = calibrate(ctx, plan, names, report=False, feed=feed, owners=owners)
                held.update(calibration.hessians)
        return held[name]

    try:
        targets, traces = allocate(ctx, plan, order, owners, hessian_of, keep_traces=keep_traces)
    finally:
        walk.close()
    return targets, traces, owners


def run_dense_blocks(ctx: RunContext, plan: Plan, chain: Chain) -> Solved:
    """The default (one-pass) pipeline on a model whose blocks chain, one block's Hessians alive at a time.

    Every group is calibrated on the DENSE network's inputs, as the one-pass pipeline calibrates every layer, so
    the masks and weights are the one-pass ones: with a global allocation, a first dense walk computes the costs
    (:func:`_allocate_on_dense_blocks`), then a second one re-accumulates each group's Hessians, solves and writes
    it, while a pruned stream beside it measures the output errors (:class:`_Pairs`). With BatchNorm re-estimated
    afterwards nothing is written while walking (the commit writes, the report measures)."""
    order = _chain_order(chain, plan)
    owners = assign_owners(ctx, plan.layers, order)
    traces: dict[str, GreedyTrace] = {}
    if ctx.options.global_allocation is not None:
        plan, traces, owners = _allocate_on_dense_blocks(ctx, plan, chain, order, keep_traces=True)
        order = [n for n in order if n in plan.layers]  # without those never called
    begin_solve(ctx, plan, order, traces)
    found = _Found()
    inside = not (ctx.options.recalibrate_bn and batchnorm_modules(ctx.model))
    pairs = _Pairs(plan, order, found) if inside else None
    try:
        for group in _walk(ctx, chain, pairs, reuse=pairs is None, dense_feed=True):
            names = [n for n in group.layers if n in plan.layers]
            if names:
                plan = _prune_unit(ctx, plan, names, group, found, owners, traces, write=inside)
    finally:
        if pairs is not None:
            pairs.close()
    return _solved(plan, order, found, pairs, inside, chain)


def _chain_order(chain: Chain, plan: Plan) -> list[str]:
    """The planned layers in the walk's order: before the blocks, block by block, after them."""
    return [n for n in (*chain.prefix, *(n for g in chain.inside for n in g), *chain.suffix) if n in plan.layers]


def run_per_layer(ctx: RunContext, plan: Plan) -> Solved:
    """Calibrate, allocate and solve the layers one after another (one forward per layer); their new weights are
    written as they go."""
    plan, order = execution_order(ctx, plan)
    owners = {n: i % ctx.rank.world_size for i, n in enumerate(order)}
    hessians: dict[str, Tensor] = {}
    positions: dict[str, float] = {}
    scales: dict[str, float] = {}

    def calibrate_one(name: str) -> Tensor:
        nonlocal plan
        plan, calibration = calibrate(ctx, plan, [name], report=False, owners=owners)
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
