"""Perplexity of the trained byte-level GPT-2 pruned by the library, by SparseGPT's and ALPS's own code, Wanda, magnitude.

    OMP_NUM_THREADS=1 python benchmarks/gpt2_perplexity.py --dense-cache runs/gpt2_dense.pt \\
        --out benchmarks/results/gpt2_perplexity.json
    OMP_NUM_THREADS=1 python benchmarks/gpt2_perplexity.py --quick      # tiny GPT-2, 12 training steps

Model and data: examples/gpt2_stdlib.py's (``lobs_lab.byte_gpt2``: a ``GPT2LMHeadModel`` with a 256-byte vocabulary
trained on the Python standard library's source; same arguments, same defaults, same dense cache: a
``--dense-cache`` file written by the example with the same training settings is loaded instead of retraining, and
this script writes one the example can load). Calibration: the example's ``--calibration-windows`` random training
windows; test: its ``--test-windows`` windows spread over the test files, perplexity = exp(mean NLL per byte), bits
per byte = NLL / ln 2.

Every method prunes the 4 ``Conv1D`` layers of every block (``lm_head``, tied to ``wte``, and the embeddings stay
dense), from the dense weights, at each ``--targets`` entry (50%, 70%, 2:4), one-shot, no retraining:

* ``auto``, ``fast``, ``admm``: ``prune_model(model, batches, target, method)`` with the library's defaults
  (global allocation for a float sparsity; the N:M pattern puts every layer at 2:4); ``*_seq`` the same with
  ``sequential=True``;
* ``sparsegpt``: SparseGPT's own ``SparseGPT`` class (every layer at the target, blocksize 128, 1% damping) and
  ``alps``: ALPS's own ``ALPS_prune.ALPS_admm`` (``rho=0.1``, their defaults; ``'cuda:0'`` patched to ``'cpu'``),
  both read at run time from the fetched snapshots and driven block by block by ``lobs_lab.peers.prune_blocks``
  (OUR loop, written after their ``opt.py``; THEIR solvers);
* ``wanda``: per output row, input norms taken block by block through the already pruned blocks (its paper's
  setting); ``magnitude``: every layer at the target by ``|w|`` (N:M: the largest 2 of 4).

One torch thread; ``prune s`` is the wall time of the prune alone, ``CPU s`` the process's CPU time over the same span
(steadier on a shared machine: with one thread it is the prune's own work; see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lobs_lab.byte_gpt2 import add_training_args, set_quick_training, stdlib_lm_data, train_byte_gpt2, wanda_block_masks
from lobs_lab.gpt2 import block_layer_sparsity
from lobs_lab.harness import machine_info, write_json
from lobs_lab.metrics import lm_metrics
from lobs_lab.peers import (
    ALPS_REPO,
    SPARSEGPT_REPO,
    alps_solver,
    gpt2_blocks,
    load_alps,
    load_sparsegpt,
    prune_blocks,
    repo_available,
    repo_commit,
    sparsegpt_solver,
)
from lobs_lab.prune_retrain import baseline_masks
from torch import Tensor, nn

log = logging.getLogger("lightning_lobs.benchmarks.gpt2_perplexity")

OURS = ("auto", "fast", "admm", "auto_seq", "fast_seq", "admm_seq")
PEERS = ("sparsegpt", "alps")
BASELINES = ("wanda", "magnitude")
METHODS = OURS + PEERS + BASELINES
DEFAULT_METHODS = "sparsegpt,alps,auto,fast,wanda,magnitude,admm,auto_seq"
TARGETS: dict[str, tuple[float | None, tuple[int, int] | None]] = {
    "50%": (0.5, None),
    "70%": (0.7, None),
    "2:4": (None, (2, 4)),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke run: tiny GPT-2, a few steps, two targets")
    add_training_args(p)
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"any of {','.join(METHODS)}")
    p.add_argument("--targets", default="50%,70%,2:4", help=f"any of {','.join(TARGETS)}")
    p.add_argument("--dense-cache", default=os.path.join("runs", "gpt2_dense.pt"), metavar="PT")
    p.add_argument("--sparsegpt-repo", default=SPARSEGPT_REPO)
    p.add_argument("--alps-repo", default=ALPS_REPO)
    p.add_argument("--out", default=None, help="JSON results (e.g. benchmarks/results/gpt2_perplexity.json)")
    args = p.parse_args(argv)
    if args.quick:
        set_quick_training(args)
        args.targets = "50%,2:4" if args.targets == "50%,70%,2:4" else args.targets
        if args.dense_cache == os.path.join("runs", "gpt2_dense.pt"):
            args.dense_cache = os.path.join("runs", "gpt2_dense_quick.pt")
    for flag, value, choices in (("--methods", args.methods, METHODS), ("--targets", args.targets, TARGETS)):
        bad = [v for v in value.split(",") if v not in choices]
        if bad:
            p.error(f"{flag}: unknown {bad}; choose from {', '.join(choices)}")
    for name, repo in (("sparsegpt", args.sparsegpt_repo), ("alps", args.alps_repo)):
        if name in args.methods.split(",") and not repo_available(repo):
            p.error(f"--{name}-repo: no git snapshot at {repo} (fetch it, or leave {name} out of --methods)")
    return args


def prune_once(
    module: nn.Module, method: str, target: str, calib: list[Tensor], args: argparse.Namespace
) -> dict[str, Any]:
    """Prune ``module`` in place with ``method`` at ``target``; returns what to record (seconds, methods used)."""
    sparsity, pattern = TARGETS[target]
    names = [f"model.transformer.h.{name}" for name in _block_layer_names(module)]
    out: dict[str, Any] = {}
    t0, cpu0 = time.perf_counter(), time.process_time()
    if method in OURS:
        from lightning_lobs import prune_model

        kw: dict[str, Any] = {"pattern": "2:4"} if pattern else {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*left dense.*")  # the tied lm_head, as intended
            report = prune_model(
                module,
                calib,
                sparsity if sparsity is not None else 0.5,
                method.removesuffix("_seq"),
                sequential=method.endswith("_seq"),
                **kw,
            )
        out["methods_used"] = sorted({r.method for r in report.layers.values()})
    elif method in PEERS:
        load, make = (load_sparsegpt, sparsegpt_solver) if method == "sparsegpt" else (load_alps, alps_solver)
        peer = load(args.sparsegpt_repo if method == "sparsegpt" else args.alps_repo)
        t0, cpu0 = time.perf_counter(), time.process_time()  # the loading of their files is not part of the prune
        prune_blocks(module, gpt2_blocks(module), calib, make(peer, sparsity, pattern))
    elif method == "wanda":
        wanda_block_masks(module, names, calib, sparsity, pattern)
    else:
        masks = baseline_masks(module, names, "magnitude_layer", sparsity, pattern)
        with torch.no_grad():
            modules = dict(module.named_modules())
            for n, m in masks.items():
                modules[n].weight.mul_(m.to(modules[n].weight.dtype))
    out["prune_seconds"] = time.perf_counter() - t0
    out["prune_cpu_seconds"] = time.process_time() - cpu0
    return out


def _block_layer_names(module: nn.Module) -> list[str]:
    from lobs_lab.peers import prunable_layers

    return list(prunable_layers(gpt2_blocks(module)))


def compare(
    args: argparse.Namespace,
    dense: nn.Module,
    test: Tensor,
    calib: list[Tensor],
    rows: list[dict[str, Any]],
    save: Callable[[], None],
) -> None:
    """Every method at every target, each from the dense weights; appends one row per (method, target) to
    ``rows`` and calls ``save()`` after each (a long run keeps what it measured if it is stopped)."""
    for target in args.targets.split(","):
        for method in args.methods.split(","):
            module = copy.deepcopy(dense)
            try:
                row = {"method": method, "target": target, **prune_once(module, method, target, calib, args)}
            except MemoryError as e:  # the library's memory check refuses before any work; the other rows go on
                log.warning("%s %s refused: %s", method, target, e)
                rows.append({"method": method, "target": target, "error": f"MemoryError: {e}"})
                save()
                continue
            row["sparsity"] = block_layer_sparsity(gpt2_blocks(module))
            row.update(lm_metrics(module, test))
            log.info(
                "%-10s %-4s ppl %.4f (%.4f bits/byte) sparsity %.4f prune %.1f s",
                method,
                target,
                row["ppl"],
                row["bpb"],
                row["sparsity"],
                row["prune_seconds"],
            )
            rows.append(row)
            save()


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per method (dense first), per target the perplexity (bits/byte) and the prune time."""
    targets = list(dict.fromkeys(r["target"] for r in results["rows"]))
    methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
    head = "| method | " + " | ".join(f"{t} ppl (bits/byte) | {t} prune s (CPU s)" for t in targets) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(targets))]
    d = results["dense_test"]
    lines.append("| dense | " + " | ".join(f"{d['ppl']:.4f} ({d['bpb']:.4f}) | -" for _ in targets) + " |")
    cell: Callable[[dict[str, Any]], str] = lambda r: (  # noqa: E731
        f"{r['ppl']:.4f} ({r['bpb']:.4f}) | {r['prune_seconds']:.1f} ({r.get('prune_cpu_seconds', math.nan):.1f})"
    )
    for m in methods:
        by_target = {r["target"]: r for r in results["rows"] if r["method"] == m and "error" not in r}
        lines.append(
            f"| {m} | " + " | ".join(cell(by_target[t]) if t in by_target else "- | -" for t in targets) + " |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train (or load) the dense GPT-2, prune it every way, print the table, write ``--out``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s")
    torch.set_num_threads(args.threads)
    import pytorch_lightning as pl

    pl.seed_everything(args.seed, workers=True)  # as examples/gpt2_stdlib.py: the same dense weights
    t_total = time.perf_counter()
    data = stdlib_lm_data(args)
    dense, training = train_byte_gpt2(args, data, args.dense_cache)
    dense.eval()
    dense_test = lm_metrics(dense, data.test)
    log.info("dense: %s (%s)", dense_test, training["dense_source"])
    methods = args.methods.split(",")
    results: dict[str, Any] = {
        "command": "python benchmarks/gpt2_perplexity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "corpus": data.corpus.info(),
        "net": {"layers": args.layers, "width": args.width, "heads": args.heads, "context": args.context},
        "calibration_tokens": int(data.calib_windows.numel()),
        "dense_train_s": training["dense_train_s"],
        "dense_source": training["dense_source"],
        "val_curve": training["val_curve"],
        "dense_test": dense_test,
        "peer_commits": {
            name: repo_commit(repo)
            for name, repo in (("sparsegpt", args.sparsegpt_repo), ("alps", args.alps_repo))
            if name in methods
        },
        "machine": machine_info(),
    }
    results["rows"] = []

    def save() -> None:
        results["total_s"] = time.perf_counter() - t_total
        results["loadavg_end"] = os.getloadavg()
        if args.out:
            write_json(args.out, results)

    compare(args, dense, data.test, data.calib, results["rows"], save)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
