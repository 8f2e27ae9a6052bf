"""A small GPT-2 (``transformers`` config, no download, byte vocabulary) trained on the Python standard library's
source, pruned block by block with ``sequential=True`` (the SparseGPT setting) against magnitude and Wanda.

    python examples/gpt2_stdlib.py --quick                              # smoke run, well under a minute
    python examples/gpt2_stdlib.py --out benchmarks/results/gpt2_stdlib  # the benchmark (BENCHMARKS.md)

Data (``lobs_lab.text``): the interpreter's ``Lib/*.py`` files, split by file (90/5/5 by a hash of the path), byte
tokens. Training draws ``--batch-size`` random windows of ``--context`` + 1 bytes per step from the train files, for
``--train-steps`` steps (the token budget is steps x batch x context); the validation loss on ``--val-windows``
fixed windows of the validation files is recorded every ``--val-every`` steps. Perplexity and bits per byte are
measured on ``--test-windows`` windows spread evenly over the test files (each window's tokens predicted from the
window's earlier tokens only).

Pruning, from the dense weights, of the 4 ``Conv1D`` layers of every block (``lm_head`` is tied to ``wte`` and
left dense, with the library's warning; embeddings are not pruned), at 50% unstructured and 2:4:

* ``exact``, ``fast``, ``lobs``: ``LOBSPruning(prune_epoch=0, sequential=True, allocation="uniform")`` in a Trainer:
  every layer at the target sparsity, each block's layers calibrated together on inputs that pass through the
  already pruned blocks before it (the block pipeline, as SparseGPT's ``opt.py``; layer by layer up to 0.3.0);
* ``magnitude_global``, ``magnitude_layer`` and ``wanda`` from ``lobs_lab.baselines``; Wanda's input norms are
  taken block by block on the outputs of the already pruned blocks (its paper's setting), per output row;

then one-shot perplexity, ``--retrain-steps`` steps of AdamW with the masks held, perplexity again.

Memory and time: a no-grad forward over the calibration tokens, and ``prune_model(..., "fast")`` with
``sequential=True`` and with ``sequential=False``, each in a fresh subprocess (peak RSS above the RSS after loading).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from lobs_lab.byte_gpt2 import add_training_args, set_quick_training, stdlib_lm_data, train_byte_gpt2, wanda_block_masks
from lobs_lab.harness import PeakRSS, figure, machine_info, write_results
from lobs_lab.metrics import LN2, lm_metrics
from lobs_lab.models import ByteLM, make_gpt2
from lobs_lab.prune_retrain import (
    BASELINES,
    Setup,
    baseline_masks,
    run_prune_retrain,
    strip_modules,
)
from lobs_lab.tables import perplexity_table
from torch import Tensor, nn
from torch.utils.data import DataLoader

log = logging.getLogger("lightning_lobs.examples.gpt2")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke run: tiny GPT-2, a few steps")
    add_training_args(p)
    p.add_argument("--retrain-steps", type=int, default=16)
    p.add_argument("--retrain-lr", type=float, default=2e-4)
    p.add_argument("--methods", default="exact,fast,lobs," + ",".join(BASELINES))
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="run the memory/time probes")
    p.add_argument("--out", default=os.path.join("runs", "gpt2_stdlib"), help="writes <out>.json and <out>.png")
    p.add_argument(
        "--dense-cache",
        default=None,
        metavar="PT",
        help="save the dense weights here, or load them if this file was trained with the same settings",
    )
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # internal: "<kind>:<state file>"
    args = p.parse_args(argv)
    if args.quick:
        set_quick_training(args)
        args.retrain_steps = 2
        args.memory = False  # three fresh interpreters cost more than the whole smoke run
    return args


def _memory_probe(spec: str) -> None:
    """Subprocess body: load the saved dense model and calibration batches, run one operation, print JSON."""
    kind, path = spec.split(":", 1)
    saved = torch.load(path, weights_only=False)
    a = saved["args"]
    torch.set_num_threads(a["threads"])
    module = ByteLM(make_gpt2(a["layers"], a["width"], a["heads"], a["context"]), lr=1.0)
    module.load_state_dict(saved["state"])
    module.eval()
    calib: list[Tensor] = saved["calib"]
    from lightning_lobs import prune_model

    with PeakRSS() as peak:
        if kind == "forward":
            with torch.no_grad():
                for b in calib:
                    module(b)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*left dense.*")
                prune_model(module, calib, 0.5, "fast", sequential=(kind == "fast_sequential"), allocation="uniform")
    print(
        json.dumps(
            {
                "kind": kind,
                "seconds": peak.seconds,
                "peak_extra_mib": peak.extra_mib,
                "rss_start_mib": peak.start / 2**20,
                "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def memory_and_time(module: nn.Module, calib: list[Tensor], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The three probes, each in a fresh interpreter so one's freed memory does not hide the next one's peak."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pt")
        torch.save({"state": module.state_dict(), "calib": calib, "args": vars(args)}, path)
        for kind in ("forward", "fast_sequential", "fast_all_at_once"):
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--memory-probe", f"{kind}:{path}"],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
            )
            if proc.returncode != 0:
                raise RuntimeError(f"memory probe {kind} failed:\n{proc.stderr[-3000:]}")
            out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            log.info("memory probe %s", out[-1])
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the dense GPT-2, compare the methods, probe memory, write ``<out>.json`` and ``<out>.png``."""
    args = parse_args(argv)
    if args.memory_probe:
        _memory_probe(args.memory_probe)
        return {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s")
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True)
    t_total = time.perf_counter()

    data = stdlib_lm_data(args, retrain_steps=args.retrain_steps)
    corpus, test, calib_windows, calib = data.corpus, data.test, data.calib_windows, data.calib
    log.info("stdlib corpus: %s", corpus.info())
    T = args.context
    dense, training = train_byte_gpt2(args, data, args.dense_cache)
    dense_test = lm_metrics(dense, test)
    log.info("dense GPT-2: test %s after %d steps (%.0f s)", dense_test, args.train_steps, training["dense_train_s"])
    names = [n for n, m in dense.named_modules() if type(m).__name__ == "Conv1D"]
    retrain_loader = DataLoader(data.retrain, batch_size=args.batch_size, shuffle=False)
    rows = compare(args, dense, names, calib, retrain_loader, test)

    memory = memory_and_time(dense, calib, args) if args.memory else []
    n_conv1d = sum(dict(dense.named_modules())[n].weight.numel() for n in names)
    results = {
        "name": "GPT-2 on the Python stdlib",
        "command": " ".join(
            [os.path.basename(sys.executable), "examples/gpt2_stdlib.py"]
            + list(argv if argv is not None else sys.argv[1:])
        ),
        "args": vars(args),
        "corpus": corpus.info(),
        "net": {
            "layers": args.layers,
            "width": args.width,
            "heads": args.heads,
            "context": T,
            "parameters": sum(p.numel() for p in dense.parameters()),
            "conv1d_weights": n_conv1d,
            "pruned_layers": names,
        },
        "train_tokens": args.train_steps * args.batch_size * T,
        "calibration_tokens": int(calib_windows.numel()),
        "test_tokens": dense_test["tokens"],
        "val_curve": training["val_curve"],
        "dense_train_s": training["dense_train_s"],
        "dense_source": training["dense_source"],
        "dense_test": dense_test,
        "rows": strip_modules(rows),
        "memory": memory,
        "machine": machine_info(),
        "total_s": time.perf_counter() - t_total,
    }
    write_results(args.out, results, _plot, table)
    return results


def compare(
    args: argparse.Namespace,
    dense: ByteLM,
    names: list[str],
    calib: list[Tensor],
    retrain_loader: DataLoader,
    test: Tensor,
) -> list[dict[str, Any]]:
    """Every method at 50% and 2:4, each from the dense weights, pruned block by block and retrained."""
    dense_state = copy.deepcopy(dense.state_dict())

    def make_module() -> ByteLM:
        m = ByteLM(make_gpt2(args.layers, args.width, args.heads, args.context), lr=args.retrain_lr)
        m.load_state_dict(dense_state)
        return m

    def evaluate(module: nn.Module) -> dict[str, float]:
        return lm_metrics(module, test)

    def mask_fn(
        module: nn.Module, rule: str, sparsity: float | None, pattern: tuple[int, int] | None
    ) -> dict[str, Tensor]:
        if rule != "wanda":
            return baseline_masks(module, names, rule, sparsity, pattern)
        return wanda_block_masks(module, names, calib, sparsity, pattern)  # its paper's block-by-block setting

    setup = Setup(
        names=names,
        evaluate=evaluate,
        calib_batches=calib,
        baseline_mask_fn=mask_fn,
        lobs_kwargs={"sequential": True, "allocation": "uniform"},
    )
    rows: list[dict[str, Any]] = []
    for sparsity, pattern in ((0.5, None), (None, (2, 4))):
        for method in [m for m in args.methods.split(",") if m]:
            row = run_prune_retrain(make_module, method, setup, sparsity, pattern, retrain_loader, args.retrain_steps)
            rows.append(row)
            log.info(
                "%-16s %-4s one-shot ppl %.3f retrained ppl %.3f zeros %.4f prune %.1fs",
                method,
                pattern and "2:4" or "50%",
                row["oneshot"]["ppl"],
                row["retrained"]["ppl"],
                row["oneshot_zeros"],
                row["prune_seconds"],
            )
    return rows


def table(results: dict[str, Any]) -> str:
    """The dense perplexity and :func:`perplexity_table`."""
    d = results["dense_test"]
    return "\n".join(
        [f"dense test perplexity {d['ppl']:.3f} ({d['bpb']:.3f} bits/byte)", "", *perplexity_table(results["rows"])]
    )


def _plot(path: str, results: dict[str, Any]) -> None:
    """The dense training curve, and test bits per byte of every method, one-shot and retrained."""
    with figure(path, ncols=2, figsize=(10, 3.8), dpi=110) as (a1, a2):
        steps = [c[0] * results["args"]["batch_size"] * results["net"]["context"] / 1e3 for c in results["val_curve"]]
        a1.plot(steps, [c[1] / LN2 for c in results["val_curve"]], "o-")
        a1.set_xlabel("training tokens (thousands)")
        a1.set_ylabel("validation bits per byte")
        a1.set_title("dense training", fontsize=9)
        a1.grid(alpha=0.3)
        methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
        for k, (pat, label) in enumerate(((None, "50%"), ("2:4", "2:4"))):
            for j, when in enumerate(("oneshot", "retrained")):
                vals = [
                    next(
                        (r[when]["bpb"] for r in results["rows"] if r["method"] == m and r["pattern"] == pat), math.nan
                    )
                    for m in methods
                ]
                a2.bar(
                    [i + 0.2 * (2 * k + j) - 0.3 for i in range(len(methods))], vals, width=0.2, label=f"{label} {when}"
                )
        a2.axhline(results["dense_test"]["bpb"], color="gray", ls="--", label="dense")
        a2.set_xticks(range(len(methods)))
        a2.set_xticklabels(methods, rotation=20, fontsize=7)
        a2.set_ylabel("test bits per byte")
        a2.set_ylim(results["dense_test"]["bpb"] * 0.9, None)
        a2.legend(fontsize=7)
        a2.set_title("pruned (sequential), test", fontsize=9)


if __name__ == "__main__":
    main()
