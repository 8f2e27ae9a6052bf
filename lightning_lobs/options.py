"""The pruning options, defined once and shared by :func:`prune`, :func:`prune_model` and ``LOBSPruning``.

:class:`PruneOptions` is the single list of what a prune step can be told (which layers, how
sparse, which solver, how to calibrate) and the single place where those values are checked.
:class:`PruneProgress` is what a long prune reports while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Tuple, Union, get_args

import torch
from torch import nn

from .allocation import GlobalAllocation, resolve_allocation
from .checks import as_real, count_or_none, describe, set_positive_ints
from .solvers import METHODS, NMPattern, SolverOptions, as_float_dtype, parse_pattern

SparsitySpec = Union[float, Mapping[str, float], Callable[[str, nn.Module], Optional[float]]]
ForwardFn = Callable[[nn.Module, Any], Any]
Method = Literal["auto", "exact", "lobs", "fast"]
AllocationName = Literal["global", "uniform"]
ProgressPhase = Literal["calibrate", "allocate", "solve", "measure"]

ALL_METHODS: Tuple[str, ...] = get_args(Method)
assert set(ALL_METHODS) == {"auto", *METHODS}  # one list of methods, checked at import


def as_fraction(value: Any, what: str) -> float:
    """``value`` as a float in [0, 1): Python, numpy and 0-d torch scalars accepted; anything else is refused."""
    number = as_real(value)
    if number is None:
        raise ValueError(f"{what} must be a number in [0, 1) (the fraction of weights to remove), got {describe(value)}.")
    out = float(number)
    if not (0.0 <= out < 1.0):  # also refuses NaN
        raise ValueError(
            f"{what} must be in [0, 1) (the fraction of weights to remove), got {out!r}; e.g. 0.9 removes 90%."
        )
    return out


def normalize_sparsity(sparsity: Any, what: str = "sparsity") -> SparsitySpec:
    """Check a sparsity spec's form without a model; numbers come back as Python floats."""
    if isinstance(sparsity, Mapping):
        if not sparsity:
            raise ValueError(f"{what} mapping is empty; give at least one 'pattern': fraction entry.")
        out = {}
        for key, value in sparsity.items():
            if not isinstance(key, str):
                raise ValueError(f"{what} mapping keys must be module-name patterns (str), got {key!r}.")
            out[key] = as_fraction(value, f"{what}[{key!r}]")
        return out
    if callable(sparsity) and not isinstance(sparsity, torch.Tensor):
        return sparsity
    return as_fraction(sparsity, what)


def _as_options(value: Any, cls: type, what: str) -> Any:
    """``None`` -> defaults, an instance as is, a mapping -> ``cls(**mapping)``; anything else is refused."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{what} has unknown keys {unknown}; {cls.__name__} takes {sorted(known)}.")
        return cls(**value)
    raise TypeError(f"{what} must be a {cls.__name__} (or a mapping of its fields), got {type(value).__name__}: {value!r}.")


@dataclass(frozen=True)
class CalibrationOptions:
    """How layer-input Hessians are gathered.

    Attributes:
        hessian_dtype: accumulation precision of H (float64 keeps long sums exact); the strings
            ``"torch.float64"``/``"float32"`` (YAML) are read as the dtypes.
        max_chunk_elements: bound on conv patches unfolded at once (bounded extra memory).
        position_stride: keep every k-th conv output position (for very large maps).
        memory_budget_bytes: refuse to start (naming the layer and the remedy) when the
            Hessians plus the largest solve would need more; None = 80% of what is free.
    """

    hessian_dtype: torch.dtype = torch.float64
    max_chunk_elements: int = 1 << 24
    position_stride: int = 1
    memory_budget_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "hessian_dtype", as_float_dtype(self.hessian_dtype, "CalibrationOptions.hessian_dtype"))
        set_positive_ints(self, ("max_chunk_elements", "position_stride"))
        if self.memory_budget_bytes is not None:
            budget = count_or_none(self.memory_budget_bytes)
            if budget is None:
                raise ValueError(
                    "CalibrationOptions.memory_budget_bytes must be a positive int (bytes) or None (80% of free "
                    f"memory), got {describe(self.memory_budget_bytes)}."
                )
            object.__setattr__(self, "memory_budget_bytes", budget)


@dataclass(frozen=True)
class PruneOptions:
    """Everything one prune step can be told; validated on construction.

    Attributes:
        sparsity: a fraction in [0, 1) of all selected weights to remove (spread over the layers
            as ``allocation`` says); or ``{"fnmatch pattern": fraction}`` over qualified module
            names (an exactly named layer beats every wildcard, among wildcards the first match
            wins, a pattern that sets no layer is named in a warning; unmatched layers stay
            dense); or a callable ``(name, module) -> fraction | None``. 0 is refused.
        method: ``"auto"`` (``exact`` where it costs seconds, else ``fast``), ``"exact"`` (OBC),
            ``"lobs"`` (the paper's one-pass rule) or ``"fast"`` (SparseGPT).
        pattern: ``"N:M"`` semi-structured sparsity (keep N of every M inputs), e.g. ``"2:4"``.
        allocation: with a float ``sparsity``: ``"global"`` (per-layer sparsities from the layers'
            relative error costs), ``"uniform"`` (every layer at ``sparsity``), or a
            :class:`GlobalAllocation` with its own settings.
        exclude: fnmatch patterns of layers to keep dense.
        sequential: calibrate each layer on inputs through the already pruned layers before it.
        solver: :class:`SolverOptions` (damping, precision, block sizes, refit).
        calibration: :class:`CalibrationOptions` (Hessian precision, conv chunking, memory budget).
        forward_fn: ``(model, batch) -> output``; by default a tensor batch is fed as is, a
            tuple/list by its first item, a mapping as ``model(**batch)`` limited to the keys the
            forward names (see :func:`~lightning_lobs.pruner.default_forward`).
        recalibrate_bn: re-estimate BatchNorm running statistics on the calibration batches after
            pruning.
        prune_head: also prune the output heads (``lm_head``, the final classifier: the layer whose
            output is the model's output, or transformers' ``get_output_embeddings()``). By default
            they are left dense and listed in the report's ``skipped``; a sparsity mapping that
            names a head exactly prunes it either way.
    """

    sparsity: SparsitySpec = 0.9
    method: Method = "auto"
    pattern: Optional[str] = None
    allocation: Union[AllocationName, GlobalAllocation] = "global"
    exclude: Tuple[str, ...] = ()
    sequential: bool = False
    solver: SolverOptions = field(default_factory=SolverOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    forward_fn: Optional[ForwardFn] = None
    recalibrate_bn: bool = True
    prune_head: bool = False

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen dataclass
        set_("sparsity", normalize_sparsity(self.sparsity))
        if self.method not in ALL_METHODS:
            raise ValueError(f"method must be one of {ALL_METHODS}, got {self.method!r}.")
        nm = parse_pattern(self.pattern)
        set_("pattern", None if nm is None else str(nm))
        resolve_allocation(self.allocation)  # raises with the choices
        exclude = self.exclude
        if isinstance(exclude, str):
            exclude = (exclude,)
        if not isinstance(exclude, Sequence) or not all(isinstance(p, str) for p in exclude):
            raise ValueError(f"exclude must be a list of fnmatch patterns (str), got {self.exclude!r}.")
        set_("exclude", tuple(exclude))
        for name in ("sequential", "recalibrate_bn", "prune_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        set_("solver", _as_options(self.solver, SolverOptions, "solver"))
        set_("calibration", _as_options(self.calibration, CalibrationOptions, "calibration"))
        if self.forward_fn is not None and not callable(self.forward_fn):
            raise TypeError(f"forward_fn must be a callable (model, batch) -> output, got {self.forward_fn!r}.")

    @property
    def nm(self) -> Optional[NMPattern]:
        """The N:M pattern, parsed."""
        return parse_pattern(self.pattern)

    @property
    def global_allocation(self) -> Optional[GlobalAllocation]:
        """The global allocation's settings when it applies (one float sparsity, no N:M pattern), else None."""
        if self.nm is not None or not isinstance(self.sparsity, float):
            return None
        return resolve_allocation(self.allocation)

    @property
    def allocation_name(self) -> str:
        """How per-layer sparsities are set: ``"global"``, ``"uniform"`` or ``"per-layer"`` (mapping/callable)."""
        if self.global_allocation is not None:
            return "global"
        if isinstance(self.sparsity, float) or self.nm is not None:
            return "uniform"
        return "per-layer"

    def with_sparsity(self, sparsity: SparsitySpec) -> "PruneOptions":
        """A copy with another sparsity (one step of iterative pruning)."""
        return replace(self, sparsity=sparsity)

    @classmethod
    def from_kwargs(cls, what: str, **kwargs: Any) -> "PruneOptions":
        """``PruneOptions(**kwargs)`` with an error naming ``what`` and the valid names for unknown keywords."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"{what} got unexpected keyword arguments {unknown}; the options are {sorted(known)}.")
        return cls(**kwargs)


@dataclass(frozen=True)
class PruneProgress:
    """One step of a running prune, for progress bars and log lines.

    ``phase`` is what is running, ``done``/``total`` count layers (or batches while
    calibrating), ``layer`` is the layer just finished, or the one still running when the
    step reports progress inside a layer (empty while calibrating), ``elapsed`` the seconds
    since the prune started and ``eta`` the estimated seconds left in this phase (None until
    it can be estimated): the phase's work left (estimated floating-point operations per
    layer) at the rate measured so far in the phase. ``fraction`` is the share of the
    phase's estimated work done (None where the step does not say).
    """

    phase: ProgressPhase
    done: int
    total: int
    layer: str
    elapsed: float
    eta: Optional[float]
    fraction: Optional[float] = None

    def describe(self) -> str:
        """``"L-OBS solve 3/12 fc2 | 4.1 s, ~9 s left"``; inside a layer ``"L-OBS allocate 0/2 fc1 37% | ..."``."""
        left = "" if self.eta is None else f", ~{self.eta:.0f} s left"
        what = f" {self.layer}" if self.layer else ""
        share = f" {100 * self.fraction:.0f}%" if self.fraction is not None and self.done < self.total else ""
        return f"L-OBS {self.phase} {self.done}/{self.total}{what}{share} | {self.elapsed:.1f} s{left}"


ProgressFn = Callable[[PruneProgress], None]
