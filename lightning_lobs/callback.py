"""``LOBSPruning``: the Lightning callback (glue between a ``Trainer`` and :mod:`lightning_lobs.engine`).

The class is a ``Callback`` of every installed Lightning namespace (``lightning.pytorch`` and
``pytorch_lightning``, see :mod:`lightning_lobs._lightning`), so one import works with either
``Trainer`` and ``LightningCLI``. What it adds to the engine is the fit lifecycle: batches fed as
the training loop feeds them (device transfer hooks, precision plugin), the prune schedule
checked against what training can reach, monitors reset at a prune, masks held and checkpointed
under a per-instance ``state_key``, metrics at the prune's global step and progress in the
trainer's own progress bar.

The decisions about the schedule (is a prune due, is the rest reachable, what a checkpoint holds)
are a :class:`~lightning_lobs.schedules.ScheduleRun`'s; the option checks are
:mod:`lightning_lobs.config`'s. The hooks here carry them out: prune, log, reset the monitors.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, Union, cast

import torch
from torch import nn

from ._lightning import (
    CALLBACK_BASES,
    callback_classes,
    is_sharded,
    logged_step,
    namespace_of,
    rank_zero_info,
    rank_zero_warn,
    sharded_refusal,
    stop_reason,
)
from .api import is_one_shot, take_batches
from .config import (
    AllocationName,
    CalibrationOptions,
    CallbackOptions,
    ForwardFn,
    GlobalAllocation,
    Method,
    PruneOptions,
    SequentialUnit,
    SolverOptions,
    SparsitySpec,
)
from .distributed import RankInfo
from .engine import PruneReport, default_forward, prune
from .masks import MaskSet, resolve_weight
from .progress import trainer_progress
from .schedules import PruneSchedule, ScheduleRun, schedule_from_args, steps_per_epoch
from .selection import select_layers
from .sharding import count

if TYPE_CHECKING:  # either namespace's classes; only for the annotations
    from lightning.pytorch import LightningModule, Trainer


# The CLI (jsonargparse) reads these annotations: floats, per-layer mappings and lists of both
# round-trip through YAML (a callable inside the list's type made jsonargparse give up serializing
# the whole list, "Unable to serialize instance"); callables are for Python, at the top level.
SparsityValue = Union[float, dict[str, float]]
SparsityFn = Callable[[str, nn.Module], float | None]


_MONITOR_FIELDS = {
    "ModelCheckpoint": ("best_k_models", "kth_best_model_path", "best_model_score", "best_model_path", "kth_value"),
    "EarlyStopping": ("wait_count", "best_score"),
}


def _monitor_state(trainer: Any) -> list[tuple]:
    """The fields :meth:`LOBSPruning._reset_monitors` may change, per monitor, to put back after a failed prune."""
    saved = []
    for cb in getattr(trainer, "callbacks", []):
        for kind, fields in _MONITOR_FIELDS.items():
            if isinstance(cb, callback_classes(kind)):
                values = {}
                for f in fields:
                    value = getattr(cb, f, None)
                    values[f] = dict(value) if isinstance(value, dict) else value  # tensors are replaced, not edited
                saved.append((cb, values))
    return saved


def _restore_monitors(saved: list[tuple]) -> None:
    for cb, values in saved:
        for f, value in values.items():
            setattr(cb, f, value)


def _held_sparsity(pl_module: nn.Module, masks: MaskSet) -> tuple:
    """The fraction of zeros in the masked weights, as the weights hold them, and the model's nonzero parameters.

    Sharded weights count every shard's zeros (a collective; this runs on every rank), never one rank's.
    """
    zeros = total = 0
    for name in masks:
        weight = resolve_weight(pl_module, name)
        zeros += count(weight.detach() == 0)
        total += weight.numel()
    nonzero = sum(count(p.detach() != 0) for p in pl_module.parameters())
    return zeros / max(total, 1), nonzero


def _points_in(points: str, unit: str, doc: str) -> property:
    """A read-only view of the list attribute ``points`` that is empty unless the schedule counts in ``unit``."""
    return property(lambda self: getattr(self, points) if self.unit == unit else [], doc=doc)


class LOBSPruning(*CALLBACK_BASES):  # type: ignore[misc]  # a Callback of lightning.pytorch and/or pytorch_lightning
    """Prune a LightningModule's Linear/Conv layers with Layer-wise OBS during ``fit``.

    At the start of each epoch in ``prune_epoch`` the callback runs ``calibration_batches``
    batches through the model (eval mode, no grad), accumulates every target layer's
    input Hessian, solves each layer with OBS, writes the pruned weights and from then
    on holds the masks: pruned weights stay exactly 0 through every optimizer step.
    The epochs after the last prune are the retraining phase.

    Each prune is all or nothing (:meth:`prune_now`). An instance belongs to the model of its last
    ``fit``: a second ``fit`` of the same model continues (no point is pruned twice); a ``fit`` on
    another model starts over (masks, pruned points and reports of the old one dropped), and a
    ``ckpt_path`` then restores the checkpoint's state.

    Args:
        sparsity: fraction in [0, 1) of the Linear/ConvNd weights to remove (spread over the
            layers as ``allocation`` says), a mapping ``{"fnmatch pattern": fraction}`` over
            qualified module names, or a callable ``(name, module) -> fraction | None``. With a
            list of ``prune_epoch``s, a list of such specs, one per epoch (iterative pruning;
            they must not decrease: a later step naming a layer exactly below an earlier step's
            known target for it is refused here; a layer that a global allocation already took
            past a later target keeps its sparsity, with a warning at that prune). Default (``None``): 0.9,
            unless ``schedule`` is given; any sparsity beside a ``schedule`` is an error.
        prune_epoch: epoch (or strictly increasing list of epochs) at whose start pruning happens
            (default 0 unless ``prune_step`` is given).
        prune_step: instead of epochs, the global step(s) (optimizer steps) before which pruning
            happens, e.g. ``prune_step=[1000, 2000]``; mid-epoch is fine.
        method: ``"auto"`` (``exact`` where ``rows * d^3 <= 3e11``, else ``fast``), ``"exact"`` (OBC: the lowest error on
            small layers), ``"fast"`` (SparseGPT's sweep and a CG refit: big layers), ``"admm"`` (mask reselection: the
            lowest error on wide layers, several times ``fast``'s time; never picked by ``auto``) or ``"lobs"`` (the
            paper's one ranking); README "Which method".
        pattern: N:M pattern such as ``"2:4"`` instead of unstructured sparsity.
        exclude: fnmatch patterns of layers to keep dense.
        calibration_batches: batches used to build the Hessians.
        calibration_dataloader: where those batches come from (default: the train dataloader); a
            DataLoader or a list, replayed at each prune (a one-shot iterator only with one prune).
        sequential: calibrate each layer on inputs through the already pruned layers before it, block by block
            (SparseGPT's pipeline: a transformer's decoder layers, a ResNet's stages).
        sequential_unit: with ``sequential=True``: ``"block"`` (a block's layers calibrated together) or
            ``"layer"`` (inside a block too, each layer on the pruned layers before it).
        blocks: with ``sequential=True``: qualified names of the modules to walk as blocks instead of the ones found.
        solver: :class:`SolverOptions` (or a mapping of its fields).
        calibration: :class:`CalibrationOptions` (or a mapping of its fields).
        forward_fn: ``(model, batch) -> output``; default feeds a tensor batch, ``batch[0]`` or a
            mapping as ``model(**batch)`` (the keys the LightningModule's forward names; see
            :func:`~lightning_lobs.engine.default_forward`). It receives the batch after the
            trainer's device transfer and precision conversion, and runs under the precision
            plugin's autocast.
        recalibrate_bn: re-estimate BatchNorm running statistics on the calibration batches.
        log_table: print a rank-zero summary table after each prune (through the progress bar).
        allocation: for a float ``sparsity``: ``"global"`` (per-layer sparsities from pooled OBS
            costs), ``"uniform"`` (every layer at ``sparsity``) or a :class:`GlobalAllocation`.
        state_key: a name for this instance's checkpoint state and metric names (``lobs/<state_key>/...``).
            Without it the key is derived from the sparsity, prune points and method (see
            :attr:`state_key`), so several instances with different schedules need no name.
        reset_monitors: after each prune, reset the best scores of every ``ModelCheckpoint`` with a
            ``monitor`` and of every ``EarlyStopping``, so the pruned model is not compared with
            dense epochs (``ckpt_path="best"`` then means the best pruned epoch).
        progress_after: seconds a prune must run before it shows progress (phase, layer i/N,
            elapsed, ETA) in the trainer's progress bar, or as log lines without one.
        save_sparse: a path; at the end of ``fit`` (rank zero) the pruned model is saved there
            with :func:`lightning_lobs.export.save_sparse`. The file holds the LightningModule's keys;
            ``load_sparse`` loads it into the LightningModule or into the bare inner model (``self.model``:
            the ``model.`` prefix is found), e.g. the Hugging Face model you ship.
        schedule: instead of ``sparsity`` and ``prune_epoch``/``prune_step``, a
            :class:`~lightning_lobs.schedules.PruneSchedule`: ``GradualSchedule(initial=0.0, final=0.9,
            start=0, end=9, every=3)`` (Zhu & Gupta's cubic ramp) or ``SparsitySchedule(lambda epoch: ...,
            points=range(0, 10, 2))`` (the sparsity as a function of the epoch; ``unit="step"`` for
            global steps). A function of the epoch goes here, never in ``sparsity``, where a callable is
            a per-layer spec. Its values are checked when it is built, its points against
            ``max_epochs``/``max_steps`` at ``setup``, as for lists.
        prune_head: also prune the output heads (the layer whose output is the model's output,
            transformers' ``get_output_embeddings()``); by default they stay dense, listed in the
            report's ``skipped``.
    """

    # LightningCLI builds its options from this signature (names, defaults, annotations): it stays as it is,
    # with more than 8 parameters on purpose; the checks live in schedules, config.CallbackOptions and PruneOptions.
    def __init__(
        self,
        sparsity: float | dict[str, float] | list[SparsityValue] | SparsityFn | None = None,
        prune_epoch: int | list[int] | None = None,
        method: Method = "auto",
        *,
        pattern: str | None = None,
        exclude: Sequence[str] = (),
        calibration_batches: int = 32,
        calibration_dataloader: Any | None = None,
        sequential: bool = False,
        sequential_unit: SequentialUnit = "block",
        blocks: Sequence[str] | None = None,
        solver: SolverOptions | None = None,
        calibration: CalibrationOptions | None = None,
        forward_fn: ForwardFn | None = None,
        recalibrate_bn: bool = True,
        log_table: bool = True,
        allocation: AllocationName | GlobalAllocation = "global",
        state_key: str | None = None,
        reset_monitors: bool = True,
        progress_after: float = 2.0,
        save_sparse: str | None = None,
        prune_step: int | list[int] | None = None,
        schedule: PruneSchedule | None = None,
        prune_head: bool = False,
    ) -> None:
        uniform = allocation == "uniform" and pattern is None  # a float is then every layer's target (N:M sets its own)
        schedule = schedule_from_args(sparsity, prune_epoch, prune_step, schedule, uniform=uniform)
        settings = CallbackOptions(calibration_batches, state_key, log_table, reset_monitors, progress_after)
        # PruneOptions is the one place that validates the pruning options; one instance per prune step.
        base = PruneOptions(
            sparsity=schedule.sparsities[0],
            method=method,
            pattern=pattern,
            allocation=allocation,
            exclude=exclude,
            sequential=sequential,
            sequential_unit=sequential_unit,
            blocks=cast(Any, blocks),  # PruneOptions checks it and makes it a tuple
            solver=solver,
            calibration=calibration,
            forward_fn=forward_fn,
            recalibrate_bn=recalibrate_bn,
            prune_head=prune_head,
        )
        self.options: list[PruneOptions] = [base.with_sparsity(s) for s in schedule.sparsities]
        self.schedule: PruneSchedule = schedule
        self.calibration_batches = settings.calibration_batches
        self.calibration_dataloader = calibration_dataloader
        self.log_table = settings.log_table
        self.reset_monitors = settings.reset_monitors
        self.progress_after = settings.progress_after
        self.save_sparse = save_sparse
        self._state_key = settings.state_key
        self.masks = MaskSet()
        self._run = ScheduleRun(schedule)  # the points pruned at: replaced, never edited, so a failed prune rolls back
        self.reports: list[PruneReport] = []
        self._bound_note_logged = False
        self._log_tag: str | None = None  # set at fit start when other unnamed instances share the Trainer
        self._adopted_key: str | None = None  # the checkpoint key restored from, when not state_key
        self._bar: Any = None  # the progress bar handle of the running prune (prints the table through it)
        self._model_ref: weakref.ref | None = None  # the model this instance's masks and schedule belong to

    # ------------------------------------------------------------------ views of the options and the schedule

    @property
    def method(self) -> str:
        return self.options[0].method

    @property
    def exclude(self) -> tuple:
        return self.options[0].exclude

    @property
    def forward_fn(self) -> ForwardFn | None:
        return self.options[0].forward_fn

    @property
    def unit(self) -> Literal["epoch", "step"]:
        return self.schedule.unit

    @property
    def prune_points(self) -> list[int]:
        """The epochs or global steps to prune at, as :attr:`unit` says."""
        return list(self.schedule.points)

    @property
    def sparsities(self) -> list[SparsitySpec]:
        """The sparsity spec of each prune point."""
        return list(self.schedule.sparsities)

    @property
    def pruned_points(self) -> list[int]:
        """The points already pruned at, in pruning order (restored from a checkpoint too)."""
        return list(self._run.done)

    @pruned_points.setter
    def pruned_points(self, points: Sequence[int]) -> None:
        self._run = ScheduleRun(self.schedule, tuple(points))

    prune_epochs = _points_in("prune_points", "epoch", "The epochs to prune at (empty with ``prune_step``).")
    pruned_epochs = _points_in(
        "pruned_points", "epoch", "The epochs already pruned at (restored from a checkpoint too)."
    )
    prune_steps = _points_in("prune_points", "step", "The global steps to prune before (empty with ``prune_epoch``).")
    pruned_steps = _points_in("pruned_points", "step", "The global steps already pruned before.")

    @property
    def last_report(self) -> PruneReport | None:
        return self.reports[-1] if self.reports else None

    # ------------------------------------------------------------------ the state key

    @property
    def state_key(self) -> str:
        """``"LOBSPruning{'state_key': ...}"`` when ``state_key`` is given, else derived from the schedule.

        Like ``EarlyStopping``'s key (from ``monitor`` and ``mode``), the derived key is
        ``"LOBSPruning{'sparsity': ..., 'prune_epoch': ..., 'method': ...}"`` (plus ``pattern`` and
        ``exclude`` when set), so instances with different schedules share a Trainer without a
        name. Two instances with the same key are refused by ``Trainer(...)`` with a message naming
        ``state_key``. A lone unnamed instance restores the lone unnamed state of a checkpoint saved
        under another key: the old ``"LOBSPruning"``, or a schedule changed on resume (checked then).
        """
        if self._state_key is not None:
            key = self._generate_state_key(state_key=self._state_key)
        else:
            key = self._generate_state_key(**self._identity())
        _refuse_duplicate_key(self, key, sys._getframe(1))
        return key

    def _identity(self) -> dict[str, Any]:
        """What tells this instance's schedule apart: prune points, sparsities, method (pattern, exclude if set)."""
        out = {**self.schedule.key_fields(), "method": self.method}
        if self.options[0].pattern is not None:
            out["pattern"] = self.options[0].pattern
        if self.exclude:
            out["exclude"] = list(self.exclude)
        return out

    @property
    def _legacy_state_key(self) -> Any:
        """Where Lightning looks when :attr:`state_key` is not in a checkpoint: the unnamed state this instance adopted."""
        return type(self) if self._adopted_key is None else self._adopted_key

    @property
    def _prefix(self) -> str:
        """``lobs/`` for a lone instance without ``state_key``; ``lobs/<state_key>/`` with one.

        Several instances without ``state_key`` in one Trainer log under ``lobs/<tag>/``, the tag being
        the first 8 hex digits of the SHA-1 of their derived :attr:`state_key` (stable across runs);
        give ``state_key`` for readable names.
        """
        if self._state_key is not None:
            return f"lobs/{self._state_key}/"
        return "lobs/" if self._log_tag is None else f"lobs/{self._log_tag}/"

    @property
    def _named(self) -> str:
        """`` (<state_key>)`` after "LOBSPruning" in messages, when the instance has a name."""
        return "" if self._state_key is None else f" ({self._state_key})"

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Tell apart in the logs several instances that have no ``state_key`` (see :attr:`_prefix`)."""
        unnamed = [cb for cb in trainer.callbacks if isinstance(cb, LOBSPruning) and cb._state_key is None]
        self._log_tag = hashlib.sha1(self.state_key.encode()).hexdigest()[:8] if len(unnamed) > 1 else None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse what cannot work before any training step: sharded strategies, unreachable epochs, bad layer specs."""
        if stage != "fit":
            return
        self._bind(pl_module)
        _refuse_one_shot_replay(self.calibration_dataloader, self._run)
        refusal = sharded_refusal(trainer.strategy)
        if refusal is not None:
            raise RuntimeError(refusal)
        if self.save_sparse and is_sharded(trainer.strategy):
            raise ValueError(
                f"LOBSPruning(save_sparse=...) under {type(trainer.strategy).__name__}: each rank holds a shard of "
                "the weights, and the sparse file needs them whole. Drop save_sparse, save a full checkpoint "
                "(ModelParallelStrategy(save_distributed_checkpoint=False)) and call lightning_lobs.export.save_sparse "
                "on the model loaded from it."
            )
        self._run.check_reachable(max_epochs=trainer.max_epochs, max_steps=getattr(trainer, "max_steps", -1))
        _refuse_shared_layers(self, trainer, pl_module)

    def _bind(self, pl_module: nn.Module) -> None:
        """Tie this instance's masks, schedule and reports to ``pl_module``; start over on another model.

        A second ``fit`` of the same model object continues (pruned points are not pruned again). Another
        model (a notebook building a new model and reusing the callbacks list) starts from nothing: the old
        masks, pruned points and reports are dropped, and a ``ckpt_path`` restores the saved ones after this.
        """
        bound = None if self._model_ref is None else self._model_ref()
        if bound is pl_module:
            return
        if self._model_ref is not None:  # bound to another model before (or to one since deleted)
            if self._run.done or len(self.masks) or self.reports:
                rank_zero_info(
                    f"LOBSPruning{self._named}: fit on a new model; the masks and prune history of the previous one "
                    f"({self.unit}s {self.pruned_points}) are dropped and this model is pruned from the start of its schedule."
                )
            self.masks.detach()
            self.masks = MaskSet()  # a new set: earlier reports keep theirs
            self._run = ScheduleRun(self.schedule)
            self.reports = []
            self._bound_note_logged = False
        self._model_ref = weakref.ref(pl_module)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model_ref"] = None  # a weak reference cannot be pickled (ddp_spawn, deepcopy of a trainer)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_run" not in state:  # pickled by 0.2.0, which kept the schedule's lists as attributes
            done = tuple(state.get("pruned_points", ()))
            state = {k: v for k, v in state.items() if k not in ("prune_points", "sparsities", "unit", "pruned_points")}
            state["_run"] = ScheduleRun(state["schedule"], done)
        self.__dict__.update(state)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Hold restored masks, and refuse a prune epoch that ``max_steps`` will not reach."""
        if len(self.masks):  # resumed after a prune: hold the restored masks
            self.masks.attach(pl_module, trainer.optimizers)
        per_epoch = steps_per_epoch(
            getattr(trainer, "num_training_batches", float("inf")), trainer.accumulate_grad_batches
        )
        if per_epoch is not None:  # unknown now: on_fit_end warns if a prune point was never reached
            max_steps = getattr(trainer, "max_steps", -1)
            self._run.check_reachable(max_epochs=trainer.max_epochs, max_steps=max_steps, steps_per_epoch=per_epoch)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.unit == "epoch":
            self._prune_due(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """With steps: prune before the first batch of the step (the last point reached, if several)."""
        if self.unit == "step":
            self._prune_due(trainer, pl_module, trainer.global_step)

    def _prune_due(self, trainer: Trainer, pl_module: LightningModule, point: int) -> None:
        """Prune for the last point the schedule has due at ``point`` (this epoch or global step)."""
        due = self._run.due(point)
        if due is None:
            return
        before = self._run
        try:
            self._run = before.with_done(*due.passed)  # passed over (a resume with a changed schedule): subsumed
            self.prune_now(trainer, pl_module, due.index)
        except BaseException:
            self._run = before
            raise

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``lobs/sparsity`` read from the weights after every epoch with masks, so a logger shows they hold."""
        if not len(self.masks) or getattr(trainer, "barebones", False):  # barebones trainers refuse self.log
            return
        sync = trainer.world_size > 1  # equal on every rank; syncing keeps Lightning from warning per metric
        sparsity, nonzero = _held_sparsity(pl_module, self.masks)
        pl_module.log(f"{self._prefix}sparsity", sparsity, on_step=False, on_epoch=True, sync_dist=sync)
        pl_module.log(f"{self._prefix}nonzero_parameters", float(nonzero), on_step=False, on_epoch=True, sync_dist=sync)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Warn when training ended before a prune epoch; write the sparse export if asked.

        ``on_fit_end``, not ``on_train_end``: Lightning skips the whole training loop (and its end hook)
        when ``max_time`` has run out before the first step, and a dense model must not pass silently.
        """
        pending = self._run.pending()
        if pending:
            rank_zero_warn(_unreached_message(self, trainer, pending))
        if self.save_sparse and trainer.is_global_zero:
            export = importlib.import_module("lightning_lobs.export")
            export.save_sparse(pl_module, self.save_sparse, masks=self.masks)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """A checkpoint with L-OBS state under other keys only means a changed ``state_key``: refuse to silently re-prune.

        A lone unnamed instance that finds no state of its own takes over the one unnamed state saved under
        another key (see :func:`_unnamed_state_key`).
        """
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states or type(self) in states:
            return
        adopted = None if self._state_key is not None else _unnamed_state_key(self, trainer, states)
        if adopted is not None:
            self._adopted_key = adopted
            return
        others = sorted(str(k) for k in states if str(k).startswith("LOBSPruning"))
        if others:
            raise ValueError(
                f"the checkpoint holds LOBSPruning state under {others}, but this callback's state_key is "
                f"{self.state_key!r}, so its masks would not be restored. Construct it with the state_key it was saved "
                "with (LOBSPruning(..., state_key=...)); a state key 'LOBSPruning' means state_key=None."
            )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.masks.detach()

    # ------------------------------------------------------------------ overridable steps

    def calibration_batches_for(self, trainer: Trainer) -> list:
        """The batches to calibrate on: from ``calibration_dataloader`` or the train dataloader."""
        loader = self.calibration_dataloader
        if loader is None:
            loader = trainer.train_dataloader
        if loader is None:
            raise RuntimeError("no train dataloader to calibrate on; pass calibration_dataloader=... to LOBSPruning.")
        batches = take_batches(loader, self.calibration_batches)
        if not batches:
            raise RuntimeError("the calibration dataloader yielded no batches.")
        return batches

    def training_forward(self, trainer: Trainer, pl_module: LightningModule) -> ForwardFn:
        """``forward_fn`` wrapped so that each batch arrives as the training loop feeds it.

        Same order as Lightning's training loop: the precision plugin's ``convert_input`` (float
        inputs to the model's dtype under ``"bf16-true"``, ``"64-true"``, ...), the module's
        ``on_before_batch_transfer``, the strategy's ``batch_to_device`` (which calls
        ``transfer_batch_to_device`` and ``on_after_batch_transfer``), then the forward pass under
        the plugin's ``forward_context()`` (autocast for ``"*-mixed"``, the default dtype for ``"*-true"``).
        """
        user_fn = self.forward_fn or default_forward
        precision = trainer.precision_plugin
        strategy = trainer.strategy

        def forward(model: nn.Module, batch: Any) -> Any:
            batch = precision.convert_input(batch)
            before = getattr(pl_module, "_on_before_batch_transfer", None)
            if before is not None:  # Lightning >= 2.5 split it out of batch_to_device
                batch = before(batch, dataloader_idx=0)
            batch = strategy.batch_to_device(batch, dataloader_idx=0)
            with precision.forward_context():
                return user_fn(model, batch)

        return forward

    def prune_now(self, trainer: Trainer, pl_module: LightningModule, index: int) -> PruneReport:
        """Calibrate and prune for entry ``index`` of ``prune_epoch`` (or ``prune_step``), all or nothing.

        On success the masks are held, the point is recorded as pruned, the report is kept
        (:attr:`last_report`) and logged, and the monitors are reset. On an exception anywhere (a
        KeyboardInterrupt too), the weights, BatchNorm state, masks, this instance's schedule state and the
        monitors are all as they were before the call, so a checkpoint written on the exception resumes cleanly.
        """
        batches = self.calibration_batches_for(trainer)
        options = replace(self.options[index], forward_fn=self.training_forward(trainer, pl_module))
        saved = (self._run, list(self.reports), self._bound_note_logged, _monitor_state(trainer))
        was_attached = self.masks.attached

        def record(report: PruneReport) -> None:  # runs inside the engine's transaction, after the masks are written
            self._run = self._run.with_done(self.schedule.points[index])
            self.reports.append(report)
            if self.reset_monitors:
                self._reset_monitors(trainer)
            self.log_report(trainer, pl_module, report)

        progress, self._bar = trainer_progress(trainer, after=self.progress_after)
        try:
            # Attached before the prune, so the engine writes the new masks into an attached set: it then saves (and
            # on a failure puts back) the optimizer state that enforcing them zeroes.
            self.masks.attach(pl_module, trainer.optimizers)
            rank = RankInfo.current() if trainer.world_size > 1 else None
            return prune(pl_module, batches, options, masks=self.masks, rank=rank, progress=progress, on_commit=record)
        except BaseException:
            self._run, self.reports, self._bound_note_logged = saved[0], saved[1], saved[2]
            _restore_monitors(saved[3])
            if not was_attached:
                self.masks.detach()
            raise
        finally:
            self._bar.clear()
            self._bar = None  # it holds the trainer: not kept past the prune

    def _reset_monitors(self, trainer: Trainer) -> None:
        """Forget the dense epochs' scores: the pruned model starts a new comparison.

        ``ModelCheckpoint``: the ranking (``best_k_models``, ``kth_value``, ``best_model_path/score``) is
        emptied, so the next monitored save becomes "best" and ``ckpt_path="best"`` means a pruned epoch;
        the dense checkpoint files stay on disk, no longer ranked (never deleted by top-k).
        ``EarlyStopping``: ``best_score`` and ``wait_count`` restart, so patience counts from the prune.
        """
        for cb in trainer.callbacks:
            if isinstance(cb, callback_classes("ModelCheckpoint")) and cb.monitor is not None:
                cb.best_k_models = {}
                cb.kth_best_model_path = ""
                cb.best_model_score = None
                cb.best_model_path = ""
                cb.kth_value = torch.tensor(math.inf if cb.mode == "min" else -math.inf)
            elif isinstance(cb, callback_classes("EarlyStopping")):
                cb.wait_count = 0
                cb.best_score = torch.tensor(math.inf if cb.monitor_op == torch.lt else -math.inf)

    def log_report(self, trainer: Trainer, pl_module: LightningModule, report: PruneReport) -> None:
        """Log the report's metrics at the prune's global step; print the table through the progress bar."""
        metrics = report.metrics(prefix=self._prefix)  # NaN values (a bound that does not apply) are left out
        metrics[f"{self._prefix}total_parameters"] = float(report.total_parameters)
        if math.isnan(report.bound) and not self._bound_note_logged and trainer.is_global_zero:
            self._bound_note_logged = True
            namespace_of(trainer).utilities.rank_zero_info(
                f"L-OBS error bound not logged: {report.bound_note or 'it does not apply to this model'}"
            )
        if trainer.is_global_zero:
            step = logged_step(trainer)
            for logger in trainer.loggers:
                # straight to the loggers: pl_module.log from an epoch-start hook is only flushed at the epoch's end
                logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if self.log_table:
            text = f"L-OBS pruning{self._named} at epoch {trainer.current_epoch} (step {trainer.global_step}):\n{report.table()}"
            if self._bar is not None:
                self._bar.print(text)
            else:
                namespace_of(trainer).utilities.rank_zero_info(text)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks.state_dict(), **self._run.to_state()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        run = self._run.from_state(state_dict)  # refuses a schedule changed at points already pruned
        self.masks.load_state_dict(state_dict.get("masks", {}))
        self._run = run


# ---------------------------------------------------------------------- checks the hooks make


def _refuse_duplicate_key(cb: LOBSPruning, key: str, caller: Any) -> None:
    """Our own message, instead of Lightning's generic one, when another LOBSPruning in the Trainer has ``key``.

    Why a frame is read: Lightning refuses duplicate keys in ``Trainer.__init__`` (``_validate_callbacks_list``),
    before any hook of ours runs, and the callback is never told which list or trainer it is in; the
    only place that list is visible is that function's frame. Without it the duplicate is still refused,
    by Lightning's own RuntimeError, which does not name ``state_key``. Keys that raised from ``__eq__``
    would break comparing two keys (equal keys are legitimate outside one Trainer), and keys made unique
    per instance would change the checkpoint keys. So the check stays narrow: only that function's frame,
    only its two locals, and should either change it does nothing and Lightning's message stays.
    """
    if caller.f_code.co_name != "_validate_callbacks_list":
        return
    seen, callbacks = caller.f_locals.get("seen_callbacks"), caller.f_locals.get("callbacks")
    if not isinstance(seen, set) or key not in seen or not isinstance(callbacks, list):
        return
    if any(isinstance(other, LOBSPruning) and other is not cb and other.state_key == key for other in callbacks):
        raise ValueError(
            f"two LOBSPruning callbacks in one Trainer have the same state_key {key!r}, so their checkpoint "
            "states would overwrite each other. Give each a distinct name with LOBSPruning(..., state_key='...'); "
            "without one the key comes from the sparsity, the prune points and the method, which are identical "
            "here."
        )


def _unnamed_state_key(cb: LOBSPruning, trainer: Trainer, states: Mapping[Any, Any]) -> str | None:
    """The one unnamed LOBSPruning state of a checkpoint that the unnamed ``cb`` takes over, if there is one.

    The derived key changes with the schedule (and was ``"LOBSPruning"`` before keys were derived), but
    resuming with a changed schedule is checked by :meth:`ScheduleRun.from_state`, so a lone unnamed state
    belongs to the lone unnamed instance that finds no state of its own.
    """
    unnamed = [other for other in trainer.callbacks if isinstance(other, LOBSPruning) and other._state_key is None]
    taken = {other.state_key for other in unnamed}
    free = [
        k
        for k in states
        if isinstance(k, str)
        and k not in taken
        and (k == "LOBSPruning" or (k.startswith("LOBSPruning{") and not k.startswith("LOBSPruning{'state_key'")))
    ]
    mine_missing = [other for other in unnamed if other.state_key not in states]
    return free[0] if len(free) == 1 and mine_missing == [cb] else None


def _unreached_message(cb: LOBSPruning, trainer: Trainer, pending: list[int]) -> str:
    """The warning when ``fit`` ended before the ``pending`` prune points."""
    unit, done = cb.unit, cb.pruned_points
    state = "never pruned (dense)" if not done else f"pruned only at {unit}s {done}"
    return (
        f"LOBSPruning{cb._named}: training ended at epoch {trainer.current_epoch} (global step "
        f"{trainer.global_step}; {stop_reason(trainer)}) before prune {unit}s {pending}, so the model was "
        f"{state}. Lower prune_{unit}, or let training reach it (max_steps, max_time, EarlyStopping patience "
        "or min_epochs)."
    )


def _refuse_one_shot_replay(source: Any, run: ScheduleRun) -> None:
    """A one-shot iterator calibrates one prune only: refuse it when more are pending."""
    pending = run.pending()
    if source is not None and is_one_shot(source) and len(pending) > 1:
        raise ValueError(
            f"calibration_dataloader is a one-shot iterator ({type(source).__name__}), but {len(pending)} "
            f"prunes are scheduled ({run.unit}s {pending}): the first would use up its batches and the "
            "next would find none. Pass a DataLoader or a list of batches, which can be replayed."
        )


def _targets(cb: LOBSPruning, pl_module: nn.Module) -> set:
    """Every layer one of ``cb``'s prune steps selects (its layer specs checked against the model on the way)."""
    names: set = set()
    for options in cb.options:
        names |= set(select_layers(pl_module, options.sparsity, options.exclude, options.nm, warn=False).targets)
    return names


def _refuse_shared_layers(cb: LOBSPruning, trainer: Trainer, pl_module: nn.Module) -> None:
    """Each layer belongs to one LOBSPruning of the Trainer: refuse two that would prune the same one."""
    mine = _targets(cb, pl_module)
    for other in trainer.callbacks:
        if isinstance(other, LOBSPruning) and other is not cb:
            both = sorted(mine & _targets(other, pl_module))
            if both:
                raise ValueError(
                    f"two LOBSPruning callbacks ({cb.state_key!r} and {other.state_key!r}) would both prune "
                    f"{both}: each layer may belong to one instance only (the second would move weights the first "
                    "pruned). Split the layers with per-layer sparsity mappings or exclude=[...]."
                )
