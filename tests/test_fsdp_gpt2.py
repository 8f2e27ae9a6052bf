"""A ``transformers`` GPT-2 under FSDP2 (``fully_shard`` per block + root) pruned on 2 gloo ranks on the CPU.

The runs live in ``tests/fsdp_gpt2_script.py`` (it starts its own 2 ranks, each calibrating on its own half of the
sequences); the tests compare the ranks with each other and with ``prune_model`` in this process on the unsharded
GPT-2 and the union of both ranks' batches: the same masks, the same weights up to the rounding of a differently
ordered Hessian sum, the same logits error on held-out sequences. What GPT-2 brings that the MLP tests of
``tests/test_fsdp.py`` lack: ``Conv1D`` weights (transposed), a tied ``lm_head`` that must stay dense, embeddings
sharded with the root, attention, dict batches of ``input_ids``, and the block pipeline (``sequential=True``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ranks import needs_gloo, rank_env, run_ranks, script_module, torchrun

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "fsdp_gpt2_script.py"
RUNS = ("default", "seq")

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.distributed, needs_gloo]


def _script_module():
    """The helper script as a module (importing it starts nothing)."""
    return script_module(SCRIPT)


@pytest.fixture(scope="module")
def gpt2_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_gpt2")
    env = rank_env(ROOT)
    run_ranks([sys.executable, str(SCRIPT), "--out", str(out), "--runs", ",".join(RUNS)], ROOT, env)
    return out


def _load(out: Path, run: str) -> tuple[dict, dict]:
    r0, r1 = (torch.load(out / f"{run}_rank{r}.pt", weights_only=False) for r in (0, 1))
    return r0, r1


@pytest.mark.slow  # one 2-rank launch: about a minute of wall time on 2 shared cores
@pytest.mark.parametrize("run", RUNS)
def test_gpt2_fsdp_ranks_agree_and_keep_the_tied_head_dense(gpt2_out, run):
    r0, r1 = _load(gpt2_out, run)
    # Every parameter sharded: the blocks' Conv1D weights, the embeddings and ln_f (with the root).
    assert all(r0["sharded"].values()) and all(r1["sharded"].values())
    assert not torch.equal(r0["batches"][0]["input_ids"], r1["batches"][0]["input_ids"])
    assert r0["dense_logits_error"] == r1["dense_logits_error"] == 0.0  # the sharded forward is the dense one
    for k in r0["pruned"]:
        assert torch.equal(r0["pruned"][k], r1["pruned"][k]), k
    assert r0["masks"].keys() == r1["masks"].keys()
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n]), n
    assert r0["logits_error"] == r1["logits_error"]
    # Only the blocks' Conv1D layers pruned; the tied lm_head / wte, wpe and the LayerNorms exactly as they were.
    assert sorted(r0["masks"]) == sorted(f"transformer.h.{b}.{m}" for b in range(2) for m in _conv1d_names())
    for k, v in r0["dense"].items():
        if ".attn.c_" not in k and ".mlp.c_" not in k:
            assert torch.equal(r0["pruned"][k], v), k
    warned = " ".join(r0["warnings"])
    assert "'lm_head'" in warned and "tied" in warned, r0["warnings"]


def _conv1d_names() -> tuple[str, ...]:
    return ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _solve_rounding(model: torch.nn.Module, names: list[str]) -> float:
    """How far two prunes of ``model`` may differ whose Hessians differ only by the summation order: the float64
    sums agree to ~tokens * eps64 (far below float32's resolution), so the float32 solves see the same Hessians
    but for a last-bit flip, and their results agree to the solve's own rounding: eps32 per eliminated column of
    the widest layer (GPT-2's ``mlp.c_proj``: 4 x width inputs + the bias)."""
    from lightning_lobs.layers import describe_layer

    cols = max(describe_layer(model.get_submodule(n)).matrix_cols for n in names)
    return cols * torch.finfo(torch.float32).eps


@pytest.mark.slow  # one 2-rank launch: about a minute of wall time on 2 shared cores
@pytest.mark.parametrize("run", RUNS)
def test_gpt2_fsdp_matches_one_process_on_the_union_of_batches(gpt2_out, run):
    r0, r1 = _load(gpt2_out, run)
    script = _script_module()
    model = script.make_gpt2()
    for k, v in model.state_dict().items():
        assert torch.equal(v, r0["dense"][k]), k  # the same seeded GPT-2 here as on the ranks
    dense_logits = script.logits(model, r0["heldout"])
    report = script.prune(model, list(r0["batches"]) + list(r1["batches"]), run)
    for n in r0["masks"]:
        mism = int((report.masks[n] != r0["masks"][n]).sum())
        assert mism == 0, f"{n}: {mism} mask entries differ from the one-process prune"
    assert r0["layer_sparsity"] == {n: r.sparsity for n, r in report.layers.items()}
    tol = _solve_rounding(model, list(r0["masks"]))
    state = model.state_dict()
    for k, v in r0["pruned"].items():
        scale = float(state[k].abs().max())
        torch.testing.assert_close(v, state[k], rtol=tol, atol=tol * scale, msg=lambda m, k=k: f"{k}: {m}")
    # The logits error: the weights' relative difference carried through the network (no amplification at
    # this size: two blocks, LayerNorm after each), on an error of about 2%.
    logits_error = script.relative_error(script.logits(model, r0["heldout"]), dense_logits)
    assert logits_error > 0.005  # a real prune, not a no-op
    assert abs(r0["logits_error"] - logits_error) <= tol, (r0["logits_error"], logits_error)


@pytest.fixture
def one_rank_group():
    """A 1-rank gloo group in this process: ``fully_shard`` on a 1-rank mesh makes every parameter a ``DTensor``,
    so the sharded code paths run without starting processes."""
    import torch.distributed as dist

    from ranks import free_port

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sequential", [False, True])
def test_gpt2_fully_shard_one_rank_prunes_as_unsharded(one_rank_group, sequential, caplog, monkeypatch):
    """The fast check (no child processes): GPT-2 sharded on a 1-rank mesh (DTensor Conv1D weights, the tied head
    and the embeddings sharded with the root, the block pipeline writing DTensor shards) pruned exactly as the
    same GPT-2 unsharded: one process, the same batches and the same sums, so the same masks and weights bit for
    bit. The errors may differ by float64 summation order only: the unsharded default walks the blocks and measures
    each layer's error inside the walk, the sharded one measures after the one pass (the same float32 outputs)."""
    from lightning_lobs.sharding import gather, is_sharded

    script = _script_module()
    sharded, plain = script.make_gpt2(2, 32), script.make_gpt2(2, 32)
    script.shard(sharded)
    assert all(is_sharded(p) for p in sharded.parameters())
    batches = script.rank_batches(0)
    run = "seq" if sequential else "default"
    import lightning_lobs.engine.run as run_mod

    walked = []  # the default walks a sharded model's blocks too (one block's Hessians at a time)
    dense_walk = run_mod.run_dense_blocks
    monkeypatch.setattr(run_mod, "run_dense_blocks", lambda *a: walked.append(1) or dense_walk(*a))
    with pytest.warns(UserWarning, match="'lm_head'.*tied"):
        got = script.prune(sharded, batches, run)
    assert walked == ([] if sequential else [1])
    with pytest.warns(UserWarning, match="'lm_head'.*tied"):
        want = script.prune(plain, batches, run)
    assert "does not apply" not in caplog.text  # sequential: the block pipeline, not the per-layer fallback
    assert got.masks.masks.keys() == want.masks.masks.keys() and got.sparsity == want.sparsity == 0.5
    for n, mask in got.masks.masks.items():
        assert is_sharded(mask) and torch.equal(gather(mask), want.masks[n]), n
    state = plain.state_dict()
    for k, v in sharded.state_dict().items():
        assert torch.equal(gather(v), state[k]), k
    terms = sum(b["input_ids"].numel() for b in batches) * max(script.VOCAB, 4 * 32)  # the widest output per token
    assert got.metrics() == pytest.approx(want.metrics(), rel=terms * torch.finfo(torch.float64).eps, abs=0)


# --------------------------------------------------------------------------- LOBSPruning under ModelParallelStrategy

LIGHTNING_SCRIPT = ROOT / "tests" / "fsdp_lightning_gpt2_script.py"
LIGHTNING_RUNS = ("fit", "fit-seq")


@pytest.fixture(scope="module")
def lightning_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_lightning_gpt2")
    cmd = torchrun(LIGHTNING_SCRIPT, "--out", str(out))
    run_ranks([*cmd, "--runs", ",".join(LIGHTNING_RUNS)], ROOT, rank_env(ROOT))
    return out


@pytest.mark.slow  # one 2-rank Trainer launch per run: about a minute of wall time on 2 shared cores
@pytest.mark.parametrize("run", LIGHTNING_RUNS)
def test_lobs_pruning_gpt2_under_model_parallel_matches_one_process(lightning_out, run):
    """``LOBSPruning`` on a GPT-2 sharded in ``configure_model``: the masks ``prune_model`` gives in one process on
    the dense weights at the prune and both ranks' calibration batches (dicts of ``input_ids`` and ``labels``),
    held at exact zeros through the AdamW epochs after it, the logged sparsity read from every shard."""
    from lightning_lobs import prune_model

    s = script_module(LIGHTNING_SCRIPT)
    r0, r1 = (torch.load(lightning_out / f"{run}_rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["pruned_points"] == r1["pruned_points"] == [s.PRUNE_EPOCH]
    assert set(r0["sharded"].values()) == {"DTensor"}
    assert not torch.equal(r0["batches"][0]["input_ids"], r1["batches"][0]["input_ids"])  # each rank its shard
    for k, v in r0["final"].items():
        assert torch.equal(v, r1["final"][k]), k
    lit = s.lit_classes()[1]()
    lit.load_state_dict(r0["dense"])
    with pytest.warns(UserWarning, match="'model.lm_head'.*tied"):
        report = prune_model(lit, list(r0["batches"]) + list(r1["batches"]), 0.5, **s.callback_options(run))
    masks = report.masks.state_dict()
    assert sorted(masks) == sorted(f"model.transformer.h.{b}.{m}" for b in range(2) for m in _conv1d_names())
    pruned = sum(int((~m).sum()) for m in masks.values())
    for record in (r0, r1):
        after = [e for e in record["epochs"] if e["masks"]]
        assert len(after) == s.EPOCHS - s.PRUNE_EPOCH
        for epoch in after:
            assert epoch["masks"].keys() == masks.keys()
            for n, m in masks.items():
                mism = int((epoch["masks"][n] != m).sum())
                assert mism == 0, f"{n}: {mism} mask entries differ from the one-process prune"
                assert epoch["at_pruned"][n] == 0.0, n
            assert epoch["logged"] == pytest.approx(pruned / sum(m.numel() for m in masks.values()), rel=1e-6)


# --------------------------------------------------------------------------- the benchmark in its quick mode


@pytest.mark.examples
@pytest.mark.slow  # three child processes, one of them 2 ranks: a minute or two on 2 shared cores
def test_gpt2_fsdp_benchmark_quick(tmp_path: Path) -> None:
    from script_loader import load_benchmark

    bench = load_benchmark("gpt2_fsdp")
    out = tmp_path / "f.json"
    res = bench.main(["--quick", "--out", str(out)])
    assert out.is_file()
    cfg = res["config"]
    ranks = cfg["fsdp"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    # Both ranks hold the same pruned model: the same logits error; every row a real 50% prune.
    assert ranks[0]["logits_error"] == ranks[1]["logits_error"]
    for r in (cfg["single"], *ranks):
        assert r["sparsity"] == 0.5
        assert 0.0 < r["logits_error"] < 1.0
        assert r["peak_rss_gib"] >= r["rss_loaded_gib"] > 0
    # Every Conv1D weight entry of the 2 x 64 GPT-2 compared (4 layers per block: 3 + 1 + 4 + 4 times 64 x 64).
    assert ranks[0]["mask_entries"] == 2 * 12 * 64 * 64
    assert 0 <= ranks[0]["mask_mismatches"] <= ranks[0]["mask_entries"]
    assert "| 2 x 64 | FSDP2 rank 1 of 2 |" in bench.table(cfg)
