"""Markdown tables for BENCHMARKS.md from the raw results of examples/resnet_mnist.py and examples/gpt2_stdlib.py.

    python benchmarks/deep_report.py benchmarks/results/resnet_mnist.json benchmarks/results/gpt2_stdlib.json

Prints only numbers read from the JSON files.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

from lobs_lab.tables import accuracy_table, method_key, perplexity_table


def resnet(res: dict[str, Any]) -> str:
    rows = res["rows"]
    cols = list(dict.fromkeys(method_key(r) for r in rows))
    out = [
        f"Dense: {100 * res['dense_acc']:.2f}% test accuracy ({res['num_train']} train / {res['num_test']} test, "
        f"{res['args']['epochs']} epochs, {res['dense_train_s']:.0f} s). Cells: one-shot test accuracy %, "
        f"(after {res['args']['retrain_steps']} retraining steps with the masks held) where retrained.",
        "",
        *accuracy_table(rows),
    ]
    out += [
        "",
        "Measured RMS output error of the logits (pruned vs dense, calibration batches) and the bound's note:",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    notes = set()
    for m in dict.fromkeys(r["method"] for r in rows if "output_error" in r):
        cells = []
        for c in cols:
            r = next((r for r in rows if r["method"] == m and method_key(r) == c), None)
            cells.append("" if r is None else f"{r['output_error']:.3g}")
            if r is not None:
                notes.add(r["bound_note"])
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out += ["", "Bound: " + "; ".join(sorted(notes))]
    return "\n".join(out)


def gpt2(res: dict[str, Any]) -> str:
    rows = res["rows"]
    d = res["dense_test"]
    out = [
        f"Dense: test perplexity {d['ppl']:.3f} ({d['bpb']:.4f} bits/byte) on {d['tokens']} test tokens. "
        f"Cells: perplexity (bits/byte); retraining = {res['args']['retrain_steps']} steps with the masks held.",
        "",
        *perplexity_table(rows, bpb_digits=4),
    ]
    out += ["", "Validation curve (step: nats/byte): " + ", ".join(f"{s}: {v:.3f}" for s, v, _ in res["val_curve"])]
    # fast vs exact, layer by layer (each in its own sequential run, so inputs differ slightly)
    for pat in (None, "2:4"):
        ex = next((r for r in rows if r["method"] == "exact" and r["pattern"] == pat), None)
        fa = next((r for r in rows if r["method"] == "fast" and r["pattern"] == pat), None)
        lo = next((r for r in rows if r["method"] == "lobs" and r["pattern"] == pat), None)
        if ex and fa:
            ratios = [
                fa["layer_error"][n] / ex["layer_error"][n] for n in ex["layer_error"] if ex["layer_error"][n] > 0
            ]
            line = (
                f"{pat or '50%'}: layer error fast/exact per layer: median {statistics.median(ratios):.3f}, "
                f"min {min(ratios):.3f}, max {max(ratios):.3f}; summed {sum(fa['layer_error'].values()) / sum(ex['layer_error'].values()):.3f}"
            )
            if lo:
                lr = [
                    lo["layer_error"][n] / ex["layer_error"][n] for n in ex["layer_error"] if ex["layer_error"][n] > 0
                ]
                line += f"; lobs/exact median {statistics.median(lr):.3f}"
            out += ["", line]
    if res.get("memory"):
        out += ["", "| operation (fresh process) | seconds | peak RSS above start (MiB) |", "|---|---|---|"]
        for m in res["memory"]:
            out.append(f"| {m['kind']} | {m['seconds']:.2f} | {m['peak_extra_mib']:.1f} |")
    return "\n".join(out)


def main(argv: list[str]) -> None:
    for path in argv:
        res = json.load(open(path))
        print(f"### {res['name']} ({path})\n")
        print(resnet(res) if "dense_acc" in res else gpt2(res))
        m = res["machine"]
        print(
            f"\nmachine: {m['cpu_model']}, {m['cpu_count']} CPUs, load average at the end {', '.join(f'{x:.2f}' for x in m['loadavg'])}, "
            f"torch threads {m['torch_threads']}, Python {m['python']}, torch {m['torch']}, total {res['total_s']:.0f} s\n"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
