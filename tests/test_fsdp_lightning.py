"""Masks on ``fully_shard`` (FSDP2) weights and ``LOBSPruning`` under ``ModelParallelStrategy``; refused strategies.

The two-rank runs live in ``tests/fsdp_lightning_script.py`` (started by ``torch.distributed.run`` on 2 CPU
gloo ranks); every rank saves what it saw, and the tests here compare the ranks with each other and
with the same training in one process without sharding.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lobs import LOBSPruning, MaskSet
from ranks import needs_gloo, rank_env, run_ranks, script_module, torchrun

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "fsdp_lightning_script.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def _script():
    """The helper script as a module (its model, masks and batches for the in-process references)."""
    return script_module(SCRIPT)


def _launch(out: Path, runs: str) -> Path:
    run_ranks(torchrun(SCRIPT, "--out", str(out), "--runs", runs), ROOT, rank_env(ROOT))
    return out


def _load(out: Path, run: str) -> tuple[dict, dict]:
    return tuple(torch.load(out / f"{run}_rank{r}.pt", weights_only=False) for r in (0, 1))


@pytest.fixture(scope="module")
def masks_out(tmp_path_factory) -> Path:
    return _launch(tmp_path_factory.mktemp("fsdp_masks"), "masks")


# --------------------------------------------------------------------------- masks on sharded weights


@pytest.mark.distributed
@needs_gloo
def test_masks_are_sharded_like_their_weights(masks_out):
    r0, r1 = _load(masks_out, "masks")
    for r in (r0, r1):
        assert r["layout"] == {n: (True, True) for n in ("0", "2", "4")}  # DTensor, the weight's placements
    # Shard(0) rows: 12 -> 6 + 6, 6 -> 3 + 3, 3 -> 2 + 1 (uneven), each rank only its own.
    assert r0["local_rows"] == {"0": (6, 8), "2": (3, 12), "4": (2, 6)}
    assert r1["local_rows"] == {"0": (6, 8), "2": (3, 12), "4": (1, 6)}
    assert r0["repr"] == "MaskSet(n_masks=3, total_sparsity=sharded, attached=True)"  # a repr starts no collective


@pytest.mark.distributed
@needs_gloo
def test_adamw_keeps_exact_zeros_on_sharded_weights(masks_out):
    for r in _load(masks_out, "masks"):
        assert r["state_at_attach"] == 0.0  # AdamW's DTensor state from the dense steps, zeroed at pruned entries
        assert r["grad_at_pruned"] == [0.0] * 4  # the post-accumulate hook after FSDP2's reduce-scatter
        assert r["weight_at_pruned"] == [0.0] * 4  # exact zeros after every step, weight decay included
        assert r["state_at_pruned"] == [0.0] * 4
        assert r["frozen_grad_at_pruned"] == [0.0] * 2  # frozen at attach: its hook comes at the unfreeze


@pytest.mark.distributed
@needs_gloo
def test_state_dict_is_whole_and_round_trips(masks_out):
    script = _script()
    full = script.hand_masks()
    for r in _load(masks_out, "masks"):
        assert r["state_dict"].keys() == full.keys()
        for n, m in full.items():
            assert torch.equal(r["state_dict"][n], m), n  # gathered: the whole mask on every rank
            assert torch.equal(r["reloaded"][n], m), n
            expected = 1 - int(m.sum()) / m.numel()
            assert r["sparsity"][n] == pytest.approx(expected, abs=1e-15)  # counts over every shard, not one
            assert r["model_sparsity"][n] == pytest.approx(expected, abs=1e-15)
        assert r["reloaded_local_equal"]


@pytest.mark.distributed
@needs_gloo
def test_sharded_masked_training_matches_one_process(masks_out):
    """Same init, the two ranks' batches in one batch: FSDP2's averaged gradients are the one-process gradients."""
    s = _script()
    net = s.make_mlp()
    opt = torch.optim.AdamW(net.parameters(), lr=s.LR, weight_decay=s.DECAY)

    def step(k: int) -> None:
        (x0, y0), (x1, y1) = s.batch(k, 0), s.batch(k, 1)
        opt.zero_grad()
        F.mse_loss(net(torch.cat([x0, x1])), torch.cat([y0, y1])).backward()
        opt.step()

    for k in range(s.N_DENSE):
        step(k)
    masks = MaskSet()
    masks.update(s.hand_masks())
    masks.attach(net, opt)
    for k in range(s.N_DENSE, s.N_DENSE + s.N_MASKED):
        step(k)
    # Each AdamW step moves a weight by about lr (m / sqrt(v) is O(1)) and carries the gradient's relative rounding,
    # a float64 sum over a batch of 8 and layers 12 wide (eps * 8 * 12 per step, amplified at most by 1/(1-beta2)
    # bias correction ~ steps): the bound below is that, times the steps taken.
    steps = s.N_DENSE + s.N_MASKED
    tol = s.LR * steps * torch.finfo(torch.float64).eps * 8 * 12 * steps
    for r in _load(masks_out, "masks"):
        for k, v in net.state_dict().items():
            assert torch.allclose(r["final"][k], v, rtol=0, atol=tol), (k, (r["final"][k] - v).abs().max())
        for n, m in s.hand_masks().items():
            assert torch.all(r["final"][f"{n}.weight"][~m] == 0)


# --------------------------------------------------------------------------- LOBSPruning under ModelParallelStrategy

HAND_RUNS = ("fit-dcp-hand", "resume-dcp-hand", "fit-full-hand", "resume-full-hand")
ENGINE_RUNS = ("fit-dcp", "resume-dcp")  # the engine's sharded prune (lightning_lobs.sharding)
# Rank 1 alone fails mid-prune; run first, so the runs after it also show the process group is still usable.
FAIL_RUNS = ("fail-dcp-failsolve1",)


@pytest.fixture(scope="module")
def fit_out(tmp_path_factory) -> Path:
    return _launch(tmp_path_factory.mktemp("fsdp_fit"), ",".join(FAIL_RUNS + ENGINE_RUNS + HAND_RUNS))


def _held(record: dict, masks: dict) -> None:
    """Every epoch after the prune: the whole masks, exact zeros under them, the logged sparsity from every shard."""
    pruned = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    for epoch in record["epochs"]:
        if epoch["epoch"] < 1:
            assert epoch["masks"] == {}  # dense before the prune epoch
            continue
        assert epoch["masks"].keys() == masks.keys()
        for n, m in masks.items():
            assert torch.equal(epoch["masks"][n], m), n
            assert epoch["at_pruned"][n] == 0.0, n
            assert epoch["sharded"][n] == "DTensor", n
        # The zeros the weights hold, counted on the gathered weights, are the pruned entries (AdamW moves the rest).
        assert sum(epoch["zeros"].values()) == pruned
        assert epoch["logged"] == pytest.approx(pruned / total, rel=1e-6)  # logged as a float32 metric


@pytest.mark.slow
@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("kind", ["dcp", "full"])
def test_masks_held_and_checkpointed_under_model_parallel(fit_out, kind):
    """Hand-made masks written at the prune epoch: held by AdamW, logged from every shard, saved in a distributed
    checkpoint (``dcp``) or a full one and restored exactly by a resume, which then trains to the same weights."""
    masks = {f"net.{n}": m for n, m in _script().hand_masks().items()}
    fit0, fit1 = _load(fit_out, f"fit-{kind}-hand")
    res0, res1 = _load(fit_out, f"resume-{kind}-hand")
    for fit, res in ((fit0, res0), (fit1, res1)):
        assert fit["pruned_points"] == res["pruned_points"] == [1]
        _held(fit, masks)
        _held(res, masks)
        assert res["restored"].keys() == masks.keys()
        for n, m in masks.items():
            assert torch.equal(res["restored"][n], m), n
        assert [e["epoch"] for e in res["epochs"]] == [2]  # resumed after the prune epoch: not pruned again
        for k, v in fit["final"].items():  # same weights and AdamW state restored, same batches: same epoch 2
            assert torch.equal(res["final"][k], v), k
    for k, v in fit0["final"].items():
        assert torch.equal(v, fit1["final"][k]), k


@pytest.mark.slow
@pytest.mark.distributed
@needs_gloo
@pytest.mark.filterwarnings("ignore:.*output head")  # the reference's own warning: the head stays dense there too
def test_lobs_pruning_under_model_parallel_matches_one_process(fit_out):
    """The engine's sharded prune in a Trainer: the masks and weights ``prune_model`` gives in one process on the
    dense weights at the prune and both ranks' calibration batches; held, logged and restored like the hand-made ones."""
    from lightning_lobs import prune_model

    s = _script()
    r0, r1 = _load(fit_out, "fit-dcp")
    assert r0["reports"] == r1["reports"] == 1 and r0["pruned_points"] == [1]
    x0, x1 = (torch.cat([b[0] for b in r["batches"]]) for r in (r0, r1))
    assert len(r0["batches"]) == len(r1["batches"]) == 2 and not torch.equal(x0, x1)  # each rank its own shard
    for k, v in r0["dense"].items():
        assert torch.equal(v, r1["dense"][k]), k
    lit = s.lit_classes()[1]()
    lit.load_state_dict(r0["dense"])
    report = prune_model(lit, list(r0["batches"]) + list(r1["batches"]), 0.5, "exact", allocation="uniform")
    masks = {n: m for n, m in report.masks.state_dict().items()}
    assert masks.keys() == {"net.0", "net.2"}  # the output head stays dense (prune_head=False)
    _held(r0, masks)  # the sharded prune's masks are the one-process masks, exactly (float64, no ties here)
    _held(r1, masks)
    pruned_epoch = next(e for e in r0["epochs"] if e["epoch"] == 1)
    assert pruned_epoch["logged"] == pytest.approx(report.metrics()["lobs/sparsity"], rel=1e-6)
    ref = report.metrics()
    # The L-OBS bound too: fully_shard layers are traced as the layers they wrap, so the chain is the same.
    assert "lobs/bound" in ref and set(r0["metrics"]) == set(ref)
    for k, v in r0["metrics"].items():  # the report reads the gathered weights: the same numbers
        assert v == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k
    res0, _ = _load(fit_out, "resume-dcp")
    for n, m in masks.items():
        assert torch.equal(res0["restored"][n], m), n
    for k, v in r0["final"].items():
        assert torch.equal(res0["final"][k], v), k


@pytest.mark.slow
@pytest.mark.distributed
@needs_gloo
def test_failure_on_one_rank_fails_every_rank_and_leaves_the_shards(fit_out):
    """Rank 1's layer solve raises in the middle of a sharded prune: both ranks raise (none waits forever in a
    collective), and on both the shards, the masks and the schedule are as they were before the prune."""
    r0, r1 = _load(fit_out, "fail-dcp-failsolve1")
    assert r1["error"].startswith("ValueError: injected failure solving net.0")
    assert r0["error"].startswith("RuntimeError:") and "failed on rank 1" in r0["error"]
    for r in (r0, r1):
        assert r["unchanged"]  # every local shard as before the prune
        assert (r["masks"], r["attached"], r["pruned_points"]) == (0, False, [])


# --------------------------------------------------------------------------- refused strategies


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


def _stub_trainer(strategy) -> SimpleNamespace:
    return SimpleNamespace(strategy=strategy, max_epochs=3, max_steps=-1, world_size=1, callbacks=[])


@pytest.mark.parametrize(
    ("name", "why"),
    [("FSDPStrategy", "FlatParameter"), ("XLAFSDPStrategy", "flattens"), ("DeepSpeedStrategy", "ZeRO")],
)
def test_flat_sharding_strategies_refused_with_reason_and_what_works(name, why):
    strategy = type(name, (), {})()
    with pytest.raises(RuntimeError) as info:
        LOBSPruning(prune_epoch=1).setup(_stub_trainer(strategy), _Tiny(), "fit")
    msg = str(info.value)
    assert name in msg and why in msg
    assert "strategy='ddp'" in msg and "ModelParallelStrategy (FSDP2)" in msg and "fully_shard" in msg


def test_real_fsdp1_and_deepspeed_classes_refused():
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy

    class MyFSDP(FSDPStrategy):  # a user's customised FSDP is still FSDP1
        pass

    for cls in (FSDPStrategy, MyFSDP, DeepSpeedStrategy):
        strategy = cls.__new__(cls)  # DeepSpeedStrategy() needs the deepspeed package; the class is what is checked
        with pytest.raises(RuntimeError, match="ModelParallelStrategy"):
            LOBSPruning(prune_epoch=1).setup(_stub_trainer(strategy), _Tiny(), "fit")


class _Mesh:
    """A stand-in for a 2-D DeviceMesh with named dimensions (only what the check reads)."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, tp: int) -> None:
        self.tp = tp

    def __getitem__(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(size=lambda: self.tp if name == "tensor_parallel" else 1)


def test_model_parallel_accepted_without_tensor_parallelism():
    from pytorch_lightning.strategies import ModelParallelStrategy

    class Stub(ModelParallelStrategy):
        def __init__(self, tp: int) -> None:  # no processes: only the mesh the check reads
            self._mesh = _Mesh(tp)

        @property
        def device_mesh(self):
            return self._mesh

    LOBSPruning(prune_epoch=1).setup(_stub_trainer(Stub(1)), _Tiny(), "fit")
    with pytest.raises(RuntimeError, match="tensor_parallel_size=1 only \\(got 2\\)"):
        LOBSPruning(prune_epoch=1).setup(_stub_trainer(Stub(2)), _Tiny(), "fit")
    with pytest.raises(ValueError, match="save_sparse"):  # a shard cannot be exported alone
        LOBSPruning(prune_epoch=1, save_sparse="x.pt").setup(_stub_trainer(Stub(1)), _Tiny(), "fit")
