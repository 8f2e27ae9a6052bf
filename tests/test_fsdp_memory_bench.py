"""``benchmarks/fsdp_memory.py`` keeps working: a tiny run of its three ways (2 gloo ranks sharded, 2 ranks whole,
one process), and what it records is what the section in BENCHMARKS.md reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ranks import needs_gloo, rank_env, run_ranks

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # five processes start torch and gloo: about a minute on 2 shared cores
@pytest.mark.distributed
@needs_gloo
def test_fsdp_memory_benchmark_quick_run(tmp_path):
    out = tmp_path / "fsdp.json"
    env = rank_env(ROOT)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fsdp_memory.py"), "--width", "64", "--layers", "4"]
    run_ranks([*cmd, "--out", str(out)], ROOT, env)
    summary = json.loads(out.read_text())
    results = summary["results"]
    assert set(results) == {"fsdp", "ddp", "single"} and len(results["fsdp"]) == len(results["ddp"]) == 2
    for mode, ranks in results.items():
        for res in ranks:
            assert res["refused"] is None and res["seconds"] > 0, (mode, res["refused"])
            assert [p["phase"] for p in res["phases"]][:2] == ["model built", "calibrate"]
            assert res["phases"][-1]["phase"] == "end" and res["peak_added_bytes"] > 0
    # each rank holds half the shards (4 Linear(64, 64): rows split in two), the DDP ranks and one process all of it
    assert [r["held_bytes"] for r in results["fsdp"]] == [summary["model_bytes"] // 2] * 2
    assert [r["held_bytes"] for r in results["ddp"]] == [summary["model_bytes"]] * 2
    # the memory check per rank: its own layers' Hessians after the reduce, below one process's
    single = results["single"][0]["check"]["peak"]
    assert all(r["check"]["peak"] < single for r in results["fsdp"] + results["ddp"])
