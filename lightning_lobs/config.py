"""Every option of a prune, defined and checked once (level 0: imports nothing of the package but ``checks``).

:class:`PruneOptions` is the single list of what a prune step can be told (which layers, how
sparse, which solver, how to calibrate) and the single place where those values are checked;
:class:`SolverOptions`, :class:`CalibrationOptions` and :class:`GlobalAllocation` are its parts,
:class:`NMPattern` an N:M pattern. :class:`PruneProgress` is what a long prune reports while it runs.
Shared by :func:`~lightning_lobs.prune_model`, ``LOBSPruning`` and the engine. :class:`CallbackOptions`
holds what ``LOBSPruning`` adds to a prune step (how many batches, its name, what it logs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Union, get_args

import torch
from torch import nn

from .checks import as_int, as_real, count_or_none, describe, set_positive_ints

#: The solver methods (``auto`` picks among them per layer).
METHODS = ("lobs", "exact", "fast", "admm")


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive input columns of each row."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


_FLOAT_DTYPES = {"float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64}


def as_float_dtype(value: object, what: str) -> torch.dtype:
    """``torch.float32``/``torch.float64``, also spelled as a string (``"torch.float64"``, ``"float64"``: YAML/CLI)."""
    if isinstance(value, str):
        key = value.strip()
        key = key[len("torch.") :] if key.startswith("torch.") else key
        if key in _FLOAT_DTYPES:
            return _FLOAT_DTYPES[key]
        raise ValueError(
            f"{what} must be torch.float32 or torch.float64, got the string {value!r}; write 'torch.float32' or "
            "'torch.float64' (in Python, the dtype object itself)."
        )
    if value in (torch.float32, torch.float64):
        return value
    raise ValueError(f"{what} must be torch.float32 or torch.float64, got {value!r} of type {type(value).__name__}.")


@dataclass(frozen=True)
class SolverOptions:
    """Numerical options shared by the solvers.

    Attributes:
        damp: damping added to H's diagonal, relative to its mean diagonal.
        dtype: precision of the solve (float64 for reference-quality results); the strings
            ``"torch.float32"``/``"float64"`` (YAML) are read as the dtypes.
        block_size: ``fast``: columns per lazy-update block.
        lazy_steps: ``exact``: removals between batched downdates of ``H^-1``.
        max_memory_bytes: ``exact``/direct refit: bound on the per-row matrices held at once (rows are solved
            in chunks; the results do not depend on it beyond float rounding). ``prune_model`` lowers it for
            one prune, with an INFO note, where it alone would exceed ``CalibrationOptions.memory_budget_bytes``.
        max_damp_tries: how many times damping is multiplied by 10 when H is singular.
        refit: ``lobs``/``fast``: after the mask is chosen, move the kept weights to the
            least-squares optimum for it (``exact`` always does). None (default): by one Cholesky
            per row (:func:`~lightning_lobs.solvers.refit`) where that is cheaper (tiny layers), else
            by batched conjugate gradients warm-started from the sweep (``solvers.cg.refit_kept``);
            True: always the per-row Cholesky (exact, but minutes on wide layers); False: none.
        min_kept_per_row: unstructured sparsity: every output row (a conv's output channel)
            keeps at least this many of its weights, so no output is cut off entirely (a
            dead row). Default 1; 0 allows dead rows. A sparsity that cannot leave this many
            in every row is lowered to the largest one that can, with a warning. Weights a
            ``prior_mask`` already pruned stay pruned even where that leaves fewer. N:M
            patterns are unaffected (they keep N of every M).
    """

    damp: float = 0.01
    dtype: torch.dtype = torch.float32
    block_size: int = 128
    lazy_steps: int = 32
    max_memory_bytes: int = 1 << 30
    max_damp_tries: int = 6
    refit: bool | None = None
    min_kept_per_row: int = 1

    def __post_init__(self) -> None:
        damp = as_real(self.damp)
        if damp is None or not (math.isfinite(damp) and damp >= 0):
            raise ValueError(
                f"SolverOptions.damp must be a finite number >= 0 (relative to H's mean diagonal), got "
                f"{describe(self.damp)}; 0.01 is typical."
            )
        object.__setattr__(self, "damp", float(damp))
        object.__setattr__(self, "dtype", as_float_dtype(self.dtype, "SolverOptions.dtype"))
        set_positive_ints(self, ("block_size", "lazy_steps", "max_memory_bytes", "max_damp_tries"))
        kept = count_or_none(self.min_kept_per_row, 0)
        if kept is None:
            raise ValueError(
                f"SolverOptions.min_kept_per_row must be an int >= 0, got {describe(self.min_kept_per_row)}; "
                "1 (default) keeps one weight in every output row, 0 allows dead rows."
            )
        object.__setattr__(self, "min_kept_per_row", kept)
        if self.refit is not None and not isinstance(self.refit, bool):  # 1 == True: compare by type, not value
            raise ValueError(f"SolverOptions.refit must be True, False or None (automatic), got {self.refit!r}.")


def parse_pattern(pattern: str | tuple[int, int] | NMPattern | None) -> NMPattern | None:
    """Parse ``"2:4"`` / ``(2, 4)`` / :class:`NMPattern` / None into an :class:`NMPattern` or None."""
    if pattern is None or isinstance(pattern, NMPattern):
        return pattern
    try:
        if isinstance(pattern, str):
            n_str, m_str = pattern.split(":")
            n, m = int(n_str), int(m_str)
        else:
            n, m = (int(v) for v in pattern)
    except (ValueError, TypeError):
        raise ValueError(f"pattern must look like '2:4' (keep N of every M), got {pattern!r}.") from None
    if not (0 < n < m):
        raise ValueError(f"pattern '{n}:{m}' must keep N of every M with 0 < N < M, e.g. '2:4'.")
    return NMPattern(n, m)


@dataclass(frozen=True)
class GlobalAllocation:
    """Options of ``allocation="global"``: how one overall sparsity is spread over the layers.

    Attributes:
        max_layer_sparsity: no layer is pruned beyond this fraction (in (0, 1]; 1 = no cap).
            Default 0.99: a layer keeps at least 1% of its weights. On LeNet-300-100 at 93%
            the best split (``exact``'s) puts at most ~95-96% on any layer (BENCHMARKS.md), so
            0.99 does not bind where the allocation is sound; it stops the collapse seen with
            one-pass costs (a 1024x2048 layer at sparsity 1.0000 with under 100 weights left).
        allow_dead_rows: False (default): every output row (a conv's output channel) keeps
            ``SolverOptions.min_kept_per_row >= 1`` weights, in the allocation and in the
            solves. True lets the allocation count on rows emptying (set
            ``SolverOptions(min_kept_per_row=0)`` too, or the solves still keep them).
        costs: ``"curve"`` (default): ``lobs``/``fast`` layers get a measured error curve
            (SparseGPT at every grid level on ``curve_rows`` sampled rows); ``"one-pass"``:
            the cheaper one-pass ``L_q``, blind to redundancy. ``exact`` layers always use
            their greedy trace.
        levels: number of grid sparsities for the curves (``grid=None``): ``1 - (1 -
            max_layer_sparsity) ** (i / (levels - 1))``, i.e. spaced evenly in log density,
            finer where the error rises fastest (a max_layer_sparsity of 1 spans down to 0.1% density).
        grid: explicit grid sparsities instead (each in [0, 1), at most ``max_layer_sparsity``).
        curve_rows: rows sampled per layer for its curve (evenly spaced; all when fewer).
    """

    max_layer_sparsity: float = 0.99
    allow_dead_rows: bool = False
    costs: Literal["curve", "one-pass"] = "curve"
    levels: int = 24
    grid: tuple[float, ...] | None = None
    curve_rows: int = 64

    def __post_init__(self) -> None:
        m = as_real(self.max_layer_sparsity)
        if m is None or not (0.0 < m <= 1.0):
            raise ValueError(
                f"GlobalAllocation.max_layer_sparsity must be a number in (0, 1], got {describe(self.max_layer_sparsity)}; "
                "0.99 (default) keeps at least 1% of every layer, 1.0 removes the cap."
            )
        object.__setattr__(self, "max_layer_sparsity", float(m))
        if not isinstance(self.allow_dead_rows, bool):
            raise ValueError(f"GlobalAllocation.allow_dead_rows must be True or False, got {self.allow_dead_rows!r}.")
        if self.costs not in ("curve", "one-pass"):
            raise ValueError(
                f"GlobalAllocation.costs must be 'curve' (measured error curves, default) or 'one-pass' (L_q), "
                f"got {self.costs!r}."
            )
        for name in ("levels", "curve_rows"):
            least = 2 if name == "levels" else 1
            value = as_int(getattr(self, name))
            if value is None or value < least:
                raise ValueError(
                    f"GlobalAllocation.{name} must be an int >= {least}, got {describe(getattr(self, name))}."
                )
            object.__setattr__(self, name, value)
        if self.grid is not None:
            try:
                if isinstance(self.grid, (str, bytes)) or any(isinstance(v, bool) for v in self.grid):
                    raise TypeError  # True is not the sparsity 1.0
                grid = tuple(float(v) for v in self.grid)
            except (TypeError, ValueError):
                raise ValueError(
                    f"GlobalAllocation.grid must be a sequence of sparsities, got {self.grid!r}."
                ) from None
            if not grid or any(not (0.0 <= v < 1.0) or v > m for v in grid):
                raise ValueError(
                    f"GlobalAllocation.grid must hold sparsities in [0, 1), none above max_layer_sparsity={m}, "
                    f"got {self.grid!r}; or leave grid=None for the default grid of `levels` points."
                )
            object.__setattr__(self, "grid", tuple(sorted(set(grid))))

    def sparsity_grid(self) -> tuple[float, ...]:
        """The grid sparsities the curves are measured at (always including 0)."""
        if self.grid is not None:
            return tuple(sorted({0.0, *self.grid}))
        floor_density = max(1.0 - self.max_layer_sparsity, 1e-3)
        n = self.levels - 1
        return tuple(sorted({1.0 - floor_density ** (i / n) for i in range(n + 1)}))


def resolve_allocation(value: Any) -> GlobalAllocation | None:
    """``"global"`` -> ``GlobalAllocation()``, a GlobalAllocation -> itself, ``"uniform"`` -> None."""
    if isinstance(value, GlobalAllocation):
        return value
    if isinstance(value, str) and value == "global":
        return GlobalAllocation()
    if isinstance(value, str) and value == "uniform":
        return None
    raise ValueError(
        f"allocation must be 'global', 'uniform' or a GlobalAllocation(...), got {value!r}: 'global' spreads "
        "the sparsity over the layers where the relative layer errors are smallest, 'uniform' prunes every layer to "
        "the same sparsity, GlobalAllocation(max_layer_sparsity=..., costs=...) is 'global' with options."
    )


SparsitySpec = Union[float, Mapping[str, float], Callable[[str, nn.Module], float | None]]
ForwardFn = Callable[[nn.Module, Any], Any]
Method = Literal["auto", "exact", "lobs", "fast", "admm"]
AllocationName = Literal["global", "uniform"]
SequentialUnit = Literal["block", "layer"]
ProgressPhase = Literal["calibrate", "allocate", "solve", "measure"]

ALL_METHODS: tuple[str, ...] = get_args(Method)
assert set(ALL_METHODS) == {"auto", *METHODS}  # one list of methods, checked at import


def as_fraction(value: Any, what: str) -> float:
    """``value`` as a float in [0, 1): Python, numpy and 0-d torch scalars accepted; anything else is refused."""
    number = as_real(value)
    if number is None:
        raise ValueError(
            f"{what} must be a number in [0, 1) (the fraction of weights to remove), got {describe(value)}."
        )
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
    raise TypeError(
        f"{what} must be a {cls.__name__} (or a mapping of its fields), got {type(value).__name__}: {value!r}."
    )


@dataclass(frozen=True)
class CalibrationOptions:
    """How layer-input Hessians are gathered.

    Attributes:
        hessian_dtype: accumulation precision of H. ``"mixed"`` (default): products in float32 (GEMM speed),
            summed in float32 over at most 2,048 rows and then in float64, so long sums stay exact; H is float64.
            ``torch.float64``: products and sum in float64 (the reference path, about twice the GEMM time).
            ``torch.float32``: both in float32 (half the Hessians' memory; rounding grows with the row count).
            BENCHMARKS.md, "Hessian precision", measures them on real activations. The strings
            ``"torch.float64"``/``"float32"`` (YAML) are read as the dtypes.
        max_chunk_elements: bound on conv patches unfolded at once (bounded extra memory).
        position_stride: keep every k-th conv output position (for very large maps).
        memory_budget_bytes: refuse to start (naming the layer and the remedy) when the
            Hessians plus the largest solve would need more; None = 80% of what is free.
    """

    hessian_dtype: Literal["mixed"] | torch.dtype = "mixed"
    max_chunk_elements: int = 1 << 24
    position_stride: int = 1
    memory_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.hessian_dtype, str) and self.hessian_dtype.strip() == "mixed":
            object.__setattr__(self, "hessian_dtype", "mixed")
        else:
            try:
                dtype = as_float_dtype(self.hessian_dtype, "CalibrationOptions.hessian_dtype")
            except ValueError as e:
                raise ValueError(f"{e} Or 'mixed' (the default: float32 products, float64 sum).") from None
            object.__setattr__(self, "hessian_dtype", dtype)
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
            ``"lobs"`` (the paper's one-pass rule), ``"fast"`` (SparseGPT) or ``"admm"`` (ADMM with mask
            reselection and a CG refit: lower layer error than ``fast``, several times its cost).
        pattern: ``"N:M"`` semi-structured sparsity (keep N of every M inputs), e.g. ``"2:4"``.
        allocation: with a float ``sparsity``: ``"global"`` (per-layer sparsities from the layers'
            relative error costs), ``"uniform"`` (every layer at ``sparsity``), or a
            :class:`GlobalAllocation` with its own settings.
        exclude: fnmatch patterns of layers to keep dense.
        sequential: calibrate on inputs through the already pruned part of the network, block by block (the
            decoder layers of a transformer, a ResNet's stages: found from the module tree, or ``blocks``): one
            forward over the calibration batches up to the first block, then each block run on its caught inputs,
            its layers calibrated and solved, and run again pruned to feed the next. A model without repeated blocks
            falls back to one forward pass per layer (said once in the ``lightning_lobs.pruner`` log).
        sequential_unit: with ``sequential=True``: ``"block"`` (a block's layers calibrated together on the pruned
            blocks before it) or ``"layer"`` (SparseGPT's "true sequential": inside a block too, each layer sees the
            pruned layers before it; one more block run per layer).
        blocks: qualified names of the modules to treat as blocks (``sequential=True`` only), instead of the ones
            found in the module tree; they must be called one after another, each fed the previous one's output.
        solver: :class:`SolverOptions` (damping, precision, block sizes, refit).
        calibration: :class:`CalibrationOptions` (Hessian precision, conv chunking, memory budget).
        forward_fn: ``(model, batch) -> output``; by default a tensor batch is fed as is, a
            tuple/list by its first item, a mapping as ``model(**batch)`` limited to the keys the
            forward names (see :func:`~lightning_lobs.engine.default_forward`).
        recalibrate_bn: re-estimate BatchNorm running statistics on the calibration batches after
            pruning.
        prune_head: also prune the output heads (``lm_head``, the final classifier: the layer whose
            output is the model's output, or transformers' ``get_output_embeddings()``). By default
            they are left dense and listed in the report's ``skipped``; a sparsity mapping that
            names a head exactly prunes it either way.
    """

    sparsity: SparsitySpec = 0.9
    method: Method = "auto"
    pattern: str | None = None
    allocation: AllocationName | GlobalAllocation = "global"
    exclude: tuple[str, ...] = ()
    sequential: bool = False
    solver: SolverOptions = field(default_factory=SolverOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    forward_fn: ForwardFn | None = None
    recalibrate_bn: bool = True
    prune_head: bool = False
    sequential_unit: SequentialUnit = "block"
    blocks: tuple[str, ...] | None = None

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
        self._check_blocks()

    def _check_blocks(self) -> None:
        if self.sequential_unit not in get_args(SequentialUnit):
            raise ValueError(
                f"sequential_unit must be one of {get_args(SequentialUnit)}, got {self.sequential_unit!r}."
            )
        if self.blocks is None:
            return
        blocks = (self.blocks,) if isinstance(self.blocks, str) else self.blocks
        if not isinstance(blocks, Sequence) or not blocks or not all(isinstance(b, str) and b for b in blocks):
            raise ValueError(
                f"blocks must be a non-empty list of module names (str), e.g. ['encoder.0', 'encoder.1'], or None to "
                f"find them, got {self.blocks!r}."
            )
        if not self.sequential:
            raise ValueError("blocks only apply with sequential=True (the block-by-block pipeline); pass both.")
        object.__setattr__(self, "blocks", tuple(blocks))

    @property
    def nm(self) -> NMPattern | None:
        """The N:M pattern, parsed."""
        return parse_pattern(self.pattern)

    @property
    def global_allocation(self) -> GlobalAllocation | None:
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

    def with_sparsity(self, sparsity: SparsitySpec) -> PruneOptions:
        """A copy with another sparsity (one step of iterative pruning)."""
        return replace(self, sparsity=sparsity)

    @classmethod
    def from_kwargs(cls, what: str, **kwargs: Any) -> PruneOptions:
        """``PruneOptions(**kwargs)`` with an error naming ``what`` and the valid names for unknown keywords."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"{what} got unexpected keyword arguments {unknown}; the options are {sorted(known)}.")
        return cls(**kwargs)


@dataclass(frozen=True)
class CallbackOptions:
    """The options ``LOBSPruning`` takes besides a prune step's (:class:`PruneOptions`); validated on construction.

    Attributes:
        calibration_batches: batches calibrated on at each prune (an int >= 1).
        state_key: a name for the callback's checkpoint state and metrics, or None (derived).
        log_table: print a summary table after each prune.
        reset_monitors: reset ``ModelCheckpoint``/``EarlyStopping`` scores after each prune.
        progress_after: seconds a prune runs before it shows progress (a number >= 0).
    """

    calibration_batches: int = 32
    state_key: str | None = None
    log_table: bool = True
    reset_monitors: bool = True
    progress_after: float = 2.0

    def __post_init__(self) -> None:
        batches = as_int(self.calibration_batches)
        if batches is None or batches < 1:
            raise ValueError(f"calibration_batches must be an int >= 1, got {describe(self.calibration_batches)}.")
        object.__setattr__(self, "calibration_batches", batches)
        key = self.state_key
        if key is not None and (not isinstance(key, str) or not key):
            raise ValueError(
                f"state_key must be a non-empty str (a name for this instance's checkpoint state), got {key!r}."
            )
        for name in ("log_table", "reset_monitors"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        after = as_real(self.progress_after)
        if after is None or not after >= 0:  # NaN too
            raise ValueError(f"progress_after must be a number of seconds >= 0, got {describe(self.progress_after)}.")
        object.__setattr__(self, "progress_after", float(after))


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
    eta: float | None
    fraction: float | None = None

    def describe(self) -> str:
        """``"L-OBS solve 3/12 fc2 | 4.1 s, ~9 s left"``; inside a layer ``"L-OBS allocate 0/2 fc1 37% | ..."``."""
        left = "" if self.eta is None else f", ~{self.eta:.0f} s left"
        what = f" {self.layer}" if self.layer else ""
        share = f" {100 * self.fraction:.0f}%" if self.fraction is not None and self.done < self.total else ""
        return f"L-OBS {self.phase} {self.done}/{self.total}{what}{share} | {self.elapsed:.1f} s{left}"


ProgressFn = Callable[[PruneProgress], None]
