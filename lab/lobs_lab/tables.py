"""The Markdown tables of the deep examples (``examples/resnet_mnist.py``, ``examples/gpt2_stdlib.py``), read from
their result rows; ``benchmarks/deep_report.py`` prints them for BENCHMARKS.md."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def method_key(row: dict[str, Any]) -> str:
    """The column of a result row: its pattern, or its sparsity in percent."""
    return row["pattern"] or f"{row['sparsity']:.0%}"


def accuracy_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines: methods x sparsities, one-shot accuracy % (retrained in parentheses where measured)."""
    cols = list(dict.fromkeys(method_key(r) for r in rows))
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for c in cols:
            r = next((r for r in rows if r["method"] == method and method_key(r) == c), None)
            if r is None:
                cells.append("")
                continue
            cell = f"{100 * r['oneshot']['acc']:.2f}"
            if r.get("retrained"):
                cell += f" ({100 * r['retrained']['acc']:.2f})"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def perplexity_table(rows: Sequence[dict[str, Any]], bpb_digits: int = 3) -> list[str]:
    """Markdown lines: methods x (50%, 2:4), test perplexity (bits/byte), one-shot and retrained, and prune seconds."""
    lines = [
        "| method | 50% one-shot | 50% retrained | 2:4 one-shot | 2:4 retrained | prune time s (50% / 2:4) |",
        "|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells, secs = [], []
        for pat in (None, "2:4"):
            r = next((r for r in rows if r["method"] == method and r["pattern"] == pat), None)
            if r is None:
                cells += ["", ""]
                continue
            cells += [f"{r[k]['ppl']:.3f} ({r[k]['bpb']:.{bpb_digits}f})" for k in ("oneshot", "retrained")]
            secs.append(f"{r['prune_seconds']:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {' / '.join(secs)} |")
    return lines
