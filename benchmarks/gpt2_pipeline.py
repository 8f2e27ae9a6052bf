"""GPT-2 end to end: the library's prune against SparseGPT's own pipeline, time, peak memory and logits error.

    OMP_NUM_THREADS=1 python benchmarks/gpt2_pipeline.py --blocks 4 --width 768 \\
        --out benchmarks/results/gpt2_pipeline.json
    OMP_NUM_THREADS=1 python benchmarks/gpt2_pipeline.py --quick          # tiny GPT-2, seconds per pipeline

Model: ``GPT2LMHeadModel`` built from a ``GPT2Config`` (no download, GPT-2's 50,257-token vocabulary, seeded random
weights, no dropout): ``--blocks`` x ``--width`` (4 x 768; 12 x 768 is GPT-2 124M, 24 x 1024 GPT-2 medium), heads
``width / 64``. Text (``lobs_lab.text``): the Python standard library's source, one GPT-2 token per byte (GPT-2's
own byte tokens, ``lobs_lab.gpt2.gpt2_byte_ids``); calibration ``--calibration`` random windows of ``--context``
tokens from the train files (16 x 128 by default, in batches of ``--calibration-batch``), held-out
``--heldout`` windows spread over the test files.

Pipelines, every one at 50% unstructured, one torch thread, EACH IN ITS OWN CHILD PROCESS (a fresh interpreter
that builds the model and loads the data, then runs the pipeline; ``wall s`` is the pipeline alone, ``CPU s`` the
child's CPU time (user + system) over the same span, the steadier number on a shared machine (one thread: a
pipeline's CPU time is its work, its wall time also counts the other jobs' share of the cores), ``peak RSS`` the
child's ``ru_maxrss`` read right after it, ``above loaded`` that minus the RSS before the pipeline started):

* ``dense``: one no-grad forward over the calibration set (the yardstick);
* ``sparsegpt``: SparseGPT's own ``SparseGPT`` class (``add_batch`` / ``fasterprune``, blocksize 128, 1% damping,
  every layer at 50%) driven block by block by ``lobs_lab.peers.prune_blocks``: OUR driver loop, written after
  their ``opt.py`` (catch block 0's inputs, per block hooks -> ``fasterprune`` -> re-run the block), adapted to
  GPT-2's ``transformer.h`` and ``Conv1D``; THEIR solver, read at run time from the fetched snapshot
  (``--sparsegpt-repo``);
* ``default``: ``prune_model(model, batches, 0.5)`` (the library's defaults: ``auto``, global allocation);
* ``sequential``: the same with ``sequential=True``;
* ``admm`` (only when named in ``--pipelines``): the same with ``method="admm"``.

Every pruning pipeline prunes the 4 ``Conv1D`` layers of every block; the tied ``lm_head`` and the embeddings stay
dense. Logits error: ``||logits - dense logits|| / ||dense logits||`` over the held-out windows, the dense logits
from the ``dense`` child (which always runs first). Ratios are against ``sparsegpt`` in the same run. A child whose
resident memory passes ``--rss-limit-gib`` is killed and reported as such (the machines are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lobs_lab.gpt2 import block_layer_sparsity, final_hidden, gpt2_byte_ids, logits_relative_error, random_gpt2
from lobs_lab.harness import current_rss_gib, machine_info, write_json
from lobs_lab.isolate import run_guarded
from lobs_lab.peers import (
    SPARSEGPT_REPO,
    gpt2_blocks,
    load_sparsegpt,
    prune_blocks,
    repo_available,
    repo_commit,
    sparsegpt_solver,
)
from lobs_lab.text import RandomWindows, eval_windows, inputs_only, load_stdlib_corpus

PIPELINES = ("dense", "sparsegpt", "default", "sequential", "admm")
DEFAULT_PIPELINES = "dense,sparsegpt,default,sequential"
SPARSITY = 0.5


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny GPT-2 (2 x 64), short windows: seconds per pipeline")
    p.add_argument("--blocks", default="4", help="comma-separated block counts, e.g. 4,12,24")
    p.add_argument("--width", default="768", help="one width for all, or one per --blocks entry, e.g. 768,768,1024")
    p.add_argument("--pipelines", default=DEFAULT_PIPELINES, help=f"any of {','.join(PIPELINES)}")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--calibration", type=int, default=16, help="calibration sequences of --context tokens")
    p.add_argument("--calibration-batch", type=int, default=16)
    p.add_argument("--heldout", type=int, default=16, help="held-out sequences for the logits error")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss-limit-gib", type=float, default=12.0, help="kill a child above this resident memory")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="kill a child running longer (seconds)")
    p.add_argument("--sparsegpt-repo", default=SPARSEGPT_REPO)
    p.add_argument("--out", default=None, help="JSON results (e.g. benchmarks/results/gpt2_pipeline.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: "<pipeline>:<spec json>"
    args = p.parse_args(argv)
    if args.quick:
        args.blocks, args.width, args.context = "2", "64", 32
        args.calibration, args.calibration_batch, args.heldout = 4, 4, 4
    bad = [n for n in args.pipelines.split(",") if n not in PIPELINES]
    if bad:
        p.error(f"--pipelines: unknown {bad}; choose from {', '.join(PIPELINES)}")
    return args


def configs(args: argparse.Namespace) -> list[tuple[int, int]]:
    """``(blocks, width)`` pairs from ``--blocks`` and ``--width``."""
    blocks = [int(b) for b in args.blocks.split(",")]
    widths = [int(w) for w in args.width.split(",")]
    if len(widths) == 1:
        widths *= len(blocks)
    if len(widths) != len(blocks):
        raise SystemExit(f"--width: give one width or one per --blocks entry ({len(blocks)}), got {args.width!r}")
    return list(zip(blocks, widths))


# --------------------------------------------------------------------------- the child: one pipeline


def _run_pipeline(
    name: str, model: torch.nn.Module, batches: list[torch.Tensor], spec: dict[str, Any]
) -> dict[str, Any]:
    """Run one pipeline; returns where its time went (the driver's phases, or the library's report)."""
    from lightning_lobs import prune_model

    if name == "dense":
        with torch.no_grad():
            for b in batches:
                model(b)
        return {}
    if name == "sparsegpt":
        module = load_sparsegpt(spec["sparsegpt_repo"])
        run = prune_blocks(model, gpt2_blocks(model), batches, sparsegpt_solver(module, SPARSITY, None))
        return {"solve_seconds": run.solve_seconds, "calibration_seconds": run.calibrate_seconds}
    kwargs = {"default": {}, "sequential": {"sequential": True}, "admm": {"method": "admm"}}[name]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*left dense.*")  # the tied lm_head, as intended
        report = prune_model(model, batches, SPARSITY, **kwargs)
    return {
        "solve_seconds": report.solve_seconds,
        "calibration_seconds": report.calibration_seconds,
        "methods_used": {n: r.method for n, r in report.layers.items()},
    }


def child_main(spec_arg: str) -> None:
    """Child process: build the model, load the data, run one pipeline, print one JSON line."""
    name, spec_path = spec_arg.split(":", 1)
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    model = random_gpt2(spec["blocks"], spec["width"], spec["heads"], spec["context"], spec["seed"])
    data = torch.load(spec["data"])
    batches: list[torch.Tensor] = list(data["calib"].split(spec["calibration_batch"]))
    rss_loaded = current_rss_gib()
    t0, cpu0 = time.perf_counter(), time.process_time()
    phases = _run_pipeline(name, model, batches, spec)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    hidden = final_hidden(model, data["heldout"])
    if name == "dense":
        torch.save(hidden, spec["reference"])
        error = 0.0
    else:
        error = logits_relative_error(hidden, torch.load(spec["reference"]), model.lm_head.weight)
    out = {
        "pipeline": name,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss_gib": peak_gib,
        "rss_loaded_gib": rss_loaded,
        "sparsity": block_layer_sparsity(gpt2_blocks(model)),
        "logits_error": error,
        **phases,
    }
    print(json.dumps(out))


# --------------------------------------------------------------------------- the parent


def prepare_data(args: argparse.Namespace, path: str) -> dict[str, Any]:
    """Calibration and held-out windows as GPT-2 token ids, saved to ``path``; returns their description."""
    corpus = load_stdlib_corpus()
    T = args.context
    calib_ds = RandomWindows(corpus.tokens["train"], T, args.calibration, seed=args.seed)
    calib = inputs_only(torch.stack([calib_ds[i] for i in range(args.calibration)]))
    heldout = inputs_only(eval_windows(corpus.tokens["test"], T, args.heldout))
    torch.save({"calib": gpt2_byte_ids(calib), "heldout": gpt2_byte_ids(heldout)}, path)
    return {"corpus": corpus.info(), "calibration_tokens": calib.numel(), "heldout_tokens": heldout.numel()}


def run_config(args: argparse.Namespace, blocks: int, width: int, tmp: str) -> dict[str, Any]:
    """Every pipeline on one ``blocks x width`` GPT-2, each in its own child; ratios against ``sparsegpt``."""
    spec = {
        "blocks": blocks,
        "width": width,
        "heads": max(1, width // 64),
        "context": args.context,
        "seed": args.seed,
        "calibration_batch": args.calibration_batch,
        "data": os.path.join(tmp, "data.pt"),
        "reference": os.path.join(tmp, "dense_hidden.pt"),
        "sparsegpt_repo": args.sparsegpt_repo,
    }
    record: dict[str, Any] = {"blocks": blocks, "width": width, "heads": spec["heads"]}
    record.update(prepare_data(args, spec["data"]))
    spec_path = os.path.join(tmp, "spec.json")
    Path(spec_path).write_text(json.dumps(spec))
    names = ["dense"] + [n for n in args.pipelines.split(",") if n != "dense"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{name}:{spec_path}"]
        child = run_guarded(cmd, args.rss_limit_gib, args.timeout, env=env)
        row = {"pipeline": name, "child_wall_s": child.wall_seconds, "polled_peak_gib": child.polled_peak_gib}
        if child.result is None:
            row["error"] = child.error
            row["stderr_tail"] = child.stderr_tail
            print(f"{blocks}x{width} {name}: {child.error}\n{child.stderr_tail[-1500:]}", file=sys.stderr, flush=True)
            if name == "dense":
                raise SystemExit("the dense child failed: no reference logits")
        else:
            row.update(child.result)
            print(f"{blocks}x{width} {name}: {json.dumps(child.result)}", flush=True)
        rows.append(row)
    add_ratios(rows)
    record["rows"] = rows
    return record


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Time, peak RSS and logits error of every pipeline over ``sparsegpt``'s (when both finished)."""
    ref = next((r for r in rows if r["pipeline"] == "sparsegpt" and "seconds" in r), None)
    if ref is None:
        return
    for r in rows:
        if "seconds" not in r:
            continue
        r["time_over_sparsegpt"] = r["seconds"] / ref["seconds"]
        r["cpu_over_sparsegpt"] = r["cpu_seconds"] / ref["cpu_seconds"]
        r["rss_over_sparsegpt"] = r["peak_rss_gib"] / ref["peak_rss_gib"]
        if r["pipeline"] != "dense" and ref["logits_error"] > 0:
            r["error_over_sparsegpt"] = r["logits_error"] / ref["logits_error"]


def table(results: dict[str, Any]) -> str:
    """The Markdown table of every configuration and pipeline (ready to paste into BENCHMARKS.md)."""
    head = (
        "| GPT-2 | pipeline | wall s | CPU s | peak RSS GiB | above loaded GiB | sparsity | logits rel. error "
        "| wall / SparseGPT | CPU / SparseGPT | peak RSS / SparseGPT | error / SparseGPT |"
    )
    lines = [head, "|" + "---|" * 12]
    fmt = lambda r, k, f: format(r[k], f) if k in r else "-"  # noqa: E731
    for c in results["configs"]:
        for r in c["rows"]:
            model = f"{c['blocks']} x {c['width']}"
            if "seconds" not in r:
                lines.append(f"| {model} | {r['pipeline']} | {r['error']} |" + " |" * 9)
                continue
            above = r["peak_rss_gib"] - r["rss_loaded_gib"]
            lines.append(
                f"| {model} | {r['pipeline']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['peak_rss_gib']:.2f} "
                f"| {above:.2f} | {r['sparsity']:.4f} | {r['logits_error']:.4f} "
                f"| {fmt(r, 'time_over_sparsegpt', '.2f')} | {fmt(r, 'cpu_over_sparsegpt', '.2f')} "
                f"| {fmt(r, 'rss_over_sparsegpt', '.2f')} | {fmt(r, 'error_over_sparsegpt', '.3f')} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every configuration; print the table; write ``--out``."""
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return {}
    names = args.pipelines.split(",")
    if "sparsegpt" in names and not repo_available(args.sparsegpt_repo):
        raise SystemExit(f"--sparsegpt-repo: no git snapshot of SparseGPT at {args.sparsegpt_repo}")
    results: dict[str, Any] = {
        "command": "python benchmarks/gpt2_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "sparsity": SPARSITY,
        "sparsegpt_commit": repo_commit(args.sparsegpt_repo) if "sparsegpt" in names else None,
        "configs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for blocks, width in configs(args):
            results["configs"].append(run_config(args, blocks, width, tmp))
    results["loadavg_end"] = os.getloadavg()
    print(table(results))
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
