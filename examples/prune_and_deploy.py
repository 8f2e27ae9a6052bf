"""One-shot pruning without a Trainer, then deployment: ``prune_model`` to a 2:4 pattern, the sparse file, inference.

    python examples/prune_and_deploy.py                  # LeNet-300-100 on MNIST, 2:4, writes runs/lenet300_2to4.lobs

1. ``prune_model(model, calibration_batches, sparsity, method, pattern="2:4")`` prunes a trained network in place
   (every 4 consecutive inputs of a row keep 2) and returns a ``PruneReport``.
2. ``save_sparse(model, path, report.masks)`` writes only the kept weights and the masks; ``load_sparse`` reads them
   into a network of the same architecture and returns the masks (``info.mask_set()``, to retrain it with them held).
3. ``to_sparse_inference(model)`` returns a copy whose layers run sparse kernels where that is faster.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import torch
from lobs_lab.harness import train_epochs
from lobs_lab.metrics import tensor_accuracy, weight_sparsity
from lobs_lab.mnist import load_mnist
from lobs_lab.models import lenet300_100

from lightning_lobs import load_sparse, prune_model, save_sparse, to_sparse_inference


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train briefly, prune 2:4 one-shot, save, load, run sparse; print and return the accuracies and file size."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3, help="dense training epochs")
    p.add_argument("--pattern", default="2:4", help="N:M pattern")
    p.add_argument("--out", default=os.path.join("runs", "lenet300_2to4.lobs"), help="the sparse file")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    splits = load_mnist()
    model = lenet300_100()
    train_epochs(model, splits.train_x, splits.train_y, args.epochs, seed=0, batch=128)
    dense_acc = tensor_accuracy(model, splits.test_x, splits.test_y)

    calibration = [splits.train_x[i : i + 256] for i in range(0, 2048, 256)]  # inputs only: the model takes x
    n, m = (int(k) for k in args.pattern.split(":"))
    report = prune_model(model, calibration, 1 - n / m, "auto", pattern=args.pattern, prune_head=True)
    pruned_acc = tensor_accuracy(model, splits.test_x, splits.test_y)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_sparse(model, args.out, report.masks)
    fresh = lenet300_100()
    info = load_sparse(fresh, args.out)  # info.mask_set().attach(fresh, optimizer) would hold them through retraining
    masks_back = set(info.masks) == set(report.masks) and all(
        torch.equal(info.masks[name], report.masks[name].cpu()) for name in report.masks
    )
    fast = to_sparse_inference(fresh.eval())
    with torch.no_grad():
        same = torch.allclose(fast(splits.test_x[:256]), model(splits.test_x[:256]), atol=1e-5)

    result = {
        "dense_acc": dense_acc,
        "pruned_acc": pruned_acc,
        "sparsity": weight_sparsity(model),
        "file_bytes": os.path.getsize(args.out),
        "loaded_model_agrees": same,
        "masks_back": masks_back,
    }
    print(
        f"dense {dense_acc:.4f} -> {args.pattern} {pruned_acc:.4f} (sparsity {result['sparsity']:.3f}); "
        f"{args.out}: {result['file_bytes']:,} bytes; sparse inference agrees with the pruned model: {same}; "
        f"the masks came back with the file: {masks_back}"
    )
    return result


if __name__ == "__main__":
    main()
