"""Pruning ``fully_shard`` (FSDP2) models: real 2-process gloo runs on CPU, compared with one unsharded process.

The runs live in ``tests/fsdp_prune_script.py`` (it starts its own 2 ranks); every rank saves what it calibrated on
and produced, and the tests here compare the ranks with each other and with ``prune_model`` in this process, on the
unsharded model and the union of the ranks' calibration batches.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from lightning_lobs.hessian import HessianCollector
from lightning_lobs.resources import layer_memory
from ranks import needs_gloo, run_ranks

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "fsdp_prune_script.py"
# The failing runs first: the runs after them also show the process group is still usable. Rank 1 alone fails: in its
# memory check (before calibrating), or in its layer solves (after the Hessians were reduced).
FAIL_RUNS = {
    "mlp-exact-failbudget1": ("MemoryError", "memory budget"),
    "mlp-fast-failsolve1": ("ValueError", "injected"),
}
RUNS = ("mlp-exact", "mlp-fast-global", "cnn-fast", "mlp-exact-seq", "gpt-fast", "mlp-fast-twice")

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process references on one thread


def _script_module():
    """The helper script as a module (importing it starts nothing and patches nothing)."""
    spec = importlib.util.spec_from_file_location("fsdp_prune_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ)
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--runs", ",".join((*FAIL_RUNS, *RUNS))]
    run_ranks(cmd, ROOT, env)
    return out


def _load(out: Path, run: str) -> tuple[dict, dict]:
    r0, r1 = (torch.load(out / f"{run}_rank{r}.pt", weights_only=False) for r in (0, 1))
    return r0, r1


def _reference(run: str, r0: dict, r1: dict):
    """prune_model in this process on the unsharded model and the union of both ranks' calibration batches."""
    script = _script_module()
    kind, method, *rest = run.split("-")
    model = script.make_net(kind)
    model.load_state_dict(r0["dense"])
    batches = list(r0["batches"]) + list(r1["batches"])
    hessians = None
    if (
        "seq" not in rest and "twice" not in rest
    ):  # dense-network Hessians (sequential ones depend on the pruned earlier layers)
        collector = HessianCollector({n: model.get_submodule(n) for n in r0["masks"]})
        model.eval()  # as the engine calibrates (BatchNorm on its running statistics)
        with collector, torch.no_grad():
            for x in batches:
                model(x)
        model.train()
        hessians = collector.hessians()
    report = script.prune_steps(model, batches, method, rest)
    return model, report, hessians


# --------------------------------------------------------------------------- the sharded prune


@pytest.mark.slow  # one 2-rank launch of about a minute on 2 shared cores for all of them (CI runs -m slow too)
@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("run", RUNS)
def test_fsdp_ranks_agree_and_share_the_solves(fsdp_out, run):
    r0, r1 = _load(fsdp_out, run)
    assert r0["error_type"] is None and r1["error_type"] is None, (r0.get("error"), r1.get("error"))
    # The model really was sharded: every parameter a DTensor, each rank holding part of the rows.
    assert all(r0["sharded"].values()) and all(r1["sharded"].values())
    for k, rows in r0["local_rows"].items():
        assert rows[0] + r1["local_rows"][k][0] == r0["dense"][k].shape[0], k
    assert not torch.equal(r0["batches"][0], r1["batches"][0])  # each rank its own calibration batches
    for n in r0["hessians"]:  # summed over ranks: the same on both
        assert torch.equal(r0["hessians"][n], r1["hessians"][n]), n
    for k in r0["pruned"]:
        assert torch.equal(r0["pruned"][k], r1["pruned"][k]), k
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n]), n
    assert r0["metrics"] == pytest.approx(r1["metrics"], rel=0, abs=0, nan_ok=True)
    # Each layer solved once a step, by one rank, on its whole (gathered) weight; both ranks had work.
    steps = 2 if "twice" in run else 1
    s0, s1 = set(r0["solved"]), set(r1["solved"])
    assert len(r0["solved"]) == steps * len(s0) and len(r1["solved"]) == steps * len(s1)
    assert s0 and s1 and not (s0 & s1) and s0 | s1 == set(r0["masks"])
    assert all(r0["solve_input_is_whole"]) and all(r1["solve_input_is_whole"])


@pytest.mark.slow  # one 2-rank launch of about a minute on 2 shared cores for all of them (CI runs -m slow too)
@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("run", RUNS)
def test_fsdp_gathers_one_layer_at_a_time(fsdp_out, run):
    for record in _load(fsdp_out, run):
        # Every layer's weight was gathered (the solve needs it whole) ...
        weights = {g for g in record["gathers"] if not g.startswith("mask of ")}
        assert weights == set(record["masks"]), record["gathers"]
        # ... but never two layers' whole weights alive at once, and none left alive after the prune.
        assert record["max_live_layers"] == 1, record["gathers"]
        assert record["still_live"] == {}
        biggest = max(w.numel() * w.element_size() for w in record["dense"].values())
        whole = sum(w.numel() * w.element_size() for w in record["dense"].values())
        assert record["max_live_bytes"] < whole
        assert record["max_live_bytes"] <= 4 * biggest  # weight + bias + the matrix built from them


@pytest.mark.slow  # one 2-rank launch of about a minute on 2 shared cores for all of them (CI runs -m slow too)
@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("run", RUNS)
def test_fsdp_masks_are_sharded_like_their_weights(fsdp_out, run):
    for record in _load(fsdp_out, run):
        assert record["mask_like_weight"] and all(record["mask_like_weight"].values()), record["mask_like_weight"]
        for n, mask in record["masks"].items():  # and the model holds them
            assert torch.all(record["pruned"][f"{n}.weight"][~mask] == 0), n


@pytest.mark.slow  # one 2-rank launch of about a minute on 2 shared cores for all of them (CI runs -m slow too)
@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("run", RUNS)
def test_fsdp_matches_unsharded_prune_on_union_of_batches(fsdp_out, run):
    r0, r1 = _load(fsdp_out, run)
    model, report, hessians = _reference(run, r0, r1)
    if hessians is not None:  # the hooks saw whole activations inside the sharded forward
        for n, h in hessians.items():
            torch.testing.assert_close(r0["hessians"][n], h, rtol=1e-10, atol=1e-12)
    # Hessians are float64 sums in a different order: masks must still agree (no ties here), weights up to the
    # float32 solve's rounding of that difference (the tolerance of the DDP tests).
    for n in r0["masks"]:
        mism = int((report.masks[n] != r0["masks"][n]).sum())
        assert mism == 0, f"{n}: {mism} mask entries differ from the unsharded prune"
    state = model.state_dict()
    assert r0["pruned"].keys() == state.keys()
    for k, v in r0["pruned"].items():
        torch.testing.assert_close(v, state[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # The report reads the gathered zeros: the same sparsities as the unsharded model's.
    assert r0["layer_sparsity"] == {n: r.sparsity for n, r in report.layers.items()}
    assert r0["sparsity"] == report.sparsity
    ref = {k: v for k, v in report.metrics().items() if "bound" not in k}
    got = {k: v for k, v in r0["metrics"].items() if "bound" not in k}
    assert ref.keys() == got.keys()
    for k, v in ref.items():
        assert math.isclose(got[k], v, rel_tol=1e-4, abs_tol=1e-7), (k, got[k], v)
    # The bound: NaN under FSDP2, with that reason or the one the unsharded prune gives too (checked before it).
    fsdp_note = "bound not applicable: torch.fx cannot trace fully_shard (FSDP2) modules"
    assert r0["bound_note"] in {fsdp_note, report.bound_note or fsdp_note}
    assert "lobs/bound" not in r0["metrics"]


@pytest.mark.slow  # one 2-rank launch of about a minute on 2 shared cores for all of them (CI runs -m slow too)
@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("run", FAIL_RUNS)
def test_fsdp_failure_on_one_rank_fails_both_and_restores(fsdp_out, run):
    r0, r1 = _load(fsdp_out, run)
    kind, words = FAIL_RUNS[run]
    assert r1["error_type"] == kind and words in r1["error"], r1["error"]
    assert r0["error_type"] == "RuntimeError" and "failed on rank 1" in r0["error"], r0["error"]
    for record in (r0, r1):  # the whole model (every shard, gathered) exactly as before
        assert record["after"].keys() == record["dense"].keys()
        for k, v in record["dense"].items():
            assert torch.equal(record["after"][k], v), k
    if "failsolve1" in run:
        assert r1["solved"], "rank 1 never reached its solves: the failure was not the injected one"
    else:
        assert r0["hessians"] == r1["hessians"] == {}, "the memory check must fail before calibrating"


# --------------------------------------------------------------------------- the memory check


def test_memory_estimate_counts_one_gathered_layer():
    layer = torch.nn.Linear(300, 200)
    args = ("l", layer, "fast", torch.float64, torch.float32, 1 << 30)
    plain, gathered = layer_memory(*args), layer_memory(*args, gathered=True)
    assert gathered.hessian_bytes == plain.hessian_bytes
    # the whole weight matrix (bias column included) and its solution, float32: 2 * 200 * 301 * 4 bytes
    assert gathered.solve_bytes - plain.solve_bytes == 2 * 200 * 301 * 4
