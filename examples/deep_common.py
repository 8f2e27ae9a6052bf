"""Shared pieces of ``resnet_mnist.py`` and ``gpt2_stdlib.py``: the baseline masks, one prune-then-retrain run in a
Lightning ``Trainer`` (``LOBSPruning`` for the OBS methods, :class:`BaselinePruning` for magnitude and Wanda), peak
memory of a block of code, and the checks both examples write into their results.

The baselines are the pure functions of ``benchmarks/baselines.py`` (magnitude layer-wise/global, Wanda, N:M), applied
as a :class:`lightning_lobs.MaskSet`, so retraining holds their masks exactly as it holds ``LOBSPruning``'s.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor, nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_ROOT, os.path.join(_ROOT, "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from baselines import magnitude_masks, mask_from_scores, nm_mask_from_scores, wanda_scores  # noqa: E402

from lightning_lobs import LOBSPruning, MaskSet, PruneReport  # noqa: E402
from lightning_lobs.batchnorm import recalibrate_batchnorm  # noqa: E402
from lightning_lobs.layers import from_rows as _from_rows  # noqa: E402
from lightning_lobs.layers import to_rows  # noqa: E402

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


def collect_input_norms(model: nn.Module, names: Sequence[str], batches: Sequence[Any], run: Callable[[Any], Any]) -> Dict[str, Tensor]:
    """Wanda's ``||X_j||^2`` for every layer in ``names`` from one no-grad pass over ``batches`` (eval mode)."""
    modules = dict(model.named_modules())
    sums: Dict[str, Tensor] = {}
    handles = []
    for n in names:
        def hook(mod: nn.Module, args: Tuple[Any, ...], name: str = n) -> None:
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


def train_or_load(path: Optional[str], key: Mapping[str, Any], module: nn.Module,
                  train: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """Dense weights for ``module``: trained by ``train()`` (which returns what to record about the training), or
    loaded from ``path`` when it holds weights trained with the same ``key`` (every argument the training depends on).

    With ``path`` set, freshly trained weights are saved there, so the pruning part of a benchmark can be rerun
    without retraining. The returned record says which happened (``"dense_source"``)."""
    key = json.loads(json.dumps(dict(key), default=str))
    if path and os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved.get("key") == key:
            module.load_state_dict(saved["state"])
            return {**saved["info"], "dense_source": f"loaded from {path}"}
        warnings.warn(f"dense_cache={path!r} was trained with other settings; training again and overwriting it")
    info = train()
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save({"key": key, "state": module.state_dict(), "info": info}, path)
    return {**info, "dense_source": "trained in this run"}


def write_results(out: str, results: Dict[str, Any], plot: Callable[[str, Dict[str, Any]], None],
                  table: Callable[[Dict[str, Any]], str]) -> None:
    """``<out>.json`` and ``<out>.png`` of an example's results, and its table on stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    plot(out + ".png", results)
    print(table(results))


def report_summary(report: PruneReport) -> Dict[str, Any]:
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
    sparsity: Optional[float],
    pattern: Optional[Tuple[int, int]],
    norms: Optional[Mapping[str, Tensor]] = None,
) -> Dict[str, Tensor]:
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
    out: Dict[str, Tensor] = {}
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

    def __init__(self, mask_fn: Callable[[nn.Module], Dict[str, Tensor]], bn_batches: Sequence[Any] = ()) -> None:
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

    def __init__(self, evaluate: Callable[[nn.Module], Dict[str, float]], names: Sequence[str]) -> None:
        self.evaluate = evaluate
        self.names = list(names)
        self.oneshot: Optional[Dict[str, float]] = None
        self.oneshot_zeros = math.nan
        self.t_pruned = math.nan

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 0 and self.oneshot is None:
            self.t_pruned = time.perf_counter()
            self.oneshot = self.evaluate(pl_module)
            self.oneshot_zeros = zero_fraction(pl_module, self.names)


def zero_fraction(model: nn.Module, names: Iterable[str]) -> float:
    """Fraction of exact zeros over the weights of the layers ``names``."""
    modules = dict(model.named_modules())
    zeros = total = 0
    for n in names:
        w = modules[n].weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else math.nan


def masks_held(model: nn.Module, masks: Mapping[str, Tensor]) -> bool:
    """Every masked-out weight of ``model`` is exactly 0."""
    modules = dict(model.named_modules())
    return all(bool((modules[n].weight.detach()[~m.to(torch.bool)] == 0).all()) for n, m in masks.items())


def mask_dict(masks: MaskSet) -> Dict[str, Tensor]:
    return {n: masks[n] for n in masks}


def run_prune_retrain(
    make_module: Callable[[], pl.LightningModule],
    method: str,
    *,
    names: Sequence[str],
    evaluate: Callable[[nn.Module], Dict[str, float]],
    train_loader: Any,
    calib_batches: Sequence[Any],
    retrain_steps: int,
    sparsity: Optional[float],
    pattern: Optional[Tuple[int, int]],
    lobs_kwargs: Mapping[str, Any],
    baseline_mask_fn: Optional[Callable[[nn.Module, str], Dict[str, Tensor]]] = None,
    bn_batches: Sequence[Any] = (),
) -> Dict[str, Any]:
    """One method at one sparsity: prune at the start of a ``Trainer.fit``, evaluate (one-shot), retrain
    ``retrain_steps`` steps with the masks held, evaluate again. Returns metrics, zeros and checks."""
    module = make_module()
    if method in OBS_METHODS:
        pruner: Callback = LOBSPruning(
            sparsity=1.0 - pattern[0] / pattern[1] if pattern is not None else float(sparsity),
            prune_epoch=0,
            method=method,
            pattern=f"{pattern[0]}:{pattern[1]}" if pattern is not None else None,
            calibration_batches=len(calib_batches),
            calibration_dataloader=list(calib_batches),
            log_table=False,
            **lobs_kwargs,
            prune_head=True,  # every layer, the output layer too, as the recorded results were made
        )
    else:
        assert baseline_mask_fn is not None
        pruner = BaselinePruning(lambda m: baseline_mask_fn(m, method), bn_batches=bn_batches)
    probe = Probe(evaluate, names)
    trainer = pl.Trainer(
        max_steps=retrain_steps,
        max_epochs=1,
        limit_train_batches=retrain_steps,
        callbacks=[pruner, probe],  # hooks run in list order: the probe sees the pruned model
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*left dense.*")
        trainer.fit(module, train_dataloaders=train_loader)
    t_fit = time.perf_counter() - t0
    retrained = evaluate(module)
    out: Dict[str, Any] = {"method": method, "sparsity": sparsity, "pattern": None if pattern is None else f"{pattern[0]}:{pattern[1]}"}
    if isinstance(pruner, LOBSPruning):
        report: PruneReport = pruner.last_report  # type: ignore[assignment]
        masks = mask_dict(report.masks)
        out.update(report_summary(report))
    else:
        masks = mask_dict(pruner.masks)
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        out.update(prune_seconds=pruner.seconds, report_sparsity=1.0 - kept / total)
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


# --------------------------------------------------------------------------- memory, machine


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory while the ``with`` block runs, above the RSS at its start (sampled every 2 ms by a thread;
    torch ops release the GIL, so the sampler runs during them). Linux only (``/proc/self/statm``)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self.seconds = math.nan
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = _rss_bytes()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak = max(self.peak, _rss_bytes())
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self._t0

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def machine_info() -> Dict[str, Any]:
    """CPU model, cores, load average, versions, torch threads."""
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        model = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        pass
    import transformers  # noqa: F401 - version only

    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def strip_modules(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Copies of result rows without the live modules."""
    return [{k: v for k, v in r.items() if k != "module"} for r in rows]


def oneshot_point(
    make_module: Callable[[], pl.LightningModule],
    method: str,
    *,
    names: Sequence[str],
    evaluate: Callable[[nn.Module], Dict[str, float]],
    calib_batches: Sequence[Any],
    sparsity: Optional[float],
    pattern: Optional[Tuple[int, int]],
    lobs_kwargs: Mapping[str, Any],
    baseline_mask_fn: Optional[Callable[[nn.Module, str], Dict[str, Tensor]]] = None,
    bn_batches: Sequence[Any] = (),
) -> Dict[str, Any]:
    """One method at one sparsity, one-shot only (no Trainer): ``prune_model`` for the OBS methods, the baseline
    masks (plus the same BatchNorm re-estimation) otherwise."""
    from lightning_lobs import prune_model

    module = make_module()
    out: Dict[str, Any] = {"method": method, "sparsity": sparsity, "pattern": None if pattern is None else f"{pattern[0]}:{pattern[1]}"}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*left dense.*")
        if method in OBS_METHODS:
            report = prune_model(
                module,
                list(calib_batches),
                1.0 - pattern[0] / pattern[1] if pattern is not None else float(sparsity),
                method,
                pattern=f"{pattern[0]}:{pattern[1]}" if pattern is not None else None,
                **lobs_kwargs,
                prune_head=True,  # every layer, the output layer too, as the recorded results were made
            )
            masks = mask_dict(report.masks)
            out.update(report_summary(report))
        else:
            assert baseline_mask_fn is not None
            masks = baseline_mask_fn(module, method)
            ms = MaskSet()
            ms.update(masks)
            ms.apply(module)
            if bn_batches:
                recalibrate_batchnorm(module, list(bn_batches), lambda b: module(b))
            kept = sum(int(m.sum()) for m in masks.values())
            out["report_sparsity"] = 1.0 - kept / sum(m.numel() for m in masks.values())
    out["prune_seconds"] = time.perf_counter() - t0
    out.update(
        pruned_layers=sorted(masks),
        oneshot=evaluate(module),
        oneshot_zeros=zero_fraction(module, masks),
        masks_held=masks_held(module, masks),
        retrained=None,
    )
    out["module"] = module
    return out
