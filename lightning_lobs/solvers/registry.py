"""The solvers by name, and :func:`solve_layer`, which dispatches through them.

A method is a class with a ``name`` and ``solve(inputs, options, tick) -> Solution`` (see :class:`Solver`):
``inputs`` are validated, the sparsity already lowered to the per-row minimum, and the solver returns the solved
``(rows, width)`` matrix (the bias its last column), its keep-mask and the damping used. Adding a method is one
module, one entry in :data:`SOLVERS` (and in ``config.METHODS``) and a brute-force test.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import torch
from torch import Tensor

from ..config import METHODS, SolverOptions
from .admm import AdmmSolver
from .core import LayerInputs, PatternLike, RowFloor, Solution, SolveResult, Tick, layer_error, prepare_inputs
from .exact import ExactSolver, GreedyTrace
from .fast import FastSolver
from .lobs import LobsSolver


class Solver(Protocol):
    """One pruning method (see the module docstring)."""

    name: str

    def solve(self, inputs: LayerInputs, options: SolverOptions, tick: Tick | None) -> Solution: ...


#: Every method by name, in ``config.METHODS`` order.
SOLVERS: dict[str, Solver] = {
    "lobs": LobsSolver(),
    "exact": ExactSolver(),
    "fast": FastSolver(),
    "admm": AdmmSolver(),
}


def solve_layer(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float | None = None,
    method: str = "exact",
    *,
    bias: Tensor | None = None,
    pattern: PatternLike = None,
    solver: SolverOptions | None = None,
    prior_mask: Tensor | None = None,
    trace: GreedyTrace | None = None,
    tick: Tick | None = None,
) -> SolveResult:
    """Prune one layer's weight with Optimal Brain Surgeon.

    Args:
        weight: ``(out, ...)`` weight; trailing dims are flattened into the d input columns
            (a conv filter ``(out, C_in/groups, *k)`` becomes ``out x C_in/groups*prod(k)``).
        hessian: ``(D, D)`` or ``(groups, D, D)`` layer-input Hessian, ``D = d + 1`` when a
            bias is given (the constant input is the last column), else ``D = d``.
        sparsity: fraction in [0, 1) of the weights to remove; implied by ``pattern`` if None.
        method: ``"lobs"``, ``"exact"``, ``"fast"`` or ``"admm"`` (see the package docstring).
        bias: optional ``(out,)`` bias; it is never pruned but OBS moves it to compensate.
        pattern: N:M pattern such as ``"2:4"`` along the input columns.
        solver: numerical solver, :class:`SolverOptions` defaults when None.
        prior_mask: keep-mask of an earlier pruning step (iterative pruning): weights it
            prunes stay pruned and count towards ``sparsity``.
        trace: ``exact`` only: a :func:`greedy_trace` of this same weight, H, bias, pattern,
            prior mask and solver, so that solving at several sparsities runs the greedy
            sequence once.
        tick: optional progress callback, called with the fraction of the work done (an
            estimate) at least every :data:`PROGRESS_TICK_FLOPS` of work in the long loops
            (the greedy trace, the column sweep, the refit). It must not raise, or the solve
            is abandoned with that exception.

    Returns:
        A :class:`SolveResult` with the pruned weight, its keep-mask and the layer error.
    """
    options = solver or SolverOptions()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    x = prepare_inputs(weight, hessian, sparsity, bias, pattern, prior_mask)
    chosen = SOLVERS[method]
    if trace is not None:
        if method != "exact":
            raise ValueError(f"trace= is for method='exact' only, got method={method!r}.")
        chosen = ExactSolver(trace)
        chosen.check_trace(x)
    floor = RowFloor.for_solve(options, x.pattern)
    x = replace(x, sparsity=floor.limit_sparsity(x.sparsity, x.rows, x.columns, x.pruned_before, method))
    if x.sparsity == 0.0 and x.pruned_before is None:
        out = Solution(x.W.to(options.dtype), torch.ones_like(x.W, dtype=torch.bool), options.damp)
    else:
        out = chosen.solve(x, options, tick)
        if not torch.isfinite(out.weight).all():
            raise FloatingPointError(
                f"the {method} solve produced non-finite weights; raise SolverOptions.damp or use dtype=torch.float64."
            )
    return _result(x, out, weight.dtype, method)


def _result(x: LayerInputs, out: Solution, dtype: torch.dtype, method: str) -> SolveResult:
    """The solved matrix back in the weight's shape and dtype, the bias split off, the undamped error."""
    error = layer_error(x.W, out.weight, x.H)
    new = out.weight.to(dtype)
    new_bias = new[:, -1].clone() if x.bias_cols else None
    new_w = new[:, : x.columns].reshape(x.shape).clone()
    mask = out.kept[:, : x.columns].reshape(x.shape).clone()
    return SolveResult(weight=new_w, mask=mask, bias=new_bias, error=error, damp=out.damp, method=method)
