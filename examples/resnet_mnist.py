"""A ResNet-20-style network (BatchNorm, residual additions) on the full MNIST, pruned with LOBSPruning against
magnitude (global and layer-wise) and Wanda, one-shot and after a short retraining with the masks held.

    python examples/resnet_mnist.py --quick                          # smoke run, well under a minute
    python examples/resnet_mnist.py --out benchmarks/results/resnet_mnist   # the benchmark (BENCHMARKS.md)

The net: a 3x3 stem (stride 2: 28 -> 14 pixels, which cuts the cost 4x on a CPU), three stages of ``--blocks`` basic
blocks (two 3x3 convs with BatchNorm, identity shortcut; the first block of stages 2 and 3 halves the map with
stride 2 and its shortcut subsamples and zero-pads the channels: ResNet's "option A", no parameters), widths
``w, 2w, 4w``, global average pooling and a Linear classifier. With 3 blocks that is ResNet-20's depth.

Dense training: ``--epochs`` epochs of SGD (momentum 0.9, nesterov, weight decay 5e-4) with a one-cycle learning rate
peaking at ``--lr``, in a Lightning ``Trainer``. Then, from the dense weights, every method at every sparsity:

* ``auto``, ``exact``, ``fast``, ``lobs`` with the library's defaults (global allocation over the layers, BatchNorm
  re-estimated on the calibration batches); at ``--retrain-at`` sparsities and 2:4 through ``LOBSPruning(prune_epoch=0)``
  in a Trainer that then retrains ``--retrain-steps`` steps with the masks held, elsewhere with ``prune_model``;
* ``magnitude_global`` (one threshold over all layers), ``magnitude_layer`` (every layer at the target), ``wanda``
  (``|w| * ||x||`` per output row, input norms from the same calibration batches), from ``lobs_lab.baselines``,
  written as a ``MaskSet`` (held through retraining the same way), BatchNorm re-estimated the same way.

The stem conv (one input channel: it cannot hold 2:4) is left dense for every method. The test set is used for
reporting only. Results: ``<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from lobs_lab.harness import figure, fit_quietly, machine_info, quiet_trainer, train_or_load, write_results
from lobs_lab.metrics import accuracy
from lobs_lab.mnist import load_mnist
from lobs_lab.models import ResNet, ResNetClassifier
from lobs_lab.prune_retrain import (
    BASELINES,
    OBS_METHODS,
    Setup,
    baseline_masks,
    collect_input_norms,
    oneshot_point,
    run_prune_retrain,
    strip_modules,
)
from lobs_lab.tables import accuracy_table
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

log = logging.getLogger("lightning_lobs.examples.resnet")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "mnist")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: tiny net, 2,048 train / 1,000 test images, few steps"
    )
    p.add_argument("--data-dir", default=DEFAULT_DATA, help="the MNIST idx files (full MNIST)")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--blocks", type=int, default=3, help="basic blocks per stage (3: ResNet-20)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2, help="peak of the one-cycle schedule")
    p.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95")
    p.add_argument("--retrain-at", default="0.9", help="sparsities (and always 2:4) retrained after the one-shot prune")
    p.add_argument("--retrain-steps", type=int, default=100)
    p.add_argument("--retrain-lr", type=float, default=0.01)
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--methods", default=",".join(OBS_METHODS + BASELINES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("runs", "resnet_mnist"), help="writes <out>.json and <out>.png")
    p.add_argument(
        "--dense-cache",
        default=None,
        metavar="PT",
        help="save the dense weights here, or load them if this file was trained with the same settings",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.blocks, args.epochs = 4, 1, 1
        args.sparsities, args.retrain_at, args.retrain_steps, args.calibration_batches = "0.8", "0.8", 3, 2
        args.batch_size = 64
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the dense ResNet, compare the methods, write ``<out>.json`` and ``<out>.png``, print the table."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s")
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True)
    t_total = time.perf_counter()

    splits = load_mnist(args.data_dir)
    train_ds = TensorDataset(splits.train_x, splits.train_y)
    test_ds = TensorDataset(splits.test_x, splits.test_y)
    if args.quick:
        train_ds, test_ds = Subset(train_ds, range(2048)), Subset(test_ds, range(1000))
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, generator=gen)
    test_loader = DataLoader(test_ds, batch_size=1000)
    # Fixed calibration batches (images only): the first training images in their stored order.
    calib = [x for x, _ in DataLoader(train_ds, batch_size=args.batch_size)][: args.calibration_batches]
    calib = [b[0] if isinstance(b, (list, tuple)) else b for b in calib]

    # ---------------------------------------------------------------- dense training
    steps_per_epoch = len(train_loader)
    dense = ResNetClassifier(ResNet(args.width, args.blocks), lr=args.lr, total_steps=args.epochs * steps_per_epoch)

    def train() -> dict[str, Any]:
        return {"dense_train_s": fit_quietly(quiet_trainer(max_epochs=args.epochs), dense, train_loader)}

    training_key = {k: getattr(args, k) for k in ("width", "blocks", "epochs", "batch_size", "lr", "seed", "quick")}
    training = train_or_load(args.dense_cache, {**training_key, "data": splits.source}, dense, train)
    dense_acc = accuracy(dense, test_loader)
    log.info(
        "dense ResNet: test accuracy %.4f after %d epochs (%.0f s)", dense_acc, args.epochs, training["dense_train_s"]
    )
    names = [n for n, m in dense.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != "net.stem"]
    rows = compare(args, dense, names, calib, train_loader, test_loader)
    n_weights = sum(p.numel() for n, p in dense.named_parameters() if n.endswith("weight") and p.dim() > 1)
    results = {
        "name": "ResNet on MNIST",
        "command": " ".join(
            [os.path.basename(sys.executable), "examples/resnet_mnist.py"]
            + list(argv if argv is not None else sys.argv[1:])
        ),
        "args": vars(args),
        "data_source": splits.source,
        "num_train": len(train_ds),
        "num_test": len(test_ds),
        "net": {
            "width": args.width,
            "blocks": args.blocks,
            "depth": 6 * args.blocks + 2,
            "parameters": sum(p.numel() for p in dense.parameters()),
            "weights": n_weights,
            "pruned_layers": names,
        },
        "dense_acc": dense_acc,
        "dense_train_s": training["dense_train_s"],
        "dense_source": training["dense_source"],
        "steps_per_epoch": steps_per_epoch,
        "rows": strip_modules(rows),
        "machine": machine_info(),
        "total_s": time.perf_counter() - t_total,
    }
    write_results(args.out, results, _plot, table)
    return results


def compare(
    args: argparse.Namespace,
    dense: ResNetClassifier,
    names: list[str],
    calib: list[Tensor],
    train_loader: DataLoader,
    test_loader: DataLoader,
) -> list[dict[str, Any]]:
    """Every method at every sparsity and 2:4, each from the dense weights: one-shot, or pruned and retrained."""
    dense_state = copy.deepcopy(dense.state_dict())

    def make_module() -> ResNetClassifier:
        m = ResNetClassifier(ResNet(args.width, args.blocks), lr=args.retrain_lr)
        m.load_state_dict(dense_state)
        return m

    def evaluate(module: nn.Module) -> dict[str, float]:
        return {"acc": accuracy(module, test_loader)}

    def mask_fn(
        module: nn.Module, rule: str, sparsity: float | None, pattern: tuple[int, int] | None
    ) -> dict[str, Tensor]:
        norms = collect_input_norms(module, names, calib, lambda b: module(b)) if rule == "wanda" else None
        return baseline_masks(module, names, rule, sparsity, pattern, norms)

    setup = Setup(
        names=names,
        evaluate=evaluate,
        calib_batches=calib,
        lobs_kwargs={"exclude": ["net.stem"]},
        baseline_mask_fn=mask_fn,
        bn_batches=calib,
    )
    retrain_at = {float(s) for s in args.retrain_at.split(",") if s}
    specs: list[tuple[float | None, tuple[int, int] | None]] = [(float(s), None) for s in args.sparsities.split(",")]
    specs.append((None, (2, 4)))
    rows: list[dict[str, Any]] = []
    for sparsity, pattern in specs:
        for method in [m for m in args.methods.split(",") if m]:
            if pattern is not None or sparsity in retrain_at:
                row = run_prune_retrain(make_module, method, setup, sparsity, pattern, train_loader, args.retrain_steps)
            else:
                row = oneshot_point(make_module, method, setup, sparsity, pattern)
            rows.append(row)
            log.info(
                "%-16s %-5s one-shot %.4f retrained %s zeros %.4f (%.1fs)",
                method,
                pattern and "2:4" or f"{sparsity:.2f}",
                row["oneshot"]["acc"],
                row["retrained"] and f"{row['retrained']['acc']:.4f}",
                row["oneshot_zeros"],
                row["prune_seconds"],
            )
    return rows


def table(results: dict[str, Any]) -> str:
    """The dense accuracy and :func:`accuracy_table`."""
    return "\n".join([f"dense test accuracy {100 * results['dense_acc']:.2f}%", "", *accuracy_table(results["rows"])])


def _plot(path: str, results: dict[str, Any]) -> None:
    """One-shot test accuracy against the measured sparsity, one line per method."""
    with figure(path, figsize=(6.5, 4.2), dpi=110) as ax:
        for method in dict.fromkeys(r["method"] for r in results["rows"]):
            pts = sorted(
                (r["oneshot_zeros"], 100 * r["oneshot"]["acc"])
                for r in results["rows"]
                if r["method"] == method and not r["pattern"]
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method, ms=4)
        ax.axhline(100 * results["dense_acc"], color="gray", ls="--", label="dense")
        ax.set_xlabel("sparsity of the pruned layers (one-shot)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(max(0.0, min(100 * r["oneshot"]["acc"] for r in results["rows"]) - 2), 100)
        ax.set_title(
            f"ResNet-{results['net']['depth']} (width {results['net']['width']}) on MNIST, one-shot", fontsize=9
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


if __name__ == "__main__":
    main()
