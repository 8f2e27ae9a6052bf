"""Deprecated: the engine moved to :mod:`lightning_lobs.engine` (0.3.0); this module goes in 0.4.0.

Every name importable from here before keeps working, read from its new home with a :class:`DeprecationWarning`
naming it. Private helpers whose signature changed with the move (they take the engine's records now) are listed
with their new home too; monkeypatching a name here no longer reaches the engine: patch it in its new module.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

#: old name -> (new module, new name), for the names that moved somewhere other than ``lightning_lobs.engine``.
_MOVED: dict[str, tuple[str, str]] = {
    "LayerReport": ("lightning_lobs.engine.records", "LayerReport"),
    "PruneReport": ("lightning_lobs.engine.records", "PruneReport"),
    "_Progress": ("lightning_lobs.progress", "PhaseProgress"),
    "_move": ("lightning_lobs.engine.forward", "move_batch"),
    "_model_device": ("lightning_lobs.engine.forward", "model_device"),
    "_eval_no_grad": ("lightning_lobs.engine.forward", "eval_no_grad"),
    "_keyword_call": ("lightning_lobs.engine.forward", "_keyword_call"),
    "_tensors": ("lightning_lobs.engine.forward", "_tensors"),
    "_INPUT_KEYS": ("lightning_lobs.engine.forward", "_INPUT_KEYS"),
    "_resolve_method": ("lightning_lobs.engine.plan", "resolve_method"),
    "_channel_last_perm": ("lightning_lobs.layers", "channel_last_perm"),
    "_check_finite_parameters": ("lightning_lobs.engine.plan", "check_finite_parameters"),
    "_solve_cost": ("lightning_lobs.engine.plan", "plan_cost"),
    "_Layer": ("lightning_lobs.engine.records", "LayerPlan"),
    "_Solved": ("lightning_lobs.engine.records", "Solution"),
    "_trace_flops": ("lightning_lobs.engine.estimates", "trace_flops"),
    "_refit_flops": ("lightning_lobs.engine.estimates", "refit_flops"),
    "_allocation_work": ("lightning_lobs.engine.estimates", "allocation_work"),
    "_solve_work": ("lightning_lobs.engine.estimates", "solve_work"),
    "_calibrate": ("lightning_lobs.engine.calibrate", "collect_hessians"),
    "_solve_one": ("lightning_lobs.engine.solve", "solve_one"),
    "_measure": ("lightning_lobs.engine.report", "measure"),
    "_bound": ("lightning_lobs.engine.report", "bound"),
    "_parameter_counts": ("lightning_lobs.engine.report", "parameter_counts"),
    "_param_state": ("lightning_lobs.engine.commit", "param_state"),
    "_load_params": ("lightning_lobs.engine.commit", "load_params"),
    "_MaskSetState": ("lightning_lobs.engine.commit", "_MaskSetState"),
    "_share": ("lightning_lobs.engine.collective", "share_solution"),
    "_broadcast_buffers": ("lightning_lobs.engine.collective", "broadcast_buffers"),
    "_all_reduce_batchnorm": ("lightning_lobs.engine.collective", "all_reduce_batchnorm"),
    "log": ("lightning_lobs.engine.report", "log"),
    # old ``hessian`` names this module re-exported; ``layers`` holds them under their new names
    "SUPPORTED_TYPES": ("lightning_lobs.layers", "PRUNABLE_TYPES"),
    "is_supported": ("lightning_lobs.layers", "is_prunable"),
    "weight_columns": ("lightning_lobs.layers", "matrix_cols"),
}
#: where a name that kept its name went: the engine first, then the modules the old one re-exported from.
_HOMES = (
    "lightning_lobs.engine",
    "lightning_lobs.config",
    "lightning_lobs.distributed",
    "lightning_lobs.solvers",
    "lightning_lobs.layers",
    "lightning_lobs.hessian",
    "lightning_lobs.masks",
    "lightning_lobs.batchnorm",
    "lightning_lobs.selection",
    "lightning_lobs.resources",
)


def _home(name: str) -> tuple[str, str]:
    if name in _MOVED:
        return _MOVED[name]
    for module in _HOMES:
        if hasattr(importlib.import_module(module), name):
            return module, name
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    module, new = _home(name)
    warnings.warn(
        f"{__name__}.{name} moved to {module}.{new}; the old path stops working in the next minor version.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), new)


def __dir__() -> list[str]:
    from . import engine

    return sorted(set(engine.__all__) | set(_MOVED))


__all__: list[str] = []
