"""Weight masks for pruned layers and their enforcement during (re)training.

A mask is a boolean tensor with the shape of a module's ``weight``: ``True`` marks a
kept weight, ``False`` a pruned one. Masks are deliberately *not* torch
parametrizations: the model stays a plain module whose ``state_dict`` loads into the
original architecture (no ``weight_orig``, no ``parametrizations.*`` keys). Instead a
:class:`MaskSet` holds the masks outside the model and enforces them with hooks:

1. a gradient hook on every masked weight zeroes the pruned entries of each incoming
   gradient, so gradient clipping and optimizer statistics only see kept weights (a weight
   frozen at attach time, e.g. a backbone unfrozen later by ``BackboneFinetuning``, gets its
   hook at its module's first forward after ``requires_grad`` turns on);
2. a step post-hook on every optimizer re-applies the masks right after each step,
   which catches momentum / Adam state carried over from before pruning and
   decoupled weight decay;
3. at attach time the optimizer state at pruned positions and any existing ``.grad``
   at pruned positions are zeroed and the masks are applied to the weights.

Sharded weights (``torch.distributed.fsdp.fully_shard``, FSDP2: parameters are ``DTensor`` objects) get
masks sharded like them: a full mask given for a sharded weight is cut into the same
``DTensor`` layout (same mesh and placements) when first enforced, each rank keeping only its
slice, so every rank must hold the same full mask (as the engine and a checkpoint give them).
FSDP2 writes a sharded weight's gradient after the backward's reduce-scatter, never through
autograd, so the gradient hook of a sharded weight is a post-accumulate-grad hook (FSDP2 calls
those) that zeroes the pruned entries of ``.grad`` in place. Everything that reads a sharded mask
as a whole (:meth:`MaskSet.state_dict`, :meth:`MaskSet.sparsity`, :func:`model_sparsity`) gathers
it across the ranks: a collective, so it runs on every rank, in the same order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .attention import mask_weight_names
from .layers import is_maskable
from .sharding import count, gather, is_sharded, local, shard_like

__all__ = ["MaskSet", "model_sparsity", "resolve_weight"]

log = logging.getLogger(__name__)


def _weight_path(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding a mask's weight and its attribute: ``<name>.weight``, or the Parameter ``<name>`` itself
    (an attention's ``in_proj_weight``, which no module of its own holds)."""
    try:
        return model.get_submodule(name), "weight"
    except AttributeError:
        owner, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            module = None
        if module is not None and isinstance(module._parameters.get(attr), nn.Parameter):
            return module, attr
        raise


def resolve_weight(model: nn.Module, name: str) -> Tensor:
    """Return ``model.<name>.weight`` (or the Parameter ``model.<name>``), raising ``KeyError`` if absent."""
    try:
        module, attr = _weight_path(model, name)
    except AttributeError as err:
        raise KeyError(
            f"mask refers to module {name!r}, but the model ({type(model).__name__}) has no such submodule ({err})"
        ) from None
    weight = getattr(module, attr, None)
    if not isinstance(weight, Tensor):
        raise KeyError(f"mask refers to module {name!r} ({type(module).__name__}), which has no 'weight' tensor")
    return weight


def _laid_out_like(mask: Tensor, ref: Tensor) -> Tensor:
    """``mask`` on ``ref``'s device and, when ``ref`` is sharded, sharded like it (same mesh and placements).

    A full mask is cut locally (no communication: every rank holds the same full mask); a mask sharded
    otherwise is redistributed (a collective).
    """
    if not is_sharded(ref):
        return gather(mask).to(ref.device)
    if is_sharded(mask):
        m, r = cast(Any, mask), cast(Any, ref)  # DTensors: torch's stubs type them as plain Tensors
        if m.device_mesh == r.device_mesh and tuple(m.placements) == tuple(r.placements):
            return mask if mask.device == ref.device else mask.to(ref.device)
        if m.device_mesh == r.device_mesh:
            return m.redistribute(r.device_mesh, r.placements)
        mask = m.full_tensor()
    return shard_like(mask, ref)  # each rank keeps a copy of its slice, not a view holding the whole mask


def _check_shape(name: str, mask: Tensor, weight: Tensor) -> None:
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(
            f"mask for module {name!r} has shape {tuple(mask.shape)}, but its weight has shape {tuple(weight.shape)}"
        )


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Strip wrappers such as Lightning's ``LightningOptimizer`` (which keep ``_optimizer``)."""
    for _ in range(8):
        inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


class MaskSet:
    """Named weight masks for modules of one model, with enforcement through optimizer steps.

    ``masks`` maps a qualified module name (as in ``model.named_modules()``) to a bool
    tensor with the shape of that module's ``weight``. Masks are moved to the weight's
    device by :meth:`apply` / :meth:`attach`; :meth:`state_dict` returns CPU copies.
    Prefer :meth:`set` / :meth:`update` over editing ``masks`` directly: they re-enforce
    the masks when the set is attached.
    """

    def __init__(self) -> None:
        self.masks: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._unfreeze: dict[str, RemovableHandle] = {}  # forward pre-hooks waiting for a frozen weight to unfreeze
        self._model: nn.Module | None = None
        self._optimizers: list[torch.optim.Optimizer] = []

    # ------------------------------------------------------------------ mapping API
    def set(self, name: str, mask: Tensor) -> None:
        """Store (a copy of) ``mask`` for module ``name``, replacing any existing mask.

        Non-bool masks are converted with ``mask != 0``. If the set is attached, the new
        mask is enforced immediately (weights, gradients and optimizer state).
        """
        self._set_no_reattach(name, mask)
        if self.attached:
            self._reattach()

    def update(self, other: Mapping[str, Tensor] | MaskSet) -> None:
        """Merge masks from ``other``; a mask for an existing name *replaces* the old one.

        Masks are not ANDed: for iterative pruning pass the final (cumulative) mask.
        If the set is attached, the merged masks are enforced immediately.
        """
        items = other.masks if isinstance(other, MaskSet) else other
        for name, mask in items.items():
            self._set_no_reattach(name, mask)
        if self.attached and len(items) > 0:
            self._reattach()

    def get(self, name: str, default: Tensor | None = None) -> Tensor | None:
        """Return the mask for ``name`` or ``default``."""
        return self.masks.get(name, default)

    def __getitem__(self, name: str) -> Tensor:
        return self.masks[name]

    def __contains__(self, name: object) -> bool:
        return name in self.masks

    def __len__(self) -> int:
        return len(self.masks)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.masks))

    def __repr__(self) -> str:
        # Sharded masks are counted by a collective, which a repr on one rank must not start.
        sparsity = "sharded" if self.sharded else f"{self.total_sparsity():.4f}"
        return f"{type(self).__name__}(n_masks={len(self)}, total_sparsity={sparsity}, attached={self.attached})"

    def _set_no_reattach(self, name: str, mask: Tensor) -> None:
        if not isinstance(name, str):
            raise TypeError(f"mask names must be str, got {type(name).__name__}")
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask for {name!r} must be a torch.Tensor, got {type(mask).__name__}")
        mask = mask.detach()
        mask = mask.clone() if mask.dtype == torch.bool else mask != 0
        self.masks[name] = mask

    def _mask_on(self, name: str, ref: Tensor) -> Tensor:
        """Return the mask for ``name`` laid out like ``ref`` (its device; its shards when sharded), keeping that copy."""
        mask = self.masks[name]
        if mask.device != ref.device or is_sharded(mask) or is_sharded(ref):
            mask = _laid_out_like(mask, ref)
            self.masks[name] = mask
        return mask

    # ------------------------------------------------------------------ enforcement
    def apply(self, model: nn.Module) -> None:
        """Zero pruned weights of ``model`` in place (under ``no_grad``).

        Raises ``KeyError`` if a masked module (or its weight) is missing from ``model`` and
        ``ValueError`` on a shape mismatch; all names are checked before anything is changed.
        """
        weights = self._resolve_all(model)
        with torch.no_grad():
            for name, weight in weights.items():
                local(weight).masked_fill_(~local(self._mask_on(name, weight)), 0.0)

    def _resolve_all(self, model: nn.Module) -> dict[str, Tensor]:
        weights: dict[str, Tensor] = {}
        for name, mask in self.masks.items():
            weight = resolve_weight(model, name)
            _check_shape(name, mask, weight)
            weights[name] = weight
        return weights

    def attach(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer] | torch.optim.Optimizer = (),
    ) -> None:
        """Enforce the masks on ``model`` through training with ``optimizers``.

        Registers a gradient hook on each masked weight (zeroes pruned gradient entries
        before they are accumulated into ``.grad``) and a step post-hook on each optimizer
        (re-applies the masks after every step); zeroes optimizer state tensors with the
        weight's shape (momentum, ``exp_avg``, ``exp_avg_sq``, ...) and existing ``.grad``
        at pruned positions; applies the masks to the weights.

        Attaching while attached first detaches, so hooks are never registered twice;
        re-attach after e.g. a checkpoint resume that created new optimizers.

        A sharded weight (``DTensor``) gets its mask cut like it, and a post-accumulate-grad hook instead of a
        gradient hook (see the module docstring); every rank attaches, each enforcing its own shard.
        """
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = [optimizers]
        opts: list[torch.optim.Optimizer] = []
        for opt in optimizers:
            opt = _unwrap_optimizer(opt)
            if all(opt is not o for o in opts):
                opts.append(opt)
        weights = self._resolve_all(model)  # validate before touching anything
        if self.attached:
            self.detach()
        self._handles, self._unfreeze = self._register_hooks(model, weights, opts)
        self._model = model
        self._optimizers = opts

        with torch.no_grad():
            for name, weight in weights.items():
                pruned = ~local(self._mask_on(name, weight))
                local(weight).masked_fill_(pruned, 0.0)
                if weight.grad is not None and weight.grad.layout == torch.strided:
                    local(weight.grad).masked_fill_(~local(_laid_out_like(self.masks[name], weight.grad)), 0.0)
            n_state = self._zero_optimizer_state(weights)
        log.debug(
            "MaskSet attached: %d masks, %d optimizers, %d optimizer state tensors masked",
            len(weights),
            len(opts),
            n_state,
        )

    def _register_hooks(
        self, model: nn.Module, weights: Mapping[str, Tensor], opts: Sequence[torch.optim.Optimizer]
    ) -> tuple[list[RemovableHandle], dict[str, RemovableHandle]]:
        """Gradient hooks (or, for a frozen weight, a hook that adds one once it unfreezes) and step post-hooks.

        All or nothing: on any error the hooks registered so far are removed again.
        """
        handles: list[RemovableHandle] = []
        unfreeze: dict[str, RemovableHandle] = {}
        try:
            for name, weight in weights.items():
                if weight.requires_grad:
                    handles.append(self._grad_hook_on(name, weight))
                else:
                    # Frozen now (e.g. a backbone that BackboneFinetuning unfreezes later): a tensor hook cannot be
                    # registered yet, so a forward pre-hook registers it at the first forward after the unfreeze,
                    # before that forward's backward, and then removes itself.
                    owner, attr = _weight_path(model, name)
                    # A sharded weight is swapped for its gathered copy during FSDP2's forward: hook the shard itself.
                    shard = weight if is_sharded(weight) else None
                    handle = owner.register_forward_pre_hook(self._make_unfreeze_hook(name, attr, shard))
                    unfreeze[name] = handle
                    handles.append(handle)
            for opt in opts:
                handles.append(opt.register_step_post_hook(self._step_post_hook))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles, unfreeze

    def _zero_optimizer_state(self, weights: Mapping[str, Tensor]) -> int:
        """Zero state tensors shaped like a masked weight at pruned positions; return the count."""
        n_zeroed = 0
        for opt in self._optimizers:
            for name, weight in weights.items():
                state = opt.state.get(weight)
                if not state:
                    continue
                for value in state.values():
                    if (
                        isinstance(value, Tensor)
                        and value.layout == torch.strided
                        and tuple(value.shape) == tuple(weight.shape)
                    ):  # AdamW's state of a sharded weight is sharded like it (DTensor): each rank zeroes its part
                        local(value).masked_fill_(~local(_laid_out_like(self.masks[name], value)), 0)
                        n_zeroed += 1
        return n_zeroed

    def _make_grad_hook(self, name: str):  # noqa: ANN202 - closure
        def hook(grad: Tensor) -> Tensor:
            mask = self._mask_on(name, grad)
            return torch.where(mask, grad, 0.0)

        return hook

    def _grad_hook_on(self, name: str, weight: Tensor) -> RemovableHandle:
        """The hook that zeroes the pruned entries of ``weight``'s gradients.

        A sharded weight's gradient never passes through autograd (FSDP2 reduce-scatters the gathered copy's
        gradient and writes ``.grad`` of the shard), so its hook runs after the gradient lands in ``.grad``.
        """
        if not is_sharded(weight):
            return weight.register_hook(self._make_grad_hook(name))

        def zero_pruned_grad(param: Tensor) -> None:
            grad = param.grad
            if grad is not None and grad.layout == torch.strided:
                with torch.no_grad():
                    local(grad).masked_fill_(~local(_laid_out_like(self.masks[name], grad)), 0.0)

        return weight.register_post_accumulate_grad_hook(zero_pruned_grad)

    def _make_unfreeze_hook(self, name: str, attr: str = "weight", shard: Tensor | None = None):  # noqa: ANN202
        def hook(module: nn.Module, args: Any) -> None:
            weight = getattr(module, attr) if shard is None else shard
            if not (isinstance(weight, Tensor) and weight.requires_grad):
                return
            own = self._unfreeze.pop(name, None)
            if own is None:  # pragma: no cover - removed by detach
                return
            self._handles.remove(own)
            own.remove()  # safe inside the hook: Module.__call__ iterates over a copy of its hooks
            self._handles.append(self._grad_hook_on(name, weight))

        return hook

    def _step_post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        model = self._model
        if model is None:  # pragma: no cover - handles are removed on detach
            return
        with torch.no_grad():
            for name in self.masks:
                weight = resolve_weight(model, name)
                local(weight).masked_fill_(~local(self._mask_on(name, weight)), 0.0)

    def _reattach(self) -> None:
        assert self._model is not None
        self.attach(self._model, list(self._optimizers))

    def detach(self) -> None:
        """Remove every hook registered by :meth:`attach`; idempotent. Masks are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._unfreeze = {}
        self._model = None
        self._optimizers = []

    @property
    def attached(self) -> bool:
        """Whether hooks are currently registered on a model."""
        return self._model is not None

    @property
    def num_hooks(self) -> int:
        """Number of hook handles currently registered (grad hooks + optimizer hooks)."""
        return len(self._handles)

    # ------------------------------------------------------------------ (de)serialization
    def state_dict(self) -> dict[str, Tensor]:
        """Return ``{name: bool CPU tensor}`` copies of all masks, whole: sharded masks are gathered (a collective:
        with sharded masks every rank calls it, as Lightning does when it saves a checkpoint)."""
        return {name: gather(mask.detach()).to("cpu", copy=True) for name, mask in self.masks.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Replace all masks with those in ``state`` (re-enforcing them if attached)."""
        new: dict[str, Tensor] = {}
        for name, mask in state.items():
            if not isinstance(name, str) or not isinstance(mask, Tensor):
                raise TypeError(f"invalid mask state entry {name!r}: expected str -> Tensor")
            new[name] = mask.detach().clone() if mask.dtype == torch.bool else mask.detach() != 0
        self.masks = new
        if self.attached:
            self._reattach()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save the masks (``state_dict``) with ``torch.save``."""
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MaskSet:
        """Load masks written by :meth:`save` (``weights_only=True``, onto CPU)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise TypeError(f"{os.fspath(path)!r} does not contain a mask state dict")
        masks = cls()
        masks.load_state_dict(state)
        return masks

    def __getstate__(self) -> dict[str, Any]:
        # Pickled / deep-copied mask sets are detached copies of the whole masks: hooks (and shards) do not travel.
        return {"masks": self.state_dict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
        self.masks = dict(state["masks"])

    # ------------------------------------------------------------------ statistics
    def sparsity(self) -> dict[str, float]:
        """Return ``{name: fraction of pruned (False) entries}`` (over every shard: with sharded masks, every rank
        calls it)."""
        return {name: (1.0 - count(mask) / mask.numel()) if mask.numel() else 0.0 for name, mask in self.masks.items()}

    def total_sparsity(self) -> float:
        """Fraction of pruned entries over all masked elements (0.0 when empty; a collective with sharded masks)."""
        total = sum(mask.numel() for mask in self.masks.values())
        if total == 0:
            return 0.0
        kept = sum(count(mask) for mask in self.masks.values())
        return 1.0 - kept / total

    @property
    def sharded(self) -> bool:
        """Whether any mask is held as shards (laid out like a ``fully_shard`` weight)."""
        return any(is_sharded(mask) for mask in self.masks.values())

    @classmethod
    def from_model(cls, model: nn.Module, names: Iterable[str] | None = None) -> MaskSet:
        """Build masks ``weight != 0`` for ``names`` (default: every Linear / Conv module and every
        ``nn.MultiheadAttention`` projection Parameter, such as ``attn.in_proj_weight``)."""
        if names is None:
            names = [n for n, m in model.named_modules() if is_maskable(m)] + mask_weight_names(model)
        masks = cls()
        for name in names:
            masks.set(name, resolve_weight(model, name).detach() != 0)
        return masks


def model_sparsity(model: nn.Module, names: Iterable[str]) -> dict[str, float]:
    """Return the fraction of exact zeros in each named module's weight (every shard's: a collective when sharded)."""
    result: dict[str, float] = {}
    for name in names:
        weight = resolve_weight(model, name).detach()
        result[name] = count(weight == 0) / weight.numel() if weight.numel() else 0.0
    return result
