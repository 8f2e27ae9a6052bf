"""``LOBSPruning``: the Lightning callback (glue between a ``Trainer`` and :mod:`lightning_lobs.pruner`).

The class is a ``Callback`` of every installed Lightning namespace (``lightning.pytorch`` and
``pytorch_lightning``, see :mod:`lightning_lobs._lightning`), so one import works with either
``Trainer`` and ``LightningCLI``. What it adds to the engine is the fit lifecycle: batches fed as
the training loop feeds them (device transfer hooks, precision plugin), the prune schedule
checked against what training can reach, monitors reset at a prune, masks held and checkpointed
under a per-instance ``state_key``, metrics at the prune's global step and progress in the
trainer's own progress bar.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import sys
import weakref
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ._lightning import CALLBACK_BASES, callback_classes, namespace_of, rank_zero_info, rank_zero_warn
from .checks import as_int, as_real, describe
from .api import is_one_shot, take_batches
from .distributed import RankInfo
from .masks import MaskSet, _resolve_weight
from .config import (
    GlobalAllocation,
    SolverOptions,
    AllocationName,
    CalibrationOptions,
    ForwardFn,
    Method,
    PruneOptions,
    SparsitySpec,
)
from .progress import trainer_progress
from .schedules import PruneSchedule, check_not_decreasing, describe_spec
from .engine import PruneReport, default_forward, prune
from .selection import select_layers

if TYPE_CHECKING:  # either namespace's classes; only for the annotations
    from lightning.pytorch import LightningModule, Trainer


_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")

# The CLI (jsonargparse) reads these annotations: floats, per-layer mappings and lists of both
# round-trip through YAML (a callable inside the list's type made jsonargparse give up serializing
# the whole list, "Unable to serialize instance"); callables are for Python, at the top level.
SparsityValue = Union[float, Dict[str, float]]
SparsityFn = Callable[[str, nn.Module], Optional[float]]


_MONITOR_FIELDS = {
    "ModelCheckpoint": ("best_k_models", "kth_best_model_path", "best_model_score", "best_model_path", "kth_value"),
    "EarlyStopping": ("wait_count", "best_score"),
}


def _monitor_state(trainer: Any) -> List[tuple]:
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


def _restore_monitors(saved: List[tuple]) -> None:
    for cb, values in saved:
        for f, value in values.items():
            setattr(cb, f, value)


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
            past a later target keeps its sparsity, with a warning at that prune).
        prune_epoch: epoch (or strictly increasing list of epochs) at whose start pruning happens
            (default 0 unless ``prune_step`` is given).
        prune_step: instead of epochs, the global step(s) (optimizer steps) before which pruning
            happens, e.g. ``prune_step=[1000, 2000]``; mid-epoch is fine.
        method: ``"auto"`` (``exact`` where it costs seconds, ``fast`` on very large layers),
            ``"exact"`` (greedy OBS, OBC), ``"lobs"`` (the paper's rule) or ``"fast"`` (SparseGPT).
        pattern: N:M pattern such as ``"2:4"`` instead of unstructured sparsity.
        exclude: fnmatch patterns of layers to keep dense.
        calibration_batches: batches used to build the Hessians.
        calibration_dataloader: where those batches come from (default: the train dataloader); a
            DataLoader or a list, replayed at each prune (a one-shot iterator only with one prune).
        sequential: calibrate layer l on inputs through the already pruned layers before it.
        solver: :class:`SolverOptions` (or a mapping of its fields).
        calibration: :class:`CalibrationOptions` (or a mapping of its fields).
        forward_fn: ``(model, batch) -> output``; default feeds a tensor batch, ``batch[0]`` or a
            mapping as ``model(**batch)`` (the keys the LightningModule's forward names; see
            :func:`~lightning_lobs.pruner.default_forward`). It receives the batch after the
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

    def __init__(
        self,
        sparsity: Union[float, Dict[str, float], List[SparsityValue], SparsityFn] = 0.9,
        prune_epoch: Union[int, List[int], None] = None,
        method: Method = "auto",
        *,
        pattern: Optional[str] = None,
        exclude: Sequence[str] = (),
        calibration_batches: int = 32,
        calibration_dataloader: Optional[Any] = None,
        sequential: bool = False,
        solver: Optional[SolverOptions] = None,
        calibration: Optional[CalibrationOptions] = None,
        forward_fn: Optional[ForwardFn] = None,
        recalibrate_bn: bool = True,
        log_table: bool = True,
        allocation: Union[AllocationName, GlobalAllocation] = "global",
        state_key: Optional[str] = None,
        reset_monitors: bool = True,
        progress_after: float = 2.0,
        save_sparse: Optional[str] = None,
        prune_step: Union[int, List[int], None] = None,
        schedule: Optional[PruneSchedule] = None,
        prune_head: bool = False,
    ) -> None:
        if schedule is not None:
            if not isinstance(schedule, PruneSchedule):
                raise ValueError(
                    f"schedule must be a PruneSchedule, e.g. GradualSchedule(initial=0.0, final=0.9, start=0, end=10) or "
                    f"SparsitySchedule(lambda epoch: ..., points=range(0, 10, 2)), got {describe(schedule)}."
                )
            given = [n for n, v in (("prune_epoch", prune_epoch), ("prune_step", prune_step)) if v is not None]
            if not (isinstance(sparsity, float) and sparsity == 0.9):  # 0.9 is the signature's default
                given.insert(0, "sparsity")
            if given:
                raise ValueError(
                    f"give schedule or {' / '.join(given)}, not both: the schedule sets the prune points and their "
                    f"sparsities (got schedule={schedule!r})."
                )
        else:
            if isinstance(sparsity, PruneSchedule):
                raise ValueError(
                    f"sparsity={sparsity!r} is a schedule: pass it as LOBSPruning(schedule=...); sparsity takes a "
                    "fraction, a {'pattern': fraction} mapping, a per-layer (name, module) -> fraction callable or a list of these."
                )
            if prune_epoch is not None and prune_step is not None:
                raise ValueError(
                    f"give prune_epoch or prune_step, not both (got prune_epoch={prune_epoch!r}, prune_step={prune_step!r})."
                )
            value = prune_step if prune_step is not None else prune_epoch
            schedule = PruneSchedule(0 if value is None else value, sparsity, "step" if prune_step is not None else "epoch")
        specs = list(schedule.sparsities)
        if allocation == "uniform" and pattern is None:  # a float is then every layer's target (N:M sets its own)
            check_not_decreasing(specs, uniform=True, labels=schedule.labels)
        batches = as_int(calibration_batches)
        if batches is None or batches < 1:
            raise ValueError(f"calibration_batches must be an int >= 1, got {describe(calibration_batches)}.")
        calibration_batches = batches
        if state_key is not None and (not isinstance(state_key, str) or not state_key):
            raise ValueError(f"state_key must be a non-empty str (a name for this instance's checkpoint state), got {state_key!r}.")
        for name, flag in (("log_table", log_table), ("reset_monitors", reset_monitors)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}.")
        after = as_real(progress_after)
        if after is None or not after >= 0:
            raise ValueError(f"progress_after must be a number of seconds >= 0, got {describe(progress_after)}.")
        progress_after = float(after)
        # PruneOptions is the one place that validates the pruning options; one instance per prune step.
        base = PruneOptions(
            sparsity=specs[0],
            method=method,
            pattern=pattern,
            allocation=allocation,
            exclude=exclude,
            sequential=sequential,
            solver=solver,
            calibration=calibration,
            forward_fn=forward_fn,
            recalibrate_bn=recalibrate_bn,
            prune_head=prune_head,
        )
        self.options: List[PruneOptions] = [base.with_sparsity(s) for s in specs]
        self.schedule: PruneSchedule = schedule
        self.unit: Literal["epoch", "step"] = schedule.unit
        self.prune_points: List[int] = list(schedule.points)  # epochs or global steps, as ``unit`` says
        self.sparsities: List[SparsitySpec] = specs
        self.calibration_batches = int(calibration_batches)
        self.calibration_dataloader = calibration_dataloader
        self.log_table = bool(log_table)
        self.reset_monitors = bool(reset_monitors)
        self.progress_after = float(progress_after)
        self.save_sparse = save_sparse
        self._state_key = state_key
        self.masks = MaskSet()
        self.pruned_points: List[int] = []
        self.reports: List[PruneReport] = []
        self._bound_note_logged = False
        self._log_tag: Optional[str] = None  # set at fit start when other unnamed instances share the Trainer
        self._adopted_key: Optional[str] = None  # the checkpoint key restored from, when not state_key
        self._bar: Any = None  # the progress bar handle of the running prune (prints the table through it)
        self._model_ref: Optional[weakref.ref] = None  # the model this instance's masks and schedule belong to

    # ------------------------------------------------------------------ convenience views of the options

    @property
    def method(self) -> str:
        return self.options[0].method

    @property
    def exclude(self) -> tuple:
        return self.options[0].exclude

    @property
    def forward_fn(self) -> Optional[ForwardFn]:
        return self.options[0].forward_fn

    @property
    def prune_epochs(self) -> List[int]:
        """The epochs to prune at (empty with ``prune_step``)."""
        return list(self.prune_points) if self.unit == "epoch" else []

    @property
    def pruned_epochs(self) -> List[int]:
        """The epochs already pruned at (restored from a checkpoint too)."""
        return list(self.pruned_points) if self.unit == "epoch" else []

    @property
    def prune_steps(self) -> List[int]:
        """The global steps to prune before (empty with ``prune_epoch``)."""
        return list(self.prune_points) if self.unit == "step" else []

    @property
    def pruned_steps(self) -> List[int]:
        """The global steps already pruned before."""
        return list(self.pruned_points) if self.unit == "step" else []

    def _pending(self) -> List[int]:
        return self.schedule.pending(self.pruned_points)

    def _identity(self) -> Dict[str, Any]:
        """What tells this instance's schedule apart: prune points, sparsities, method (pattern, exclude if set)."""
        points: Any = self.prune_points if len(self.prune_points) > 1 else self.prune_points[0]
        specs = [describe_spec(s) for s in self.sparsities]
        out: Dict[str, Any] = {
            "sparsity": specs if len(specs) > 1 else specs[0],
            f"prune_{self.unit}": points,
            "method": self.method,
        }
        if self.options[0].pattern is not None:
            out["pattern"] = self.options[0].pattern
        if self.exclude:
            out["exclude"] = list(self.exclude)
        return out

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
        self._refuse_duplicate_key(key, sys._getframe(1))
        return key

    def _refuse_duplicate_key(self, key: str, caller: Any) -> None:
        """Our own message, instead of Lightning's generic one, when another LOBSPruning in the Trainer has ``key``.

        Lightning checks the keys in ``Trainer.__init__``, before any hook of ours runs, so the check
        reads the list it is validating from its frame; should that change, Lightning's message stays.
        """
        if caller.f_code.co_name != "_validate_callbacks_list":
            return
        seen, callbacks = caller.f_locals.get("seen_callbacks"), caller.f_locals.get("callbacks")
        if not isinstance(seen, set) or key not in seen or not isinstance(callbacks, list):
            return
        if any(isinstance(cb, LOBSPruning) and cb is not self and cb.state_key == key for cb in callbacks):
            raise ValueError(
                f"two LOBSPruning callbacks in one Trainer have the same state_key {key!r}, so their checkpoint "
                "states would overwrite each other. Give each a distinct name with LOBSPruning(..., state_key='...'); "
                "without one the key comes from the sparsity, the prune points and the method, which are identical "
                "here."
            )

    @property
    def _legacy_state_key(self) -> Any:  # type: ignore[override]
        """Where Lightning looks when :attr:`state_key` is not in a checkpoint: the unnamed state this instance adopted."""
        return type(self) if self._adopted_key is None else self._adopted_key

    def _adopt_unnamed_state(self, trainer: "Trainer", states: Mapping[Any, Any]) -> bool:
        """Take over the one unnamed LOBSPruning state of a checkpoint whose key is not this schedule's.

        The derived key changes with the schedule (and was ``"LOBSPruning"`` before keys were
        derived), but resuming with a changed schedule is checked by :meth:`load_state_dict`, so a
        lone unnamed state belongs to the lone unnamed instance that finds no state of its own.
        """
        if self._state_key is not None:
            return False
        unnamed = [cb for cb in trainer.callbacks if isinstance(cb, LOBSPruning) and cb._state_key is None]
        taken = {cb.state_key for cb in unnamed}
        free = [
            k for k in states
            if isinstance(k, str) and k not in taken
            and (k == "LOBSPruning" or (k.startswith("LOBSPruning{") and not k.startswith("LOBSPruning{'state_key'")))
        ]
        mine_missing = [cb for cb in unnamed if cb.state_key not in states]
        if len(free) != 1 or mine_missing != [self]:
            return False
        self._adopted_key = free[0]
        return True

    def on_fit_start(self, trainer: "Trainer", pl_module: "LightningModule") -> None:
        """Tell apart in the logs several instances that have no ``state_key`` (see :attr:`_prefix`)."""
        unnamed = [cb for cb in trainer.callbacks if isinstance(cb, LOBSPruning) and cb._state_key is None]
        self._log_tag = hashlib.sha1(self.state_key.encode()).hexdigest()[:8] if len(unnamed) > 1 else None

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: "Trainer", pl_module: "LightningModule", stage: str) -> None:
        """Refuse what cannot work before any training step: sharded strategies, unreachable epochs, bad layer specs."""
        if stage != "fit":
            return
        self._bind(pl_module)
        source = self.calibration_dataloader
        if source is not None and is_one_shot(source) and len(self._pending()) > 1:
            raise ValueError(
                f"calibration_dataloader is a one-shot iterator ({type(source).__name__}), but {len(self._pending())} "
                f"prunes are scheduled ({self.unit}s {self._pending()}): the first would use up its batches and the "
                "next would find none. Pass a DataLoader or a list of batches, which can be replayed."
            )
        strategy = type(trainer.strategy).__name__
        if any(cls.__name__ in _SHARDED for cls in type(trainer.strategy).__mro__):  # subclasses shard too
            raise RuntimeError(
                f"LOBSPruning does not support the sharded strategy {strategy}: layer weights are split across "
                "ranks. Use strategy='ddp' (or 'ddp_spawn'), or prune the gathered model with prune_model()."
            )
        self.schedule.check_reachable(self.pruned_points, max_epochs=trainer.max_epochs, max_steps=getattr(trainer, "max_steps", -1))
        mine = set()
        for options in self.options:  # fail now, not epochs into training
            mine |= set(select_layers(pl_module, options.sparsity, options.exclude, options.nm, warn=False).targets)
        for other in trainer.callbacks:
            if isinstance(other, LOBSPruning) and other is not self:
                theirs = set()
                for options in other.options:
                    theirs |= set(select_layers(pl_module, options.sparsity, options.exclude, options.nm, warn=False).targets)
                both = sorted(mine & theirs)
                if both:
                    raise ValueError(
                        f"two LOBSPruning callbacks ({self.state_key!r} and {other.state_key!r}) would both prune "
                        f"{both}: each layer may belong to one instance only (the second would move weights the first "
                        "pruned). Split the layers with per-layer sparsity mappings or exclude=[...]."
                    )

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
            if self.pruned_points or len(self.masks) or self.reports:
                rank_zero_info(
                    f"LOBSPruning{'' if self._state_key is None else f' ({self._state_key})'}: fit on a new model; "
                    f"the masks and prune history of the previous one ({self.unit}s {self.pruned_points}) are dropped "
                    "and this model is pruned from the start of its schedule."
                )
            self.masks.detach()
            self.masks = MaskSet()  # a new set: earlier reports keep theirs
            self.pruned_points = []
            self.reports = []
            self._bound_note_logged = False
        self._model_ref = weakref.ref(pl_module)

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_model_ref"] = None  # a weak reference cannot be pickled (ddp_spawn, deepcopy of a trainer)
        return state

    def on_train_start(self, trainer: "Trainer", pl_module: "LightningModule") -> None:
        """Hold restored masks, and refuse a prune epoch that ``max_steps`` will not reach."""
        if len(self.masks):  # resumed after a prune: hold the restored masks
            self.masks.attach(pl_module, trainer.optimizers)
        self._check_max_steps(trainer)

    def _check_max_steps(self, trainer: "Trainer") -> None:
        batches = getattr(trainer, "num_training_batches", float("inf"))
        if not math.isfinite(batches) or batches <= 0:
            return  # unknown now: on_fit_end warns if a prune point was never reached
        per_epoch = math.ceil(batches / max(1, trainer.accumulate_grad_batches))  # the last partial window steps too
        self.schedule.check_reachable(
            self.pruned_points, max_epochs=trainer.max_epochs, max_steps=getattr(trainer, "max_steps", -1), steps_per_epoch=per_epoch
        )

    def on_train_epoch_start(self, trainer: "Trainer", pl_module: "LightningModule") -> None:
        if self.unit == "epoch":
            self._prune_due(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(self, trainer: "Trainer", pl_module: "LightningModule", batch: Any, batch_idx: int) -> None:
        """With steps: prune before the first batch of the step (the last point reached, if several)."""
        if self.unit == "step":
            self._prune_due(trainer, pl_module, trainer.global_step)

    def _prune_due(self, trainer: "Trainer", pl_module: "LightningModule", point: int) -> None:
        """Prune for the last point the schedule has due at ``point`` (this epoch or global step)."""
        due = self.schedule.due(point, self.pruned_points)
        if due:
            before = list(self.pruned_points)
            try:
                for p in due[:-1]:  # passed over (e.g. a resume with a changed schedule): the latest step subsumes them
                    self.pruned_points.append(p)
                self.prune_now(trainer, pl_module, self.prune_points.index(due[-1]))
            except BaseException:
                self.pruned_points = before
                raise

    def on_train_epoch_end(self, trainer: "Trainer", pl_module: "LightningModule") -> None:
        """``lobs/sparsity`` read from the weights after every epoch with masks, so a logger shows they hold."""
        if not len(self.masks) or getattr(trainer, "barebones", False):  # barebones trainers refuse self.log
            return
        zeros = total = 0
        for name in self.masks:
            weight = _resolve_weight(pl_module, name)
            zeros += int((weight.detach() == 0).sum())
            total += weight.numel()
        params = list(pl_module.parameters())
        nonzero = sum(int(torch.count_nonzero(p.detach())) for p in params)
        sync = trainer.world_size > 1  # equal on every rank; syncing keeps Lightning from warning per metric
        pl_module.log(f"{self._prefix}sparsity", zeros / max(total, 1), on_step=False, on_epoch=True, sync_dist=sync)
        pl_module.log(f"{self._prefix}nonzero_parameters", float(nonzero), on_step=False, on_epoch=True, sync_dist=sync)

    def on_fit_end(self, trainer: "Trainer", pl_module: "LightningModule") -> None:
        """Warn when training ended before a prune epoch; write the sparse export if asked.

        ``on_fit_end``, not ``on_train_end``: Lightning skips the whole training loop (and its end hook)
        when ``max_time`` has run out before the first step, and a dense model must not pass silently.
        """
        pending = self._pending()
        if pending:
            unit = self.unit
            state = "never pruned (dense)" if not self.pruned_points else f"pruned only at {unit}s {self.pruned_points}"
            rank_zero_warn(
                f"LOBSPruning{'' if self._state_key is None else f' ({self._state_key})'}: training ended at epoch "
                f"{trainer.current_epoch} (global step {trainer.global_step}; {self._stop_reason(trainer)}) before prune "
                f"{unit}s {pending}, so the model was {state}. Lower prune_{unit}, or let training reach it (max_steps, "
                "max_time, EarlyStopping patience or min_epochs)."
            )
        if self.save_sparse and trainer.is_global_zero:
            export = importlib.import_module("lightning_lobs.export")
            export.save_sparse(pl_module, self.save_sparse, masks=self.masks)

    @staticmethod
    def _stop_reason(trainer: "Trainer") -> str:
        for es in trainer.callbacks:
            if isinstance(es, callback_classes("EarlyStopping")) and getattr(es, "stopped_epoch", 0):
                return f"EarlyStopping on {es.monitor!r} stopped it"
        max_steps = getattr(trainer, "max_steps", -1)
        if max_steps is not None and 0 <= max_steps <= trainer.global_step:
            return f"max_steps={max_steps} reached"
        for timer in trainer.callbacks:
            if isinstance(timer, callback_classes("Timer")) and timer.time_remaining() is not None and timer.time_remaining() <= 0:
                return "max_time reached"
        return "stopped early"

    def on_load_checkpoint(self, trainer: "Trainer", pl_module: "LightningModule", checkpoint: Dict[str, Any]) -> None:
        """A checkpoint with L-OBS state under other keys only means a changed ``state_key``: refuse to silently re-prune."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states or type(self) in states:
            return
        if self._adopt_unnamed_state(trainer, states):
            return
        others = sorted(str(k) for k in states if str(k).startswith("LOBSPruning"))
        if others:
            raise ValueError(
                f"the checkpoint holds LOBSPruning state under {others}, but this callback's state_key is "
                f"{self.state_key!r}, so its masks would not be restored. Construct it with the state_key it was saved "
                "with (LOBSPruning(..., state_key=...)); a state key 'LOBSPruning' means state_key=None."
            )

    def teardown(self, trainer: "Trainer", pl_module: "LightningModule", stage: str) -> None:
        self.masks.detach()

    # ------------------------------------------------------------------ overridable steps

    def calibration_batches_for(self, trainer: "Trainer") -> list:
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

    def training_forward(self, trainer: "Trainer", pl_module: "LightningModule") -> ForwardFn:
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

    def prune_now(self, trainer: "Trainer", pl_module: "LightningModule", index: int) -> PruneReport:
        """Calibrate and prune for entry ``index`` of ``prune_epoch`` (or ``prune_step``), all or nothing.

        On success the masks are held, the point is recorded as pruned, the report is kept
        (:attr:`last_report`) and logged, and the monitors are reset. On an exception anywhere (a
        KeyboardInterrupt too), the weights, BatchNorm state, masks, this instance's schedule state and the
        monitors are all as they were before the call, so a checkpoint written on the exception resumes cleanly.
        """
        batches = self.calibration_batches_for(trainer)
        options = replace(self.options[index], forward_fn=self.training_forward(trainer, pl_module))
        saved = (list(self.pruned_points), list(self.reports), self._bound_note_logged, _monitor_state(trainer))
        was_attached = self.masks.attached

        def record(report: PruneReport) -> None:  # runs inside the engine's transaction, after the masks are written
            self.pruned_points.append(self.prune_points[index])
            self.reports.append(report)
            if self.reset_monitors:
                self._reset_monitors(trainer)
            self.log_report(trainer, pl_module, report)

        progress, self._bar = trainer_progress(trainer, after=self.progress_after)
        try:
            # Attached before the prune, so the engine writes the new masks into an attached set: it then saves (and
            # on a failure puts back) the optimizer state that enforcing them zeroes.
            self.masks.attach(pl_module, trainer.optimizers)
            return prune(
                pl_module,
                batches,
                options,
                masks=self.masks,
                rank=RankInfo.current() if trainer.world_size > 1 else None,
                progress=progress,
                on_commit=record,
            )
        except BaseException:
            self.pruned_points, self.reports, self._bound_note_logged = saved[0], saved[1], saved[2]
            _restore_monitors(saved[3])
            if not was_attached:
                self.masks.detach()
            raise
        finally:
            self._bar.clear()
            self._bar = None  # it holds the trainer: not kept past the prune

    def _reset_monitors(self, trainer: "Trainer") -> None:
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

    def log_report(self, trainer: "Trainer", pl_module: "LightningModule", report: PruneReport) -> None:
        """Log the report's metrics at the prune's global step; print the table through the progress bar."""
        metrics = report.metrics(prefix=self._prefix)  # NaN values (a bound that does not apply) are left out
        metrics[f"{self._prefix}total_parameters"] = float(report.total_parameters)
        if math.isnan(report.bound) and not self._bound_note_logged and trainer.is_global_zero:
            self._bound_note_logged = True
            namespace_of(trainer).utilities.rank_zero_info(
                f"L-OBS error bound not logged: {report.bound_note or 'it does not apply to this model'}"
            )
        if trainer.is_global_zero:
            # The x-axis Lightning logs training metrics on: batches that stepped, which is global_step with one
            # optimizer (global_step counts each optimizer's steps, e.g. twice per batch for a GAN).
            step = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_batches_that_stepped", trainer.global_step)
            for logger in trainer.loggers:
                # straight to the loggers: pl_module.log from an epoch-start hook is only flushed at the epoch's end
                logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if self.log_table:
            bar = self._bar
            text = f"L-OBS pruning{'' if self._state_key is None else f' ({self._state_key})'} at epoch {trainer.current_epoch} (step {trainer.global_step}):\n{report.table()}"
            if bar is not None:
                bar.print(text)
            else:
                namespace_of(trainer).utilities.rank_zero_info(text)

    @property
    def last_report(self) -> Optional[PruneReport]:
        return self.reports[-1] if self.reports else None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> Dict[str, Any]:
        return {"masks": self.masks.state_dict(), f"pruned_{self.unit}s": list(self.pruned_points), "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        saved = state_dict.get("schedule")
        done = {u: [int(p) for p in state_dict.get(f"pruned_{u}s", [])] for u in ("epoch", "step")}
        if saved is not None:
            self.schedule.check_resume(list(saved), done)
        self.masks.load_state_dict(state_dict.get("masks", {}))
        self.pruned_points = done[self.unit]
