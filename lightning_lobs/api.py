"""``prune_model``: L-OBS pruning without a Trainer."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .checks import as_int, describe
from .config import ProgressFn, PruneOptions
from .engine import PruneReport, prune
from .masks import MaskSet


def is_one_shot(source: Any) -> bool:
    """Whether ``source`` is an iterator (a generator, ``iter(loader)``): it yields its batches once, and
    iterating it again continues where the last pass stopped instead of starting over."""
    return isinstance(source, Iterator)


def _loader_generators(dataloader: Any) -> list[torch.Generator]:
    """The loader's own RNGs: its ``generator`` (a DataLoader draws its workers' base seed from it) and
    its sampler's / batch sampler's (a shuffling sampler draws each epoch's order from it)."""
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    found: list[torch.Generator] = []
    for owner in (
        dataloader,
        getattr(dataloader, "sampler", None),
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
    ):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def take_batches(dataloader: Iterable[Any], calibration_batches: int | None) -> list:
    """The first ``calibration_batches`` batches of ``dataloader`` (all of them when None).

    Every RNG that shapes the training run's data order is left as it was: the global RNGs are
    forked (a shuffling sampler without a generator seeds itself from them when an iterator is
    made), and the states of the loader's and its sampler's own ``generator`` are put back.
    A one-shot iterator that yields fewer batches than asked gets a warning saying how many were used.
    """
    if calibration_batches is not None:
        batches = as_int(calibration_batches)
        if batches is None or batches < 1:
            raise ValueError(
                f"calibration_batches must be an int >= 1 (or None for the whole dataloader), got "
                f"{describe(calibration_batches)}."
            )
        calibration_batches = batches
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    generators = _loader_generators(dataloader)
    states = [g.get_state() for g in generators]
    try:
        with torch.random.fork_rng(devices=devices):
            if calibration_batches is None:
                return list(dataloader)
            batches = list(itertools.islice(iter(dataloader), int(calibration_batches)))
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)
    if is_one_shot(dataloader) and 0 < len(batches) < calibration_batches:
        warnings.warn(
            f"calibration_batches={calibration_batches} but the iterator yielded only {len(batches)} batch(es); "
            f"calibrating on those {len(batches)}. Pass a DataLoader or a list to calibrate on a fixed set.",
            UserWarning,
            stacklevel=3,
        )
    return batches


def prune_model(
    model: nn.Module,
    dataloader: Iterable[Any],
    sparsity: Any = None,
    method: str = "auto",
    *,
    calibration_batches: int | None = None,
    masks: MaskSet | None = None,
    progress: bool | ProgressFn = False,
    options: PruneOptions | None = None,
    **kwargs: Any,
) -> PruneReport:
    """Prune ``model``'s Linear/Conv layers and attention projections in place with Optimal Brain Surgeon.

    Args:
        model: any ``nn.Module`` (a LightningModule too); its device is used for calibration.
        dataloader: iterable of batches; ``forward_fn(model, batch)`` runs the model on one
            (default: a tensor batch as is, the first item of a tuple, a mapping as
            ``model(**batch)`` limited to the keys the forward names).
        method: ``"auto"`` (``exact`` where ``rows * d^3 <= 3e11``, else ``fast``), ``"exact"`` (OBC: the lowest error on
            small layers), ``"fast"`` (SparseGPT's sweep and a CG refit: big layers), ``"admm"`` (mask reselection: the
            lowest error on wide layers, several times ``fast``'s time; never picked by ``auto``) or ``"lobs"`` (the
            paper's one ranking); README "Which method".
        sparsity: the fraction to remove, a per-layer mapping or callable (:class:`PruneOptions`); default
            (``None``) 0.9.
        **kwargs: the other options of :class:`PruneOptions` (``pattern``,
            ``allocation``, ``exclude``, ``sequential``, ``sequential_unit``, ``blocks``,
            ``solver``, ``calibration``, ``forward_fn``, ``recalibrate_bn``, ``prune_head``): see
            there. Or pass ``options=PruneOptions(...)``.
        calibration_batches: how many batches to calibrate on (all when None); an iterator that
            yields fewer gives a warning with the count.
        masks: a :class:`MaskSet` from an earlier step; its pruned weights stay pruned and it
            receives the new masks.
        progress: True prints phase, layer i/N, elapsed time and an ETA to stderr while it
            runs; or a callable receiving :class:`PruneProgress` events.

    Returns:
        A :class:`PruneReport` with per-layer errors, sparsities, the bound and the masks.

    All or nothing: if it raises (a KeyboardInterrupt too), the model's weights, BatchNorm statistics
    and ``masks`` are as they were before the call.
    """
    if options is None:
        spec = PruneOptions.sparsity if sparsity is None else sparsity  # None: not given, PruneOptions' default
        options = PruneOptions.from_kwargs("prune_model()", sparsity=spec, method=method, **kwargs)
    else:
        # sparsity=None is "not given", so an explicit 0.9 beside options= is refused like any other value
        extra = sorted(kwargs) + [k for k, v, d in (("sparsity", sparsity, None), ("method", method, "auto")) if v != d]
        if extra:
            raise TypeError(f"prune_model() got options=PruneOptions(...) and also {extra}; give one or the other.")
    if progress is True:
        from .progress import console_progress

        progress = console_progress()
    batches = take_batches(dataloader, calibration_batches)
    return prune(model, batches, options, masks=masks, progress=progress or None)
