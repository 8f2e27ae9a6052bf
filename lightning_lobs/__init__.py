"""lightning-lobs: Layer-wise Optimal Brain Surgeon pruning for PyTorch Lightning."""

import importlib.metadata as _metadata
from typing import TYPE_CHECKING, Any

from .api import prune_model
from .config import CalibrationOptions, GlobalAllocation, PruneOptions, PruneProgress, SolverOptions
from .engine import LayerReport, PruneReport
from .export import SparseFileInfo, export_sparse, load_sparse, save_sparse, to_sparse_inference
from .masks import MaskSet, model_sparsity
from .schedules import GradualSchedule, PruneSchedule, SparsitySchedule
from .solvers import GreedyTrace, SolveResult, greedy_trace, solve_layer

__all__ = [
    "CalibrationOptions",
    "GlobalAllocation",
    "GradualSchedule",
    "GreedyTrace",
    "LOBSPruning",
    "LayerReport",
    "MaskSet",
    "PruneOptions",
    "PruneProgress",
    "PruneReport",
    "PruneSchedule",
    "SolveResult",
    "SolverOptions",
    "SparseFileInfo",
    "SparsitySchedule",
    "export_sparse",
    "greedy_trace",
    "load_sparse",
    "model_sparsity",
    "prune_model",
    "save_sparse",
    "solve_layer",
    "to_sparse_inference",
]

try:  # one source for the version: pyproject.toml, read from the installed metadata
    __version__ = _metadata.version("lightning-lobs")
except _metadata.PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from .callback import LOBSPruning


def __getattr__(name: str) -> Any:
    # The callback imports Lightning (and through it torchmetrics), seconds of imports that prune_model,
    # the solvers and the export functions do not need: it is loaded on first use of the name.
    if name == "LOBSPruning":
        from .callback import LOBSPruning

        return LOBSPruning
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
