"""Prune LeNet-5 (Caffe's, as in Han et al. 2015 and the L-OBS paper) on real MNIST with LOBSPruning.

    python examples/lenet5_mnist.py                 # defaults: keep 7% of the weights
    python examples/lenet5_mnist.py --conv-relu     # add a ReLU after each conv block

Same pipeline, CLI and outputs as ``examples/lenet300_mnist.py`` (whose ``run`` driver this script
reuses): dense training, L-OBS pruning at the start of epoch ``--epochs``, one-shot accuracy,
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

import argparse
import logging
import os
import sys
from typing import Any, Dict, Optional, Sequence

# The shared driver and the demo data/models live next to this file (on sys.path when it runs as a script;
# the insert covers loading it by path). lenet300_mnist also makes lightning_lobs importable from a checkout.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lenet300_mnist import _validate, build_parser, run  # noqa: E402
from mnist_data import lenet5  # noqa: E402

#: Han et al. (2015), Table 3: fraction of weights kept per layer of LeNet-5 (conv1, conv2, fc1, fc2).
LENET5_KEEP_PROFILE = (0.66, 0.12, 0.08, 0.19)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = build_parser(
        "lenet5",
        "Prune LeNet-5 on MNIST with L-OBS (LOBSPruning).",
        defaults={"epochs": 15, "retrain_epochs": 5},
    )
    parser.add_argument("--conv-relu", action="store_true", help="add a ReLU after each conv+pool block")
    args: argparse.Namespace = parser.parse_args(argv)
    _validate(args, parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    return run(args, "LeNet-5", lambda: lenet5(conv_relu=args.conv_relu), LENET5_KEEP_PROFILE)


if __name__ == "__main__":
    main()
