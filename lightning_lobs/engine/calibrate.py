"""Stage 2, calibrate: stream the selected layers' input Hessians over the calibration batches."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..config import CalibrationOptions
from ..distributed import RankInfo
from ..hessian import HessianCollector
from ..progress import PhaseProgress
from ..selection import warn_skipped
from .collective import fail_together, reduce_calibration, share_scales
from .context import RunContext
from .forward import model_device
from .plan import samples_in
from .records import Calibration, Plan

__all__ = ["calibrate", "collect_hessians", "drop_uncalled", "normalise"]


def calibrate(
    ctx: RunContext,
    plan: Plan,
    names: Sequence[str],
    report: bool = True,
    feed: tuple[Sequence[Any], Callable[[Any], Any]] | None = None,
    owners: Mapping[str, int] | None = None,
) -> tuple[Plan, Calibration]:
    """Hessians (normalised, see :func:`normalise`) and positions of ``names``, and their call order.

    Layers the forward never called leave the plan (see :func:`drop_uncalled`). ``report=False`` inside another
    phase (sequential mode calibrates one layer at a time while allocating and solving, and those phases report
    per layer). ``feed=(items, run)`` runs ``run(item)`` for each item instead of the model on each batch (the block
    pipeline runs one block on its caught inputs). ``owners`` (layer -> the rank that will solve it, in a group of
    ranks): each Hessian is summed onto its owner only; on the other ranks :attr:`Calibration.hessians` holds a
    meta tensor of its shape (no data) in its place. Without ``owners`` every rank holds every Hessian.
    """
    t0 = time.perf_counter()
    items, run = feed if feed is not None else (ctx.batches, ctx.run_batch)
    progress = ctx.progress if report else PhaseProgress(None)
    progress.begin("calibrate", {str(i): 1.0 for i in range(len(items))})
    hessians, positions, order, missing = collect_hessians(
        ctx.model,
        items,
        {n: plan.layers[n].module for n in names},
        ctx.options.calibration,
        run,
        ctx.rank,
        progress,
        owners,
    )
    plan = drop_uncalled(plan, missing)
    normalised: dict[str, Tensor] = {}
    scales: dict[str, float] = {}
    for n in names:
        if n in plan.layers:
            hessian = hessians.pop(n)  # popped: the unnormalised one is freed as the normalised one is made
            if hessian.is_meta:  # another rank's (owners): only its shape here
                normalised[n] = hessian
            else:
                normalised[n], scales[n] = normalise(hessian)
            del hessian
            progress.step(n, n)
    if owners is not None:
        scales = share_scales(scales, list(normalised), owners, ctx.rank, ctx.device)
    ctx.timings.calibration += time.perf_counter() - t0
    calibration = Calibration(
        hessians=normalised,
        positions={n: positions[n] for n in normalised},
        scales=scales,
        order=tuple(order),
        missing=tuple(missing),
    )
    return plan, calibration


def normalise(hessian: Tensor) -> tuple[Tensor, float]:
    """H divided by its mean diagonal, and that scale: the OBS solution does not change, and a float32 solve
    cannot overflow.

    Inputs of magnitude 1e20 are finite in float32, but their squares are not; the layer
    error is scaled back in the report.
    """
    diag = torch.diagonal(hessian, dim1=-2, dim2=-1)
    scale = float(diag.mean()) if hessian.numel() else 1.0
    if not (scale > 0 and math.isfinite(scale)):
        scale = 1.0
    return hessian / scale, scale


def drop_uncalled(plan: Plan, missing: Sequence[str]) -> Plan:
    """Layers the forward never called: an error when named exactly (or when it is every layer), else left dense
    with a warning."""
    if not missing:
        return plan
    named = [n for n in missing if n in plan.explicit]
    if named or len(missing) == len(plan.layers):
        raise RuntimeError(
            f"layers {list(missing)} were never called during calibration, so they have no Hessian; exclude "
            "them or check forward_fn (the model must call these modules on the calibration batches)."
        )
    reasons = {n: "never called by the model's forward on the calibration batches" for n in missing}
    warn_skipped(reasons)
    return plan.without(reasons)


def collect_hessians(  # noqa: PLR0913 - eight inputs of one streaming pass, each used once
    model: nn.Module,
    batches: Sequence[Any],
    modules: Mapping[str, nn.Module],
    options: CalibrationOptions,
    run: Callable[[Any], Any],
    rank: RankInfo,
    progress: PhaseProgress,
    owners: Mapping[str, int] | None = None,
) -> tuple[dict[str, Tensor], dict[str, float], list[str], list[str]]:
    """Stream H for ``modules`` over ``batches`` (summed over ranks; with ``owners``, onto each layer's owner only).

    Returns the Hessians and output positions per sample of the layers that were called, the
    call order, and the layers never called (on any rank). A Hessian another rank owns is a meta tensor of its
    shape. Each accumulator's sum is freed as its Hessian is taken, so the two are not held at once.
    """
    samples: dict[str, float] = {n: 0 for n in modules}
    order: list[str] = []
    handles = []

    def make_hook(name: str):  # noqa: ANN202 - closure
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            samples[name] += samples_in(module, x)
            if name not in order:
                order.append(name)

        return hook

    collector = HessianCollector(
        modules,
        dtype=options.hessian_dtype,
        max_chunk_elements=options.max_chunk_elements,
        position_stride=options.position_stride,
    )
    with fail_together(rank, model_device(model), "calibration"):  # before the all-reduces below
        try:
            for n, m in modules.items():
                handles.append(m.register_forward_pre_hook(make_hook(n), with_kwargs=True))
            with collector:
                for i, batch in enumerate(batches):
                    run(batch)
                    progress.step(str(i), "")
        finally:
            for h in handles:
                h.remove()
    samples = reduce_calibration(collector, samples, rank, model_device(model), owners)
    missing = [n for n in modules if samples[n] == 0]
    called = [n for n in modules if samples[n] > 0]
    # Finishing the Hessians is d^2 work per layer (seconds in all for wide convolutions): counted per layer, as
    # a second stretch of the phase (the caller normalises them and finishes each layer's step).
    progress.begin("calibrate", {n: float(collector.accumulators[n].sum.numel()) for n in called})
    positions = {n: collector.accumulators[n].count / samples[n] for n in called}
    hessians = {}
    for n in called:
        acc = collector.accumulators[n]
        hessians[n] = acc.sum if acc.released else acc.hessian()  # released: reduced to its owner rank
        acc.release()  # its sums, before the next layer's Hessian is made
        progress.advance(n, 0.5, n)
    return hessians, positions, order, missing
