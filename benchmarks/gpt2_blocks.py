"""The block-by-block pipeline on a small GPT-2: time, peak RSS and logits error of each way to run a prune.

One process per run (peak RSS is the process's), one torch thread, a GPT-2 built from its config (seeded random
weights, no download), the calibration and held-out sequences drawn from a seeded generator. Runs:

- ``one-pass``: ``sequential=False`` (every layer calibrated on the dense network);
- ``per-layer``: ``sequential=True`` as it was before the block pipeline (one forward over the batches per layer;
  forced here by making block discovery fail, which is the fallback path);
- ``block``: ``sequential=True`` (a block's layers calibrated together);
- ``layer``: ``sequential=True, sequential_unit="layer"`` (SparseGPT's "true sequential").

    OMP_NUM_THREADS=1 python benchmarks/gpt2_blocks.py --blocks 4 --width 768 --runs one-pass block layer per-layer

prints one JSON line per run and a table; ``--out file.json`` keeps them. ``cpu_seconds`` (the process's CPU time,
one thread) is the number to compare on a machine shared with other jobs; ``seconds`` is wall time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

import torch

RUNS = ("one-pass", "per-layer", "block", "layer")


def _model(blocks: int, width: int, seed: int):
    import transformers

    heads = max(1, width // 64)
    config = transformers.GPT2Config(n_layer=blocks, n_embd=width, n_head=heads, n_positions=256)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def _tokens(count: int, length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50257, (1, length), generator=g) for _ in range(count)]


def _logits(model, batch):
    return model(batch).logits


def one_run(args: argparse.Namespace) -> dict:
    """One configuration in this process."""
    import lightning_lobs.engine.sequential as sequential
    from lightning_lobs import CalibrationOptions, prune_model

    torch.set_num_threads(1)
    model = _model(args.blocks, args.width, args.seed)
    calib = _tokens(args.sequences, args.length, 1 + 10 * args.seed)
    held_out = _tokens(4, args.length, 2 + 10 * args.seed)
    with torch.no_grad():
        dense = [_logits(model, b) for b in held_out]
    options = {"sequential": args.run != "one-pass"}
    if args.run == "layer":
        options["sequential_unit"] = "layer"
    if args.run == "per-layer":
        sequential.find_chain = lambda ctx, plan: "blocks disabled by the benchmark"
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = prune_model(
            model,
            calib,
            args.sparsity,
            args.method,
            allocation=args.allocation,
            forward_fn=_logits,
            calibration=CalibrationOptions(memory_budget_bytes=args.budget_gib * 2**30),
            **options,
        )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    with torch.no_grad():
        num = sum(float((_logits(model, b) - d).pow(2).sum()) for b, d in zip(held_out, dense))
    den = sum(float(d.pow(2).sum()) for d in dense)
    return {
        "run": args.run,
        "blocks": args.blocks,
        "width": args.width,
        "seed": args.seed,
        "method": args.method,
        "allocation": args.allocation,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "calibration_seconds": round(report.calibration_seconds, 2),
        "solve_seconds": round(report.solve_seconds, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "logits_rel_error": round((num / den) ** 0.5, 4),
        "layer_error_sum": sum(r.layer_error for r in report.layers.values()),
        "sparsity": round(report.sparsity, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--method", default="fast")
    parser.add_argument(
        "--budget-gib",
        type=int,
        default=8,
        help="memory budget (the default, 80%% of free memory, moves on a shared machine)",
    )
    parser.add_argument("--seed", type=int, default=0, help="model weights and token draws")
    parser.add_argument("--allocation", default="uniform")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)  # one run, in a child process
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.run:
        print(json.dumps(one_run(args)), flush=True)
        return
    results = []
    for run in args.runs:
        child = [a for a in sys.argv[1:] if a != "--runs" and a not in RUNS]
        out = subprocess.run([sys.executable, __file__, *child, "--run", run], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print(
        f"{'run':<10} {'cpu s':>8} {'seconds':>8} {'calib s':>8} {'solve s':>8} {'peak GiB':>9} {'logits err':>10} {'sum dE':>10}"
    )
    for r in results:
        print(
            f"{r['run']:<10} {r['cpu_seconds']:>8} {r['seconds']:>8} {r['calibration_seconds']:>8} {r['solve_seconds']:>8} "
            f"{r['peak_rss_gib']:>9} {r['logits_rel_error']:>10} {r['layer_error_sum']:>10.4g}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": sys.argv, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
