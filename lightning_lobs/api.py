"""``prune_model``: L-OBS pruning without a Trainer."""

from __future__ import annotations

import itertools
import numbers
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from .masks import MaskSet
from .options import ProgressFn, PruneOptions
from .pruner import PruneReport, prune


def take_batches(dataloader: Iterable[Any], calibration_batches: Optional[int]) -> list:
    """The first ``calibration_batches`` batches of ``dataloader`` (all of them when None).

    The global RNG is forked while iterating: a shuffling sampler draws its seed from it when an
    iterator is made, and calibration must not change the training run's data order.
    """
    if calibration_batches is not None:
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, numbers.Integral) or calibration_batches < 1:
            raise ValueError(
                f"calibration_batches must be an int >= 1 (or None for the whole dataloader), got {calibration_batches!r}."
            )
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        if calibration_batches is None:
            return list(dataloader)
        return list(itertools.islice(iter(dataloader), int(calibration_batches)))


def prune_model(
    model: nn.Module,
    dataloader: Iterable[Any],
    sparsity: Any = 0.9,
    method: str = "auto",
    *,
    calibration_batches: Optional[int] = None,
    masks: Optional[MaskSet] = None,
    progress: Union[bool, ProgressFn] = False,
    options: Optional[PruneOptions] = None,
    **kwargs: Any,
) -> PruneReport:
    """Prune ``model``'s Linear/Conv layers in place with Optimal Brain Surgeon.

    Args:
        model: any ``nn.Module`` (a LightningModule too); its device is used for calibration.
        dataloader: iterable of batches; ``forward_fn(model, batch)`` runs the model on one
            (default: a tensor batch as is, the first item of a tuple, or a dict's input).
        sparsity, method, **kwargs: the options of :class:`PruneOptions` (``pattern``,
            ``allocation``, ``exclude``, ``sequential``, ``solver``, ``calibration``,
            ``forward_fn``, ``recalibrate_bn``): see there. Or pass ``options=PruneOptions(...)``.
        calibration_batches: how many batches to calibrate on (all when None).
        masks: a :class:`MaskSet` from an earlier step; its pruned weights stay pruned and it
            receives the new masks.
        progress: True prints phase, layer i/N, elapsed time and an ETA to stderr while it
            runs; or a callable receiving :class:`PruneProgress` events.

    Returns:
        A :class:`PruneReport` with per-layer errors, sparsities, the bound and the masks.
    """
    if options is None:
        options = PruneOptions.from_kwargs("prune_model()", sparsity=sparsity, method=method, **kwargs)
    else:
        extra = sorted(kwargs) + [k for k, v, d in (("sparsity", sparsity, 0.9), ("method", method, "auto")) if v != d]
        if extra:
            raise TypeError(f"prune_model() got options=PruneOptions(...) and also {extra}; give one or the other.")
    if progress is True:
        from .progress import console_progress

        progress = console_progress()
    batches = take_batches(dataloader, calibration_batches)
    return prune(model, batches, options, masks=masks, progress=progress or None)
