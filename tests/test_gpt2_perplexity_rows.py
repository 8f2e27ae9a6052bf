"""benchmarks/gpt2_perplexity.py's loop over methods: a prune refused by the library's memory check is recorded and
the other rows still run (one refusal on a shared machine must not lose the rest of a long run)."""

from __future__ import annotations

import argparse
import math
from typing import Any

import pytest
import torch
from lobs_lab.models import ByteLM, make_gpt2

from script_loader import load_benchmark


def test_a_refused_prune_is_recorded_and_the_other_rows_run(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_benchmark("gpt2_perplexity")
    dense = ByteLM(make_gpt2(2, 16, 2, 8), lr=1e-3, warmup=1, total_steps=1)
    test = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(0))
    refusal = "pruning needs about 3.02 GiB but the memory budget is 2.30 GiB"

    def fake_prune(module: Any, method: str, target: str, calib: Any, args: Any) -> dict[str, float]:
        if method == "auto":
            raise MemoryError(refusal)
        return {"prune_seconds": 0.0, "prune_cpu_seconds": 0.0}  # nothing pruned: the dense model's metrics

    monkeypatch.setattr(bench, "prune_once", fake_prune)
    args = argparse.Namespace(targets="50%,2:4", methods="auto,magnitude")
    rows: list[dict[str, Any]] = []
    saves: list[int] = []
    bench.compare(args, dense, test, [], rows, lambda: saves.append(len(rows)))

    assert [(r["method"], r["target"]) for r in rows] == [
        ("auto", "50%"),
        ("magnitude", "50%"),
        ("auto", "2:4"),
        ("magnitude", "2:4"),
    ]
    assert saves == [1, 2, 3, 4]  # saved after every row, refused ones included
    for r in rows:
        if r["method"] == "auto":
            assert r["error"] == f"MemoryError: {refusal}" and "ppl" not in r
        else:
            assert "error" not in r and r["sparsity"] == 0.0
            assert r["ppl"] == pytest.approx(math.exp(r["nll"]))
    results = {"rows": rows, "dense_test": {"ppl": 1.5, "bpb": 0.5}}
    auto_line = next(line for line in bench.table(results).splitlines() if line.startswith("| auto |"))
    assert auto_line == "| auto | - | - | - | - |"  # a refused cell is left empty, not filled from another row
