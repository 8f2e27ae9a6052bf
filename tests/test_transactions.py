"""All-or-nothing prunes and no stale state across fits.

A prune changes weights, biases, BatchNorm buffers, the MaskSet (and, through the callback, its schedule state,
its reports and the monitors) together or not at all; a callback reused on another model starts over; calibration
leaves every RNG that orders the training data alone; one-shot iterators and data-dependent layers are handled up
front.
"""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning_helpers import BothCallback, lit_mlp, make_trainer, ns  # noqa: F401 - ns is a fixture
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_lobs import LOBSPruning, MaskSet, prune_model
from lightning_lobs import pruner as pruner_mod
from lightning_lobs.api import take_batches

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*"),
    pytest.mark.filterwarnings("ignore:.*your dataloader is not resumable.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"),
    pytest.mark.filterwarnings("ignore:.*Checkpoint directory .* exists and is not empty.*"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided.*"),
]


class Injected(Exception):
    """A failure the test injects (not a RuntimeError, so nothing re-types it on the way out)."""


# --------------------------------------------------------------------------- the engine


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 3))


def calib_batches(n: int = 4, rows: int = 32) -> list:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(rows, 12, generator=g) for _ in range(n)]


def everything(model: nn.Module, masks: MaskSet, opt: torch.optim.Optimizer) -> dict:
    """Every piece a prune may change, copied: parameters, buffers, masks, attachment, optimizer state."""
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "masks": {k: v.detach().clone() for k, v in masks.masks.items()},
        "attached": (masks._model is model, list(masks._optimizers) == [opt], masks.num_hooks),
        "opt": {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()},
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["model"].keys() == after["model"].keys()
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k]), k  # bit for bit
    assert before["masks"].keys() == after["masks"].keys()
    for k, v in before["masks"].items():
        assert torch.equal(v.cpu(), after["masks"][k].cpu()), k
    assert before["attached"] == after["attached"]
    assert before["opt"].keys() == after["opt"].keys()
    for p, s in before["opt"].items():
        for k, v in s.items():
            assert torch.equal(v, after["opt"][p][k]), k


def pruned_once(sequential: bool = False):
    """A model pruned at 0.5 whose MaskSet is attached to it and to an SGD with momentum state, as in training."""
    model = bn_net()
    masks = MaskSet()
    prune_model(model, calib_batches(), 0.5, masks=masks, allocation="uniform", sequential=sequential)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    masks.attach(model, opt)
    model.train()
    F.mse_loss(model(calib_batches(1)[0]), torch.zeros(32, 3)).backward()
    opt.step()
    opt.zero_grad()
    return model, masks, opt


def _fail_after(monkeypatch, owner, name: str, exc: BaseException, *, calls: int = 1) -> None:
    """``owner.name`` runs normally, then raises ``exc`` on its ``calls``-th call only (one Ctrl-C, not one per call)."""
    original = getattr(owner, name)
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        count["n"] += 1
        if count["n"] == calls:
            raise exc
        return out

    monkeypatch.setattr(owner, name, wrapped)


def _fail_in_calibration(monkeypatch):
    original = pruner_mod._calibrate

    def wrapped(model, batches, modules, options, run, rank, progress):
        seen = {"n": 0}

        def run_then_fail(batch):
            seen["n"] += 1
            if seen["n"] == 2:
                raise Injected("during calibration")
            return run(batch)

        return original(model, batches, modules, options, run_then_fail, rank, progress)

    monkeypatch.setattr(pruner_mod, "_calibrate", wrapped)


def _fail_in_bn(monkeypatch):
    original = pruner_mod.recalibrate_batchnorm

    def wrapped(model, batches, run):
        seen = {"n": 0}

        def run_then_fail(batch):  # the statistics were reset and one batch ran: half re-estimated
            seen["n"] += 1
            if seen["n"] == 2:
                raise Injected("during BatchNorm re-estimation")
            return run(batch)

        return original(model, batches, run_then_fail)

    monkeypatch.setattr(pruner_mod, "recalibrate_batchnorm", wrapped)


FAILURES = {
    "calibration": _fail_in_calibration,
    "after the solves (weights written)": lambda mp: _fail_after(mp, pruner_mod._PruneRun, "commit", Injected("after commit")),
    "BatchNorm re-estimation": _fail_in_bn,
    "inside the report, after measuring": lambda mp: _fail_after(mp, pruner_mod, "_parameter_counts", Injected("report")),
    "KeyboardInterrupt in the bound": lambda mp: _fail_after(mp, pruner_mod, "_bound", KeyboardInterrupt()),
    "KeyboardInterrupt while the masks are enforced": lambda mp: _fail_after(mp, MaskSet, "attach", KeyboardInterrupt()),
    "second layer's solve (sequential writes as it goes)": lambda mp: _fail_after(
        mp, pruner_mod, "_solve_one", Injected("solve"), calls=2
    ),
}


@pytest.mark.parametrize("sequential", [False, True], ids=["parallel", "sequential"])
@pytest.mark.parametrize("where", list(FAILURES))
def test_a_failed_prune_leaves_weights_bn_masks_and_optimizer_as_they_were(monkeypatch, where, sequential):
    model, masks, opt = pruned_once(sequential)
    before = everything(model, masks, opt)
    FAILURES[where](monkeypatch)
    with pytest.raises((Injected, KeyboardInterrupt)):
        prune_model(model, calib_batches(), 0.8, masks=masks, allocation="uniform", sequential=sequential)
    assert_same(before, everything(model, masks, opt))
    monkeypatch.undo()
    # the same prune without the failure changes all of it: the comparison above could fail
    report = prune_model(model, calib_batches(), 0.8, masks=masks, allocation="uniform", sequential=sequential)
    assert report.sparsity > 0.79 and masks.total_sparsity() > 0.79
    after = everything(model, masks, opt)
    assert not torch.equal(before["model"]["0.weight"], after["model"]["0.weight"])
    assert not torch.equal(before["model"]["1.running_mean"], after["model"]["1.running_mean"])
    assert not torch.equal(before["masks"]["0"], after["masks"]["0"])


def test_a_failed_first_prune_leaves_an_empty_detached_maskset(monkeypatch):
    model = bn_net()
    masks = MaskSet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _fail_after(monkeypatch, pruner_mod, "_parameter_counts", Injected("report"))
    with pytest.raises(Injected):
        prune_model(model, calib_batches(), 0.8, masks=masks)
    assert len(masks) == 0 and not masks.attached
    for k, v in before.items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_a_failing_on_commit_undoes_the_prune():
    model, masks, opt = pruned_once()
    before = everything(model, masks, opt)

    def on_commit(report):
        raise Injected("the caller's bookkeeping")

    options = pruner_mod.PruneOptions(sparsity=0.8, allocation="uniform")
    with pytest.raises(Injected):
        pruner_mod.prune(model, calib_batches(), options, masks=masks, on_commit=on_commit)
    assert_same(before, everything(model, masks, opt))


