"""``prune_model``: L-OBS pruning without a Trainer."""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Optional, Sequence, Union

from torch import nn

from .masks import MaskSet
from .pruner import CalibrationOptions, ForwardFn, PruneReport, SparsitySpec, prune
from .solvers import NMPattern, SolverOptions


def take_batches(dataloader: Iterable[Any], calibration_batches: Optional[int]) -> list:
    """The first ``calibration_batches`` batches of ``dataloader`` (all of them when None)."""
    if calibration_batches is not None:
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches must be an int >= 1, got {calibration_batches!r}.")
        return list(itertools.islice(iter(dataloader), calibration_batches))
    return list(dataloader)


def prune_model(
    model: nn.Module,
    dataloader: Iterable[Any],
    sparsity: SparsitySpec = 0.9,
    method: str = "auto",
    *,
    pattern: Union[str, NMPattern, None] = None,
    exclude: Sequence[str] = (),
    calibration_batches: Optional[int] = None,
    sequential: bool = False,
    solver: Optional[SolverOptions] = None,
    calibration: Optional[CalibrationOptions] = None,
    forward_fn: Optional[ForwardFn] = None,
    masks: Optional[MaskSet] = None,
    recalibrate_bn: bool = True,
    allocation: str = "global",
) -> PruneReport:
    """Prune ``model``'s Linear/Conv layers in place with Optimal Brain Surgeon.

    Args:
        model: any ``nn.Module`` (a LightningModule too); its device is used for calibration.
        dataloader: iterable of batches; ``forward_fn(model, batch)`` runs the model on one
            (default: a tensor batch as is, the first item of a tuple, or a dict's input).
        sparsity: float in [0, 1): the fraction of all selected weights to remove (see
            ``allocation``), ``{"pattern*": float}`` per layer (fnmatch on qualified names),
            or ``callable(name, module) -> float | None``.
        method: ``"auto"`` (``exact`` where affordable, else ``fast``), ``"exact"``,
            ``"lobs"`` or ``"fast"``.
        pattern: N:M semi-structured pattern such as ``"2:4"`` (implies the sparsity).
        exclude: fnmatch patterns of layers to leave dense.
        calibration_batches: how many batches to calibrate on (all when None).
        sequential: calibrate each layer on inputs that pass through the already pruned
            layers before it (corrects propagated error) instead of the dense network.
        solver, calibration: numerical options (:class:`SolverOptions`, :class:`CalibrationOptions`).
        masks: a :class:`MaskSet` from an earlier step; its pruned weights stay pruned and it
            receives the new masks.
        recalibrate_bn: re-estimate BatchNorm running statistics on the calibration batches
            after pruning.
        allocation: with a float ``sparsity``: ``"global"`` (default) spreads it over the
            layers where the one-pass OBS costs, relative to each layer's output energy, are
            smallest; ``"uniform"`` prunes every layer to ``sparsity``.

    Returns:
        A :class:`PruneReport` with per-layer errors, sparsities, the bound and the masks.
    """
    batches = take_batches(dataloader, calibration_batches)
    return prune(
        model,
        batches,
        sparsity,
        method,
        pattern=pattern,
        exclude=exclude,
        sequential=sequential,
        solver=solver,
        calibration=calibration,
        forward_fn=forward_fn,
        masks=masks,
        recalibrate_bn=recalibrate_bn,
        allocation=allocation,
    )
