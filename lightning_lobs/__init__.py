"""lightning-lobs: Layer-wise Optimal Brain Surgeon pruning for PyTorch Lightning."""

from .allocation import GlobalAllocation
from .api import prune_model
from .callback import LOBSPruning
from .export import SparseFileInfo, export_sparse, load_sparse, save_sparse, to_sparse_inference
from .masks import MaskSet, model_sparsity
from .options import CalibrationOptions, PruneOptions, PruneProgress
from .pruner import LayerReport, PruneReport
from .solvers import GreedyTrace, SolveResult, SolverOptions, greedy_trace, solve_layer

__all__ = [
    "CalibrationOptions",
    "GlobalAllocation",
    "GreedyTrace",
    "LOBSPruning",
    "LayerReport",
    "MaskSet",
    "PruneOptions",
    "PruneProgress",
    "PruneReport",
    "SolveResult",
    "SolverOptions",
    "SparseFileInfo",
    "export_sparse",
    "greedy_trace",
    "load_sparse",
    "model_sparsity",
    "prune_model",
    "save_sparse",
    "solve_layer",
    "to_sparse_inference",
]

__version__ = "0.1.0"
