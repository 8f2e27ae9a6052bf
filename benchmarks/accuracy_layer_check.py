"""Layer-wise diagnostic for the accuracy benchmark: each solver's own objective against magnitude pruning.

    python benchmarks/accuracy_layer_check.py [--nets lenet300,lenet5] [--sparsities 0.8,0.93] [--seed 0]

Trains the dense net with the benchmark's recipe (``benchmarks/accuracy.py``, same seed -> same
weights), collects every layer's input Hessian on the same calibration batches (dense inputs, as
``LOBSPruning`` does by default) and reports, per layer and sparsity, the layer error
``dE = 1/2 sum_rows (w^ - w) H (w^ - w)^T`` (``lightning_lobs.solvers.layer_error``) of:

* ``magnitude``: keep the largest |w| of the layer, no update (what ModelPruning l1 layer-wise does);
* ``magnitude+refit``: the same mask, kept weights refitted to the least-squares optimum;
* ``lobs`` / ``exact`` / ``fast`` from ``solve_layer`` with ``refit=True`` (the library defaults on these
  layers: lobs's mask compensated jointly, SparseGPT's mask refitted), and ``lobs-literal`` /
  ``fast-literal`` with ``refit=False`` (the paper's one-by-one stale corrections; SparseGPT as published).

Every OBS method minimises dE, so a method whose dE is above plain magnitude's has a weaker
layer-wise solution than not solving at all. No test data is used.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import torch
from lobs_lab.harness import csv_list
from torch.utils.data import DataLoader

import accuracy as A  # benchmarks/accuracy.py, beside this script (its folder is on sys.path when run as one)
from lightning_lobs.hessian import HessianCollector
from lightning_lobs.layers import has_bias, weight_matrix
from lightning_lobs.solvers import SolverOptions, layer_error, magnitude_mask, refit, solve_layer

#: column -> (solve_layer method, SolverOptions.refit)
VARIANTS = {
    "lobs": ("lobs", True),
    "lobs-literal": ("lobs", False),
    "exact": ("exact", None),
    "fast": ("fast", True),
    "fast-literal": ("fast", False),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nets", type=csv_list(str), default=["lenet300", "lenet5"])
    p.add_argument("--sparsities", type=csv_list(float), default=[0.8, 0.93])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "accuracy_layer_check.json"))
    cli = p.parse_args()
    args = A.build_parser().parse_args([])
    A.configure(args)
    splits = A.load_mnist(args.data_dir, split_seed=args.split_seed)
    calib = DataLoader(
        A.mnist_dataloaders(splits, args.batch_size)[0].dataset, batch_size=args.batch_size, shuffle=False
    )
    batches = [b for _, b in zip(range(args.calibration_batches), calib)]
    rows = []
    for net_name in cli.nets:
        dense = A.train_dense(net_name, cli.seed, splits, args)
        net = A.NETS[net_name]()
        net.load_state_dict(dense["state"])
        net.eval()
        layers = dict(A.prunable_layers(net))
        with torch.no_grad(), HessianCollector(layers) as col:
            for x, _ in batches:
                net(x)
        hessians = col.hessians()
        opts = SolverOptions()
        for name, m in layers.items():
            H = hessians[name]
            W = m.weight.detach()
            b = m.bias.detach() if has_bias(m) else None
            Wm = weight_matrix(m).double()  # (out, d [+1]) with the bias column last
            frozen = 1 if b is not None else 0
            for s in cli.sparsities:
                keep = magnitude_mask(Wm.float(), s, frozen=frozen)
                mag = Wm * keep
                mag_refit = refit(Wm, H, keep, opts).double()
                row = {
                    "net": net_name,
                    "seed": cli.seed,
                    "layer": name,
                    "shape": list(W.shape),
                    "sparsity": s,
                    "dE": {"magnitude": layer_error(Wm, mag, H), "magnitude+refit": layer_error(Wm, mag_refit, H)},
                    "seconds": {},
                }
                for column, (method, with_refit) in VARIANTS.items():
                    t0 = time.perf_counter()
                    res = solve_layer(W, H, s, method, bias=b, solver=replace(opts, refit=with_refit))
                    row["seconds"][column] = time.perf_counter() - t0
                    row["dE"][column] = res.error  # with the undamped H, like layer_error
                rows.append(row)
                print(
                    f"{net_name} {name:>3} {str(list(W.shape)):>16} s={s:.2f} "
                    + " ".join(f"{k}={v:.4g}" for k, v in row["dE"].items()),
                    flush=True,
                )
    with open(cli.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {cli.out}")


if __name__ == "__main__":
    main()
