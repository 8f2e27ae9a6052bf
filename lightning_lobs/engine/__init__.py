"""The pruning engine shared by :func:`~lightning_lobs.prune_model` and the :class:`~lightning_lobs.LOBSPruning`
callback: :func:`prune` runs one prune of a model in place, in stages, each a module:

1. :mod:`~.plan`: select the layers, resolve each one's method, check weights, memory and cost before any work;
2. :mod:`~.calibrate`: stream every layer's input Hessian over the batches;
3. :mod:`~.allocate`: spread a global sparsity over the layers (the split: :mod:`lightning_lobs.allocation`);
4. :mod:`~.solve`: OBS per layer, each rank solving its share;
5. :mod:`~.commit`: write the weights, only once every solve succeeded (the transaction lives here);
6. :mod:`~.report`: re-estimate BatchNorm, measure output errors and the bound, report what the model now holds;
   then the masks are written.

:mod:`~.run` strings them together; :mod:`~.sequential` is the other pipeline (each layer calibrated on the
network pruned before it). The stages hand each other the frozen records of :mod:`~.records`; every exchange
between ranks is in :mod:`~.collective`; feeding the model a batch is :mod:`~.forward`.

All or nothing: any failure (a KeyboardInterrupt too) restores the model's weights, BatchNorm statistics,
train/eval modes and the MaskSet; the masks are written last, after the report is built.
"""

from .forward import HEAD_REASON, default_forward, is_empty_batch, output_heads
from .plan import AUTO_EXACT_MAX_COST, EXACT_COST_PER_SECOND, EXACT_WARN_SECONDS
from .records import LayerReport, PruneReport
from .run import prune

__all__ = [
    "AUTO_EXACT_MAX_COST",
    "EXACT_COST_PER_SECOND",
    "EXACT_WARN_SECONDS",
    "HEAD_REASON",
    "LayerReport",
    "PruneReport",
    "default_forward",
    "is_empty_batch",
    "output_heads",
    "prune",
]
