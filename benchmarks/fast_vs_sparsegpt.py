"""The library's ``fast`` against a plain SparseGPT sweep on the same layer: time and layer error.

    OMP_NUM_THREADS=1 python benchmarks/fast_vs_sparsegpt.py --data-dir ../shared/data/mnist \
        --out benchmarks/results/fast_vs_sparsegpt.json

For each layer and target (50%, 90%, 2:4), on the same weight and Hessian, in float32 (the library's default solve
dtype, ``SolverOptions.dtype``, and the SparseGPT reference's):

* ``sparsegpt``: :func:`baselines.sparsegpt_sweep`, one sweep as the SparseGPT reference runs it (float32 inputs);
* ``fast``: ``solve_layer(method="fast")`` with the library defaults (the per-row minimum, and the refit of the
  kept weights where it is cheap: ``SolverOptions(refit=None)``);
* ``fast_norefit``: the same with ``SolverOptions(refit=False)``.

Times are the median of ``--repeats`` runs, interleaved so that load on the machine hits all three alike; the
ratio ``fast / sparsegpt`` is taken within each repeat. The error is L-OBS's ``dE = 1/2 sum (w^ - w) H (w^ - w)^T``
with the undamped H. Layers: LeNet-300-100's first layer (H from 4,096 MNIST training images, W from a net trained
for one epoch), and three transformer-shaped layers (GPT-2 width 768: attention output, MLP up, MLP down) with W
Gaussian and H from Gaussian inputs with a decaying spectrum (``x = z * 0.97^j``, mixed by a random rotation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lobs_lab import baselines as B
from torch import Tensor

from lightning_lobs import SolverOptions
from lightning_lobs.solvers import solve_layer

ROOT = Path(__file__).resolve().parents[1]

TARGETS: list[tuple[str, float | None, str | None]] = [("50%", 0.5, None), ("90%", 0.9, None), ("2:4", None, "2:4")]


def mnist_layer(data_dir: str | None) -> tuple[Tensor, Tensor]:
    """LeNet-300-100's fc1 after one epoch of Adam, and the Hessian of its inputs on 4,096 training images."""
    from lobs_lab.mnist import load_mnist
    from lobs_lab.models import lenet300_100

    splits = load_mnist(data_dir)
    torch.manual_seed(0)
    net = lenet300_100()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for i in range(0, splits.num_train, 128):
        loss = torch.nn.functional.cross_entropy(net(splits.train_x[i : i + 128]), splits.train_y[i : i + 128])
        opt.zero_grad()
        loss.backward()
        opt.step()
    X = splits.train_x[:4096].reshape(4096, -1).double()
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Linear))
    return first.weight.detach().double(), X.T @ X / X.shape[0]


def synthetic_layer(rows: int, d: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(4 * d, d, generator=g, dtype=torch.float64) * (0.97 ** torch.arange(d, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    X = Z @ Q
    return torch.randn(rows, d, generator=g, dtype=torch.float64) / d**0.5, X.T @ X / X.shape[0]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(name: str, W: Tensor, H: Tensor, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for label, sparsity, pattern in TARGETS:
        nm = (2, 4) if pattern else (0, 0)
        runs: dict[str, list[float]] = {"sparsegpt": [], "fast": [], "fast_norefit": []}
        errors: dict[str, float] = {}
        for _ in range(repeats):
            t, (V, _) = timed(lambda: B.sparsegpt_sweep(W.float(), H.float(), sparsity or 0.0, nm=nm))
            runs["sparsegpt"].append(t)
            errors["sparsegpt"] = B.layer_objective(W, V.double(), H)
            for key, refit in (("fast", None), ("fast_norefit", False)):
                t, res = timed(
                    lambda: solve_layer(
                        W.float(), H.float(), sparsity, "fast", pattern=pattern, solver=SolverOptions(refit=refit)
                    )
                )
                runs[key].append(t)
                errors[key] = B.layer_objective(W, res.weight.double(), H)
        ratio = statistics.median(f / s for f, s in zip(runs["fast"], runs["sparsegpt"]))
        ratio_nr = statistics.median(f / s for f, s in zip(runs["fast_norefit"], runs["sparsegpt"]))
        row = {
            "layer": name,
            "shape": list(W.shape),
            "target": label,
            "seconds": {k: statistics.median(v) for k, v in runs.items()},
            "all_seconds": runs,
            "fast_over_sparsegpt": ratio,
            "fast_norefit_over_sparsegpt": ratio_nr,
            "error": errors,
        }
        print(
            f"{name:18s} {label:4s} sparsegpt {row['seconds']['sparsegpt']:.3f}s  fast {row['seconds']['fast']:.3f}s "
            f"(x{ratio:.2f})  no refit {row['seconds']['fast_norefit']:.3f}s (x{ratio_nr:.2f})  "
            f"dE sparsegpt {errors['sparsegpt']:.4g} fast {errors['fast']:.4g} no refit {errors['fast_norefit']:.4g}",
            flush=True,
        )
        rows.append(row)
    return rows


def table(results: dict[str, Any]) -> str:
    lines = [
        "| layer | target | SparseGPT s | `fast` s (ratio) | `fast`, no refit s (ratio) | dE SparseGPT | dE `fast` | dE no refit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        s, e = r["seconds"], r["error"]
        lines.append(
            f"| {r['layer']} {tuple(r['shape'])} | {r['target']} | {s['sparsegpt']:.3f} | {s['fast']:.3f} "
            f"({r['fast_over_sparsegpt']:.2f}x) | {s['fast_norefit']:.3f} ({r['fast_norefit_over_sparsegpt']:.2f}x) | "
            f"{e['sparsegpt']:.4g} | {e['fast']:.4g} | {e['fast_norefit']:.4g} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fast_vs_sparsegpt.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    layers = [("lenet300.fc1", *mnist_layer(args.data_dir))]
    for name, rows, d, seed in (("attn.c_proj", 768, 768, 2), ("mlp.c_fc", 3072, 768, 3), ("mlp.c_proj", 768, 3072, 4)):
        layers.append((name, *synthetic_layer(rows, d, seed)))
    results: dict[str, Any] = {
        "command": "python benchmarks/fast_vs_sparsegpt.py " + " ".join(sys.argv[1:]),
        "rows": [],
        "machine": {
            "cpu": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg(),
        },
    }
    for name, W, H in layers:
        results["rows"] += measure(name, W, H, args.repeats)
    results["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
