"""Prune-then-retrain runs shared by the deep examples (ResNet, GPT-2): ``LOBSPruning`` for the OBS methods,
:class:`BaselinePruning` for magnitude and Wanda, one-shot points with ``prune_model``, and what both record.

The baselines are the pure functions of :mod:`lobs_lab.baselines` (magnitude layer-wise/global, Wanda, N:M), applied
as a :class:`lightning_lobs.MaskSet`, so retraining holds their masks exactly as it holds ``LOBSPruning``'s.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor, nn

from lightning_lobs import LOBSPruning, MaskSet, PruneReport, prune_model
from lightning_lobs.batchnorm import recalibrate_batchnorm
from lightning_lobs.layers import from_rows as _from_rows
from lightning_lobs.layers import to_rows
from lobs_lab.baselines import magnitude_masks, mask_from_scores, nm_mask_from_scores, wanda_scores
from lobs_lab.harness import quiet_trainer
from lobs_lab.metrics import masks_held, zero_fraction

#: An N:M pattern as ``(n, m)``: keep ``n`` of every ``m`` consecutive inputs.
Pattern = tuple[int, int]

OBS_METHODS = ("auto", "exact", "fast", "lobs")
BASELINES = ("magnitude_global", "magnitude_layer", "wanda")

# --------------------------------------------------------------------------- layers and their (rows, d) view


def rows_view(module: nn.Module, weight: Tensor) -> Tensor:
    """``weight`` (or a tensor of its shape) as ``(out, d)`` with N:M groups along inputs (conv: input channels last)."""
    if weight.dim() > 2:  # conv (out, in, *k) -> (out, *k, in): consecutive columns are input channels
        return weight.movedim(1, -1).reshape(weight.shape[0], -1)
    return to_rows(module, weight)  # Linear, or transformers' Conv1D (stored transposed)


def from_rows(module: nn.Module, rows: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`rows_view`."""
    if len(shape) > 2:
        k = shape[2:]
        return rows.reshape(shape[0], *k, shape[1]).movedim(-1, 1).contiguous()
    return _from_rows(module, rows).contiguous()


def _input_sq_norms(module: nn.Module, x: Tensor) -> Tensor:
    """Sum over samples/positions of each input column's square, in the layout of ``module.weight``'s columns."""
    x = x.detach().double()
    if isinstance(module, nn.Conv2d):
        cols = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.pow(2).sum(dim=(0, 2)).reshape(module.in_channels, *module.kernel_size)  # (in, kh, kw)
    return x.reshape(-1, x.shape[-1]).pow(2).sum(dim=0)


def collect_input_norms(
    model: nn.Module, names: Sequence[str], batches: Sequence[Any], run: Callable[[Any], Any]
) -> dict[str, Tensor]:
    """Wanda's ``||X_j||^2`` for every layer in ``names`` from one no-grad pass over ``batches`` (eval mode)."""
    modules = dict(model.named_modules())
    sums: dict[str, Tensor] = {}
    handles = []
    for n in names:

        def hook(mod: nn.Module, args: tuple[Any, ...], name: str = n) -> None:
            s = _input_sq_norms(mod, args[0])
            sums[name] = sums[name] + s if name in sums else s

        handles.append(modules[n].register_forward_pre_hook(hook))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                run(b)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return sums


def report_summary(report: PruneReport) -> dict[str, Any]:
    """The numbers of a :class:`PruneReport` that the examples' JSON results keep."""
    return dict(
        prune_seconds=report.calibration_seconds + report.solve_seconds,
        calibration_seconds=report.calibration_seconds,
        solve_seconds=report.solve_seconds,
        report_sparsity=report.sparsity,
        bound=report.bound,
        bound_spectral=report.bound_spectral,
        bound_note=report.bound_note,
        output_error=report.output_error,
        model_output_error=report.model_output_error,
        methods_used=sorted({r.method for r in report.layers.values()}),
        layer_sparsity={n: r.sparsity for n, r in report.layers.items()},
        layer_error={n: r.layer_error for n, r in report.layers.items()},
        skipped=dict(report.skipped),
    )


def baseline_masks(
    model: nn.Module,
    names: Sequence[str],
    rule: str,
    sparsity: float | None,
    pattern: tuple[int, int] | None,
    norms: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Keep-masks (weight shape) of ``rule`` for the layers ``names``: ``magnitude_global``, ``magnitude_layer``, ``wanda``,
    or ``dense`` (all kept: the control that only retrains).

    Unstructured: magnitude through ``magnitude_masks`` (global threshold or every layer at ``sparsity``), Wanda per
    output row at ``sparsity`` (its paper's comparison group). With ``pattern=(n, m)`` every rule keeps the ``n``
    best of each ``m`` consecutive inputs (global and layer-wise magnitude are then the same mask).
    """
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight.detach() for n in names}
    if rule == "dense":  # the control: nothing pruned, retrained the same way
        return {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    out: dict[str, Tensor] = {}
    for n, w in weights.items():
        mod = modules[n]
        rows = rows_view(mod, w)
        if rule == "wanda":
            if norms is None:
                raise ValueError("wanda needs the input norms")
            colsq = norms[n]
            if colsq.dim() > 1:  # conv (in, kh, kw) -> the rows_view column order (kh, kw, in)
                colsq = colsq.movedim(0, -1)
            scores = wanda_scores(rows, torch.diag(colsq.reshape(-1)))
        elif rule.startswith("magnitude"):
            scores = rows.abs().double()
        else:
            raise ValueError(f"unknown baseline {rule!r}")
        if pattern is not None:
            out[n] = from_rows(mod, nm_mask_from_scores(scores, *pattern), w.shape)
        elif rule == "wanda":
            out[n] = from_rows(mod, mask_from_scores(scores, float(sparsity), "row"), w.shape)
    if pattern is None and rule.startswith("magnitude"):
        out = magnitude_masks(weights, float(sparsity), "global" if rule == "magnitude_global" else "layer")
    return {n: m.to(torch.bool) for n, m in out.items()}


# --------------------------------------------------------------------------- callbacks


class BaselinePruning(Callback):
    """At the start of epoch 0: compute masks with ``mask_fn(pl_module)``, write them, re-estimate BatchNorm, then hold
    them through retraining with a :class:`MaskSet` attached to the trainer's optimizers."""

    def __init__(self, mask_fn: Callable[[nn.Module], dict[str, Tensor]], bn_batches: Sequence[Any] = ()) -> None:
        self.mask_fn = mask_fn
        self.bn_batches = list(bn_batches)
        self.masks = MaskSet()
        self.seconds = math.nan

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != 0 or len(self.masks):
            return
        t0 = time.perf_counter()
        self.masks.update(self.mask_fn(pl_module))
        self.masks.attach(pl_module, trainer.optimizers)
        if self.bn_batches:  # the same re-estimation LOBSPruning does (recalibrate_bn=True)
            recalibrate_batchnorm(pl_module, self.bn_batches, lambda b: pl_module(b))
        self.seconds = time.perf_counter() - t0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.masks.detach()


class Probe(Callback):
    """Placed after the pruning callback: ``evaluate(pl_module)`` and the zeros right after the prune (one-shot)."""

    def __init__(self, evaluate: Callable[[nn.Module], dict[str, float]], names: Sequence[str]) -> None:
        self.evaluate = evaluate
        self.names = list(names)
        self.oneshot: dict[str, float] | None = None
        self.oneshot_zeros = math.nan
        self.t_pruned = math.nan

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 0 and self.oneshot is None:
            self.t_pruned = time.perf_counter()
            self.oneshot = self.evaluate(pl_module)
            self.oneshot_zeros = zero_fraction(pl_module, self.names)


def mask_dict(masks: MaskSet) -> dict[str, Tensor]:
    """A :class:`MaskSet`'s masks as a plain ``{layer name: keep-mask}``."""
    return {n: masks[n] for n in masks}


@dataclass(frozen=True)
class Setup:
    """What every point of a method comparison shares: the layers, the metric, the calibration data, the options.

    Attributes:
        names: the layers pruned (and counted for the zeros).
        evaluate: the metric, ``{name: value}`` of a module (test accuracy, perplexity, ...).
        calib_batches: calibration batches of ``LOBSPruning`` / ``prune_model`` (and Wanda's input norms).
        lobs_kwargs: further ``LOBSPruning`` / ``prune_model`` arguments (``exclude``, ``sequential``, ...).
        baseline_mask_fn: ``(module, rule, sparsity, pattern) -> keep-masks`` for the baselines.
        bn_batches: batches to re-estimate BatchNorm on after a baseline prune (LOBSPruning does its own).
    """

    names: Sequence[str]
    evaluate: Callable[[nn.Module], dict[str, float]]
    calib_batches: Sequence[Any]
    lobs_kwargs: Mapping[str, Any]
    baseline_mask_fn: Callable[[nn.Module, str, float | None, Pattern | None], dict[str, Tensor]] | None = None
    bn_batches: Sequence[Any] = ()


def _target(sparsity: float | None, pattern: Pattern | None) -> tuple[float, str | None]:
    """The library's ``(sparsity, pattern)`` arguments: an N:M pattern prunes ``1 - n / m`` of the weights."""
    if pattern is not None:
        return 1.0 - pattern[0] / pattern[1], f"{pattern[0]}:{pattern[1]}"
    return float(sparsity), None  # type: ignore[arg-type]


def _row(method: str, sparsity: float | None, pattern: Pattern | None) -> dict[str, Any]:
    return {"method": method, "sparsity": sparsity, "pattern": _target(sparsity, pattern)[1]}


def _baseline_sparsity(masks: Mapping[str, Tensor]) -> float:
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / sum(m.numel() for m in masks.values())


def run_prune_retrain(
    make_module: Callable[[], pl.LightningModule],
    method: str,
    setup: Setup,
    sparsity: float | None,
    pattern: Pattern | None,
    train_loader: Any,
    retrain_steps: int,
) -> dict[str, Any]:
    """One method at one sparsity: prune at the start of a ``Trainer.fit``, evaluate (one-shot), retrain
    ``retrain_steps`` steps with the masks held, evaluate again. Returns metrics, zeros and checks."""
    module = make_module()
    target, pattern_str = _target(sparsity, pattern)
    if method in OBS_METHODS:
        pruner: Callback = LOBSPruning(
            sparsity=target,
            prune_epoch=0,
            method=method,
            pattern=pattern_str,
            calibration_batches=len(setup.calib_batches),
            calibration_dataloader=list(setup.calib_batches),
            log_table=False,
            **setup.lobs_kwargs,
            prune_head=True,  # every layer, the output layer too, as the recorded results were made
        )
    else:
        assert setup.baseline_mask_fn is not None
        mask_fn = setup.baseline_mask_fn
        pruner = BaselinePruning(lambda m: mask_fn(m, method, sparsity, pattern), bn_batches=setup.bn_batches)
    probe = Probe(setup.evaluate, setup.names)
    trainer = quiet_trainer(
        max_steps=retrain_steps,
        max_epochs=1,
        limit_train_batches=retrain_steps,
        callbacks=[pruner, probe],  # hooks run in list order: the probe sees the pruned model
        limit_val_batches=0,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*left dense.*")
        trainer.fit(module, train_dataloaders=train_loader)
    t_fit = time.perf_counter() - t0
    retrained = setup.evaluate(module)
    out = _row(method, sparsity, pattern)
    if isinstance(pruner, LOBSPruning):
        report: PruneReport = pruner.last_report  # type: ignore[assignment]
        masks = mask_dict(report.masks)
        out.update(report_summary(report))
    else:
        masks = mask_dict(pruner.masks)
        out.update(prune_seconds=pruner.seconds, report_sparsity=_baseline_sparsity(masks))
    out.update(
        pruned_layers=sorted(masks),
        oneshot=probe.oneshot,
        oneshot_zeros=probe.oneshot_zeros,
        retrained=retrained,
        retrained_zeros=zero_fraction(module, masks),
        masks_held=masks_held(module, masks),
        retrain_steps=retrain_steps,
        fit_seconds=t_fit,
    )
    out["module"] = module  # removed by the caller before writing JSON
    return out


def strip_modules(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of result rows without the live modules."""
    return [{k: v for k, v in r.items() if k != "module"} for r in rows]


def oneshot_point(
    make_module: Callable[[], pl.LightningModule],
    method: str,
    setup: Setup,
    sparsity: float | None,
    pattern: Pattern | None,
) -> dict[str, Any]:
    """One method at one sparsity, one-shot only (no Trainer): ``prune_model`` for the OBS methods, the baseline
    masks (plus the same BatchNorm re-estimation) otherwise."""
    module = make_module()
    out = _row(method, sparsity, pattern)
    target, pattern_str = _target(sparsity, pattern)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*left dense.*")
        if method in OBS_METHODS:
            report = prune_model(
                module,
                list(setup.calib_batches),
                target,
                method,
                pattern=pattern_str,
                **setup.lobs_kwargs,
                prune_head=True,  # every layer, the output layer too, as the recorded results were made
            )
            masks = mask_dict(report.masks)
            out.update(report_summary(report))
        else:
            assert setup.baseline_mask_fn is not None
            masks = setup.baseline_mask_fn(module, method, sparsity, pattern)
            ms = MaskSet()
            ms.update(masks)
            ms.apply(module)
            if setup.bn_batches:
                recalibrate_batchnorm(module, list(setup.bn_batches), lambda b: module(b))
            out["report_sparsity"] = _baseline_sparsity(masks)
    out["prune_seconds"] = time.perf_counter() - t0
    out.update(
        pruned_layers=sorted(masks),
        oneshot=setup.evaluate(module),
        oneshot_zeros=zero_fraction(module, masks),
        masks_held=masks_held(module, masks),
        retrained=None,
    )
    out["module"] = module
    return out
