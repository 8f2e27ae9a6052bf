"""``LOBSPruning`` in real Lightning pipelines, under every installed namespace (``ns`` fixture):
precisions, the fit lifecycle (max_steps, EarlyStopping, monitored checkpoints), several
instances, checkpoint state, metrics at the prune's step, progress output, frozen layers, export."""

from __future__ import annotations

import csv
import importlib
import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_helpers import LAYERS, NAMESPACES, BothCallback, lit_mlp, make_trainer, zeros
from lightning_lobs import LOBSPruning
from lightning_lobs.config import PruneProgress
from lightning_lobs.progress import console_progress

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint need to be provided.*"),
    pytest.mark.filterwarnings("ignore:.*your dataloader is not resumable.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"),
    pytest.mark.filterwarnings("ignore:.*Checkpoint directory .* exists and is not empty.*"),
]


def small(ns, **kwargs):
    """128 samples in 2 batches of 64: an epoch is 2 optimizer steps."""
    return lit_mlp(ns, n=128, **kwargs)


def lobs(**kwargs) -> LOBSPruning:
    kwargs.setdefault("calibration_batches", 2)
    kwargs.setdefault("log_table", False)
    kwargs.setdefault("allocation", "uniform")
    return LOBSPruning(**kwargs, prune_head=True)


def assert_masks_hold(cb: LOBSPruning, model: nn.Module) -> None:
    assert len(cb.masks) > 0
    for name, mask in cb.masks.masks.items():
        w = model.get_submodule(name).weight.detach()
        assert torch.all(w[~mask.to(w.device)] == 0), name


# --------------------------------------------------------------------------- namespaces


def test_one_class_is_a_callback_of_every_installed_namespace():
    cb = lobs()
    for name in NAMESPACES:
        assert isinstance(cb, importlib.import_module(name).Callback), name


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", ["32-true", "64-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed"])
def test_every_cpu_precision_prunes_and_holds_masks(ns, precision):
    model = small(ns, optimizer="sgd")  # Adam's eps underflows in float16 weights ("16-true")
    cb = lobs(sparsity=0.6, prune_epoch=1)
    make_trainer(ns, 2, [cb], precision=precision).fit(model)
    assert cb.pruned_epochs == [1]
    assert cb.last_report.sparsity == pytest.approx(0.6, abs=5e-3)
    assert_masks_hold(cb, model)
    for name in LAYERS:
        assert zeros(model, name) >= round(0.6 * model.get_submodule(name).weight.numel())


def test_batches_arrive_as_the_training_loop_feeds_them(ns):
    """Calibration sees the batch after convert_input and the transfer hooks, under the plugin's forward context."""
    seen: list[tuple] = []

    class Hooked(type(small(ns))):  # type: ignore[misc]
        def on_after_batch_transfer(self, batch, dataloader_idx):
            x, y = batch
            return x * 0 + 1, y  # a transformation the calibration must see too

    model = Hooked(n=128, optimizer="sgd")

    def fwd(m, batch):
        seen.append((batch[0].dtype, bool(torch.all(batch[0] == 1)), torch.get_default_dtype()))
        return m(batch[0])

    cb = lobs(sparsity=0.5, prune_epoch=0, forward_fn=fwd)
    make_trainer(ns, 1, [cb], precision="64-true").fit(model)
    assert seen and all(s == (torch.float64, True, torch.float64) for s in seen)


# --------------------------------------------------------------------------- lifecycle


def test_max_steps_that_ends_before_the_prune_is_an_error_before_training(ns):
    model = small(ns)
    with pytest.raises(ValueError, match=r"prune_epoch 2 is never reached: max_steps=3 .* 2 steps per epoch"):
        make_trainer(ns, 4, [lobs(sparsity=0.5, prune_epoch=2)], max_steps=3).fit(model)
    assert model.steps == 0


def test_early_stopping_before_the_prune_warns_naming_the_epochs(ns):
    model = small(ns)

    class Flat(BothCallback):  # a monitored value that never improves: EarlyStopping stops after `patience`
        def on_train_epoch_end(self, trainer, pl_module):
            pl_module.log("flat", 1.0)

    stop = ns.callbacks.EarlyStopping(monitor="flat", patience=1, check_on_train_epoch_end=True)
    cb = lobs(sparsity=[0.5, 0.7], prune_epoch=[1, 4])
    with pytest.warns(
        UserWarning,
        match=r"training ended at epoch .*EarlyStopping on 'flat' stopped it.*prune epochs \[4\].*pruned only at epochs \[1\]",
    ):
        make_trainer(ns, 6, [cb, Flat(), stop]).fit(model)
    assert cb.pruned_epochs == [1]


class ZeroFraction(BothCallback):
    """Logs a validation score that is best (lowest) for the dense model: the fraction of zero weights."""

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log("zero_frac", float((pl_module.net[0].weight == 0).float().mean()))


def test_best_checkpoint_after_a_prune_is_a_pruned_one(ns, tmp_path):
    """Every dense epoch scores better; without the reset "best" would stay dense and so would test(ckpt_path="best")."""
    model = small(ns)
    cb = lobs(sparsity=0.9, prune_epoch=2)
    ckpt = ns.callbacks.ModelCheckpoint(dirpath=str(tmp_path), monitor="zero_frac", save_top_k=1, filename="{epoch}")
    stop = ns.callbacks.EarlyStopping(monitor="zero_frac", patience=3)
    tr = make_trainer(ns, 3, [cb, ZeroFraction(), ckpt, stop], tmp_path, enable_checkpointing=True, limit_val_batches=1)
    tr.fit(model)
    assert cb.pruned_epochs == [2]
    assert ckpt.best_model_path.endswith("epoch=2.ckpt"), ckpt.best_model_path
    assert (tmp_path / "epoch=0.ckpt").exists()  # the dense best stays on disk, no longer ranked
    assert stop.wait_count == 0 and stop.best_score == pytest.approx(0.9, abs=0.05)  # patience restarted at the prune
    tr.test(model, ckpt_path="best", verbose=False)
    assert float((model.net[0].weight == 0).float().mean()) >= 0.85


def test_no_reset_keeps_the_dense_best(ns, tmp_path):
    model = small(ns)
    cb = lobs(sparsity=0.9, prune_epoch=2, reset_monitors=False)
    ckpt = ns.callbacks.ModelCheckpoint(dirpath=str(tmp_path), monitor="zero_frac", save_top_k=1, filename="{epoch}")
    make_trainer(ns, 3, [cb, ZeroFraction(), ckpt], tmp_path, enable_checkpointing=True, limit_val_batches=1).fit(model)
    assert ckpt.best_model_path.endswith("epoch=0.ckpt"), ckpt.best_model_path


def test_prune_step_prunes_mid_epoch_at_that_step(ns, tmp_path):
    model = small(ns)
    cb = lobs(sparsity=0.6, prune_step=3)
    logger = ns.loggers.CSVLogger(str(tmp_path), name="m", version=0)
    seen = []

    class StepWatch(BothCallback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.global_step, len(cb.masks) > 0))

    make_trainer(ns, 3, [cb, StepWatch()], tmp_path, logger=logger).fit(model)
    assert cb.pruned_steps == [3] and cb.pruned_epochs == [] and cb.prune_epochs == []
    assert seen == [(0, False), (1, False), (2, False), (3, True), (4, True), (5, True)]  # step 3 is mid-epoch 1
    assert_masks_hold(cb, model)
    with open(tmp_path / "m" / "version_0" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("lobs/net.0/layer_error")]
    assert [int(r["step"]) for r in rows] == [3]


def test_unreachable_prune_step_is_an_error_before_training(ns):
    with pytest.raises(ValueError, match=r"prune_step 8 is never reached: max_steps=8"):
        make_trainer(ns, 9, [lobs(prune_step=8)], max_steps=8).fit(small(ns))
    with pytest.raises(ValueError, match=r"prune_step 6 is never reached: max_epochs=3 with 2 steps per epoch"):
        make_trainer(ns, 3, [lobs(prune_step=6)]).fit(small(ns))
    with pytest.raises(ValueError, match="prune_epoch or prune_step, not both"):
        lobs(prune_epoch=1, prune_step=6)


# --------------------------------------------------------------------------- several instances, state


def test_two_instances_each_prune_and_restore_their_own_layers(ns, tmp_path):
    model = small(ns)
    first = lobs(sparsity={"net.0": 0.5}, prune_epoch=0, state_key="first")
    second = lobs(sparsity={"net.[24]": 0.7}, prune_epoch=1, state_key="second")
    ckpt = ns.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    make_trainer(ns, 2, [first, second, ckpt], tmp_path, enable_checkpointing=True).fit(model)
    assert set(first.masks) == {"net.0"} and set(second.masks) == {"net.2", "net.4"}
    assert_masks_hold(first, model)
    assert_masks_hold(second, model)

    model2 = small(ns, seed=3)
    first2 = lobs(sparsity={"net.0": 0.5}, prune_epoch=0, state_key="first")
    second2 = lobs(sparsity={"net.[24]": 0.7}, prune_epoch=1, state_key="second")
    make_trainer(ns, 3, [second2, first2]).fit(model2, ckpt_path=str(tmp_path / "last.ckpt"))
    assert first2.reports == [] and second2.reports == []  # restored, not pruned again
    for old, new in ((first, first2), (second, second2)):
        assert set(new.masks) == set(old.masks)
        for name in old.masks:
            assert torch.equal(new.masks[name].cpu(), old.masks[name].cpu())
    assert_masks_hold(first2, model2)
    assert_masks_hold(second2, model2)


def test_instances_pruning_the_same_layer_are_refused(ns):
    with pytest.raises(ValueError, match=r"would both prune \['net.2'\]"):
        make_trainer(
            ns, 2, [lobs(sparsity={"net.[02]": 0.5}, state_key="a"), lobs(sparsity={"net.2": 0.5}, state_key="b")]
        ).fit(small(ns))


def test_resume_with_a_different_schedule_is_detected(ns, tmp_path):
    model = small(ns)
    ckpt = ns.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0)
    make_trainer(ns, 2, [lobs(sparsity=0.5, prune_epoch=0), ckpt], tmp_path, enable_checkpointing=True).fit(model)
    with pytest.raises(
        ValueError,
        match=r"different prune schedule.*pruned at epoch 0 with \[0.5\].*prunes at epoch 0: 0.8.*trained with \(epoch 0: 0.5\)",
    ):
        make_trainer(ns, 3, [lobs(sparsity=0.8, prune_epoch=0)]).fit(small(ns), ckpt_path=str(tmp_path / "last.ckpt"))
    with pytest.raises(
        ValueError,
        match=r"state_key is \"LOBSPruning\{'state_key': 'other'\}\"|state_key is 'LOBSPruning\{'state_key': 'other'\}'",
    ):
        make_trainer(ns, 3, [lobs(sparsity=0.5, prune_epoch=0, state_key="other")]).fit(
            small(ns), ckpt_path=str(tmp_path / "last.ckpt")
        )
    # a later step added on resume is fine (with a warning): the done step matches
    cb = lobs(sparsity=[0.5, 0.7], prune_epoch=[0, 2])
    with pytest.warns(UserWarning, match="prune steps not yet run changed"):
        make_trainer(ns, 3, [cb]).fit(small(ns), ckpt_path=str(tmp_path / "last.ckpt"))
    assert cb.pruned_epochs == [0, 2]


# --------------------------------------------------------------------------- metrics


def test_metrics_at_the_prune_step_and_sparsity_every_epoch(ns, tmp_path):
    model = small(ns)
    cb = lobs(sparsity=0.6, prune_epoch=1)
    logger = ns.loggers.CSVLogger(str(tmp_path), name="m", version=0)
    tr = make_trainer(ns, 3, [cb], tmp_path, logger=logger, log_every_n_steps=1)
    tr.fit(model)
    with open(tmp_path / "m" / "version_0" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    prune_rows = [r for r in rows if r.get("lobs/net.0/layer_error")]
    assert len(prune_rows) == 1
    assert int(prune_rows[0]["step"]) == 2 and int(prune_rows[0]["epoch"]) == 1  # epoch 1 starts after 2 steps
    assert float(prune_rows[0]["lobs/nonzero_parameters"]) < float(prune_rows[0]["lobs/total_parameters"])
    sparsity_rows = [r for r in rows if r.get("lobs/sparsity") and not r.get("lobs/net.0/layer_error")]
    assert [int(r["epoch"]) for r in sparsity_rows] == [1, 2]  # after every epoch with masks
    assert all(float(r["lobs/sparsity"]) == pytest.approx(0.6, abs=5e-3) for r in sparsity_rows)
    total = sum(p.numel() for p in model.parameters())
    assert (
        float(sparsity_rows[-1]["lobs/nonzero_parameters"])
        == sum(int(torch.count_nonzero(p)) for p in model.parameters())
        < total
    )


def test_metrics_step_is_lightnings_logging_step_with_two_optimizers(ns, tmp_path):
    """Manual optimization with two optimizers: global_step counts 2 per batch; the logging axis counts batches."""

    class TwoOpt(type(small(ns))):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(n=128)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            for opt in self.optimizers():
                opt.zero_grad()
                self.manual_backward(F.cross_entropy(self(x), y))
                opt.step()

        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.net[0].parameters(), lr=0.01),
                torch.optim.SGD(self.net[2:].parameters(), lr=0.01),
            ]

    cb = lobs(sparsity=0.5, prune_epoch=1)
    logger = ns.loggers.CSVLogger(str(tmp_path), name="m", version=0)
    tr = make_trainer(ns, 2, [cb], tmp_path, logger=logger)
    tr.fit(TwoOpt())
    assert tr.global_step == 8  # 2 epochs x 2 batches x 2 optimizers
    with open(tmp_path / "m" / "version_0" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("lobs/net.0/layer_error")]
    assert [int(r["step"]) for r in rows] == [2]  # 2 batches stepped before epoch 1 (global_step was 4)
    assert_masks_hold(cb, tr.lightning_module)


def test_barebones_trainer_prunes_without_logging(ns):
    model = small(ns)
    cb = lobs(sparsity=0.5, prune_epoch=1, log_table=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(ns, 2, [cb], barebones=True).fit(model)
    refused = [w for w in caught if "self.log()" in str(w.message) and "barebones" in str(w.message)]
    assert len(refused) == model.steps  # only the model's own train_loss; the callback does not try self.log
    assert cb.pruned_epochs == [1]
    assert_masks_hold(cb, model)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 4)

    def forward(self, x):
        return self.b(x + torch.relu(self.a(x)))  # a residual: the bound does not apply


def test_nan_bound_not_logged_and_reason_logged_once(ns, tmp_path, caplog):
    model = small(ns)
    model.net = Residual()
    cb = lobs(sparsity=[0.5, 0.6], prune_epoch=[0, 1])
    logger = ns.loggers.CSVLogger(str(tmp_path), name="m", version=0)
    with caplog.at_level(logging.INFO):
        make_trainer(ns, 2, [cb], tmp_path, logger=logger).fit(model)
    assert math.isnan(cb.last_report.bound)
    with open(tmp_path / "m" / "version_0" / "metrics.csv") as fh:
        header = next(csv.reader(fh))
    assert "lobs/bound" not in header and "lobs/output_error" in header
    notes = [r for r in caplog.records if "error bound not logged" in r.getMessage()]
    assert len(notes) == 1 and cb.last_report.bound_note in notes[0].getMessage()


# --------------------------------------------------------------------------- progress


class RichSpy(BothCallback):
    """Placed before LOBSPruning: records the descriptions written into the Rich train task (a captured
    console does not render live updates)."""

    def __init__(self) -> None:
        self.descriptions: list[str] = []

    def on_train_epoch_start(self, trainer, pl_module):
        progress = trainer.progress_bar_callback.progress
        update = progress.update

        def spy(task, *args, **kwargs):
            if "description" in kwargs:
                self.descriptions.append(str(kwargs["description"]))
            return update(task, *args, **kwargs)

        progress.update = spy


@pytest.mark.parametrize("bar", ["tqdm", "rich", "none"])
def test_progress_and_table_through_the_trainers_bar(ns, bar, capsys, caplog):
    if bar == "rich":
        pytest.importorskip("rich")
    printed: list[str] = []
    spy = RichSpy()
    cb = lobs(sparsity=0.5, prune_epoch=1, log_table=True, progress_after=0.0)
    extra = {"tqdm": [ns.callbacks.TQDMProgressBar()], "rich": [spy, ns.callbacks.RichProgressBar()], "none": []}[bar]
    with caplog.at_level(logging.INFO):
        tr = make_trainer(ns, 2, extra[:-1] + [cb] + extra[-1:] if extra else [cb], enable_progress_bar=bar != "none")
        if bar != "none":
            orig = tr.progress_bar_callback.print
            tr.progress_bar_callback.print = lambda *a, **k: printed.append(" ".join(map(str, a))) or orig(*a, **k)
        tr.fit(small(ns))
    out = capsys.readouterr()
    assert cb.pruned_epochs == [1]
    if bar == "none":
        messages = [r.getMessage() for r in caplog.records]
        assert any(m.startswith("L-OBS solve 3/3") for m in messages), messages
        assert any("L-OBS pruning at epoch 1 (step 2)" in m and "nonzero parameters" in m for m in messages)
        return
    if bar == "tqdm":
        assert "L-OBS solve 3/3" in out.out + out.err  # the postfix of the train bar
    else:
        assert any("L-OBS solve 3/3" in d for d in spy.descriptions), spy.descriptions
        assert "L-OBS" not in spy.descriptions[-1]  # restored after the prune
    assert (
        len(printed) == 1 and "L-OBS pruning at epoch 1 (step 2)" in printed[0] and "nonzero parameters" in printed[0]
    )


def test_progress_waits_for_progress_after(ns, caplog):
    cb = lobs(sparsity=0.5, prune_epoch=0, progress_after=3600.0)
    with caplog.at_level(logging.INFO):
        make_trainer(ns, 1, [cb]).fit(small(ns))
    assert not any(r.getMessage().startswith("L-OBS ") and "|" in r.getMessage() for r in caplog.records)


def test_console_progress_throttles_but_shows_each_phase_end(capsys):
    fn = console_progress(interval=3600.0)
    for i in range(1, 6):
        fn(PruneProgress("solve", i, 5, f"l{i}", 0.1 * i, 1.0))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        PruneProgress("solve", 1, 5, "l1", 0.1, 1.0).describe(),
        PruneProgress("solve", 5, 5, "l5", 0.5, 1.0).describe(),
    ]


# --------------------------------------------------------------------------- frozen layers


def test_layer_frozen_at_the_prune_gets_its_gradient_masked_after_unfreezing(ns):
    base = type(small(ns))

    class WithBackbone(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__(n=128)
            self.backbone = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU())
            self.head = nn.Linear(16, 4)
            del self.net

        def forward(self, x):
            return self.head(self.backbone(x))

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)

    pruned_grads: list[float] = []

    class GradCheck(BothCallback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            for name, mask in cb.masks.masks.items():
                g = pl_module.get_submodule(name).weight.grad
                if g is not None:
                    pruned_grads.append(float(g[~mask].abs().sum()))

    model = WithBackbone()
    cb = lobs(sparsity=0.5, prune_epoch=0)
    finetune = ns.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda e: 1.0)
    check = GradCheck()
    make_trainer(ns, 3, [finetune, cb, check], gradient_clip_val=0.5).fit(model)
    assert set(cb.masks) == {"backbone.0", "backbone.2", "head"}
    assert all(p.requires_grad for p in model.backbone.parameters())  # it was unfrozen ...
    assert len(pruned_grads) > 4 and max(pruned_grads) == 0.0  # ... and its pruned gradients stayed 0
    assert_masks_hold(cb, model)
    assert cb.masks.num_hooks == 0


# --------------------------------------------------------------------------- sparse export at the end of fit


def test_save_sparse_at_the_end_of_fit(ns, tmp_path):
    export = pytest.importorskip("lightning_lobs.export")
    model = small(ns)
    path = tmp_path / "model.lobs"
    cb = lobs(sparsity=0.7, prune_epoch=0, save_sparse=str(path))
    make_trainer(ns, 1, [cb]).fit(model)
    assert path.exists()
    state = export.read_sparse(str(path))
    assert set(state) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k  # the final (retrained, masked) weights, bit for bit
    assert int((state["net.0.weight"] == 0).sum()) >= round(0.7 * 24 * 32)
