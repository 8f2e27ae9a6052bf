"""What ``LOBSPruning`` promises about its schedule, its metric names and the monitors it resets,
checked inside the run (not only after ``fit``), under every installed namespace (``ns`` fixture).

- a schedule is reachable when the batches per epoch are not a multiple of ``accumulate_grad_batches``
  (the last, partial window steps too);
- several instances each log under ``lobs/<state_key>/``;
- ``reset_monitors=True`` restarts ``EarlyStopping``'s patience at the prune itself.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from lightning_helpers import BothCallback, lit_mlp, make_trainer
from lightning_lobs import LOBSPruning

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"),
]


def lobs(**kwargs: Any) -> LOBSPruning:
    kwargs.setdefault("calibration_batches", 2)
    kwargs.setdefault("log_table", False)
    kwargs.setdefault("allocation", "uniform")
    return LOBSPruning(**kwargs)


# --------------------------------------------------------------------------- schedule with gradient accumulation


def five_batches(ns):
    """320 samples in 5 batches of 64: with accumulate_grad_batches=2 an epoch steps 3 times (2 + 2 + 1)."""
    return lit_mlp(ns, n=320, batch_size=64)


def test_prune_step_in_the_second_epoch_is_reached_when_the_last_window_is_partial(ns):
    steps: list[int] = []

    class StepWatch(BothCallback):
        def on_train_end(self, trainer, pl_module):
            steps.append(trainer.global_step)

    cb = lobs(sparsity=0.5, prune_step=5)
    make_trainer(ns, 2, [cb, StepWatch()], accumulate_grad_batches=2).fit(five_batches(ns))
    assert steps == [6]  # 3 steps per epoch, not 5 // 2 = 2
    assert cb.pruned_steps == [5]


def test_prune_epoch_after_max_steps_is_refused_before_training_with_a_partial_window(ns):
    model = five_batches(ns)
    # epoch 2 starts after 2 * 3 = 6 steps, so max_steps=6 never reaches it (with 5 // 2 = 2 it would seem to)
    with pytest.raises(ValueError, match=r"prune_epoch 2 is never reached: max_steps=6 .* 3 steps per epoch"):
        make_trainer(ns, 4, [lobs(sparsity=0.5, prune_epoch=2)], max_steps=6, accumulate_grad_batches=2).fit(model)
    assert model.steps == 0


# --------------------------------------------------------------------------- metric names of several instances


def memory_logger(ns):
    """A logger that records every metric name it is sent, in order."""

    class Memory(ns.loggers.Logger):
        def __init__(self) -> None:
            super().__init__()
            self.logged: list[tuple[int, dict[str, float]]] = []

        @property
        def name(self) -> str:
            return "memory"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: Any = None) -> None:
            self.logged.append((step, dict(metrics)))

    return Memory()


def test_two_instances_log_under_their_own_state_key(ns):
    model = lit_mlp(ns, n=128)
    first = lobs(sparsity={"net.0": 0.5}, prune_epoch=0, state_key="first")
    second = lobs(sparsity={"net.[24]": 0.7}, prune_epoch=1, state_key="second", prune_head=True)  # net.4 is the head
    logger = memory_logger(ns)
    trainer = make_trainer(ns, 2, [first, second], logger=logger, log_every_n_steps=1)
    trainer.fit(model)
    names = {k for _, metrics in logger.logged for k in metrics}
    lobs_names = {k for k in names if k.startswith("lobs/")}
    # every metric of an instance carries its state_key; nothing goes to the unprefixed names
    assert all(k.startswith(("lobs/first/", "lobs/second/")) for k in lobs_names), sorted(lobs_names)
    for key in ("first", "second"):
        for metric in ("sparsity", "total_parameters", "nonzero_parameters", "model_sparsity"):
            assert f"lobs/{key}/{metric}" in names, (key, metric)
    assert "lobs/first/net.0/layer_error" in names and "lobs/first/net.2/layer_error" not in names
    assert {"lobs/second/net.2/layer_error", "lobs/second/net.4/layer_error"} <= names
    assert "lobs/second/net.0/layer_error" not in names
    # each instance's own sparsity: first prunes net.0 to 0.5, second net.2 and net.4 to 0.7
    last = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert last["lobs/first/sparsity"] == pytest.approx(0.5, abs=5e-3)
    assert last["lobs/second/sparsity"] == pytest.approx(0.7, abs=5e-3)
    assert "lobs/sparsity" not in last


# --------------------------------------------------------------------------- reset_monitors at the prune


@pytest.mark.parametrize("mode", ["min", "max"])
def test_reset_monitors_restarts_early_stopping_patience_at_the_prune(ns, mode):
    """A monitored value that never improves after epoch 0: patience counts from epoch 1 on, and the prune at the
    start of epoch 3 restarts it (read at that epoch's first batch, before EarlyStopping's own end-of-epoch check)."""
    model = lit_mlp(ns, n=128)
    seen: dict[int, tuple[int, float]] = {}

    class Flat(BothCallback):
        def on_train_epoch_end(self, trainer, pl_module):
            pl_module.log("flat", 1.0)

    stop = ns.callbacks.EarlyStopping(monitor="flat", mode=mode, patience=10, check_on_train_epoch_end=True)

    class Watch(BothCallback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                seen[trainer.current_epoch] = (int(stop.wait_count), float(stop.best_score))

    cb = lobs(sparsity=0.5, prune_epoch=3)
    make_trainer(ns, 4, [cb, Flat(), stop, Watch()]).fit(model)
    assert cb.pruned_epochs == [3]
    assert seen[1] == (0, 1.0) and seen[2] == (1, 1.0)  # epoch 0 set the best, epoch 1 did not improve on it
    assert seen[3] == (0, math.inf if mode == "min" else -math.inf)  # restarted at the prune


def test_reset_monitors_false_keeps_early_stopping_patience(ns):
    model = lit_mlp(ns, n=128)
    seen: dict[int, int] = {}

    class Flat(BothCallback):
        def on_train_epoch_end(self, trainer, pl_module):
            pl_module.log("flat", 1.0)

    stop = ns.callbacks.EarlyStopping(monitor="flat", patience=10, check_on_train_epoch_end=True)

    class Watch(BothCallback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                seen[trainer.current_epoch] = int(stop.wait_count)

    cb = lobs(sparsity=0.5, prune_epoch=2, reset_monitors=False)
    make_trainer(ns, 3, [cb, Flat(), stop, Watch()]).fit(model)
    assert cb.pruned_epochs == [2]
    assert seen[2] == 1
    assert torch.is_tensor(stop.best_score) and float(stop.best_score) == 1.0


@pytest.mark.parametrize("mode", ["min", "max"])
def test_reset_monitors_empties_the_checkpoint_ranking_at_the_prune(ns, mode, tmp_path):
    """Read at the prune epoch's first batch: the ranking is as a new ModelCheckpoint's, so the next save is best."""
    model = lit_mlp(ns, n=128)
    seen: dict[int, tuple] = {}

    class Flat(BothCallback):
        def on_train_epoch_end(self, trainer, pl_module):
            pl_module.log("flat", 1.0)

    ckpt = ns.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path), monitor="flat", mode=mode, save_top_k=1, save_on_train_epoch_end=True
    )
    fresh = ns.callbacks.ModelCheckpoint(dirpath=str(tmp_path), monitor="flat", mode=mode, save_top_k=1)

    class Watch(BothCallback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                seen[trainer.current_epoch] = (
                    dict(ckpt.best_k_models),
                    ckpt.kth_best_model_path,
                    ckpt.best_model_path,
                    ckpt.best_model_score,
                    float(ckpt.kth_value),
                )

    cb = lobs(sparsity=0.5, prune_epoch=2)
    make_trainer(ns, 3, [cb, Flat(), Watch(), ckpt], tmp_path, enable_checkpointing=True).fit(model)
    assert cb.pruned_epochs == [2]
    assert seen[1][0] and seen[1][2]  # the dense epoch 0 was ranked
    assert seen[2] == (
        {},
        fresh.kth_best_model_path,
        fresh.best_model_path,
        fresh.best_model_score,
        float(fresh.kth_value),
    )
    assert ckpt.best_model_path.endswith("epoch=2-step=6.ckpt"), ckpt.best_model_path  # the first pruned save is best
