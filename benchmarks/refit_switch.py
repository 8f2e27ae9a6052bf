"""Where ``lobs``/``fast`` switch from the direct per-row refit to the batched CG refit: both timed on one layer.

    OMP_NUM_THREADS=1 python benchmarks/refit_switch.py --layers 8x16,32x32,64x64,128x128,100x300,300x784,768x768 \
        --sparsities 0.5,0.7,0.9

For each LLM-like layer (``admm_vs_peers.llm_layer``: correlated inputs, 1% outlier channels, 2,048 tokens) and
sparsity, SparseGPT's mask (``fast`` with ``refit=False``) is refitted by :func:`lightning_lobs.solvers.refit` (one
Cholesky per row) and by :func:`lightning_lobs.solvers.cg.cg_refit` warm-started from the sweep with ``fast``'s
defaults (``FAST_REFIT_RTOL``, ``FAST_REFIT_ITERATIONS``), float32, one torch thread; the best of two runs each.
Printed: both times, the CG's layer error relative to the direct solve's, and what ``refit_plan`` picks.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from admm_vs_peers import llm_layer  # noqa: E402
from lightning_lobs.solvers import SolverOptions, layer_error, refit, solve_layer  # noqa: E402
from lightning_lobs.solvers.cg import cg_refit  # noqa: E402
from lightning_lobs.solvers.core import FAST_REFIT_ITERATIONS, FAST_REFIT_RTOL, refit_flops, refit_plan  # noqa: E402


def best(fn: Callable[[], torch.Tensor], runs: int = 2) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    assert out is not None
    return min(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="8x16,32x32,64x64,128x128,100x300,300x784,768x768")
    p.add_argument("--sparsities", default="0.5,0.7,0.9")
    args = p.parse_args()
    torch.set_num_threads(1)
    for layer in args.layers.split(","):
        rows, d = (int(v) for v in layer.split("x"))
        W, H = llm_layer(rows, d, 2048, 0)
        Hf = H.float()
        for sparsity in (float(v) for v in args.sparsities.split(",")):
            sweep = solve_layer(W, Hf, sparsity, method="fast", solver=SolverOptions(refit=False))
            mask = sweep.mask
            t_direct, direct = best(lambda: refit(W, Hf, mask))
            t_cg, cg = best(
                lambda: cg_refit(W, Hf, mask, x0=sweep.weight, rtol=FAST_REFIT_RTOL, maxiter=FAST_REFIT_ITERATIONS)
            )
            excess = layer_error(W, cg, H) / layer_error(W, direct, H) - 1
            plan = refit_plan(SolverOptions(), rows, d, refit_flops(mask))
            print(
                f"{rows}x{d} {sparsity:.2f}: direct {t_direct:.4f} s  cg {t_cg:.4f} s  cg error / direct - 1 "
                f"{excess:+.1e}  refit_plan -> {plan}",
                flush=True,
            )


if __name__ == "__main__":
    main()
