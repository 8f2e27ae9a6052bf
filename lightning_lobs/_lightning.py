"""Which Lightning is installed: ``lightning`` (``lightning.pytorch``), ``pytorch_lightning``, or both.

Lightning ships the same trainer under two package names. A callback is only accepted by a
``Trainer`` (and by ``LightningCLI``'s ``--trainer.callbacks``) if it is an instance of *that*
namespace's ``Callback`` class, so :class:`~lightning_lobs.LOBSPruning` derives from the
``Callback`` class of every installed namespace (:data:`CALLBACK_BASES`). Everything else the
callback needs from Lightning (progress bars, checkpoint and early-stopping classes) is looked
up in the namespace of the trainer at hand (:func:`namespace_of`), never assumed. The questions the
callback asks a ``Trainer`` (why training stopped, whether its strategy shards the weights, which
step the loggers are at) are answered here, reading it and changing nothing.

This module only imports; it changes no global state.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any


def _find(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or half-installed package counts as absent
        return False


def _load_namespaces() -> tuple[ModuleType, ...]:
    found = []
    for name in ("lightning.pytorch", "pytorch_lightning"):  # the unified package first: most new code uses it
        if _find(name.split(".")[0]):
            found.append(importlib.import_module(name))
    if not found:
        raise ImportError(
            "lightning-lobs needs PyTorch Lightning, in either of its packages: install one with "
            "`pip install lightning` (imported as `lightning.pytorch`) or `pip install pytorch-lightning` "
            '(imported as `pytorch_lightning`); or `pip install "lightning-lobs[lightning]"` / '
            '`pip install "lightning-lobs[pl]"`.'
        )
    return tuple(found)


NAMESPACES: tuple[ModuleType, ...] = _load_namespaces()
"""The installed Lightning namespaces: ``lightning.pytorch`` and/or ``pytorch_lightning``."""

CALLBACK_BASES: tuple[type, ...] = tuple(ns.Callback for ns in NAMESPACES)
"""Every installed namespace's ``Callback`` class (the bases of ``LOBSPruning``)."""

_primary = NAMESPACES[0]
rank_zero_info = _primary.utilities.rank_zero_info
rank_zero_warn = _primary.utilities.rank_zero_warn
rank_zero_only = _primary.utilities.rank_zero_only


def namespace_of(trainer: Any) -> ModuleType:
    """The namespace (``lightning.pytorch`` or ``pytorch_lightning``) whose ``Trainer`` ``trainer`` is."""
    for ns in NAMESPACES:
        if isinstance(trainer, ns.Trainer):
            return ns
    return _primary  # a stand-in object in a unit test: the primary namespace's classes apply


def callback_classes(name: str) -> tuple[Any, ...]:  # Any: isinstance then leaves the Lightning fields typed Any
    """``<ns>.callbacks.<name>`` of every installed namespace (for ``isinstance`` across both)."""
    return tuple(getattr(ns.callbacks, name) for ns in NAMESPACES if hasattr(ns.callbacks, name))


_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")

_WORKS = (
    "Use strategy='ddp' (or 'ddp_spawn'), or ModelParallelStrategy (FSDP2) with the layers sharded by "
    "torch.distributed.fsdp.fully_shard in configure_model(); or prune the gathered model with prune_model()."
)
# Why each sharded strategy is refused: the masks and the per-layer solves need every layer's weight as one tensor of
# its own shape (whole or a DTensor of it), and the optimizer steps of the weights visible to hooks.
_REFUSED = {
    "FSDPStrategy": (
        "FSDP1 flattens each wrapped module's parameters into one FlatParameter and shards that, so no rank holds a "
        "layer's weight as a tensor of its shape (masks and per-layer solves cannot address it)"
    ),
    "XLAFSDPStrategy": "XLA's FSDP flattens and shards the parameters as FSDP1 does, so no rank holds a layer's weight",
    "DeepSpeedStrategy": (
        "DeepSpeed ZeRO partitions the parameters into flat buffers and its engine runs the optimizer step itself, "
        "so the masks could neither be cut like the weights nor held through the steps"
    ),
}


def is_sharded(strategy: Any) -> bool:
    """Whether ``strategy`` splits layer weights across ranks (a subclass of a sharded strategy does too)."""
    return any(cls.__name__ in _SHARDED for cls in type(strategy).__mro__)


def sharded_refusal(strategy: Any) -> str | None:
    """Why ``LOBSPruning`` cannot run under ``strategy`` (and what works instead), or ``None`` when it can.

    ``ModelParallelStrategy`` runs when it only shards over data-parallel ranks (``fully_shard``, FSDP2: every
    weight a ``DTensor`` of its shape); tensor parallelism splits a layer's inputs too, which per-layer Hessians need
    whole.
    """
    names = [cls.__name__ for cls in type(strategy).__mro__]
    name = type(strategy).__name__
    for base, why in _REFUSED.items():
        if base in names:
            return f"LOBSPruning does not support {name}: {why}. {_WORKS}"
    if "ModelParallelStrategy" in names:
        try:
            mesh = strategy.device_mesh
        except (AttributeError, RuntimeError):  # before the processes start there is no mesh (setup has one)
            mesh = None
        dims = tuple(getattr(mesh, "mesh_dim_names", None) or ())
        tp = mesh["tensor_parallel"].size() if "tensor_parallel" in dims else 1
        if tp > 1:
            return (
                f"LOBSPruning supports {name} with tensor_parallel_size=1 only (got {tp}): tensor parallelism splits "
                "a layer's input features over ranks, and its Hessian needs them whole. Use "
                "ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1) with fully_shard "
                "in configure_model(), or strategy='ddp'."
            )
    return None


def stop_reason(trainer: Any) -> str:
    """Why ``fit`` ended, as a message says it: EarlyStopping, ``max_steps``, ``max_time`` or "stopped early"."""
    for es in trainer.callbacks:
        if isinstance(es, callback_classes("EarlyStopping")) and getattr(es, "stopped_epoch", None):
            return f"EarlyStopping on {es.monitor!r} stopped it"
    max_steps = getattr(trainer, "max_steps", -1)
    if max_steps is not None and 0 <= max_steps <= trainer.global_step:
        return f"max_steps={max_steps} reached"
    for timer in trainer.callbacks:
        if (
            isinstance(timer, callback_classes("Timer"))
            and timer.time_remaining() is not None
            and timer.time_remaining() <= 0
        ):
            return "max_time reached"
    return "stopped early"


def logged_step(trainer: Any) -> int:
    """The x-axis Lightning logs training metrics on: batches that stepped.

    That is ``global_step`` with one optimizer; ``global_step`` counts each optimizer's steps (twice
    per batch for a GAN).
    """
    return getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_batches_that_stepped", trainer.global_step)
