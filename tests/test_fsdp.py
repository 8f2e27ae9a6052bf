"""Pruning ``fully_shard`` (FSDP2) models: real 2-process gloo runs on CPU, compared with one unsharded process.

The runs live in ``tests/fsdp_prune_script.py`` (it starts its own 2 ranks); every rank saves what it calibrated on
and produced, and the tests here compare the ranks with each other and with ``prune_model`` in this process, on the
unsharded model and the union of the ranks' calibration batches.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from lightning_lobs import SolverOptions
from lightning_lobs.distributed import assign_layers
from lightning_lobs.hessian import HessianCollector
from lightning_lobs.layers import solve_cost
from lightning_lobs.resources import LayerMemory, check_budget, layer_memory
from ranks import needs_gloo, rank_env, run_ranks, script_module

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
    """The helper script as a module (importing it starts nothing)."""
    return script_module(SCRIPT)


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    env = rank_env(ROOT)
    runs = (*FAIL_RUNS, *RUNS, _budget_run())
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--runs", ",".join(runs)]
    run_ranks(cmd, ROOT, env)
    return out


def _budget_between() -> tuple[int, int, int]:
    """For the 3-layer MLP with ``fast``, from :func:`layer_memory`'s per-layer numbers, by hand: the peak one
    process needs (every Hessian, the largest solve on top), the larger of the two ranks' (after the reduce a rank
    holds only its own layers' Hessians, with its largest solve or the gathered weight and solution of the other
    rank's layer on top; while calibrating, every layer's partial sums), and a budget between the two."""
    net = _script_module().make_net("mlp")
    layers = {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
    opts = SolverOptions()

    def estimate(gathered: bool) -> dict:
        args = ("fast", torch.float64, opts)
        return {n: layer_memory(n, m, *args, gathered=gathered) for n, m in layers.items()}

    one, sharded = estimate(False), estimate(True)
    all_h = sum(e.hessian_bytes for e in one.values())
    single = all_h + max(e.solve_bytes for e in one.values())
    owners = assign_layers({n: solve_cost(m, "fast") for n, m in layers.items()}, 2)  # the engine's assignment
    ranks = []
    for r in (0, 1):
        own = [e for n, e in sharded.items() if owners[n] == r]
        others = [e.gathered_bytes for n, e in sharded.items() if owners[n] != r]
        ranks.append(max(all_h, sum(e.hessian_bytes for e in own) + max([e.solve_bytes for e in own] + others)))
    assert max(ranks) < single, (ranks, single)  # the example must separate them
    return single, max(ranks), (single + max(ranks)) // 2


def _budget_run() -> str:
    return f"mlp-fast-budget{_budget_between()[2]}"


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
    _check_hessians_on_owners(run, r0, r1)
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


def _owned(record: dict) -> set[str]:
    """The layers whose Hessian this rank held (the others' are meta tensors: a shape, no data)."""
    return {n for n, h in record["hessians"].items() if not h.is_meta}


def _check_hessians_on_owners(run: str, r0: dict, r1: dict) -> None:
    """Each Hessian summed onto the rank that solves its layer, nowhere else (one pass and the walks alike)."""
    assert r0["hessians"].keys() == r1["hessians"].keys() == r0["masks"].keys()
    assert _owned(r0) == set(r0["solved"]) and _owned(r1) == set(r1["solved"])
    assert not (_owned(r0) & _owned(r1))
    for n in r0["hessians"]:  # the placeholder has the owner's shape
        assert r0["hessians"][n].shape == r1["hessians"][n].shape, n
    assert r0["scales"] == r1["scales"] and set(r0["scales"]) == set(r0["masks"])


def _summed_hessian(r0: dict, r1: dict, n: str) -> torch.Tensor:
    return r1["hessians"][n] if r0["hessians"][n].is_meta else r0["hessians"][n]


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
            torch.testing.assert_close(_summed_hessian(r0, r1, n), h, rtol=1e-10, atol=1e-12)
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
    # The bound too: the sharded model's chain is analysed as the unsharded one's (or NaN for the same reason).
    ref, got = dict(report.metrics()), dict(r0["metrics"])
    assert ref.keys() == got.keys()
    for k, v in ref.items():
        assert math.isclose(got[k], v, rel_tol=1e-4, abs_tol=1e-7), (k, got[k], v)
    assert r0["bound_note"] == report.bound_note
    if run.startswith("mlp-"):  # a chain of Linear layers: the bound applies, sharded or not
        assert math.isfinite(got["lobs/bound"]) and not r0["bound_note"], r0["bound_note"]


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
    args = ("l", layer, "fast", torch.float64, SolverOptions())
    plain, gathered = layer_memory(*args), layer_memory(*args, gathered=True)
    assert gathered.hessian_bytes == plain.hessian_bytes
    # the whole weight matrix (bias column included) and its solution, float32: 2 * 200 * 301 * 4 bytes
    assert gathered.solve_bytes - plain.solve_bytes == 2 * 200 * 301 * 4


@pytest.mark.slow  # one 2-rank launch of about a minute on 2 shared cores for all of them (CI runs -m slow too)
@pytest.mark.distributed
@needs_gloo
def test_fsdp_budget_counts_only_the_ranks_own_hessians(fsdp_out):
    """A budget that one process cannot prune in (refused before any work) fits each of the 2 sharded ranks: the
    check counts, per rank, only the Hessians of the layers it owns once they are reduced."""
    run = _budget_run()
    r0, r1 = _load(fsdp_out, run)
    assert r0["error_type"] is None and r1["error_type"] is None, (r0.get("error"), r1.get("error"))
    assert _owned(r0) and _owned(r1) and not (_owned(r0) & _owned(r1))
    script = _script_module()
    model = script.make_net("mlp")
    model.load_state_dict(r0["dense"])
    with pytest.raises(MemoryError, match="memory budget"):
        script.prune_steps(model, list(r0["batches"]) + list(r1["batches"]), "fast", run.split("-")[2:])
    assert r0["sparsity"] == pytest.approx(0.6, abs=0.01)


def test_budget_check_per_rank_counts_owned_hessians():
    """check_budget's two phases per rank, against the numbers worked out by hand."""
    est = {
        "a": LayerMemory("a", hessian_bytes=100, solve_bytes=50, gathered_bytes=10),
        "b": LayerMemory("b", hessian_bytes=300, solve_bytes=400, gathered_bytes=30),
        "c": LayerMemory("c", hessian_bytes=200, solve_bytes=70, gathered_bytes=20),
    }
    cpu = torch.device("cpu")
    assert check_budget(est, 1 << 40, False, cpu)["peak"] == 600 + 400  # one process: every H + largest solve
    assert check_budget(est, 1 << 40, False, cpu, (), {"b"})["peak"] == 300 + 400  # its H + its solve
    # calibrating holds every rank's partial sums of all three (600) > its own H + the gathered b (300 + 30)
    assert check_budget(est, 1 << 40, False, cpu, (), {"a", "c"})["peak"] == 600
    assert check_budget(est, 1 << 40, False, cpu, (), set())["peak"] == 600  # a rank that owns nothing
    # one at a time (sequential): the largest Hessian while calibrating, then its own largest + its work
    assert check_budget(est, 1 << 40, True, cpu, (), {"a"})["peak"] == 300
    assert check_budget(est, 1 << 40, True, cpu, (), {"b"})["peak"] == 300 + 400
    check_budget(est, 700, False, cpu, (), {"b"})
    with pytest.raises(MemoryError, match="memory budget"):
        check_budget(est, 699, False, cpu, (), {"b"})


def test_released_accumulator_frees_its_sum_and_refuses_a_hessian():
    """What a rank that does not own a layer keeps after the reduce: the shape and the count, no data."""
    layer = torch.nn.Linear(6, 3)
    collector = HessianCollector({"l": layer})
    with collector, torch.no_grad():
        layer(torch.randn(5, 6))
    acc = collector.accumulators["l"]
    expected = acc.hessian()
    acc.release()
    assert acc.released and acc.memory_bytes() == 0 and acc.count == 5
    assert acc.sum.is_meta and acc.sum.shape == (1, 7, 7)
    with pytest.raises(RuntimeError, match="released"):
        acc.hessian()
    acc.reset()  # a new sum: usable again
    with collector, torch.no_grad():
        layer(torch.randn(5, 6))
    assert not acc.released and acc.count == 5 and acc.hessian().shape == expected.shape
