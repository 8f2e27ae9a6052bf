"""Where the default prune's time goes on a small GPT-2: calibration (Hessians), the global allocation's curves, solves.

    OMP_NUM_THREADS=1 python benchmarks/prune_overheads.py --out benchmarks/results/prune_overheads

A GPT-2 built from its config (``lobs_lab.models.make_gpt2``: seeded random weights, byte vocabulary, ``--layers``
blocks of ``--width``), ``--sequences`` x ``--context`` random tokens of calibration, ``prune_model(model, batches,
--sparsity)`` with the defaults (``allocation="global"`` with error curves, ``method="auto"``) under cProfile, one
thread, once per ``--hessian-dtype``. Reports the cumulative time of the stages' functions and the total.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lightning_lobs import CalibrationOptions, prune_model

#: (label, function-name substring in pstats' "file:line(function)" key) summed over matches
STAGES = [
    ("prune_model", "api.py", "prune_model"),
    ("Hessian accumulation (HessianAccumulator.add)", "hessian.py", "add"),
    ("allocation: curves (error_curve)", "costs.py", "error_curve"),
    ("allocation: one-pass costs (obs_scores)", "costs.py", "obs_scores"),
    ("allocation: exact traces (greedy_trace)", "exact.py", "greedy_trace"),
    ("solves (solve_layer)", "registry.py", "solve_layer"),
]


def stage_times(stats: pstats.Stats) -> dict[str, float]:
    out = {label: 0.0 for label, _, _ in STAGES}
    for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        for label, file_part, name in STAGES:
            if filename.endswith(file_part) and func == name:
                out[label] += ct
    return out


def run_once(args: argparse.Namespace, dtype: Any) -> dict[str, Any]:
    from lobs_lab.models import make_gpt2

    torch.manual_seed(0)
    model = make_gpt2(args.layers, args.width, args.width // 64, args.context).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (args.sequences, args.context), generator=g)
    batches = [ids[i : i + args.batch] for i in range(0, args.sequences, args.batch)]
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof.enable()
        calibration = CalibrationOptions(hessian_dtype=dtype, memory_budget_bytes=args.memory_budget_gib << 30)
        report = prune_model(model, batches, args.sparsity, calibration=calibration)
        prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    times = stage_times(stats)
    if args.top:
        stats.sort_stats("cumulative").print_stats(args.top)
    return {
        "wall_s": wall,
        "stages_s": times,
        "sparsity": float(report.sparsity) if hasattr(report, "sparsity") else None,
    }


def curve_breakdown(args: argparse.Namespace) -> dict[str, Any]:
    """Per GPT-2 layer shape: the allocation's error curve (its inverse, SparseGPT sweep and float64 error
    evaluation, from cProfile) against the ``fast`` solve with and without the refit and SparseGPT's own code, on
    one H; CPU seconds of this process (one thread: steadier than wall time on a shared machine)."""
    from lightning_lobs import SolverOptions
    from lightning_lobs.solvers import error_curve, solve_layer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lobs_lab.peers import load_sparsegpt

    from admm_vs_peers import run_sparsegpt  # noqa: E402 - the sibling benchmark's driver of SparseGPT's code

    sparsegpt = load_sparsegpt()
    w_ = args.width
    shapes = [(3 * w_, w_), (w_, w_), (4 * w_, w_), (w_, 4 * w_)]
    grid = [1 - 0.01 ** (i / 23) for i in range(24)]  # GlobalAllocation's default 24 levels up to 0.99
    g = torch.Generator().manual_seed(2)
    out: dict[str, Any] = {}
    for rows, d in shapes:
        mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
        x = torch.randn(2048, d, generator=g) @ mix  # correlated inputs
        H = (x.T @ x / x.shape[0]).double()
        W = torch.randn(rows, d, generator=g) / d**0.5
        prof = cProfile.Profile(time.process_time)
        t0 = time.process_time()
        prof.enable()
        error_curve(W, H, grid, sample_rows=64)
        prof.disable()
        rec = {"curve_s": time.process_time() - t0}
        stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        parts = (
            ("inverse_s", "core.py", "inverse_with_damping"),
            ("sweep_s", "fast.py", "run"),
            ("errors_s", "", "einsum"),
        )
        for label, file_part, name in parts:
            rec[label] = sum(v[3] for k, v in stats.items() if k[0].endswith(file_part) and k[2] == name)
        for label, opts in (("fast_s", SolverOptions()), ("fast_no_refit_s", SolverOptions(refit=False))):
            t0 = time.process_time()
            solve_layer(W, H, args.sparsity, "fast", solver=opts)
            rec[label] = time.process_time() - t0
        t0 = time.process_time()
        run_sparsegpt(sparsegpt, W, H, args.sparsity, None)
        rec["sparsegpt_s"] = time.process_time() - t0
        out[f"{rows}x{d}"] = rec
        print(f"{rows}x{d}: " + ", ".join(f"{k} {v:.2f}" for k, v in rec.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--hessian-dtypes", default="mixed,float64", help="'' = no profiled prune")
    p.add_argument("--curve-breakdown", action="store_true", help="also time the curves against the solves per shape")
    p.add_argument("--top", type=int, default=0, help="also print the top N cumulative entries")
    p.add_argument(
        "--memory-budget-gib", type=int, default=32, help="the memory check's budget (a loaded machine has little free)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from lobs_lab.harness import machine_info, write_json

    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args)}
    if args.curve_breakdown:
        results["curve_breakdown"] = curve_breakdown(args)
    for name in [n for n in args.hessian_dtypes.split(",") if n]:
        dtype = name if name == "mixed" else getattr(torch, name)
        rec = run_once(args, dtype)
        results[name] = rec
        print(f"hessian_dtype={name}: wall {rec['wall_s']:.1f} s")
        for label, secs in rec["stages_s"].items():
            print(f"  {label:48s} {secs:8.1f} s")
    if args.out:
        write_json(args.out + ".json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
