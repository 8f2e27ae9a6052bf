"""Prune LeNet-5 (Caffe's, as in Han et al. 2015 and the L-OBS paper) on real MNIST with LOBSPruning.

    python examples/lenet5_mnist.py                 # defaults: keep 7% of the weights
    python examples/lenet5_mnist.py --conv-relu     # add a ReLU after each conv block

Same pipeline, CLI and outputs as ``examples/lenet300_mnist.py`` (both run
``lobs_lab.mnist_job.run``): dense training, L-OBS pruning at the start of epoch ``--epochs``, one-shot accuracy,
retraining with the masks held, an optional one-shot sweep with ``prune_model``, ``results.json``
and ``accuracy_vs_sparsity.png`` under ``--out`` (default ``runs/lenet5``).

Network: ``conv 1->20 k5, maxpool 2, conv 20->50 k5, maxpool 2, flatten, fc 800->500, ReLU,
fc 500->10`` (430,500 weights), a plain ``nn.Sequential`` so the error bound's chain analysis applies.

Per-layer sparsity: ``--allocation global`` (the default) lets ``LOBSPruning`` choose it from the
pooled OBS costs; ``--allocation paper`` uses Han et al. (2015)'s keep ratios for this net (conv1
66%, conv2 12%, fc1 8%, fc2 19%; 8.4% overall) scaled by one common factor to keep exactly
``1 - sparsity`` of all weights (at 0.93: conv1 45.2%, conv2 90.0%, fc1 93.4%, fc2 84.2%);
``--allocation uniform`` prunes every layer by ``--sparsity``.

The default ``auto`` method solves every layer with ``exact`` greedy OBS; fc1 (500 rows x 801
inputs) dominates the run time (tens of seconds per solve on one core, and the sweep solves it
six more times; ``--no-sweep`` skips that).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from lobs_lab.mnist_job import build_parser, parse_args, run
from lobs_lab.models import LENET5_KEEP_PROFILE, lenet5


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the command line, run the experiment, return what results.json holds."""
    parser = build_parser(
        "lenet5",
        "Prune LeNet-5 on MNIST with L-OBS (LOBSPruning).",
        defaults={"epochs": 15, "retrain_epochs": 5},
    )
    parser.add_argument("--conv-relu", action="store_true", help="add a ReLU after each conv+pool block")
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    return run(args, "LeNet-5", lambda: lenet5(conv_relu=args.conv_relu), LENET5_KEEP_PROFILE)


if __name__ == "__main__":
    main()
