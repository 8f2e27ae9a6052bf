"""Estimated work (floating-point operations) of each layer's allocation costs and solve: what progress ETAs count.

Estimates only: nothing here changes a result, and they read the plan's shape facts, not the modules.
"""

from __future__ import annotations

from ..config import SolverOptions
from ..solvers.admm import admm_work
from ..solvers.core import MASK_WORK_PER_WEIGHT, REFIT_WORK_FACTOR, refit_work, tick_rows
from ..solvers.trace import trace_work
from .records import LayerPlan

__all__ = ["allocation_work", "solve_work"]


def trace_flops(rows: int, d: int, solver: SolverOptions) -> float:
    """Estimated flops of ``exact``'s greedy trace: every step's share of a flush, 2 x width^2 per row, and more."""
    chunk = min(rows, tick_rows(rows, 2.0 * solver.lazy_steps * d * d))
    return 2.0 * rows * trace_work(d, d, solver.lazy_steps, 0, 0.75, chunk)


def refit_flops(rows: int, d: int, sparsity: float, solver: SolverOptions, method: str) -> float:
    """Estimated work of the refit: ``exact``'s k x k Cholesky per row (k kept), ``lobs``/``fast``'s planned one."""
    flops = rows * (d * (1.0 - sparsity)) ** 3 / 3
    if method != "exact":
        return refit_work(solver, rows, d, flops)
    return REFIT_WORK_FACTOR * flops


def allocation_work(layer: LayerPlan, solver: SolverOptions, curve_rows: int, levels: int, curve: bool) -> float:
    """Estimated flops of one layer's allocation costs: the trace (``exact``), the curve or the one-pass scores."""
    rows, d = layer.dense.shape
    g = layer.groups
    if layer.method == "exact":
        return trace_flops(rows, d, solver)
    if curve:
        return g * d**3 + 2.0 * min(rows, curve_rows) * levels * d * d
    return g * d**3 + float(rows) * d


def solve_work(layer: LayerPlan, solver: SolverOptions, pattern: bool, has_trace: bool) -> float:
    """Estimated flops of one layer's solve at its target: what the progress ETA of the solve phase counts.

    An ``exact`` layer with a trace from the allocation (``has_trace``) only chooses its mask and refits; a layer
    the allocation left dense (target 0, no earlier mask, no N:M ``pattern``) costs next to nothing.
    """
    rows, d = layer.dense.shape
    g = layer.groups
    if layer.target == 0 and layer.prior is None and not pattern:
        return float(rows) * d
    if layer.method == "admm":  # its refit is the CG inside admm_work, never the Cholesky one
        return admm_work(rows, d, g)
    work = g * d**3 + refit_flops(rows, d, layer.target, solver, layer.method)
    if layer.method == "exact":
        work += MASK_WORK_PER_WEIGHT * rows * d
        return work + (0.0 if has_trace and layer.perm is None else trace_flops(rows, d, solver))
    return work + 2.0 * rows * d * d
