"""lightning-lobs: Layer-wise Optimal Brain Surgeon pruning for PyTorch Lightning."""

from .api import prune_model
from .callback import LOBSPruning
from .masks import MaskSet, export_sparse, model_sparsity
from .pruner import CalibrationOptions, LayerReport, PruneReport
from .solvers import GreedyTrace, SolveResult, SolverOptions, greedy_trace, solve_layer

__all__ = [
    "CalibrationOptions",
    "GreedyTrace",
    "LOBSPruning",
    "LayerReport",
    "MaskSet",
    "PruneReport",
    "SolveResult",
    "SolverOptions",
    "export_sparse",
    "greedy_trace",
    "model_sparsity",
    "prune_model",
    "solve_layer",
]

__version__ = "0.1.0"
