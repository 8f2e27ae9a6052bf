"""``LOBSPruning``: the Lightning callback (thin glue over :mod:`lightning_lobs.pruner`)."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info

from .api import take_batches
from .distributed import RankInfo
from .masks import MaskSet
from .pruner import (
    ALL_METHODS,
    CalibrationOptions,
    ForwardFn,
    PruneReport,
    SparsitySpec,
    prune,
    select_layers,
    validate_allocation,
    validate_sparsity,
)
from .solvers import SolverOptions, parse_pattern

log = logging.getLogger(__name__)

_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


class LOBSPruning(Callback):
    """Prune a LightningModule's Linear/Conv layers with Layer-wise OBS during ``fit``.

    At the start of each epoch in ``prune_epoch`` the callback runs ``calibration_batches``
    batches through the model (eval mode, no grad), accumulates every target layer's
    input Hessian, solves each layer with OBS, writes the pruned weights and from then
    on holds the masks: pruned weights stay exactly 0 through every optimizer step.
    The epochs after the last prune are the retraining phase.

    Args:
        sparsity: fraction in [0, 1) of the Linear/ConvNd weights to remove (spread over the
            layers as ``allocation`` says), a mapping
            ``{"fnmatch pattern": fraction}`` over qualified module names, or a callable
            ``(name, module) -> fraction | None``. With a list of ``prune_epoch``s, a list of
            such specs, one per epoch (iterative pruning; sparsities should increase).
        prune_epoch: epoch (or increasing list of epochs) at whose start pruning happens.
        method: ``"auto"`` (default: ``exact`` where it costs seconds, ``fast`` on very
            large layers), ``"exact"`` (greedy OBS, OBC), ``"lobs"`` (the paper's one-pass
            ranking) or ``"fast"`` (SparseGPT).
        pattern: N:M pattern such as ``"2:4"`` instead of unstructured sparsity.
        exclude: fnmatch patterns of layers to keep dense.
        calibration_batches: batches used to build the Hessians.
        calibration_dataloader: where those batches come from (default: the train dataloader).
        sequential: calibrate layer l on inputs through the already pruned layers before it.
        solver: :class:`SolverOptions` (damping, precision, block sizes).
        calibration: :class:`CalibrationOptions` (Hessian precision, conv chunking).
        forward_fn: ``(model, batch) -> output``; default feeds ``batch[0]`` (or the tensor).
        recalibrate_bn: re-estimate BatchNorm running statistics on the calibration batches
            after pruning (as the paper's code did).
        log_table: log a rank-zero summary table after each prune.
        allocation: for a float ``sparsity``: ``"global"`` (default) chooses per-layer
            sparsities from the pooled one-pass OBS costs, each layer's relative to its output
            energy, so small, sensitive layers (a 10-way classifier) keep more weights;
            ``"uniform"`` prunes every layer to ``sparsity`` (like ``ModelPruning``'s default).
            Mappings, callables and N:M patterns set per-layer sparsities themselves.
    """

    def __init__(
        self,
        sparsity: Union[SparsitySpec, Sequence[SparsitySpec]] = 0.9,
        prune_epoch: Union[int, Sequence[int]] = 0,
        method: str = "auto",
        *,
        pattern: Optional[str] = None,
        exclude: Sequence[str] = (),
        calibration_batches: int = 32,
        calibration_dataloader: Optional[Any] = None,
        sequential: bool = False,
        solver: Optional[SolverOptions] = None,
        calibration: Optional[CalibrationOptions] = None,
        forward_fn: Optional[ForwardFn] = None,
        recalibrate_bn: bool = True,
        log_table: bool = True,
        allocation: str = "global",
    ) -> None:
        epochs = [prune_epoch] if isinstance(prune_epoch, int) else list(prune_epoch)
        if not epochs or any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in epochs):
            raise ValueError(f"prune_epoch must be an int >= 0 or a list of them, got {prune_epoch!r}.")
        if any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise ValueError(f"prune_epoch must be strictly increasing, got {epochs}.")
        if isinstance(sparsity, (list, tuple)):
            specs = list(sparsity)
            if len(specs) != len(epochs):
                raise ValueError(
                    f"sparsity has {len(specs)} entries but prune_epoch has {len(epochs)}; give one sparsity per "
                    "prune epoch, or a single sparsity."
                )
        else:
            specs = [sparsity] * len(epochs)
        for i, spec in enumerate(specs):
            validate_sparsity(spec, "sparsity" if len(specs) == 1 else f"sparsity[{i}]")
        if method not in ALL_METHODS:
            raise ValueError(f"method must be one of {ALL_METHODS}, got {method!r}.")
        validate_allocation(allocation)
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches must be an int >= 1, got {calibration_batches!r}.")
        if isinstance(exclude, str):
            exclude = (exclude,)
        if not all(isinstance(p, str) for p in exclude):
            raise ValueError(f"exclude must be a sequence of fnmatch patterns (str), got {exclude!r}.")
        if solver is not None and not isinstance(solver, SolverOptions):
            raise TypeError(f"solver must be a SolverOptions, got {type(solver).__name__}.")
        if calibration is not None and not isinstance(calibration, CalibrationOptions):
            raise TypeError(f"calibration must be a CalibrationOptions, got {type(calibration).__name__}.")
        self.prune_epochs: List[int] = epochs
        self.sparsities: List[SparsitySpec] = specs
        self.method = method
        self.pattern = parse_pattern(pattern)
        self.exclude = tuple(exclude)
        self.calibration_batches = calibration_batches
        self.calibration_dataloader = calibration_dataloader
        self.sequential = bool(sequential)
        self.solver = solver or SolverOptions()
        self.calibration = calibration or CalibrationOptions()
        self.forward_fn = forward_fn
        self.recalibrate_bn = bool(recalibrate_bn)
        self.log_table = log_table
        self.allocation = allocation
        self.masks = MaskSet()
        self.pruned_epochs: List[int] = []
        self.reports: List[PruneReport] = []

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if any(cls.__name__ in _SHARDED for cls in type(trainer.strategy).__mro__):  # subclasses shard too
            raise RuntimeError(
                f"LOBSPruning does not support the sharded strategy {strategy}: layer weights are split across "
                "ranks. Use strategy='ddp' (or 'ddp_spawn'), or prune the gathered model with prune_model()."
            )
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.prune_epochs[-1] >= max_epochs:
            raise ValueError(
                f"prune_epoch {self.prune_epochs[-1]} is beyond the last epoch of training (max_epochs={max_epochs}, "
                f"epochs are 0..{max_epochs - 1}); lower prune_epoch or raise max_epochs."
            )
        for spec in self.sparsities:  # fail now, not epochs into training
            select_layers(pl_module, spec, self.exclude, self.pattern)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if len(self.masks):  # resumed after a prune: hold the restored masks
            self.masks.attach(pl_module, trainer.optimizers)

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        epoch = trainer.current_epoch
        if epoch in self.prune_epochs and epoch not in self.pruned_epochs:
            report = self.prune_now(trainer, pl_module, self.prune_epochs.index(epoch))
            self.log_report(trainer, pl_module, report)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self.masks.detach()

    # ------------------------------------------------------------------ overridable steps

    def calibration_batches_for(self, trainer: "pl.Trainer") -> list:
        """The batches to calibrate on: from ``calibration_dataloader`` or the train dataloader."""
        loader = self.calibration_dataloader
        if loader is None:
            loader = trainer.train_dataloader
        if loader is None:
            raise RuntimeError("no train dataloader to calibrate on; pass calibration_dataloader=... to LOBSPruning.")
        batches = take_batches(loader, self.calibration_batches)
        if not batches:
            raise RuntimeError("the calibration dataloader yielded no batches.")
        return batches

    def prune_now(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", index: int) -> PruneReport:
        """Calibrate and prune for entry ``index`` of ``prune_epoch``; then hold the masks."""
        batches = self.calibration_batches_for(trainer)
        report = prune(
            pl_module,
            batches,
            self.sparsities[index],
            self.method,
            pattern=self.pattern,
            exclude=self.exclude,
            sequential=self.sequential,
            solver=self.solver,
            calibration=self.calibration,
            forward_fn=self.forward_fn,
            masks=self.masks,
            recalibrate_bn=self.recalibrate_bn,
            rank=RankInfo.current() if trainer.world_size > 1 else None,
            allocation=self.allocation,
        )
        self.masks.attach(pl_module, trainer.optimizers)
        self.pruned_epochs.append(self.prune_epochs[index])
        self.reports.append(report)
        return report

    def log_report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", report: PruneReport) -> None:
        """Log the report's metrics through the LightningModule and a rank-zero table."""
        metrics = {k: float(v) for k, v in report.metrics().items()}
        # Every rank holds the same report; syncing (a mean of equal values) keeps Lightning from warning per metric.
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1)
        if self.log_table:
            rank_zero_info(f"L-OBS pruning at epoch {trainer.current_epoch}:\n{report.table()}")

    @property
    def last_report(self) -> Optional[PruneReport]:
        return self.reports[-1] if self.reports else None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> Dict[str, Any]:
        return {"masks": self.masks.state_dict(), "pruned_epochs": list(self.pruned_epochs)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.masks.load_state_dict(state_dict.get("masks", {}))
        self.pruned_epochs = list(state_dict.get("pruned_epochs", []))

