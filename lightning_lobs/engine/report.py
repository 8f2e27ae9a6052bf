"""Stage 6, report: re-estimate BatchNorm, measure the output errors and the bound, and report what the model holds."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from .. import attention as _attention
from .. import bounds as _bounds
from ..batchnorm import batchnorm_state, load_batchnorm_state, recalibrate_batchnorm
from ..checks import add_note
from ..distributed import RankInfo
from ..layers import weight_matrix
from ..sharding import count, is_sharded
from ..solvers import Tick
from .collective import all_reduce_batchnorm, dense_matrices, reduce_errors
from .commit import DenseState, Transaction, load_params, param_state
from .context import RunContext
from .forward import PieceRows, batch_rows, eval_no_grad, model_device, slice_batch
from .records import LayerReport, Measurement, PruneReport, Solved

__all__ = ["Comparison", "bound", "make_report", "measure", "nonzero", "parameter_counts", "recalibrate_bn"]

log = logging.getLogger("lightning_lobs.pruner")  # the logger's name is what users filter on: kept from 0.2


def recalibrate_bn(ctx: RunContext) -> bool:
    """Re-estimate BatchNorm statistics on the pruned network (``recalibrate_bn=True``); whether any was."""
    if not ctx.options.recalibrate_bn:
        return False
    try:
        done = recalibrate_batchnorm(ctx.model, ctx.batches, ctx.run_batch)
    except Exception as err:  # the user's own exception, same type and arguments: only a note is added
        add_note(
            err,
            "lightning_lobs: raised during the BatchNorm re-estimation after pruning (recalibrate_bn=True); the "
            "model's weights and BatchNorm statistics were restored.",
        )
        raise
    if done:
        all_reduce_batchnorm(ctx.model, ctx.rank)
    return bool(done)


def make_report(ctx: RunContext, solved: Solved, tx: Transaction, bn_recalibrated: bool) -> PruneReport:
    """Check the commit, measure the output errors and the bound, and report what the model now holds."""
    ctx.progress.begin("measure", {"measure": 1.0})
    order, layers = solved.order, solved.plan.layers
    errors: dict[str, float] = {}
    for n in order:
        weight = cast(Tensor, layers[n].module.weight).detach()
        pruned = weight.masked_fill(solved.solutions[n].mask.to(weight.device), 0.0)  # DTensors too (fully_shard)
        if count(pruned != 0):  # the model must hold the masks
            raise AssertionError(
                f"layer '{n}': pruned positions are not zero after the commit; please report this bug."
            )
        errors[n] = solved.solutions[n].error * solved.scales.get(n, 1.0)
        if solved.solutions[n].damp > ctx.solver.damp:
            log.warning(
                "layer %s needed relative damping %.3g (asked %.3g)", n, solved.solutions[n].damp, ctx.solver.damp
            )
    d_terms = {n: math.sqrt(max(0.0, 2.0 * errors[n] * solved.positions[n])) for n in order}
    modules = {n: layers[n].module for n in order}
    with eval_no_grad(ctx.model), _attention.feeding(ctx.model, modules):
        if solved.compared is not None and not bn_recalibrated:  # measured inside the block pipeline
            outputs, _, model_err = solved.compared.results(ctx.rank, ctx.device)
            out_err = outputs[order[-1]]
            example = solved.example
        else:
            outputs, out_err, model_err, example = measure(
                ctx.model,
                ctx.batches,
                modules,
                tx.dense_state(order),
                tx.batchnorm,
                ctx.run_batch,
                ctx.rank,
                lambda f: ctx.progress.advance("measure", f),
            )
        dense = dense_matrices({n: layers[n] for n in order}, tx.params) if ctx.options.sequential else None
        fro, spec, note, norms = bound(ctx.model, modules, d_terms, example, bn_recalibrated, dense)
    ctx.progress.step("measure", "")
    measured = Measurement(outputs, out_err, model_err, norms, fro, spec, note)
    return _prune_report(ctx, solved, errors, d_terms, measured)


def _prune_report(
    ctx: RunContext, solved: Solved, errors: Mapping[str, float], d_terms: Mapping[str, float], measured: Measurement
) -> PruneReport:
    reports: dict[str, LayerReport] = {}
    for n in solved.order:
        layer, solution = solved.plan.layers[n], solved.solutions[n]
        weight = cast(Tensor, layer.module.weight).detach()
        norms = measured.norms.get(n, (float("nan"), float("nan")))
        reports[n] = LayerReport(
            name=n,
            kind=type(layer.module).__name__,
            shape=tuple(weight.shape),
            method=layer.method,
            target_sparsity=layer.target,
            sparsity=(weight.numel() - nonzero(weight)) / max(weight.numel(), 1),
            layer_error=errors[n],
            d_term=d_terms[n],
            norm_frobenius=norms[0],
            norm_spectral=norms[1],
            damp=solution.damp,
            positions=solved.positions[n],
            seconds=solution.seconds,
            output_error=measured.output_errors[n],
        )
    weights = [cast(Tensor, solved.plan.layers[n].module.weight) for n in solved.order]
    zeros = sum(w.numel() - nonzero(w) for w in weights)  # over every shard (fully_shard) too
    counts = parameter_counts(ctx.model)
    return PruneReport(
        layers=reports,
        sparsity=zeros / max(sum(w.numel() for w in weights), 1),
        bound=measured.bound,
        bound_spectral=measured.bound_spectral,
        bound_note=measured.bound_note,
        output_error=measured.output_error,
        model_output_error=measured.model_output_error,
        calibration_seconds=ctx.timings.calibration,
        solve_seconds=ctx.timings.solve,
        masks=ctx.masks,
        sequential=ctx.options.sequential,
        allocation=ctx.options.allocation_name,
        skipped=dict(solved.plan.skipped),
        empty_batches=ctx.empty_batches,
        **counts,
    )


def parameter_counts(model: nn.Module) -> dict[str, Any]:
    """Zeros over every weight of >= 2 dimensions, and nonzero/total parameters, each Parameter counted once."""
    params = list(model.parameters())  # unique: tied parameters appear once
    weights = [p for p in params if p.dim() >= 2]
    total_w = sum(p.numel() for p in weights)
    zeros_w = sum(p.numel() - nonzero(p) for p in weights)
    return {
        "model_sparsity": zeros_w / total_w if total_w else float("nan"),
        "nonzero_parameters": sum(nonzero(p) for p in params),
        "total_parameters": sum(p.numel() for p in params),
    }


def nonzero(t: Tensor) -> int:
    """Nonzero entries of ``t``, over every shard of a ``DTensor``; counted without a bool mask and its int64 sum
    (a 0.3 GB temporary for GPT-2's embedding) where not sharded."""
    return count(t.detach() != 0) if is_sharded(t) else int(torch.count_nonzero(t.detach()))


class Comparison:
    """Pruned-vs-dense RMS errors of every pruned layer's output and of the model's, one batch at a time.

    Dense outputs are kept for one batch; each pruned output is compared as it appears and the dense one
    freed, so at most one pruned layer output is held on top of the dense ones (a layer called twice in a
    forward is compared on its first call). :meth:`start` with ``only`` limits what is recorded to those layers
    (the block pipeline compares one stretch of the network at a time); :meth:`stop` records nothing until the
    next start.
    """

    def __init__(self, order: Sequence[str]) -> None:
        self.layers = {n: _bounds.RMSAccumulator() for n in order}
        self.model = _bounds.RMSAccumulator()
        self.model_ok = True
        self.dense_outputs: dict[str, Tensor] = {}
        self.dense = True
        self.only: frozenset[str] | None = None

    def start(self, dense: bool, only: Sequence[str] | None = None) -> None:
        """The next forward runs the dense (True) or the pruned network."""
        if dense:
            self.dense_outputs.clear()
        self.dense = dense
        self.only = None if only is None else frozenset(only)

    def stop(self) -> None:
        self.only = frozenset()

    def layer_output(self, name: str, out: Tensor) -> None:
        if self.only is not None and name not in self.only:
            return
        if self.dense:
            self.dense_outputs.setdefault(name, out.detach())
        elif name in self.dense_outputs:
            self.layers[name].add(self.dense_outputs.pop(name), out.detach())

    def model_output(self, dense_out: Any, out: Any) -> None:
        if self.model_ok and isinstance(out, Tensor) and isinstance(dense_out, Tensor) and out.shape == dense_out.shape:
            self.model.add(dense_out, out)
        else:
            self.model_ok = False

    def results(self, rank: RankInfo, device: Any) -> tuple[dict[str, float], float, float]:
        """Per-layer errors (summed over ranks), the last layer's, and the model output's (NaN if not a tensor)."""
        reduce_errors([*self.layers.values(), self.model], rank, device)
        errors = {n: a.value() for n, a in self.layers.items()}
        last = errors[next(reversed(errors))] if errors else float("nan")
        return errors, last, (self.model.value() if self.model_ok else float("nan"))


def measure(  # noqa: PLR0913 - the model, what to compare, and how to run it
    model: nn.Module,
    batches: Sequence[Any],
    modules: Mapping[str, nn.Module],
    snapshot: DenseState,
    bn_dense: dict[str, Tensor],
    run: Callable[[Any], Any],
    rank: RankInfo,
    tick: Tick | None = None,
) -> tuple[dict[str, float], float, float, Any]:
    """RMS per-sample output errors (every pruned layer, the last one, and the model output), pruned vs dense.

    Dense and pruned weights (and BatchNorm statistics) are swapped in batch by batch, so
    only one batch of layer outputs is held at a time; a batch whose tensors share their first dimension runs in
    pieces of samples (:class:`~.forward.PieceRows`), so that a language model's dense and pruned logits never
    exist whole. Errors are summed over ranks. Also
    returns the model's positional input for the first batch (for the bound's shape analysis).
    ``tick`` hears the fraction of batches done after each batch but the last.
    """
    order = list(modules)
    pruned_state = param_state(modules)
    bn_pruned = batchnorm_state(model)
    compare = Comparison(order)
    rows = PieceRows()
    handles = [
        modules[n].register_forward_hook(lambda mod, args, out, n=n: compare.layer_output(n, out)) for n in order
    ]
    inputs: list[Any] = []

    def keep_first_input(mod: nn.Module, args: tuple) -> None:
        if not inputs and len(args) == 1:
            inputs.append(args[0])

    handles.append(model.register_forward_pre_hook(keep_first_input))

    def load(dense: bool) -> None:
        load_params(modules, snapshot if dense else pruned_state)
        load_batchnorm_state(model, bn_dense if dense else bn_pruned)

    try:
        with eval_no_grad(model):
            for i, batch in enumerate(batches):
                if tick is not None and i:
                    tick(i / len(batches))
                _compare_batch(batch, run, rows, compare, load)
    finally:
        for h in handles:
            h.remove()
        load_params(modules, pruned_state)
        load_batchnorm_state(model, bn_pruned)
    errors, last, model_error = compare.results(rank, model_device(model))
    return errors, last, model_error, (inputs[0] if inputs else None)


def _compare_batch(
    batch: Any, run: Callable[[Any], Any], rows: PieceRows, compare: Comparison, load: Callable[[bool], None]
) -> None:
    """One batch's dense and pruned forwards (``load(dense)`` swaps the weights in), in pieces of samples where the
    batch can be cut and the model runs on them."""
    cuts = rows.pieces(batch)
    for part in [batch] if cuts is None else (slice_batch(batch, c) for c in cuts):
        load(True)
        compare.start(dense=True)
        if part is batch or rows.rows is not None:
            dense_out = run(part)
        else:  # the first piece sizes the others, or shows that the model runs on whole batches only
            dense_out = rows.first(functools.partial(run, part), batch_rows(part) or 1)
            if dense_out is None:
                compare.start(dense=True)
                dense_out, part = run(batch), batch
        load(False)
        compare.start(dense=False)
        compare.model_output(dense_out, run(part))
        del dense_out
        if part is batch:
            break


def bound(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    d_terms: Mapping[str, float],
    example: Any,
    bn_recalibrated: bool,
    dense: Mapping[str, Tensor] | None,
) -> tuple[float, float, str, dict[str, tuple[float, float]]]:
    """The paper's bound (Frobenius, spectral) from the model's traced structure, or NaN and why not, and the
    operator norms it used.

    ``dense`` (sequential calibration): the layers' weights before the prune, whose norms the recursion multiplies
    (each d^l was measured on pruned inputs); otherwise the pruned weights' norms.
    """
    nan = float("nan")
    if bn_recalibrated:
        return (
            nan,
            nan,
            "bound not applicable: BatchNorm statistics were re-estimated after pruning (the bound assumes the "
            "dense network's BatchNorm; pass recalibrate_bn=False to get it)",
            {},
        )
    order = list(modules)
    chain = _bounds.analyze_chain(model, order, example_input=example)
    if not chain.is_chain:
        return nan, nan, f"bound not applicable: {chain.reason}", {}
    norms: dict[str, tuple[float, float]] = {}
    for n in order:
        W = dense[n] if dense is not None else weight_matrix(modules[n])
        norms[n] = (_bounds.operator_norm(modules[n], W, "frobenius"), _bounds.operator_norm(modules[n], W, "spectral"))
        del W  # a gathered one (fully_shard), before the next layer's gather
    terms = [_bounds.LayerTerm(n, d_terms[n], *norms[n]) for n in order]
    fro, spec = _bounds.error_bound(terms, chain)
    return fro, spec, "", norms
