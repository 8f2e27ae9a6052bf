"""The GPT-2 benchmarks' pieces (lobs_lab.peers, lobs_lab.gpt2, lobs_lab.isolate) against direct references, and
benchmarks/gpt2_pipeline.py / gpt2_perplexity.py in their ``--quick`` mode.

The block driver is checked against a brute-force loop that re-runs the WHOLE partly pruned model for every block
(what block-by-block calibration must equal), with SparseGPT's own solver when its snapshot is on this machine.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lobs_lab import peers
from lobs_lab.gpt2 import BYTE_TO_GPT2_ID, final_hidden, gpt2_byte_ids, logits_relative_error, random_gpt2
from lobs_lab.isolate import run_guarded

from script_loader import load_benchmark

HAVE_SPARSEGPT = peers.repo_available(peers.SPARSEGPT_REPO)
HAVE_ALPS = peers.repo_available(peers.ALPS_REPO)
needs_peers = pytest.mark.skipif(not (HAVE_SPARSEGPT and HAVE_ALPS), reason="peers' git snapshots not fetched")


def _tiny(seed: int = 0) -> torch.nn.Module:
    return random_gpt2(layers=3, width=32, heads=2, context=16, seed=seed)


def _batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 16), generator=g) for _ in range(n)]


def test_byte_ids_are_gpt2s_byte_tokens() -> None:
    # Known ids of GPT-2's vocabulary: "!" is token 0, "\n" ("Ċ") 198, " " ("Ġ") 220.
    assert sorted(BYTE_TO_GPT2_ID.tolist()) == list(range(256))
    assert gpt2_byte_ids(torch.tensor([ord("!"), 10, 32], dtype=torch.uint8)).tolist() == [0, 198, 220]


class _Recorder:
    """A stand-in for a peer's per-layer class: records every ``add_batch`` input, prunes nothing."""

    def __init__(self, layer: torch.nn.Module, log: dict[int, list[torch.Tensor]]) -> None:
        self.layer, self.log = layer, log

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self.log.setdefault(id(self.layer), []).append(inp.clone())


def test_driver_feeds_every_layer_the_inputs_of_a_plain_forward() -> None:
    """With nothing pruned, each layer's inputs through the driver equal those of a whole-model forward, also with
    a padded attention mask passed as a keyword (the caught kwargs must reach every block)."""
    model = _tiny()
    ids = _batches()
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    batches: list[dict[str, Any]] = [{"input_ids": b, "attention_mask": mask} for b in ids]
    got: dict[int, list[torch.Tensor]] = {}
    solver = peers.PeerSolver("record", lambda layer: _Recorder(layer, got), lambda p: None)
    run = peers.prune_blocks(model, peers.gpt2_blocks(model), batches, solver, forward=lambda m, b: m(**b))
    layers = [m for block in peers.gpt2_blocks(model) for m in peers.prunable_layers(block).values()]
    assert len(run.layers) == len(layers) == 12
    want: dict[int, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: want.setdefault(id(mod), []).append(inp[0].clone()))
        for m in layers
    ]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    for m in layers:
        assert len(got[id(m)]) == len(want[id(m)]) == 3
        for a, b in zip(got[id(m)], want[id(m)]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # same float32 ops, same order


@pytest.mark.skipif(not HAVE_SPARSEGPT, reason="SparseGPT's git snapshot not fetched")
def test_driver_equals_whole_model_reruns_with_sparsegpts_solver() -> None:
    """Block by block = every block calibrated on the outputs of the already pruned blocks: the reference re-runs
    the whole partly pruned model for each block and calls the same solver on the same layers."""
    mod = peers.load_sparsegpt()
    batches = _batches()
    model, ref = _tiny(), _tiny()
    peers.prune_blocks(model, peers.gpt2_blocks(model), batches, peers.sparsegpt_solver(mod, 0.5, None))
    with torch.no_grad():
        for block in peers.gpt2_blocks(ref):
            layers = peers.prunable_layers(block)
            pruners = {n: mod.SparseGPT(m) for n, m in layers.items()}
            hooks = [
                m.register_forward_hook(lambda _m, inp, out, n=n, p=pruners: p[n].add_batch(inp[0].data, out.data))
                for n, m in layers.items()
            ]
            for b in batches:
                ref(b)
            for h in hooks:
                h.remove()
            for p in pruners.values():
                p.fasterprune(0.5, blocksize=128, percdamp=0.01)
    pruned = dict(model.named_parameters())
    for name, w in ref.named_parameters():
        torch.testing.assert_close(pruned[name], w, rtol=1e-4, atol=1e-5)  # float32 sweeps, same order
    zeros = [
        float((m.weight == 0).double().mean())
        for b in peers.gpt2_blocks(model)
        for m in peers.prunable_layers(b).values()
    ]
    assert all(abs(z - 0.5) < 0.01 for z in zeros)


def test_logits_relative_error_matches_the_logits() -> None:
    model, other = _tiny(0), _tiny(3)
    ids = _batches(1)[0]
    h0, h1 = final_hidden(model, ids), final_hidden(other, ids)
    W = model.lm_head.weight.detach()
    dense, pruned = (h0 @ W.T).double(), (h1 @ W.T).double()
    want = float((pruned - dense).norm() / dense.norm())
    assert logits_relative_error(h1, h0, W) == pytest.approx(want, rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, h0 @ W.T, rtol=1e-5, atol=1e-5)  # the head reads final_hidden


def test_run_guarded_returns_json_and_kills_above_the_rss_limit() -> None:
    ok = run_guarded([sys.executable, "-c", "print('noise'); print('{\"a\": 1}')"], rss_limit_gib=4.0, timeout_s=60)
    assert ok.result == {"a": 1} and ok.error is None
    # 600 MiB written (so resident), then held: the guard (limit 0.25 GiB) must kill it long before the sleep ends.
    hog = "import time; b = b'x' * (600 * 2**20); time.sleep(60)"
    killed = run_guarded([sys.executable, "-c", hog], rss_limit_gib=0.25, timeout_s=50)
    assert killed.result is None and killed.error.startswith("killed: resident memory")
    assert killed.wall_seconds < 50
    failed = run_guarded([sys.executable, "-c", "raise SystemExit(3)"], rss_limit_gib=4.0, timeout_s=60)
    assert failed.error == "failed with exit status 3"


@pytest.mark.examples
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SPARSEGPT, reason="SparseGPT's git snapshot not fetched")
def test_gpt2_pipeline_quick(tmp_path: Path) -> None:
    bench = load_benchmark("gpt2_pipeline")
    out = tmp_path / "p.json"
    res = bench.main(["--quick", "--pipelines", "dense,sparsegpt,default", "--out", str(out)])
    assert out.is_file()
    rows = {r["pipeline"]: r for r in res["configs"][0]["rows"]}
    assert list(rows) == ["dense", "sparsegpt", "default"]
    assert rows["dense"]["logits_error"] == 0.0 and rows["dense"]["sparsity"] == 0.0
    for name in ("sparsegpt", "default"):
        r = rows[name]
        assert abs(r["sparsity"] - 0.5) < 0.01, name
        assert 0.0 < r["logits_error"] < 1.0, name
        assert r["peak_rss_gib"] >= r["rss_loaded_gib"] > 0, name
        assert r["time_over_sparsegpt"] == pytest.approx(r["seconds"] / rows["sparsegpt"]["seconds"])
    assert "| 2 x 64 | sparsegpt |" in bench.table(res)


@pytest.mark.examples
@pytest.mark.slow
@needs_peers
def test_gpt2_perplexity_quick(tmp_path: Path) -> None:
    bench = load_benchmark("gpt2_perplexity")
    cache = tmp_path / "dense.pt"
    args = ["--quick", "--methods", "auto,sparsegpt,alps,wanda,magnitude", "--dense-cache", str(cache)]
    res = bench.main([*args, "--out", str(tmp_path / "q.json")])
    assert cache.is_file() and res["dense_source"] == "trained in this run"
    dense = res["dense_test"]["ppl"]
    assert 1.0 < dense < 256.0
    assert {(r["method"], r["target"]) for r in res["rows"]} == {
        (m, t) for m in ("auto", "sparsegpt", "alps", "wanda", "magnitude") for t in ("50%", "2:4")
    }
    for r in res["rows"]:
        assert abs(r["sparsity"] - 0.5) < 0.01 and math.isfinite(r["ppl"]) and r["ppl"] > 1.0, r
    assert bench.table(res).splitlines()[2].startswith("| dense |")
    again = bench.main([*args, "--methods", "magnitude", "--targets", "50%"])
    assert again["dense_source"].startswith("loaded from") and again["dense_test"]["ppl"] == pytest.approx(dense)
