"""What pruning costs: calibration and solve times per method, against a dense training epoch,
a plain forward pass and the machine's GEMM rate.

    python benchmarks/cost.py --out benchmarks/results/cost.json

Real MNIST (lobs_lab.mnist.load_mnist); LeNet-300-100 and LeNet-5 trained briefly
(2 epochs) so that activations are realistic; every method prunes every layer to 90%
(``--allocation uniform``, the default here, so per-layer times are one solve each); with
``--allocation global`` the per-layer split is chosen first (exact's trace is then computed during the
allocation and reused by the solve, so the per-layer seconds no longer contain it; compare the totals).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch
from lobs_lab.harness import gemm_gflops
from lobs_lab.mnist import load_mnist, mnist_dataloaders
from lobs_lab.models import lenet5, lenet300_100
from torch import nn

from lightning_lobs import SolverOptions, prune_model
from lightning_lobs.hessian import HessianCollector
from lightning_lobs.layers import is_prunable
from lightning_lobs.solvers.core import cg_refit_flops, refit_plan


def train_epochs(model: nn.Module, loader, epochs: int, lr: float = 1e-3) -> float:
    """Plain training loop; returns the seconds of the LAST epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    last = 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        last = time.perf_counter() - t0
    model.eval()
    return last


def nominal_flops(method: str, rows: int, d: int, kept: float) -> float:
    """Nominal floating-point work of one layer solve (see BENCHMARKS.md for the counts)."""
    if method == "exact":
        # rank-1 downdates over the shrinking candidate set: 2 * rows * sum_t (d - t)^2 ~ 2/3 rows d^3,
        # plus the refit on the kept columns (rows * (kept d)^3 / 3).
        return 2 / 3 * rows * d**3 + rows * (kept * d) ** 3 / 3
    direct = rows * (kept * d) ** 3 / 3
    # SolverOptions(refit=None): the direct per-row solve where it is the cheaper, else the batched CG refit.
    kind = refit_plan(SolverOptions(), rows, d, direct)
    refit = direct if kind == "direct" else cg_refit_flops(rows, d)
    if method == "fast":
        # Cholesky (d^3/3), its inverse (~2 d^3/3), Cholesky of the inverse (d^3/3), 2 rows d^2 updates,
        # then the refit of the kept weights.
        return 4 / 3 * d**3 + 2 * rows * d**2 + refit
    # lobs: inverse (~d^3), then the refit of the kept weights.
    return d**3 + refit


def time_forward(model: nn.Module, batches, hessians: bool) -> float:
    modules = {n: m for n, m in model.named_modules() if is_prunable(m)}
    t0 = time.perf_counter()
    with torch.no_grad():
        if hessians:
            with HessianCollector(modules) as col:
                for x, _ in batches:
                    model(x)
            col.hessians()
        else:
            for x, _ in batches:
                model(x)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--calibration-batches", type=int, default=32)
    p.add_argument("--methods", default="lobs,exact,fast")
    p.add_argument("--nets", default="lenet300,lenet5")
    p.add_argument("--allocation", choices=["uniform", "global"], default="uniform")
    p.add_argument("--out", default="benchmarks/results/cost.json")
    args = p.parse_args()

    torch.manual_seed(0)
    splits = load_mnist(args.data_dir)
    gemm = gemm_gflops()
    gemm64 = gemm_gflops(dtype=torch.float64)  # the solvers' dtype
    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_avg_start": os.getloadavg(),
            "gemm_gflops_fp32_2048": gemm,
            "gemm_gflops_fp64_2048": gemm64,
        },
        "data": splits.source,
        "sparsity": args.sparsity,
        "allocation": args.allocation,
        "nets": {},
    }
    for net_name in args.nets.split(","):
        train, _ = mnist_dataloaders(splits, batch_size=128, flatten=False, seed=0)
        model = lenet300_100() if net_name == "lenet300" else lenet5()
        epoch_s = train_epochs(model, train, epochs=2)
        batches = [b for _, b in zip(range(args.calibration_batches), train)]
        fwd = min(time_forward(model, batches, False) for _ in range(3))
        cal = min(time_forward(model, batches, True) for _ in range(2))
        entry = {
            "dense_epoch_seconds": epoch_s,
            "forward_seconds": fwd,
            "calibration_forward_seconds": cal,
            "calibration_overhead_ratio": cal / fwd,
            "methods": {},
        }
        for method in args.methods.split(","):
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            report = prune_model(m, batches, args.sparsity, method, allocation=args.allocation, prune_head=True)
            total = time.perf_counter() - t0
            layers = {}
            flops = 0.0
            for name, layer in report.layers.items():
                rows, d = layer.shape[0], int(torch.tensor(layer.shape[1:]).prod()) + 1
                f = nominal_flops(layer.method, rows, d, 1 - layer.sparsity)
                flops += f
                layers[name] = {
                    "shape": list(layer.shape),
                    "seconds": layer.seconds,
                    "gflops_per_s": f / max(layer.seconds, 1e-9) / 1e9,
                    "layer_error": layer.layer_error,
                }
            entry["methods"][method] = {
                "calibration_seconds": report.calibration_seconds,
                "solve_seconds": report.solve_seconds,
                "prune_model_seconds": total,
                "solve_gflops_per_s": flops / max(report.solve_seconds, 1e-9) / 1e9,
                "solve_vs_gemm": flops / max(report.solve_seconds, 1e-9) / 1e9 / gemm,
                "solve_vs_gemm_fp64": flops / max(report.solve_seconds, 1e-9) / 1e9 / gemm64,
                "solve_over_dense_epoch": report.solve_seconds / epoch_s,
                "layers": layers,
            }
            print(
                f"{net_name:9s} {method:6s} calib {report.calibration_seconds:6.2f}s solve {report.solve_seconds:6.2f}s "
                f"({flops / max(report.solve_seconds, 1e-9) / 1e9:6.1f} GFLOP/s nominal, GEMM fp32 {gemm:.0f} fp64 {gemm64:.0f}) "
                f"dense epoch {epoch_s:.2f}s",
                flush=True,
            )
        results["nets"][net_name] = entry
    results["machine"]["load_avg_end"] = os.getloadavg()
    results["machine"]["gemm_gflops_fp32_2048_end"] = gemm_gflops()
    results["machine"]["gemm_gflops_fp64_2048_end"] = gemm_gflops(dtype=torch.float64)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
