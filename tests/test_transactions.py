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
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_helpers import BothCallback, lit_mlp, make_trainer
from lightning_lobs import LOBSPruning, MaskSet, prune_model
from lightning_lobs.api import take_batches
from lightning_lobs.config import PruneOptions
from lightning_lobs.engine import calibrate as calibrate_mod
from lightning_lobs.engine import prune
from lightning_lobs.engine import report as report_mod
from lightning_lobs.engine import run as run_mod
from lightning_lobs.engine import solve as solve_mod

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
    return nn.Sequential(
        nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 3)
    )


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
    prune_model(model, calib_batches(), 0.5, masks=masks, allocation="uniform", sequential=sequential, prune_head=True)
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
    original = calibrate_mod.collect_hessians

    def wrapped(model, batches, modules, options, run, rank, progress, *rest):
        seen = {"n": 0}

        def run_then_fail(batch):
            seen["n"] += 1
            if seen["n"] == 2:
                raise Injected("during calibration")
            return run(batch)

        return original(model, batches, modules, options, run_then_fail, rank, progress, *rest)

    monkeypatch.setattr(calibrate_mod, "collect_hessians", wrapped)


def _fail_in_bn(monkeypatch):
    original = report_mod.recalibrate_batchnorm

    def wrapped(model, batches, run):
        seen = {"n": 0}

        def run_then_fail(batch):  # the statistics were reset and one batch ran: half re-estimated
            seen["n"] += 1
            if seen["n"] == 2:
                raise Injected("during BatchNorm re-estimation")
            return run(batch)

        return original(model, batches, run_then_fail)

    monkeypatch.setattr(report_mod, "recalibrate_batchnorm", wrapped)


FAILURES = {
    "calibration": _fail_in_calibration,
    "after the solves (weights written)": lambda mp: _fail_after(mp, run_mod, "commit", Injected("after commit")),
    "BatchNorm re-estimation": _fail_in_bn,
    "inside the report, after measuring": lambda mp: _fail_after(
        mp, report_mod, "parameter_counts", Injected("report")
    ),
    "KeyboardInterrupt in the bound": lambda mp: _fail_after(mp, report_mod, "bound", KeyboardInterrupt()),
    "KeyboardInterrupt while the masks are enforced": lambda mp: _fail_after(
        mp, MaskSet, "attach", KeyboardInterrupt()
    ),
    "second layer's solve (sequential writes as it goes)": lambda mp: _fail_after(
        mp, solve_mod, "solve_one", Injected("solve"), calls=2
    ),
}


@pytest.mark.parametrize("sequential", [False, True], ids=["parallel", "sequential"])
@pytest.mark.parametrize("where", list(FAILURES))
def test_a_failed_prune_leaves_weights_bn_masks_and_optimizer_as_they_were(monkeypatch, where, sequential):
    model, masks, opt = pruned_once(sequential)
    before = everything(model, masks, opt)
    FAILURES[where](monkeypatch)
    with pytest.raises((Injected, KeyboardInterrupt)):
        prune_model(
            model, calib_batches(), 0.8, masks=masks, allocation="uniform", sequential=sequential, prune_head=True
        )
    assert_same(before, everything(model, masks, opt))
    monkeypatch.undo()
    # the same prune without the failure changes all of it: the comparison above could fail
    report = prune_model(
        model, calib_batches(), 0.8, masks=masks, allocation="uniform", sequential=sequential, prune_head=True
    )
    assert report.sparsity > 0.79 and masks.total_sparsity() > 0.79
    after = everything(model, masks, opt)
    assert not torch.equal(before["model"]["0.weight"], after["model"]["0.weight"])
    assert not torch.equal(before["model"]["1.running_mean"], after["model"]["1.running_mean"])
    assert not torch.equal(before["masks"]["0"], after["masks"]["0"])


def test_a_failed_first_prune_leaves_an_empty_detached_maskset(monkeypatch):
    model = bn_net()
    masks = MaskSet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _fail_after(monkeypatch, report_mod, "parameter_counts", Injected("report"))
    with pytest.raises(Injected):
        prune_model(model, calib_batches(), 0.8, masks=masks, prune_head=True)
    assert len(masks) == 0 and not masks.attached
    for k, v in before.items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_a_failing_on_commit_undoes_the_prune():
    model, masks, opt = pruned_once()
    before = everything(model, masks, opt)

    def on_commit(report):
        raise Injected("the caller's bookkeeping")

    options = PruneOptions(sparsity=0.8, allocation="uniform", prune_head=True)
    with pytest.raises(Injected):
        prune(model, calib_batches(), options, masks=masks, on_commit=on_commit)
    assert_same(before, everything(model, masks, opt))


# --------------------------------------------------------------------------- the callback


class Snapshot(BothCallback):
    """Listed before LOBSPruning: copies the model and the callback's state at the start of ``epoch``."""

    def __init__(self, lobs: LOBSPruning, epoch: int) -> None:
        self.lobs, self.epoch, self.state = lobs, epoch, None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            self.state = callback_state(trainer, pl_module, self.lobs)


def callback_state(trainer, model, lobs: LOBSPruning) -> dict:
    return {
        "opt": [{k: v.clone() for k, v in s.items()} for s in trainer.optimizers[0].state.values()],
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "masks": {k: v.detach().clone().cpu() for k, v in lobs.masks.masks.items()},
        "pruned": list(lobs.pruned_points),
        "reports": list(lobs.reports),
        "last": lobs.last_report,
    }


def assert_callback_state(before: dict, after: dict) -> None:
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k]), k
    assert before["masks"].keys() == after["masks"].keys()
    for k, v in before["masks"].items():
        assert torch.equal(v, after["masks"][k]), k
    assert before["pruned"] == after["pruned"]
    assert len(before["reports"]) == len(after["reports"])
    assert all(a is b for a, b in zip(before["reports"], after["reports"]))
    assert before["last"] is after["last"]
    assert len(before["opt"]) == len(after["opt"]) > 0
    for a, b in zip(before["opt"], after["opt"]):
        assert all(torch.equal(v, b[k]) for k, v in a.items())


CALLBACK_FAILURES = {
    "inside the report": lambda mp, cb: _fail_after(mp, report_mod, "parameter_counts", Injected("report")),
    "logging the report": lambda mp, cb: mp.setattr(
        cb, "log_report", lambda *a: (_ for _ in ()).throw(Injected("log"))
    ),
    "resetting the monitors": lambda mp, cb: _fail_after(mp, cb, "_reset_monitors", Injected("monitors")),
}


class Armer(BothCallback):
    """Arms a failure at the end of epoch 0, after the first prune ran, for the second one (epoch 1)."""

    def __init__(self, arm) -> None:
        self.arm = arm

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            self.arm()


@pytest.mark.parametrize("which", ["first", "second"])
@pytest.mark.parametrize("where", list(CALLBACK_FAILURES))
def test_a_failed_prune_leaves_the_callback_state_as_it_was(monkeypatch, where, which, tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    model = lit_mlp("lightning.pytorch", bn=True)
    if which == "first":  # fails at epoch 1, the only prune: the MaskSet was empty and detached
        lobs = LOBSPruning(
            sparsity=0.8, prune_epoch=1, calibration_batches=2, log_table=False, allocation="uniform", prune_head=True
        )
    else:  # epoch 0 pruned, epoch 1 fails
        lobs = LOBSPruning(
            sparsity=[0.5, 0.8],
            prune_epoch=[0, 1],
            calibration_batches=2,
            log_table=False,
            allocation="uniform",
            prune_head=True,
        )
    snap = Snapshot(lobs, epoch=1)
    es = EarlyStopping("train_loss", patience=5)
    es_before = {}

    class EarlyStoppingState(BothCallback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                es_before.update(wait=es.wait_count, best=es.best_score.clone())

    armer = Armer(lambda: CALLBACK_FAILURES[where](monkeypatch, lobs))
    tr = make_trainer("lightning.pytorch", 3, [EarlyStoppingState(), snap, lobs, es, armer], tmp_path)
    with pytest.raises(Injected):
        tr.fit(model)
    assert snap.state is not None and snap.state["pruned"] == ([] if which == "first" else [0])
    assert_callback_state(snap.state, callback_state(tr, model, lobs))
    assert lobs.masks.attached == (which == "second")
    assert bool(torch.isfinite(es_before["best"]))  # EarlyStopping had a score to lose
    assert es.wait_count == es_before["wait"] and torch.equal(es.best_score, es_before["best"])


@pytest.mark.filterwarnings("ignore:.*was called without a model.*")  # Lightning's, with OnExceptionCheckpoint
@pytest.mark.filterwarnings("ignore:.*there is no last checkpoint available.*")
def test_exception_checkpoint_holds_the_old_state_and_resumes_into_a_normal_prune(monkeypatch, tmp_path, ns):
    """An out-of-memory error while the report is built: OnExceptionCheckpoint writes the dense weights beside no
    masks and no pruned epoch (not new masks beside dense weights), and resuming from it prunes at epoch 1."""
    model = lit_mlp(ns)
    lobs = LOBSPruning(sparsity=0.8, prune_epoch=1, calibration_batches=4, log_table=False, prune_head=True)
    snap = Snapshot(lobs, epoch=1)
    on_exc = ns.callbacks.OnExceptionCheckpoint(dirpath=str(tmp_path))
    armer = Armer(lambda: _fail_after(monkeypatch, report_mod, "parameter_counts", Injected("out of memory")))
    tr = make_trainer(ns, 2, [snap, lobs, armer, on_exc], tmp_path, enable_checkpointing=True)
    with pytest.raises(Injected):
        tr.fit(model)
    ckpt = torch.load(tmp_path / "on_exception.ckpt", map_location="cpu", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "LOBSPruning" in k]
    assert state["masks"] == {} and state["pruned_epochs"] == []
    for k, v in snap.state["model"].items():
        assert torch.equal(ckpt["state_dict"][k], v), k  # the weights at the start of epoch 1, dense
    monkeypatch.undo()

    model2 = lit_mlp(ns, seed=7)
    lobs2 = LOBSPruning(sparsity=0.8, prune_epoch=1, calibration_batches=4, log_table=False, prune_head=True)
    record = RecordOrder()
    make_trainer(ns, 2, [record, lobs2], tmp_path).fit(model2, ckpt_path=str(tmp_path / "on_exception.ckpt"))
    assert {epoch for epoch, _ in record.seen} == {1}  # resumed at the interrupted epoch
    assert lobs2.pruned_epochs == [1] and len(lobs2.reports) == 1
    report = lobs2.last_report
    assert report.sparsity > 0.79
    for name in report.layers:
        weight = model2.get_submodule(name).weight
        assert torch.all(weight[~lobs2.masks[name].to(weight.device)] == 0)


def test_a_failed_step_prune_does_not_mark_the_steps_it_passed_over_as_pruned(monkeypatch):
    """A resume past two prune steps prunes once at the later one and records both; if that prune fails, neither."""
    from types import SimpleNamespace

    lobs = LOBSPruning(sparsity=[0.5, 0.7], prune_step=[2, 4], calibration_batches=2, log_table=False, prune_head=True)
    monkeypatch.setattr(lobs, "prune_now", lambda *a: (_ for _ in ()).throw(Injected("prune")))
    with pytest.raises(Injected):
        lobs.on_train_batch_start(SimpleNamespace(global_step=5), None, None, 0)
    assert lobs.pruned_steps == []


# --------------------------------------------------------------------------- reusing a callback


class CountPrunes(BothCallback):
    def __init__(self, lobs: LOBSPruning) -> None:
        self.lobs, self.calls = lobs, 0
        original = lobs.prune_now

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        lobs.prune_now = counted  # type: ignore[method-assign]


def test_a_callback_reused_on_another_model_starts_over(tmp_path, ns):
    lobs = LOBSPruning(sparsity=0.7, prune_epoch=0, calibration_batches=2, log_table=False, prune_head=True)
    counter = CountPrunes(lobs)
    first = lit_mlp(ns, seed=1)
    make_trainer(ns, 1, [lobs], tmp_path).fit(first)
    first_masks = {n: m.clone() for n, m in lobs.masks.masks.items()}
    first_report = lobs.last_report

    second = lit_mlp(ns, seed=2)  # a notebook cell re-run: new model, same callbacks list
    make_trainer(ns, 1, [lobs], tmp_path).fit(second)
    assert counter.calls == 2  # solved again, on the new model
    assert lobs.pruned_epochs == [0] and len(lobs.reports) == 1 and lobs.last_report is not first_report
    assert first_report.masks is not lobs.masks  # the first fit's report keeps its own masks
    assert any(not torch.equal(first_masks[n], lobs.masks[n]) for n in first_masks)
    for name, report in lobs.last_report.layers.items():
        weight = second.get_submodule(name).weight
        assert torch.equal(weight != 0, lobs.masks[name]) or torch.all(weight[~lobs.masks[name]] == 0)
        assert report.layer_error > 0


def test_a_second_fit_of_the_same_model_continues(tmp_path, ns):
    lobs = LOBSPruning(sparsity=0.7, prune_epoch=0, calibration_batches=2, log_table=False, prune_head=True)
    counter = CountPrunes(lobs)
    model = lit_mlp(ns)
    make_trainer(ns, 1, [lobs], tmp_path).fit(model)
    masks = {n: m.clone() for n, m in lobs.masks.masks.items()}
    make_trainer(ns, 2, [lobs], tmp_path).fit(model)
    assert counter.calls == 1 and lobs.pruned_epochs == [0] and len(lobs.reports) == 1
    for name, m in masks.items():
        assert torch.equal(lobs.masks[name], m)
        assert torch.all(model.get_submodule(name).weight[~m] == 0)  # held through the second fit


def test_a_callback_bound_to_a_model_still_pickles():
    """ddp_spawn pickles the callbacks: one reused from an earlier fit holds a (weak) reference to that model."""
    lobs = LOBSPruning(sparsity=0.5, prune_epoch=0, prune_head=True)
    model = bn_net()
    lobs._bind(model)
    lobs.masks.set("0", torch.ones(16, 12, dtype=torch.bool))
    copy = pickle.loads(pickle.dumps(lobs))
    assert set(copy.masks) == {"0"}
    copy._bind(bn_net())  # a spawned worker's model is a copy of the same model: its state carries on
    assert set(copy.masks) == {"0"}


def test_a_reused_callback_resuming_a_new_model_from_a_checkpoint_restores_the_saved_masks(tmp_path, ns):
    lobs = LOBSPruning(sparsity=0.7, prune_epoch=0, calibration_batches=2, log_table=False, prune_head=True)
    counter = CountPrunes(lobs)
    ckpt = ns.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    make_trainer(ns, 1, [lobs, ckpt], tmp_path, enable_checkpointing=True).fit(lit_mlp(ns, seed=1))
    saved = {n: m.clone() for n, m in lobs.masks.masks.items()}
    model = lit_mlp(ns, seed=2)
    make_trainer(ns, 2, [lobs], tmp_path).fit(model, ckpt_path=str(tmp_path / "last.ckpt"))
    assert counter.calls == 1 and lobs.pruned_epochs == [0]
    for name, m in saved.items():
        assert torch.equal(lobs.masks[name], m)
        assert torch.all(model.get_submodule(name).weight[~m] == 0)


# --------------------------------------------------------------------------- calibration and the data order


def epoch_orders(loader, calibrate_between: bool) -> list:
    out = [torch.cat([b[0] for b in loader]).tolist()]
    if calibrate_between:
        assert len(take_batches(loader, 2)) == 2
    out += [torch.cat([b[0] for b in loader]).tolist() for _ in range(2)]
    return out


@pytest.mark.parametrize("owner", ["loader", "sampler"])
def test_calibration_leaves_the_loaders_own_generator_alone(owner):
    data = TensorDataset(torch.arange(40))

    def loader():
        g = torch.Generator().manual_seed(3)
        if owner == "loader":
            return DataLoader(data, batch_size=5, shuffle=True, generator=g)
        return DataLoader(data, batch_size=5, sampler=RandomSampler(data, generator=g))

    plain = epoch_orders(loader(), calibrate_between=False)
    assert plain[1] != plain[2]  # the order does change from epoch to epoch
    assert epoch_orders(loader(), calibrate_between=True) == plain


class RecordOrder(BothCallback):
    def __init__(self) -> None:
        self.seen: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, batch[0][:, 0].tolist()))


def test_calibrating_from_the_training_loader_keeps_the_data_order_of_later_epochs(tmp_path, ns):
    """LitMLP's training loader has its own generator: the prune at epoch 1 draws from that loader."""
    orders = []
    for with_prune in (False, True):
        record = RecordOrder()
        callbacks = [record] + (
            [LOBSPruning(sparsity=0.5, prune_epoch=1, calibration_batches=3, log_table=False, prune_head=True)]
            if with_prune
            else []
        )
        make_trainer(ns, 3, callbacks, tmp_path).fit(lit_mlp(ns))
        orders.append(record.seen)
    assert orders[0] == orders[1]


# --------------------------------------------------------------------------- one-shot iterators


def mlp_batches(n: int) -> list:
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(64, 32, generator=g), torch.zeros(64, dtype=torch.long)) for _ in range(n)]


def test_a_one_shot_iterator_with_two_scheduled_prunes_is_refused_at_setup(tmp_path, ns):
    lobs = LOBSPruning(
        sparsity=[0.5, 0.7],
        prune_epoch=[0, 1],
        calibration_batches=2,
        calibration_dataloader=iter(mlp_batches(4)),
        prune_head=True,
    )
    model = lit_mlp(ns)
    with pytest.raises(ValueError, match="one-shot iterator.*DataLoader or a list"):
        make_trainer(ns, 2, [lobs], tmp_path).fit(model)
    assert model.steps == 0  # refused before any training


def test_a_short_one_shot_iterator_with_one_prune_warns_how_many_batches_were_used(tmp_path, ns):
    source = (b for b in mlp_batches(2))
    lobs = LOBSPruning(
        sparsity=0.5,
        prune_epoch=0,
        calibration_batches=5,
        calibration_dataloader=source,
        log_table=False,
        prune_head=True,
    )
    with pytest.warns(UserWarning, match=r"calibration_batches=5 but the iterator yielded only 2"):
        make_trainer(ns, 1, [lobs], tmp_path).fit(lit_mlp(ns))
    assert lobs.pruned_epochs == [0]


def test_prune_model_says_when_an_iterator_yields_fewer_batches_than_asked():
    model = bn_net()
    with pytest.warns(UserWarning, match=r"calibration_batches=6 but the iterator yielded only 3 batch"):
        prune_model(model, iter(calib_batches(3)), 0.5, calibration_batches=6, prune_head=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a list gives what it holds, and a full iterator what was asked: no warning
        prune_model(bn_net(), calib_batches(3), 0.5, calibration_batches=6, prune_head=True)
        prune_model(bn_net(), iter(calib_batches(3)), 0.5, calibration_batches=3, prune_head=True)


# --------------------------------------------------------------------------- data-dependent layers


class Branchy(nn.Module):
    """``expert`` is called only on batches of 3 rows (a data-dependent branch, an MoE expert)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)
        self.expert = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.expert(h) if x.shape[0] == 3 else self.b(h)


@pytest.mark.parametrize("spec", ["pattern", "named"])
def test_sequential_prunes_the_layers_the_parallel_path_prunes(spec):
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g), torch.randn(3, 8, generator=g)]
    sparsity = 0.5 if spec == "pattern" else {"a": 0.5, "b": 0.5, "expert": 0.5}
    pruned = {}
    for sequential in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no "never called" warning either
            report = prune_model(
                Branchy(), batches, sparsity, allocation="uniform", sequential=sequential, prune_head=True
            )
        pruned[sequential] = set(report.layers)
    assert pruned[False] == pruned[True] == {"a", "b", "expert"}
