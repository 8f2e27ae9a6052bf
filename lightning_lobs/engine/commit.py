"""Stage 5, commit: the transaction. The model's weights, BatchNorm statistics and masks change together or not at all.

:class:`Transaction` saves what a prune may change (the selected layers' weights and biases, BatchNorm buffers, the
MaskSet's masks and attachment, and, when new masks are enforced, the optimizer state and gradients that zeroes);
an exception anywhere inside it, a KeyboardInterrupt included, puts every saved piece back before it propagates.
(Train/eval modes are restored by :func:`~lightning_lobs.engine.forward.eval_no_grad` around every forward.)

The weights' undo copy is the plan's own copy of each layer's matrix (:attr:`~.records.LayerPlan.dense`, which no
stage writes into), so the prune holds one copy of the dense weights, not two; only a sharded layer (whose plan
holds no data) gets a copy of this rank's shards here.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from types import TracebackType

import torch
from torch import Tensor, nn

from ..batchnorm import batchnorm_state, load_batchnorm_state
from ..layers import set_weight_matrix
from ..masks import MaskSet, resolve_weight
from ..sharding import local
from .context import RunContext
from .records import Solved

__all__ = ["DenseState", "Transaction", "commit", "load_params", "param_state"]

ParamState = dict[str, tuple[Tensor, Tensor | None]]
DenseState = Mapping[str, "Tensor | tuple[Tensor, Tensor | None]"]
"""Per layer: its ``(rows, matrix_cols)`` matrix (the layout of ``layers.weight_matrix``), or a weight and bias."""


def commit(ctx: RunContext, solved: Solved) -> None:
    """Write every layer's weights (only now, so a failed solve leaves no trace) and zero the pruned ones.

    The masks are written by :meth:`Transaction.write_masks` after the report, so a failure while measuring leaves
    the old ones.
    """
    t0 = time.perf_counter()
    if not solved.written:
        for n in solved.order:
            set_weight_matrix(solved.plan.layers[n].module, solved.solutions[n].matrix)
    with torch.no_grad():
        for n in solved.order:
            weight = solved.plan.layers[n].module.weight
            weight.masked_fill_(~solved.solutions[n].mask.to(weight.device), 0.0)
    ctx.timings.solve += time.perf_counter() - t0


class Transaction:
    """A context manager around one prune: on an exception, the masks, weights and BatchNorm state as they were."""

    def __init__(
        self,
        model: nn.Module,
        modules: Mapping[str, nn.Module],
        masks: MaskSet,
        dense: Mapping[str, Tensor] | None = None,
    ) -> None:
        """``dense``: copies of the layers' matrices that nothing writes into until the transaction ends (the
        plan's), kept as the undo copy instead of a second one; a meta tensor (a sharded layer) does not count."""
        self.model = model
        self.modules = dict(modules)
        self.dense = {n: d for n, d in (dense or {}).items() if n in self.modules and d.device.type != "meta"}
        # attention projections: copies of their blocks
        self.params = param_state({n: m for n, m in self.modules.items() if n not in self.dense})
        self.batchnorm = batchnorm_state(model)
        self.mask_state = _MaskSetState(masks)

    def dense_state(self, names: Collection[str]) -> dict[str, Tensor | tuple[Tensor, Tensor | None]]:
        """The weights before the prune of ``names``, for :func:`load_params`."""
        return {n: self.dense[n] if n in self.dense else self.params[n] for n in names}

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if error is not None:  # the exception then propagates
            self.restore()

    def write_masks(self, new: Mapping[str, Tensor]) -> None:
        """Write the new masks (enforcing them when the set is attached), keeping what enforcing zeroes."""
        self.mask_state.save_enforced(new)
        self.mask_state.masks.update(new)  # MaskSet.update: enforces them when attached

    def restore(self) -> None:
        # Masks first: re-attaching the old ones re-applies them, and the weights below are then exact again.
        try:
            self.mask_state.restore()
        finally:
            load_params(self.modules, self.dense_state(self.modules))
            load_batchnorm_state(self.model, self.batchnorm)


class _MaskSetState:
    """A MaskSet as it was (masks, attachment) to put back after a failed prune, and, once :meth:`save_enforced`
    ran, the optimizer state and gradients that enforcing new masks zeroes."""

    def __init__(self, masks: MaskSet) -> None:
        self.masks = masks
        self.saved = dict(masks.masks)  # the tensors themselves: MaskSet replaces entries, never edits them
        self.model = masks._model
        self.optimizers = list(masks._optimizers)
        self.written = False
        self.zeroed: list[tuple[Tensor, Tensor, Tensor]] = []  # (tensor, positions, their values)

    def save_enforced(self, new: Mapping[str, Tensor]) -> None:
        """Before writing ``new`` into an attached set: keep what attaching zeroes (optimizer state shaped like a
        masked weight, and its ``.grad``, at the pruned positions)."""
        self.written = True
        model = self.masks._model
        if model is None:
            return
        for name, mask in new.items():
            weight = resolve_weight(model, name)
            pruned = ~mask.to(weight.device)
            tensors = [weight.grad] if weight.grad is not None and weight.grad.layout == torch.strided else []
            for opt in self.masks._optimizers:
                tensors += [
                    v
                    for v in (opt.state.get(weight) or {}).values()
                    if isinstance(v, Tensor) and v.layout == torch.strided and v.shape == weight.shape
                ]
            for t in tensors:  # sharded ones (fully_shard) shard by shard: the mask is sharded like its weight
                t, where = local(t), local(pruned).to(t.device)
                if where.shape == t.shape:
                    self.zeroed.append((t, where, t[where].clone()))

    def restore(self) -> None:
        if not self.written:
            return  # nothing written: leave the hooks and the optimizer state alone
        m = self.masks
        m.masks = dict(self.saved)
        if self.model is None:
            m.detach()
        else:
            m.attach(self.model, self.optimizers)
        with torch.no_grad():
            for t, where, values in self.zeroed:
                t[where] = values


def param_state(modules: Mapping[str, nn.Module]) -> ParamState:
    """Copies of each module's weight and bias, for :func:`load_params` (of a sharded one, this rank's shard: a
    ``DTensor``'s clone copies its local shard only)."""
    return {
        n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone()) for n, m in modules.items()
    }


def load_params(modules: Mapping[str, nn.Module], state: DenseState) -> None:
    """Copy ``state`` (from :func:`param_state`, or matrices as :func:`~lightning_lobs.layers.weight_matrix` gives)
    back into the modules' weights and biases."""
    with torch.no_grad():
        for n, value in state.items():
            if isinstance(value, Tensor):
                set_weight_matrix(modules[n], value)
                continue
            w, b = value
            modules[n].weight.copy_(w)
            if b is not None:
                modules[n].bias.copy_(b)
