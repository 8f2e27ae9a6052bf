"""Tests for the :class:`lightning_lobs.LOBSPruning` callback inside a Lightning ``Trainer``."""

from __future__ import annotations

import copy
import csv
import math
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from helpers import hook_counts
from lightning_helpers import LAYERS, BothCallback, lit_mlp, make_trainer, numel, zeros
from lightning_lobs import LOBSPruning, prune_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided.*"),
    pytest.mark.filterwarnings("ignore:.*your dataloader is not resumable.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"),
]

# --------------------------------------------------------------------------- model, data, helpers


def LitMLP(optimizer: str = "adam", bn: bool = False, seed: int = 0, ns=pl):  # noqa: N802 - reads as the class
    return lit_mlp(ns, optimizer=optimizer, bn=bn, seed=seed)


def trainer(max_epochs: int, callbacks, tmp_path=None, ns=pl, **kwargs):
    return make_trainer(ns, max_epochs, callbacks, tmp_path, **kwargs)


class Watcher(BothCallback):
    """Placed AFTER LOBSPruning: checks masks on every batch and records states at epoch starts."""

    def __init__(self, lobs: LOBSPruning) -> None:
        self.lobs = lobs
        self.checked_batches = 0
        self.epoch_start_weights: dict[int, dict[str, torch.Tensor]] = {}
        self.epoch_start_masks: dict[int, dict[str, torch.Tensor]] = {}
        self.epoch_start_zeros: dict[int, dict[str, int]] = {}
        self.optimizers: list[torch.optim.Optimizer] = []
        self.hooks_during_training: int | None = None
        self.epochs_seen: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module):
        e = trainer.current_epoch
        self.epochs_seen.append(e)
        self.epoch_start_weights[e] = {n: pl_module.get_submodule(n).weight.detach().clone() for n in LAYERS}
        self.epoch_start_masks[e] = {n: m.clone() for n, m in self.lobs.masks.masks.items()}
        self.epoch_start_zeros[e] = {n: zeros(pl_module, n) for n in LAYERS}
        self.optimizers = [getattr(o, "_optimizer", o) for o in trainer.optimizers]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not len(self.lobs.masks):
            return
        assert self.lobs.masks.attached
        self.hooks_during_training = self.lobs.masks.num_hooks
        for name, mask in self.lobs.masks.masks.items():
            w = pl_module.get_submodule(name).weight
            assert torch.all(w.detach()[~mask.to(w.device)] == 0), f"pruned weight of {name} revived"
            if w.grad is not None:
                assert torch.all(w.grad[~mask.to(w.device)] == 0), f"pruned grad of {name} nonzero"
        self.checked_batches += 1


# --------------------------------------------------------------------------- masks held through training


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_masks_hold_through_retraining(optimizer, ns):
    model = LitMLP(optimizer, ns=ns)
    lobs = LOBSPruning(sparsity=0.8, prune_epoch=1, calibration_batches=4, log_table=False, prune_head=True)
    assert isinstance(lobs, ns.Callback)
    watch = Watcher(lobs)
    tr = trainer(3, [lobs, watch], accumulate_grad_batches=2, gradient_clip_val=1.0, ns=ns)
    tr.fit(model)
    assert lobs.pruned_epochs == [1]
    assert len(lobs.reports) == 1
    assert set(lobs.masks) == set(LAYERS)
    # checked on every batch of epochs 1 and 2 (8 batches each)
    assert watch.checked_batches == 16
    # dense before the prune epoch, pruned at its start
    assert all(v == 0 for v in watch.epoch_start_zeros[0].values())
    # default global allocation: exact overall count, per-layer counts as the report chose them
    report = lobs.last_report
    assert report.allocation == "global"
    assert sum(watch.epoch_start_zeros[1].values()) == round(0.8 * sum(numel(model, n) for n in LAYERS))
    for name in LAYERS:
        target = round(report.layers[name].target_sparsity * numel(model, name))
        assert watch.epoch_start_zeros[1][name] == target
        mask = lobs.masks[name]
        w = model.get_submodule(name).weight.detach()
        assert int((~mask).sum()) == target
        assert torch.all(w[~mask] == 0)
        assert zeros(model, name) == target  # per-layer sparsity after fit
        # kept weights kept training after pruning
        after_prune = watch.epoch_start_weights[1][name]
        changed = (w[mask] != after_prune[mask]).float().mean().item()
        assert changed > 0.9, f"{name}: only {changed:.2f} of kept weights changed"
    # optimizer state at pruned positions is zero after fit (momentum / Adam moments)
    opt = watch.optimizers[0]
    for name in LAYERS:
        w = model.get_submodule(name).weight
        for key, value in opt.state[w].items():
            if torch.is_tensor(value) and value.shape == w.shape:
                assert torch.all(value[~lobs.masks[name]] == 0), (name, key)


def test_metrics_logged(tmp_path):
    model = LitMLP()
    lobs = LOBSPruning(sparsity=0.8, prune_epoch=1, calibration_batches=4, log_table=False, prune_head=True)
    logger = CSVLogger(str(tmp_path), name="m", version=0)
    tr = trainer(2, [lobs], tmp_path, logger=logger, log_every_n_steps=1)
    tr.fit(model)
    m = tr.callback_metrics
    for key in ("lobs/sparsity", "lobs/bound", "lobs/bound_spectral", "lobs/output_error"):
        assert key in m, key
    for name in LAYERS:
        assert f"lobs/{name}/layer_error" in m
        assert f"lobs/{name}/sparsity" in m
    report = lobs.last_report
    for name in LAYERS:
        assert float(m[f"lobs/{name}/sparsity"]) == pytest.approx(report.layers[name].sparsity)
    assert float(m["lobs/bound"]) == pytest.approx(report.bound, rel=1e-6)
    assert float(m["lobs/output_error"]) == pytest.approx(report.output_error, rel=1e-6)
    assert float(m["lobs/bound"]) >= float(m["lobs/output_error"]) > 0
    assert float(m["lobs/bound_spectral"]) <= float(m["lobs/bound"])
    assert float(m["lobs/sparsity"]) == pytest.approx(0.8, abs=2e-3)
    # and written by the logger, in the row of epoch 1
    logger.save()
    with open(tmp_path / "m" / "version_0" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    lobs_rows = [r for r in rows if r.get("lobs/bound")]
    assert len(lobs_rows) == 1
    assert int(lobs_rows[0]["epoch"]) == 1
    for name in LAYERS:
        assert float(lobs_rows[0][f"lobs/{name}/layer_error"]) == pytest.approx(
            report.layers[name].layer_error, rel=1e-5
        )


# --------------------------------------------------------------------------- checkpoints


def test_resume_after_prune_keeps_masks(tmp_path, ns):
    model = LitMLP(ns=ns)
    lobs = LOBSPruning(sparsity=0.8, prune_epoch=1, calibration_batches=4, log_table=False, prune_head=True)
    ckpt = ns.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    tr = trainer(2, [lobs, ckpt], tmp_path, enable_checkpointing=True, ns=ns)
    tr.fit(model)
    path = tmp_path / "last.ckpt"
    assert path.exists()
    state = torch.load(path, map_location="cpu", weights_only=False)
    cb_state = [v for k, v in state["callbacks"].items() if "LOBSPruning" in k]
    assert len(cb_state) == 1 and cb_state[0]["pruned_epochs"] == [1]
    masks_before = {n: m.clone() for n, m in lobs.masks.masks.items()}

    model2 = LitMLP(seed=123, ns=ns)  # different init: everything must come from the checkpoint
    lobs2 = LOBSPruning(sparsity=0.8, prune_epoch=1, calibration_batches=4, log_table=False, prune_head=True)
    pruned_calls = []
    orig = lobs2.prune_now
    lobs2.prune_now = lambda *a, **k: pruned_calls.append(a) or orig(*a, **k)  # type: ignore[method-assign]
    watch = Watcher(lobs2)
    tr2 = trainer(4, [lobs2, watch], tmp_path, ns=ns)
    tr2.fit(model2, ckpt_path=str(path))
    assert watch.epochs_seen == [2, 3]
    assert pruned_calls == [] and lobs2.reports == []
    assert lobs2.pruned_epochs == [1]
    assert set(lobs2.masks) == set(masks_before)
    for name, m in masks_before.items():
        assert torch.equal(lobs2.masks[name].cpu(), m.cpu())
        assert zeros(model2, name) == int((~m).sum())
    assert watch.checked_batches == 16  # held through every resumed batch
    # training actually continued on the restored weights
    for name in LAYERS:
        w = model2.get_submodule(name).weight.detach()
        assert not torch.equal(w, watch.epoch_start_weights[2][name])
    assert lobs2.masks.num_hooks == 0


def test_resume_mid_prune_epoch_does_not_prune_again(tmp_path):
    """A checkpoint saved inside the prune epoch: that epoch restarts, but must not prune twice."""
    model = LitMLP()
    lobs = LOBSPruning(sparsity=0.8, prune_epoch=1, calibration_batches=4, log_table=False, prune_head=True)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=10, save_top_k=-1, filename="{step}")
    tr = trainer(2, [lobs, ckpt], tmp_path, enable_checkpointing=True)
    tr.fit(model)
    path = tmp_path / "step=10.ckpt"  # step 10 lies in epoch 1 (8 steps per epoch)
    assert path.exists(), sorted(p.name for p in tmp_path.iterdir())
    masks_before = {n: m.clone() for n, m in lobs.masks.masks.items()}

    model2 = LitMLP(seed=5)
    lobs2 = LOBSPruning(sparsity=0.8, prune_epoch=1, calibration_batches=4, log_table=False, prune_head=True)
    watch = Watcher(lobs2)
    tr2 = trainer(3, [lobs2, watch], tmp_path)
    tr2.fit(model2, ckpt_path=str(path))
    # Lightning finishes the interrupted epoch 1 (6 batches left) without a new epoch start
    assert watch.epochs_seen == [2]
    assert tr2.global_step == 24
    assert lobs2.reports == []  # not pruned a second time
    assert lobs2.pruned_epochs == [1]
    for name, m in masks_before.items():
        assert torch.equal(lobs2.masks[name].cpu(), m.cpu())
        assert torch.all(model2.get_submodule(name).weight[~m] == 0)
    # masks were held (attached at train start) on the rest of epoch 1 and all of epoch 2
    assert watch.checked_batches == 6 + 8


def test_checkpoint_saved_under_the_old_default_key_restores(tmp_path, ns):
    """Before keys were derived from the schedule, ``state_key=None`` saved under ``"LOBSPruning"``."""
    lobs = LOBSPruning(sparsity=0.8, prune_epoch=0, calibration_batches=2, log_table=False, prune_head=True)
    tr = trainer(1, [lobs], tmp_path, ns=ns)
    tr.fit(LitMLP(ns=ns))
    path = tmp_path / "old.ckpt"
    tr.save_checkpoint(str(path))
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert list(state["callbacks"]) == [lobs.state_key] and lobs.state_key != "LOBSPruning"
    state["callbacks"] = {"LOBSPruning": state["callbacks"][lobs.state_key]}
    torch.save(state, path)

    lobs2 = LOBSPruning(sparsity=0.8, prune_epoch=0, calibration_batches=2, log_table=False, prune_head=True)
    model2 = LitMLP(seed=9, ns=ns)
    trainer(2, [lobs2], tmp_path, ns=ns).fit(model2, ckpt_path=str(path))
    assert lobs2.pruned_epochs == [0] and lobs2.reports == []
    for name, m in lobs.masks.masks.items():
        assert torch.equal(lobs2.masks[name].cpu(), m.cpu())
        assert zeros(model2, name) == int((~m).sum())


def test_two_unnamed_instances_share_a_trainer_and_log_apart(ns):
    a = LOBSPruning(sparsity={"net.0": 0.5}, prune_epoch=0, calibration_batches=2, log_table=False, prune_head=True)
    b = LOBSPruning(sparsity={"net.[24]": 0.7}, prune_epoch=0, calibration_batches=2, log_table=False, prune_head=True)
    assert a.state_key == "LOBSPruning{'sparsity': {'net.0': 0.5}, 'prune_epoch': 0, 'method': 'auto'}"
    assert a.state_key != b.state_key
    tr = trainer(1, [a, b], ns=ns)
    tr.fit(LitMLP(ns=ns))
    assert a._prefix != b._prefix and {a._prefix[:5], b._prefix[:5]} == {"lobs/"}
    keys = set(tr.callback_metrics)
    assert f"{a._prefix}net.0/sparsity" in keys and f"{b._prefix}net.2/sparsity" in keys
    assert "lobs/net.0/sparsity" not in keys  # neither one took the lone instance's names
    lone = LOBSPruning(sparsity={"net.0": 0.5}, prune_epoch=0, calibration_batches=2, log_table=False, prune_head=True)
    tr = trainer(1, [lone], ns=ns)
    tr.fit(LitMLP(ns=ns))
    assert lone._prefix == "lobs/" and "lobs/net.0/sparsity" in tr.callback_metrics


def test_identical_instances_are_refused_naming_state_key(ns):
    with pytest.raises(
        ValueError, match=r"two LOBSPruning callbacks in one Trainer have the same state_key .*state_key='\.\.\.'"
    ):
        trainer(1, [LOBSPruning(sparsity=0.5, prune_head=True), LOBSPruning(sparsity=0.5, prune_head=True)], ns=ns)
    named = [
        LOBSPruning(sparsity=0.5, state_key="x", prune_head=True),
        LOBSPruning(sparsity={"net.0": 0.5}, state_key="x", prune_head=True),
    ]
    with pytest.raises(ValueError, match=r"same state_key \"LOBSPruning\{'state_key': 'x'\}\""):
        trainer(1, named, ns=ns)


def test_a_callback_pickled_with_the_schedule_as_lists_still_unpickles():
    """0.2.0 pickled the schedule's lists (prune_points, sparsities, unit, pruned_points) as attributes."""
    lobs = LOBSPruning(sparsity=[0.5, 0.8], prune_epoch=[1, 2], prune_head=True)
    old = {k: v for k, v in lobs.__getstate__().items() if k != "_run"}
    old.update(prune_points=[1, 2], sparsities=[0.5, 0.8], unit="epoch", pruned_points=[1])
    copy = LOBSPruning.__new__(LOBSPruning)
    copy.__setstate__(old)
    assert copy.pruned_epochs == [1] and copy.prune_epochs == [1, 2] and copy.state_key == lobs.state_key
    assert copy.state_dict()["pruned_epochs"] == [1] and not {"pruned_points", "unit"} & set(vars(copy))


def test_restored_pruned_epochs_block_a_second_prune():
    lobs = LOBSPruning(sparsity=0.5, prune_epoch=1, calibration_batches=2, log_table=False, prune_head=True)
    lobs.load_state_dict({"masks": {"net.0": torch.ones(24, 32, dtype=torch.bool)}, "pruned_epochs": [1]})
    assert lobs.pruned_epochs == [1] and set(lobs.masks) == {"net.0"}
    calls = []
    lobs.prune_now = lambda *a, **k: calls.append(a)  # type: ignore[method-assign]
    lobs.on_train_epoch_start(SimpleNamespace(current_epoch=1), None)
    assert calls == []
    fresh = LOBSPruning(sparsity=0.5, prune_epoch=1, calibration_batches=2, log_table=False, prune_head=True)
    fresh.prune_now = lambda *a, **k: calls.append(a)  # type: ignore[method-assign]
    fresh.log_report = lambda *a, **k: None  # type: ignore[method-assign]
    fresh.on_train_epoch_start(SimpleNamespace(current_epoch=1), None)
    assert len(calls) == 1


def test_resume_before_prune_epoch_prunes_on_time(tmp_path):
    model = LitMLP()
    lobs = LOBSPruning(
        sparsity=0.7, prune_epoch=2, calibration_batches=4, log_table=False, allocation="uniform", prune_head=True
    )
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    tr = trainer(3, [lobs, ckpt], tmp_path, enable_checkpointing=True)
    tr.fit(model)
    path = tmp_path / "epoch=0.ckpt"
    assert path.exists()

    model2 = LitMLP(seed=7)
    lobs2 = LOBSPruning(
        sparsity=0.7, prune_epoch=2, calibration_batches=4, log_table=False, allocation="uniform", prune_head=True
    )
    watch = Watcher(lobs2)
    tr2 = trainer(3, [lobs2, watch], tmp_path)
    tr2.fit(model2, ckpt_path=str(path))
    assert watch.epochs_seen == [1, 2]
    assert all(v == 0 for v in watch.epoch_start_zeros[1].values())  # still dense in epoch 1
    assert lobs2.pruned_epochs == [2] and len(lobs2.reports) == 1
    for name in LAYERS:
        assert watch.epoch_start_zeros[2][name] == round(0.7 * numel(model2, name))
        assert zeros(model2, name) == round(0.7 * numel(model2, name))


# --------------------------------------------------------------------------- plain model afterwards


def test_final_model_is_plain_and_hooks_removed():
    model = LitMLP()
    lobs = LOBSPruning(
        sparsity=0.5, prune_epoch=0, calibration_batches=2, log_table=False, allocation="uniform", prune_head=True
    )
    watch = Watcher(lobs)
    trainer(2, [lobs, watch]).fit(model)
    # hooks were there during training (grad hooks on 3 weights + 1 optimizer step hook) ...
    assert watch.hooks_during_training == 4
    # ... and are all gone after fit
    assert lobs.masks.num_hooks == 0 and not lobs.masks.attached
    assert hook_counts(model) == {}
    assert all(len(o._optimizer_step_post_hooks) == 0 for o in watch.optimizers)
    assert watch.optimizers
    fresh = LitMLP(seed=3)
    assert list(model.state_dict().keys()) == list(fresh.state_dict().keys())
    fresh.load_state_dict(model.state_dict(), strict=True)
    for name in LAYERS:
        assert zeros(fresh, name) == round(0.5 * numel(fresh, name))
    # plain module: a new optimizer step on it is not masked anymore
    x, y = model.data.tensors
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert (model.net[0].weight.grad[~lobs.masks["net.0"]] != 0).any()


# --------------------------------------------------------------------------- iterative pruning


def test_iterative_pruning(ns):
    model = LitMLP(ns=ns)
    lobs = LOBSPruning(sparsity=[0.5, 0.8], prune_epoch=[1, 2], calibration_batches=4, log_table=False, prune_head=True)
    watch = Watcher(lobs)
    trainer(3, [lobs, watch], ns=ns).fit(model)
    assert lobs.pruned_epochs == [1, 2] and len(lobs.reports) == 2
    assert lobs.reports[0].sparsity == pytest.approx(0.5, abs=2e-3)
    assert lobs.reports[1].sparsity == pytest.approx(0.8, abs=2e-3)
    total = sum(numel(model, n) for n in LAYERS)
    assert sum(watch.epoch_start_zeros[1].values()) == round(0.5 * total)  # global allocation: exact total
    assert sum(watch.epoch_start_zeros[2].values()) == round(0.8 * total)
    for name in LAYERS:
        n = numel(model, name)
        first_zeros = ~watch.epoch_start_masks[1][name]
        assert int(first_zeros.sum()) == watch.epoch_start_zeros[1][name]
        assert watch.epoch_start_zeros[2][name] == round(lobs.reports[1].layers[name].target_sparsity * n)
        # every epoch-1 zero is still zero after the second prune and at the end
        assert torch.all(watch.epoch_start_weights[2][name][first_zeros] == 0)
        assert torch.all(model.get_submodule(name).weight[first_zeros] == 0)
        assert not torch.any(lobs.masks[name] & first_zeros)
        assert zeros(model, name) == watch.epoch_start_zeros[2][name]
    assert watch.checked_batches == 16


# --------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(sparsity=1.5), ValueError, r"sparsity must be in \[0, 1\)"),
        (dict(sparsity=-0.1), ValueError, r"sparsity must be in \[0, 1\)"),
        (dict(sparsity={}), ValueError, r"mapping is empty"),
        (dict(prune_epoch=-1), ValueError, r"prune_epoch must be an epoch number >= 0"),
        (
            dict(prune_epoch=1.5),
            ValueError,
            r"prune_epoch must be a whole epoch number >= 0 .*got 1\.5.*e\.g\. prune_epoch=5",
        ),
        (dict(prune_epoch="1"), ValueError, r"prune_epoch must be a whole epoch number"),
        (dict(prune_epoch=[]), ValueError, r"prune_epoch is an empty list"),
        (dict(prune_epoch=[2, 1], sparsity=[0.5, 0.8]), ValueError, r"strictly increasing"),
        (
            dict(prune_epoch=[1, 2], sparsity=[0.5, 0.6, 0.8]),
            ValueError,
            r"sparsity has 3 entries but prune_epoch has 2",
        ),
        (dict(prune_epoch=[1, 2], sparsity=[0.5, 1.2]), ValueError, r"sparsity\[1\]"),
        (
            dict(prune_epoch=[1, 2], sparsity=[0.8, 0.5]),
            ValueError,
            r"sparsity\[1\] = 0.5 is lower than sparsity\[0\] = 0.8.*stay pruned",
        ),
        (
            dict(prune_epoch=[1, 2], sparsity=[{"net.*": 0.8}, {"net.*": 0.6}]),
            ValueError,
            r"sparsity\[1\]\['net.\*'\] = 0.6 is lower",
        ),
        (
            dict(prune_epoch=[1, 2], sparsity=[{"net.*": 0.8}, {"net.0": 0.6, "net.*": 0.9}]),
            ValueError,
            r"layer 'net.0' cannot reach sparsity\[1\] = 0.6: sparsity\[0\] already prunes it to 0.8",
        ),
        (
            dict(prune_epoch=[1, 2, 3], sparsity=[{"net.0": 0.7}, {"net.2": 0.5}, {"net.0": 0.6}]),
            ValueError,
            r"layer 'net.0' cannot reach sparsity\[2\] = 0.6: sparsity\[0\] already prunes it to 0.7",
        ),
        (
            dict(prune_epoch=[1, 2], sparsity=[0.7, {"net.0": 0.6}], allocation="uniform"),
            ValueError,
            r"layer 'net.0' cannot reach sparsity\[1\] = 0.6: sparsity\[0\] already prunes it to 0.7",
        ),
        (dict(method="foo"), ValueError, r"method must be one of"),
        (dict(allocation="layer"), ValueError, r"allocation"),
        (dict(calibration_batches=0), ValueError, r"calibration_batches must be an int >= 1"),
        (dict(pattern="3:2"), ValueError, r"pattern '3:2'"),
        (dict(solver=3), TypeError, r"solver must be a SolverOptions"),
        (dict(solver={"damp_x": 0.1}), ValueError, r"solver has unknown keys \['damp_x'\]"),
        (dict(state_key=""), ValueError, r"state_key must be a non-empty str"),
        (dict(progress_after=-1), ValueError, r"progress_after must be a number of seconds >= 0"),
        (dict(reset_monitors="no"), ValueError, r"reset_monitors must be True or False, got 'no'"),
        (dict(prune_step=-2), ValueError, r"prune_step must be a step number >= 0, got -2"),
    ],
)
def test_construction_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LOBSPruning(**kwargs, prune_head=True)


def test_integral_epochs_and_numpy_values_accepted():
    np = pytest.importorskip("numpy")
    lobs = LOBSPruning(sparsity=np.float32(0.5), prune_epoch=1.0, prune_head=True)
    assert lobs.prune_epochs == [1] and type(lobs.prune_epochs[0]) is int
    lobs = LOBSPruning(sparsity=np.array([0.5, 0.5, 0.8]), prune_epoch=np.array([1, 2, 4]), prune_head=True)
    assert lobs.prune_epochs == [1, 2, 4] and lobs.sparsities == [0.5, 0.5, 0.8]
    assert [o.sparsity for o in lobs.options] == [0.5, 0.5, 0.8]
    lobs = LOBSPruning(solver={"damp": 0.1}, calibration={"position_stride": 2}, prune_head=True)
    assert lobs.options[0].solver.damp == 0.1 and lobs.options[0].calibration.position_stride == 2


@pytest.mark.parametrize(
    "kwargs, max_epochs, match",
    [
        (dict(prune_epoch=3), 3, r"prune_epoch 3 is beyond the last epoch of training \(max_epochs=3"),
        (dict(prune_epoch=[0, 5], sparsity=[0.3, 0.5]), 2, r"prune_epoch 5"),
        (dict(sparsity={"encoder.*": 0.5}), 2, r"pattern 'encoder\.\*' matches no module"),
        (dict(sparsity={"net.1": 0.5}), 2, r"module 'net.1' \(ReLU\) cannot be pruned"),
        (dict(exclude=["nope"]), 2, r"exclude pattern 'nope' matches no module"),
    ],
)
def test_setup_errors_before_training(kwargs, max_epochs, match):
    model = LitMLP()
    before = copy.deepcopy(model.state_dict())
    lobs = LOBSPruning(calibration_batches=2, log_table=False, **kwargs, prune_head=True)
    with pytest.raises(ValueError, match=match):
        trainer(max_epochs, [lobs]).fit(model)
    assert model.steps == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# --------------------------------------------------------------------------- calibration data


class CountingLoader:
    def __init__(self, batches) -> None:
        self.batches = batches
        self.yielded = 0

    def __iter__(self):
        for b in self.batches:
            self.yielded += 1
            yield b

    def __len__(self) -> int:
        return len(self.batches)


def test_calibration_dataloader_is_used():
    g = torch.Generator().manual_seed(42)
    cal = CountingLoader(
        [(torch.randn(32, 32, generator=g) * 3 + 1, torch.zeros(32, dtype=torch.long)) for _ in range(6)]
    )
    model = LitMLP()
    reference = copy.deepcopy(model)
    lobs = LOBSPruning(
        sparsity=0.6, prune_epoch=0, calibration_batches=3, calibration_dataloader=cal, log_table=False, prune_head=True
    )
    trainer(1, [lobs]).fit(model)
    assert cal.yielded == 3
    # same layer errors as pruning the initial model on those 3 batches (and not on the train data)
    expected = prune_model(reference, cal.batches, 0.6, calibration_batches=3, prune_head=True)
    got = lobs.last_report
    for name in LAYERS:
        assert got.layers[name].layer_error == pytest.approx(expected.layers[name].layer_error, rel=1e-6)
    on_train = prune_model(
        copy.deepcopy(LitMLP()), LitMLP().train_dataloader(), 0.6, calibration_batches=3, prune_head=True
    )
    assert on_train.layers["net.0"].layer_error != pytest.approx(got.layers["net.0"].layer_error, rel=1e-3)


def test_forward_fn_used_by_callback():
    calls = []

    def fwd(model, batch):
        calls.append(batch[0].shape[0])
        return model(batch[0])

    model = LitMLP()
    lobs = LOBSPruning(
        sparsity=0.5, prune_epoch=0, calibration_batches=2, forward_fn=fwd, log_table=False, prune_head=True
    )
    trainer(1, [lobs]).fit(model)
    # batches of 64, or the output comparison's pieces of the first one (its first sample alone, then the rest)
    assert len(calls) >= 2 and all(c in (64, 1, 63) for c in calls) and calls.count(64) >= 2
    assert lobs.last_report.sparsity == pytest.approx(0.5, abs=2e-3)


# --------------------------------------------------------------------------- BN statistics and optimizer state


class StateWatcher(BothCallback):
    """Placed after LOBSPruning: compares BN buffers / optimizer state across the prune."""

    def __init__(self) -> None:
        self.end0: dict[str, torch.Tensor] = {}
        self.start1: dict[str, torch.Tensor] = {}
        self.opt_end0: dict = {}
        self.opt_start1: dict = {}
        self.training_flags: list[bool] = []

    @staticmethod
    def _opt_state(trainer, pl_module):
        opt = trainer.optimizers[0]
        return {
            n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
            for n, p in pl_module.named_parameters()
        }

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            self.end0 = {k: v.clone() for k, v in pl_module.net[1].state_dict().items()}
            self.opt_end0 = self._opt_state(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        self.training_flags.append(all(m.training for m in pl_module.modules()))
        if trainer.current_epoch == 1:
            self.start1 = {k: v.clone() for k, v in pl_module.net[1].state_dict().items()}
            self.opt_start1 = self._opt_state(trainer, pl_module)


def test_calibration_leaves_bn_stats_and_optimizer_state():
    model = LitMLP(bn=True)
    lobs = LOBSPruning(
        sparsity=0.6, prune_epoch=1, calibration_batches=4, log_table=False, recalibrate_bn=False, prune_head=True
    )
    watch = StateWatcher()
    trainer(2, [lobs, watch]).fit(model)
    assert lobs.pruned_epochs == [1]
    names = ("net.0", "net.3", "net.5")
    assert set(lobs.masks) == set(names)
    # BN running statistics are exactly those at the end of epoch 0 (calibration ran in eval mode)
    assert watch.end0["num_batches_tracked"] == 8
    for k, v in watch.end0.items():
        assert torch.equal(watch.start1[k], v), k
    assert watch.training_flags == [True, True]  # train mode restored after calibration
    # optimizer state: unchanged except that masked weights' moments are zeroed at pruned positions
    for pname, state in watch.opt_end0.items():
        after = watch.opt_start1[pname]
        assert state.keys() == after.keys()
        layer = pname.rsplit(".", 1)[0]
        for key, v in state.items():
            if not torch.is_tensor(v) or v.dim() == 0:
                assert torch.equal(torch.as_tensor(after[key]), torch.as_tensor(v)), (pname, key)
            elif pname.endswith(".weight") and layer in lobs.masks:
                mask = lobs.masks[layer]
                assert torch.equal(after[key][mask], v[mask]), (pname, key)
                assert torch.all(after[key][~mask] == 0), (pname, key)
            else:
                assert torch.equal(after[key], v), (pname, key)
    report = lobs.last_report
    assert math.isfinite(report.bound) and report.bound >= report.output_error


def test_prune_model_on_lightning_module_in_train_mode_keeps_bn_stats():
    model = LitMLP(bn=True)
    model.train()
    with torch.no_grad():
        for x, _ in model.train_dataloader():
            model(x)
    bn = {k: v.clone() for k, v in model.net[1].state_dict().items()}
    report = prune_model(
        model, model.train_dataloader(), 0.6, calibration_batches=4, recalibrate_bn=False, prune_head=True
    )
    assert set(report.layers) == {"net.0", "net.3", "net.5"}
    for k, v in model.net[1].state_dict().items():
        assert torch.equal(v, bn[k]), k
    assert all(m.training for m in model.modules())


def test_iterative_step_below_what_the_global_allocation_took_warns_per_layer(ns):
    """A schedule like the README's: step 1's global 0.7 takes layers past step 2's 0.7, which cannot be undone."""
    lobs = LOBSPruning(
        sparsity=[0.7, {"net.0": 0.9, "net.*": 0.7}],
        prune_epoch=[0, 1],
        calibration_batches=2,
        log_table=False,
        prune_head=True,
    )
    model = LitMLP(ns=ns)
    with pytest.warns(UserWarning, match=r"already sparser than asked") as rec:
        trainer(2, [lobs], ns=ns).fit(model)
    first, second = lobs.reports
    over = [n for n in ("net.2", "net.4") if first.layers[n].sparsity > 0.7]
    assert over, "the first step must take a layer past 0.7 for this test to mean anything"
    (msg,) = [str(w.message) for w in rec if "already sparser" in str(w.message)]
    for n in over:
        assert f"'{n}' at {first.layers[n].sparsity:.4g} (asked 0.7)" in msg
        assert second.layers[n].sparsity == pytest.approx(first.layers[n].sparsity)  # the report stays true
        assert second.layers[n].target_sparsity == 0.7
