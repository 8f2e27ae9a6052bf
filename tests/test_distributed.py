"""Distributed pruning: real 2-process CPU DDP / ddp_spawn runs, layer assignment, sharded strategies.

The DDP runs live in ``tests/ddp_prune_script.py`` (Lightning re-launches a script, so they
cannot run inside pytest's process); every rank saves what it calibrated on and produced,
and the tests here compare the ranks with each other and with ``prune_model`` in one process
on the union of the ranks' calibration batches.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_lobs import LOBSPruning, prune_model
from lightning_lobs.distributed import RankInfo, assign_layers, broadcast_floats, broadcast_tensors
from lightning_lobs.hessian import HessianCollector
from ranks import free_port, needs_gloo, rank_env, run_ranks, script_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "ddp_prune_script.py"
DDP_RUNS = ("mlp-exact", "mlp-fast", "cnn-exact", "cnn-fast", "mlp-exact-seq", "cnn-admm", "blk-fast-seq")
# prune() called directly with RankInfo.current() on uneven shards (1 batch of 16 vs 3 of 32).
RAW_RUNS = ("raw-exact",)
# Rank 1 alone fails; run first, so the runs after them also show the process group is still usable.
FAIL_RUNS = ("mlp-exact-failbudget1", "mlp-fast-failsolve1", "cnn-exact-seq-uni-failsolve1")
SPAWN_RUNS = ("cnn-exact",)

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process references on one thread


def _script_module():
    """The helper script as a module (importing it does not patch the engine: only running it does)."""
    return script_module(SCRIPT)


def _launch(out: Path, strategy: str, runs) -> Path:
    env = rank_env(ROOT, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--strategy", strategy, "--runs", ",".join(runs)]
    run_ranks(cmd, ROOT, env)
    return out


def _load(out: Path, strategy: str, run: str) -> tuple[dict, dict]:
    r0, r1 = (torch.load(out / f"{strategy}_{run}_rank{r}.pt", weights_only=False) for r in (0, 1))
    return r0, r1


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory) -> Path:
    return _launch(tmp_path_factory.mktemp("ddp"), "ddp", FAIL_RUNS + DDP_RUNS + RAW_RUNS)


@pytest.fixture(scope="module")
def spawn_out(tmp_path_factory) -> Path:
    return _launch(tmp_path_factory.mktemp("ddp_spawn"), "ddp_spawn", SPAWN_RUNS)


def _same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _close_float(a: float, b: float, rel: float = 1e-4, abs_: float = 1e-7) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def _params_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


# --------------------------------------------------------------------------- the ranks agree


def _check_ranks_agree(r0: dict, r1: dict, strategy_name: str) -> None:
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["rank_info"] == (0, 2) and r1["rank_info"] == (1, 2)
    assert r0["strategy"] == r1["strategy"] == strategy_name
    # Each rank calibrated on its own DistributedSampler shard: 4 full batches, disjoint samples.
    assert len(r0["batches"]) == len(r1["batches"]) == 4
    x0 = torch.cat([b[0] for b in r0["batches"]])
    x1 = torch.cat([b[0] for b in r1["batches"]])
    assert x0.shape[0] == x1.shape[0] == 128
    assert not torch.equal(x0, x1)
    rows0 = {tuple(r.flatten().tolist()) for r in x0}
    rows1 = {tuple(r.flatten().tolist()) for r in x1}
    assert len(rows0 | rows1) == 256 and not (rows0 & rows1)
    # Same model going in, same Hessians (summed over ranks), same weights/masks/metrics coming out.
    for k, v in _params_only(r0["dense"]).items():
        assert torch.equal(v, r1["dense"][k]), k
    assert r0["hessians"].keys() == r1["hessians"].keys() == r0["masks"].keys()
    for n in r0["hessians"]:  # summed onto the rank that solves the layer (one pass), or onto both (sequential)
        h0, h1 = r0["hessians"][n], r1["hessians"][n]
        assert h0.shape == h1.shape, n
        if h0.is_meta or h1.is_meta:
            assert h0.is_meta != h1.is_meta and n in (r1 if h0.is_meta else r0)["solved"], n
        else:
            assert torch.equal(h0, h1), n
    assert r0["positions"] == r1["positions"]
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n]), n
    assert r0["pruned"].keys() == r1["pruned"].keys()
    for k in r0["pruned"]:  # BatchNorm statistics too: re-estimated per rank, then combined
        assert torch.equal(r0["pruned"][k], r1["pruned"][k]), k
    assert r0["metrics"].keys() == r1["metrics"].keys()
    for k in r0["metrics"]:
        assert _same_float(r0["metrics"][k], r1["metrics"][k]), (k, r0["metrics"][k], r1["metrics"][k])
    assert r0["layers"].keys() == r1["layers"].keys()
    for n in r0["layers"]:
        for key, v in r0["layers"][n].items():
            w = r1["layers"][n][key]
            assert _same_float(v, w) if isinstance(v, float) else v == w, (n, key, v, w)
    # Pruning really happened, and retraining held the masks on both ranks.
    assert 0.55 < r0["metrics"]["lobs/sparsity"] < 0.65
    for n, m in r0["masks"].items():
        assert torch.all(r0["pruned"][f"{n}.weight"][~m] == 0), n
    assert r0["final_masks_held"] and r1["final_masks_held"]
    for k, v in _params_only(r0["final"]).items():
        assert torch.equal(v, r1["final"][k]), k
        if k.endswith(".weight") and k[: -len(".weight")] in r0["masks"]:
            assert torch.all(v[~r0["masks"][k[: -len(".weight")]]] == 0), k
            assert not torch.equal(v, r0["pruned"][k]), f"{k} was not retrained after pruning"


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("run", DDP_RUNS)
def test_ddp_ranks_agree(ddp_out, run):
    r0, r1 = _load(ddp_out, "ddp", run)
    _check_ranks_agree(r0, r1, "DDPStrategy")


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("run", DDP_RUNS)
def test_ddp_layer_solves_are_spread_over_ranks(ddp_out, run):
    r0, r1 = _load(ddp_out, "ddp", run)
    layers = set(r0["masks"])
    assert len(layers) == 3
    s0, s1 = set(r0["solved"]), set(r1["solved"])
    # Each layer solved exactly once, by one rank, and both ranks had work.
    assert len(r0["solved"]) == len(s0) and len(r1["solved"]) == len(s1)
    assert s0 and s1 and not (s0 & s1) and s0 | s1 == layers


def _reference(run: str, r0: dict, r1: dict):
    """prune_model in this process on the union of both ranks' calibration batches."""
    script = _script_module()
    kind, method, *rest = run.split("-")
    model = script.LitNet(kind)
    model.load_state_dict(r0["dense"])
    batches = list(r0["batches"]) + list(r1["batches"])
    collector = HessianCollector({n: model.get_submodule(n) for n in r0["masks"]})
    hessians = None
    if not rest:  # dense-network Hessians (sequential ones depend on the pruned earlier layers)
        with collector, torch.no_grad():
            model.eval()
            for x, _ in batches:
                model(x)
        model.train()
        hessians = collector.hessians()
    report = prune_model(model, batches, 0.6, method, sequential="seq" in rest, prune_head=True, calibration=script.C64)
    return model, report, hessians


def _check_matches_single_process(run: str, r0: dict, r1: dict) -> None:
    model, report, hessians = _reference(run, r0, r1)
    if hessians is not None:
        for n, h in hessians.items():
            got = r1["hessians"][n] if r0["hessians"][n].is_meta else r0["hessians"][n]  # the owner's
            torch.testing.assert_close(got, h, rtol=1e-10, atol=1e-12)
    kind = run.split("-")[0]
    expected_positions = {
        "mlp": {"net.0": 1.0, "net.2": 1.0, "net.4": 1.0},
        "cnn": {"net.0": 64.0, "net.4": 16.0, "net.7": 1.0},
        "blk": {"net.0.0": 1.0, "net.1.0": 1.0, "net.2": 1.0},
    }
    assert r0["positions"] == pytest.approx(expected_positions[kind])  # sample counts summed over ranks too
    # Hessians are float64 sums in a different order: masks must still agree (no ties here).
    for n in r0["masks"]:
        mism = int((report.masks[n] != r0["masks"][n]).sum())
        assert mism == 0, f"{n}: {mism} mask entries differ from single-process pruning"
    state = model.state_dict()
    for k, v in r0["pruned"].items():
        if k.endswith("num_batches_tracked"):
            assert int(v) == int(state[k]) == 8, k  # 4 batches on each of 2 ranks
        else:
            torch.testing.assert_close(v, state[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    ref = report.metrics()
    assert ref.keys() == r0["metrics"].keys()
    for k, v in ref.items():
        assert _close_float(r0["metrics"][k], v), (k, r0["metrics"][k], v)
    assert r0["bound_note"] == report.bound_note


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("run", DDP_RUNS)
def test_ddp_matches_single_process_on_union_of_batches(ddp_out, run):
    r0, r1 = _load(ddp_out, "ddp", run)
    _check_matches_single_process(run, r0, r1)


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("run", SPAWN_RUNS)
def test_ddp_spawn_agrees_and_matches_single_process(spawn_out, run):
    r0, r1 = _load(spawn_out, "ddp_spawn", run)
    _check_ranks_agree(r0, r1, "DDPStrategy")
    s0, s1 = set(r0["solved"]), set(r1["solved"])
    assert s0 and s1 and not (s0 & s1) and s0 | s1 == set(r0["masks"])
    _check_matches_single_process(run, r0, r1)


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("run", FAIL_RUNS)
def test_ddp_failure_on_one_rank_stops_every_rank(ddp_out, run):
    """A failure on rank 1 alone (memory check, a layer solve) makes every rank raise instead of hang."""
    r0, r1 = _load(ddp_out, "ddp", run)
    if "failbudget1" in run:
        assert r1["error_type"] == "MemoryError"
        assert "memory budget is 1 bytes" in r1["error"] and "method='fast'" in r1["error"]
        assert r0["error_type"] == "RuntimeError" and "memory check failed on rank 1" in r0["error"]
        assert r0["calibrated"] == r1["calibrated"] == []  # refused before calibrating
    else:
        assert r1["error_type"] == "ValueError" and "injected failure solving" in r1["error"]
        assert r0["error_type"] == "RuntimeError" and "failed on rank 1" in r0["error"]
        assert r0["calibrated"] == r1["calibrated"] != []
        if "seq" in run:  # sequential: the first layer is rank 0's and solved fine; rank 1's net.4 fails
            assert "solving layer 'net.4' failed on rank 1" in r0["error"]
            assert r0["calibrated"] == r1["calibrated"] == ["net.0", "net.4"]
    for r in (r0, r1):
        assert r["masks"] == {}
        for k, v in _params_only(r["dense"]).items():  # weights restored on every rank
            assert torch.equal(r["after"][k], v), k


@pytest.mark.distributed
@needs_gloo
def test_prune_with_rank_info_on_uneven_shards_matches_single_process(ddp_out):
    """BatchNorm statistics of ranks with different batch counts combine into the all-batch average."""
    script = _script_module()
    r0, r1 = _load(ddp_out, "raw", "cnn-exact")
    assert not torch.equal(r0["dense"]["net.1.running_mean"], r1["dense"]["net.1.running_mean"])
    for k in r0["pruned"]:
        assert torch.equal(r0["pruned"][k], r1["pruned"][k]), k
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n]), n
    assert set(r0["solved"]) and set(r1["solved"]) and not set(r0["solved"]) & set(r1["solved"])
    # One process, all four batches, rank 0's dense model (its buffers are what every rank calibrates).
    model = script.LitNet("cnn")
    model.load_state_dict(r0["dense"])
    report = prune_model(model, script.raw_batches(), 0.6, "exact", prune_head=True, calibration=script.C64)
    for n in r0["masks"]:
        assert torch.equal(report.masks[n], r0["masks"][n]), n
    state = model.state_dict()
    assert int(r0["pruned"]["net.1.num_batches_tracked"]) == int(state["net.1.num_batches_tracked"]) == 4
    for k, v in r0["pruned"].items():
        torch.testing.assert_close(v, state[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    for k, v in report.metrics().items():
        assert _close_float(r0["metrics"][k], v), (k, r0["metrics"][k], v)
    assert r0["positions"] == pytest.approx({"net.0": 64.0, "net.4": 16.0, "net.7": 1.0})


# --------------------------------------------------------------------------- assign_layers


def _loads(owners: dict[str, int], costs: dict[str, float], world: int):
    loads = [0.0] * world
    for n, r in owners.items():
        loads[r] += costs[n]
    return loads


def test_assign_layers_lpt_example_and_determinism():
    costs = {"a": 10.0, "b": 7.0, "c": 5.0, "d": 3.0}
    owners = assign_layers(costs, 2)
    # LPT: a->0 (10), b->1 (7), c->1 (12), d->0 (13)
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0}
    assert _loads(owners, costs, 2) == [13.0, 12.0]
    # Insertion order of the mapping does not matter (every rank must compute the same plan).
    for perm in itertools.permutations(costs):
        assert assign_layers({n: costs[n] for n in perm}, 2) == owners


def test_assign_layers_ties_broken_by_name_and_every_rank_gets_work():
    costs = {"z": 1.0, "y": 1.0, "x": 1.0}
    assert assign_layers(costs, 3) == {"x": 0, "y": 1, "z": 2}
    assert assign_layers(costs, 1) == {"x": 0, "y": 0, "z": 0}
    # Three layers of very different cost on two ranks: both ranks still get a layer.
    owners = assign_layers({"net.0": 1e9, "net.2": 3e6, "net.4": 1e3}, 2)
    assert set(owners.values()) == {0, 1}
    assert owners["net.0"] != owners["net.2"]
    # More ranks than layers: each layer on its own rank.
    owners = assign_layers({"a": 5.0, "b": 2.0}, 4)
    assert sorted(owners.values()) == [0, 1]
    assert assign_layers({}, 2) == {}


def test_assign_layers_is_within_lpt_bound_of_optimum():
    rng = random.Random(0)
    for _ in range(60):
        world = rng.randint(2, 3)
        costs = {f"l{i}": float(rng.randint(1, 50)) for i in range(rng.randint(1, 7))}
        owners = assign_layers(costs, world)
        assert set(owners) == set(costs) and all(0 <= r < world for r in owners.values())
        makespan = max(_loads(owners, costs, world))
        names = list(costs)
        best = min(
            max(_loads(dict(zip(names, combo)), costs, world))
            for combo in itertools.product(range(world), repeat=len(names))
        )
        assert makespan <= (4 / 3 - 1 / (3 * world)) * best + 1e-9, (costs, owners, best)
        if len(costs) >= world:
            assert len(set(owners.values())) == world  # no idle rank


def test_single_process_rank_info_and_broadcast_helpers_are_noops():
    info = RankInfo()
    assert not info.active and (info.rank, info.world_size) == (0, 1)
    assert RankInfo.current() == RankInfo()  # no process group in the test process
    t = [torch.ones(2, dtype=torch.bool), torch.arange(3.0)]
    out = broadcast_tensors(t, 0, info)
    assert out[0] is t[0] and out[1] is t[1]
    assert broadcast_floats([1.5, float("nan")], 0, info)[0] == 1.5


# --------------------------------------------------------------------------- sharded strategies refused


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


def _stub_trainer(strategy) -> SimpleNamespace:
    return SimpleNamespace(strategy=strategy, max_epochs=3, max_steps=-1, world_size=1, callbacks=[])


def test_fsdp_trainer_refused_or_not_constructible_on_cpu():
    import pytorch_lightning as pl

    try:
        trainer = pl.Trainer(strategy="fsdp", accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    except Exception as err:  # Lightning needs a GPU for FSDP: nothing to refuse on CPU
        assert "fsdp" in str(err).lower() or "gpu" in str(err).lower()
        return
    with pytest.raises(RuntimeError, match="ddp"):
        LOBSPruning(prune_epoch=1).setup(trainer, _Tiny(), "fit")


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy", "XLAFSDPStrategy"])  # FSDP2: test_fsdp_lightning
def test_sharded_strategies_refused_in_setup(name):
    strategy = type(name, (), {})()
    with pytest.raises(RuntimeError, match="ddp") as info:
        LOBSPruning(prune_epoch=1).setup(_stub_trainer(strategy), _Tiny(), "fit")
    assert name in str(info.value)
    # Only at fit: validate/test/predict have nothing to prune.
    LOBSPruning(prune_epoch=1).setup(_stub_trainer(strategy), _Tiny(), "validate")


def test_real_fsdp_strategy_and_subclasses_refused():
    from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy

    class MyFSDP(FSDPStrategy):  # a user's customised FSDP is still sharded
        pass

    for strategy in (FSDPStrategy(), MyFSDP()):
        with pytest.raises(RuntimeError, match="ddp"):
            LOBSPruning(prune_epoch=1).setup(_stub_trainer(strategy), _Tiny(), "fit")
    LOBSPruning(prune_epoch=1).setup(_stub_trainer(DDPStrategy()), _Tiny(), "fit")  # DDP is fine
