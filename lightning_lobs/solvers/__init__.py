"""Optimal Brain Surgeon solvers for one layer: pure tensor functions.

Every solver works on a weight matrix ``W`` (rows x d) and the layer-input Hessian
``H = (1/n) sum x~ x~^T`` (d x d, or groups x d x d for grouped convolutions, whose
output rows split into ``groups`` contiguous blocks). Pruning a row ``w`` to ``w^``
costs ``1/2 (w^ - w) H (w^ - w)^T``; a layer's error ``dE`` is the sum over rows.

Methods
-------
``lobs``   The L-OBS paper's rule (Dong et al. 2017): one damped ``H^-1`` per layer,
           every weight ranked once, layer-wide, by ``L_q = w_q^2 / (2 [H^-1]_qq)``.
           The removed set is then compensated jointly: the kept weights move to the
           least-squares optimum for that mask (the multi-weight OBS update,
           :func:`refit`). With ``SolverOptions(refit=False)`` the paper's literal
           sequence is used instead: the lowest-ranked are removed one after another,
           each applying the single-weight correction ``-(w_q / [H^-1]_qq) H^-1 e_q``
           with that same, stale ``H^-1``. Those corrections also move weights that were
           already removed, which the final mask then zeroes, so the literal sequence
           can end worse than no correction at all (see BENCHMARKS.md).
``exact``  Greedy OBS with exact downdates (OBC, Frantar & Alistarh 2022): every
           row removes its cheapest weight, downdates its own ``H^-1`` and repeats.
           Downdates are accumulated lazily as a low-rank factor and flushed every
           ``lazy_steps`` removals with one batched matmul, so the greedy choice stays
           exact while the memory traffic is matmul-shaped. The OBS loss of every
           removal is recorded; per-row budgets are then chosen from those losses so
           that the layer's summed error is smallest for the requested count, and the
           kept weights are refitted to the least-squares optimum for the final mask.
``fast``   SparseGPT (Frantar & Alistarh 2023): Cholesky factor of ``H^-1``, columns
           processed left to right in blocks with lazy updates, mask chosen per block;
           then, where affordable (``SolverOptions.refit``), the kept weights are
           refitted to the least-squares optimum for SparseGPT's mask.
``admm``   ADMM with mask reselection (ALPS, Meng et al. 2024; Boza 2024), :mod:`.admm`: a dense and a
           sparse copy of the weights joined by a growing penalty, the mask reselected layer-wide at every
           iteration until it settles, then the kept weights refitted by batched conjugate gradients
           (:mod:`.cg`). Lower layer error than ``fast`` at several times its cost; ``auto`` never picks it.

Across layers (``lightning_lobs.allocation``): :func:`error_curve` measures a layer's
relative SparseGPT error at a grid of sparsities in one batched sweep; :func:`obs_scores`
gives the one-pass OBS costs (``lightning_lobs.allocation.allocate_global`` pools them);
errors are divided by :func:`output_energy` so that layers compare relative output errors.

Unstructured solves keep ``SolverOptions.min_kept_per_row`` weights in every output row
(default 1: no dead rows): ``lobs`` ranks each row's costliest weights last, ``exact``
stops each row's trace that many steps early, ``fast`` never prunes them and moves the
block quotas so that every removal is still compensated, ``admm`` ranks each row's largest
weights above every other in its projection.

All four support N:M patterns (keep N of every M consecutive input columns).

Layout: ``core`` (inputs, damping and the inverse, layer error, refit, masks from scores, the
per-row minimum :class:`~lightning_lobs.solvers.core.RowFloor`, progress ticks), one module per
method (``lobs``, ``exact`` with its kernel in ``trace``, ``fast``, ``admm``), ``cg`` (the batched conjugate-gradient
refit of ``admm`` and, on all but tiny layers, of ``lobs``/``fast``), ``costs`` (the curves for
the allocation) and ``registry`` (:data:`SOLVERS` and :func:`solve_layer`). A new method is
one module (a class with a ``name`` and ``solve(inputs, options, tick) -> Solution``), one entry
in ``registry.SOLVERS`` and in ``config.METHODS``, and a brute-force test of its mask choice
(tests/test_solvers_registry.py already checks every registered solver's refit and count).
The kernels read :data:`PROGRESS_TICK_FLOPS` from ``core`` (:data:`REFIT_AUTO_MAX_FLOPS` decides nothing since the CG
refit; ``core.refit_plan`` chooses between the direct and the CG refit).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from ..config import METHODS, NMPattern, SolverOptions, parse_pattern
from .core import (
    MASK_WORK_PER_WEIGHT,
    PROGRESS_TICK_FLOPS,
    REFIT_AUTO_MAX_FLOPS,
    REFIT_WORK_FACTOR,
    DampedInverse,
    LayerInputs,
    RowFloor,
    Solution,
    SolveResult,
    Tick,
    damped_hessian,
    inverse_with_damping,
    layer_error,
    magnitude_mask,
    prepare_inputs,
    refit,
    tick_rows,
)
from .costs import error_curve, obs_scores, output_energy
from .exact import GreedyTrace, greedy_trace
from .registry import SOLVERS, Solver, solve_layer
from .trace import trace_work

__all__ = [
    "GreedyTrace",
    "PROGRESS_TICK_FLOPS",
    "REFIT_AUTO_MAX_FLOPS",
    "SolveResult",
    "damped_hessian",
    "error_curve",
    "greedy_trace",
    "layer_error",
    "magnitude_mask",
    "obs_scores",
    "output_energy",
    "refit",
    "solve_layer",
    "Tick",
    # the layout of the package (see the module docstring)
    "DampedInverse",
    "LayerInputs",
    "MASK_WORK_PER_WEIGHT",
    "REFIT_WORK_FACTOR",
    "RowFloor",
    "SOLVERS",
    "Solution",
    "Solver",
    "inverse_with_damping",
    "prepare_inputs",
    "tick_rows",
    "trace_work",
    # re-exported from lightning_lobs.config, where they live
    "METHODS",
    "NMPattern",
    "SolverOptions",
    "parse_pattern",
]


def __getattr__(name: str) -> Any:
    # allocate_global pools costs across layers: allocation (a level above), not a solver. The old path works one
    # version; the module is looked up by name at call time because it is a link of the deprecated alias only,
    # not a dependency of the solvers (a static import would make allocation <-> solvers a cycle).
    if name == "allocate_global":
        warnings.warn(
            "lightning_lobs.solvers.allocate_global moved to lightning_lobs.allocation.allocate_global; "
            "the old path stops working in the next minor version.",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module("lightning_lobs.allocation").allocate_global
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
