"""The pruning engine shared by :func:`prune_model` and the :class:`LOBSPruning` callback.

One call prunes a model in place, in named stages (:class:`_PruneRun`):

1. **plan**: select the layers (:mod:`lightning_lobs.selection`), resolve each one's method,
   check weights, memory and cost before any work;
2. **calibrate**: stream every layer's input Hessian over the batches;
3. **allocate**: spread a global sparsity over the layers (:mod:`lightning_lobs.allocation`);
4. **solve**: OBS per layer (with ``sequential``, each calibrated on the pruned layers before it);
5. **commit**: write the weights (only once every solve succeeded);
6. **measure**: re-estimate BatchNorm, measure output errors, the bound, and report what the
   model now holds; then write the masks.

All or nothing: any failure (a KeyboardInterrupt too) restores the model's weights, BatchNorm statistics,
train/eval modes and the MaskSet; the masks are written last, after the report is built.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import attention as _attention
from . import bounds as _bounds
from .allocation import allocate_layers
from .batchnorm import batchnorm_modules, batchnorm_state, load_batchnorm_state, recalibrate_batchnorm
from .distributed import RankInfo, assign_layers, broadcast_floats, broadcast_tensors, fail_together
from .hessian import (
    HessianCollector,
    from_rows,
    has_bias,
    is_linear_like,
    is_supported,
    num_groups,
    output_rows,
    set_weight_matrix,
    to_rows,
    weight_matrix,
)
from .masks import MaskSet, _resolve_weight
from .config import (  # noqa: F401 - re-exported: the engine's public names
    ALL_METHODS,
    CalibrationOptions,
    NMPattern,
    SolverOptions,
    ForwardFn,
    ProgressFn,
    PruneOptions,
    PruneProgress,
    SparsitySpec,
)
from .resources import check_budget, layer_memory
from .selection import Selection, check_prior_masks, select_layers, warn_skipped
from .solvers import (
    _MASK_WORK_PER_WEIGHT,
    _REFIT_WORK_FACTOR,
    REFIT_AUTO_MAX_FLOPS,
    GreedyTrace,
    Tick,
    _tick_rows,
    _trace_work,
    solve_layer,
)

log = logging.getLogger(__name__)

#: ``auto`` uses ``exact`` where rows * d^3 is at most this (a few seconds on 2 CPU cores), else ``fast``.
AUTO_EXACT_MAX_COST = 1e12
#: ``exact`` work (rows * d^3) done per second on one CPU core: LeNet-300-100's 300 x 785 layer
#: (1.45e11) takes about 5 s (BENCHMARKS.md, "Cost"). Used only to warn before very long solves.
EXACT_COST_PER_SECOND = 3e10
#: An explicit ``method="exact"`` whose estimate exceeds this many seconds warns before starting.
EXACT_WARN_SECONDS = 180.0


@dataclass
class LayerReport:
    """What pruning did to one layer."""

    name: str
    kind: str
    shape: Tuple[int, ...]
    method: str
    target_sparsity: float
    sparsity: float
    """Fraction of the layer's weight that is exactly zero in the model after the prune."""
    layer_error: float
    """dE = 1/(2n) ||(W^ - W) X~||_F^2 on the calibration inputs."""
    d_term: float
    """Per-sample layer term of the bound, sqrt(2 dE * positions)."""
    norm_frobenius: float
    """Operator-norm bounds of the layer used in the error bound (NaN where the bound does not apply)."""
    norm_spectral: float
    damp: float
    positions: float
    seconds: float
    """Every second the layer took: its greedy trace or error curve in the allocation (and its calibration in
    sequential mode) plus its solve."""
    output_error: float = float("nan")
    """Measured RMS (per sample) error of this layer's output, pruned vs dense network."""


@dataclass
class PruneReport:
    """Per-layer numbers and whole-network errors of one pruning step.

    ``sparsity`` is the fraction of zeros over the pruned layers' weights, read from the model
    after the prune; ``model_sparsity`` the same over every weight of two or more dimensions of
    the model (embeddings and skipped layers included), and ``nonzero_parameters`` /
    ``total_parameters`` count every parameter once (tied ones too). ``skipped`` lists the
    weight-bearing modules left dense and why.
    """

    layers: Dict[str, LayerReport]
    sparsity: float
    bound: float
    bound_spectral: float
    bound_note: str
    output_error: float
    model_output_error: float
    calibration_seconds: float
    solve_seconds: float
    masks: MaskSet = field(repr=False)
    sequential: bool = False
    allocation: str = "uniform"
    """How per-layer sparsities were set: "global" (chosen from the layers' costs), "uniform" (one float or an
    N:M pattern for every layer) or "per-layer" (a mapping or callable)."""
    skipped: Dict[str, str] = field(default_factory=dict)
    model_sparsity: float = float("nan")
    nonzero_parameters: int = 0
    total_parameters: int = 0
    empty_batches: int = 0
    """Calibration batches with no samples, left out."""

    def metrics(self, prefix: str = "lobs/") -> Dict[str, float]:
        """Flat metric dict (``lobs/<layer>/layer_error``, ``lobs/sparsity``, ...); NaN values are left out."""
        out: Dict[str, float] = {}
        for name, layer in self.layers.items():
            out[f"{prefix}{name}/layer_error"] = layer.layer_error
            out[f"{prefix}{name}/sparsity"] = layer.sparsity
            out[f"{prefix}{name}/output_error"] = layer.output_error
        out[f"{prefix}sparsity"] = self.sparsity
        out[f"{prefix}model_sparsity"] = self.model_sparsity
        out[f"{prefix}nonzero_parameters"] = float(self.nonzero_parameters)
        out[f"{prefix}bound"] = self.bound
        out[f"{prefix}bound_spectral"] = self.bound_spectral
        out[f"{prefix}output_error"] = self.output_error
        out[f"{prefix}model_output_error"] = self.model_output_error
        return {k: float(v) for k, v in out.items() if not math.isnan(v)}

    def table(self) -> str:
        """A plain-text summary table of the pruned layers."""
        head = f"{'layer':<28} {'method':<6} {'shape':<18} {'sparsity':>8} {'dE':>10} {'out err':>10} {'secs':>6}"
        lines = [head, "-" * len(head)]
        for r in self.layers.values():
            shape = "x".join(str(s) for s in r.shape)
            lines.append(
                f"{r.name[-28:]:<28} {r.method:<6} {shape:<18} {r.sparsity:>8.4f} {r.layer_error:>10.4g} "
                f"{r.output_error:>10.4g} {r.seconds:>6.2f}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"pruned layers' sparsity {self.sparsity:.4f} ({self.allocation}) | all weights {self.model_sparsity:.4f} | "
            f"nonzero parameters {self.nonzero_parameters:,} of {self.total_parameters:,}"
        )
        lines.append(
            f"output error {self.output_error:.4g} | bound (Frobenius) {self.bound:.4g} | bound (spectral) "
            f"{self.bound_spectral:.4g}" + (f" | {self.bound_note}" if self.bound_note else "")
        )
        if self.skipped:
            lines.append(f"left dense: {', '.join(self.skipped)}")
        if self.empty_batches:
            lines.append(f"{self.empty_batches} empty calibration batch(es) left out")
        return "\n".join(lines)


# --------------------------------------------------------------------------- batches and modes


_INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values", "input_ids")


def _keyword_call(model: nn.Module, batch: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The keyword arguments ``model(**kwargs)`` takes from ``batch`` under the default rule, or None.

    Keys the forward names are passed (a forward that names none of them but takes only ``**kwargs``
    gets them all); keys it does not name, a dataset's ``idx`` say, are dropped, as HF's ``Trainer``
    drops unused columns. None (feed one input entry instead) when the forward names none of the keys,
    or when a parameter it requires is missing from the batch (``{"input": x}`` into ``forward(self, x)``).
    """
    forward = getattr(getattr(model, "_orig_mod", model), "forward")  # a torch.compile wrapper: the model's own
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):  # a builtin or C forward: no signature to read
        return None
    kinds = inspect.Parameter
    named = {p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
    required = {p.name for p in params if p.default is kinds.empty and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)}
    if not required <= set(batch):
        return None
    passed = {k: v for k, v in batch.items() if k in named}
    if passed:
        return passed
    only_kwargs = not named and not required and any(p.kind == kinds.VAR_KEYWORD for p in params)
    only_kwargs = only_kwargs and not any(p.kind == kinds.VAR_POSITIONAL for p in params)
    return dict(batch) if only_kwargs and all(isinstance(k, str) for k in batch) else None


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Feed one batch to the model: a tensor as is, the first item of a tuple/list, a mapping as keywords.

    A mapping (a dict, a transformers ``BatchEncoding``) goes in as ``model(**batch)``, HF's convention,
    limited to the keys the forward's signature names (``labels`` too when it takes them; others
    dropped; a forward taking only ``**kwargs`` gets every key). When the forward names none of the
    keys, or requires an argument the batch lacks, the mapping's ``x``/``input(s)``/``image(s)``/
    ``pixel_values``/``input_ids`` entry is fed as the one input. If the model raises, its own exception
    propagates unchanged, with a note saying what was fed and how to pass ``forward_fn``.
    """
    if isinstance(batch, Tensor):
        fed, call = "model(batch)", lambda: model(batch)
    elif isinstance(batch, (list, tuple)) and batch:
        fed, call = "model(batch[0])", lambda: model(batch[0])
    elif isinstance(batch, Mapping):
        kwargs = _keyword_call(model, batch)
        key = next((k for k in _INPUT_KEYS if k in batch), None)
        if kwargs is not None:
            fed = f"model({', '.join(f'{k}=...' for k in kwargs)})"
            call = lambda: model(**kwargs)  # noqa: E731
        elif key is not None:
            fed, call = f"model(batch[{key!r}])", lambda: model(batch[key])
        else:
            raise TypeError(
                f"cannot tell the model input in a batch with keys {list(batch)}: the model's forward names none of "
                f"them and none is one of {list(_INPUT_KEYS)}; pass forward_fn=lambda model, batch: "
                "model(batch['...']) to say how to run the model on a batch."
            )
    else:
        raise TypeError(
            f"cannot tell the model input in a batch of type {type(batch).__name__}; pass "
            "forward_fn=lambda model, batch: model(...) to say how to run the model on a batch."
        )
    try:
        return call()
    except Exception as error:
        # the model's own exception propagates unchanged (same object, type and arguments), with a note
        error.add_note(
            f"lightning_lobs fed this batch as {fed}, the default forward_fn; if the model runs otherwise, say how, "
            "e.g. forward_fn=lambda model, batch: model(batch['input_ids'], attention_mask=batch['attention_mask'])"
        )
        raise


def _tensors(batch: Any) -> Iterator[Tensor]:
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from _tensors(v)


def is_empty_batch(batch: Any) -> bool:
    """A batch whose tensors all have 0 rows (the last batch of some samplers, a filtered shard)."""
    tensors = [t for t in _tensors(batch) if t.dim() > 0]
    return bool(tensors) and all(t.shape[0] == 0 for t in tensors)


def _move(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device``: through tuples, lists, named tuples, mappings and dataclasses,
    and objects with their own ``.to`` (a transformers ``BatchEncoding``, say). Written here rather than borrowed
    from Lightning Fabric so that ``prune_model`` needs no Lightning."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        moved = {f.name: _move(getattr(batch, f.name), device) for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **moved)
    if isinstance(batch, Mapping):
        items = {k: _move(v, device) for k, v in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:  # a mapping type that cannot be built from a dict
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(_move(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    to = getattr(batch, "to", None)
    return to(device) if callable(to) else batch


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, a forked RNG (so the training shuffle is untouched) and no MHA fast path.

    The fused fast path of ``nn.TransformerEncoderLayer``/``nn.MultiheadAttention`` in eval mode
    skips the Linear modules' forward calls, so their hooks would see nothing.
    """
    modes = {m: m.training for m in model.modules()}
    device = _model_device(model)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, mode in modes.items():
            m.training = mode


HEAD_REASON = (
    "output head ({how}): the most sensitive layer, left dense by default as SparseGPT and Wanda do; "
    "prune_head=True prunes it (or name it exactly in a sparsity mapping)"
)


def output_heads(model: nn.Module, run: Callable[[], Any]) -> Dict[str, str]:
    """The model's output heads, ``name -> why``, found on one forward pass ``run()``.

    A head is a layer (not the model itself) that transformers' ``get_output_embeddings()`` returns
    for the model or one of its submodules (an HF model inside a LightningModule), or whose output
    tensor *is* the model's output: the returned tensor, a tensor item of a returned tuple/list, or
    a tensor value of a returned mapping or ``ModelOutput`` (its ``logits``). A head whose output is
    transformed before it is returned (``log_softmax(fc(x))``) is not recognised by the second rule.
    """
    names = {id(m): n for n, m in model.named_modules() if n}
    heads: Dict[str, str] = {}
    for m in model.modules():
        get = getattr(m, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if isinstance(head, nn.Module) and id(head) in names:
            heads.setdefault(names[id(head)], "the model's get_output_embeddings()")
    outputs: Dict[str, Any] = {}

    def keep(name: str):  # noqa: ANN202 - closure
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if isinstance(out, Tensor):  # a weak reference: no activation is kept alive
                outputs[name] = weakref.ref(out)

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n and is_supported(m)]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    if isinstance(result, Mapping):
        returned = list(result.values())
    elif isinstance(result, (list, tuple)):
        returned = list(result)
    else:
        returned = [result, getattr(result, "logits", None)]
    returned = [t for t in returned if isinstance(t, Tensor)]
    for n, ref in outputs.items():
        out = ref()
        if out is not None and any(out is t for t in returned):
            heads.setdefault(n, "its output is the model's output")
    return {n: HEAD_REASON.format(how=how) for n, how in heads.items()}


# --------------------------------------------------------------------------- layers


@dataclass
class _Layer:
    name: str
    module: nn.Module
    target: float
    method: str
    perm: Optional[Tensor]
    dense: Tensor  # (out, d) weight matrix (bias column included) before this step
    prior: Optional[Tensor] = None  # (out, d_w) keep-mask of an earlier step
    trace: Optional[GreedyTrace] = None  # exact's greedy sequence, when the global allocation computed it


@dataclass
class _Solved:
    """One layer's solve: the new ``(out, d)`` matrix, the keep-mask in the weight's layout, and its numbers."""

    matrix: Tensor
    mask: Tensor
    error: float
    damp: float
    seconds: float

    _FLOATS = ("error", "damp", "seconds")


def _resolve_method(method: str, module: nn.Module) -> str:
    if method != "auto":
        return method
    rows = output_rows(module) // num_groups(module)
    d = weight_matrix(module).shape[1]
    return "exact" if rows * d**3 <= AUTO_EXACT_MAX_COST else "fast"


def _solve_cost(layer: _Layer) -> float:
    rows, d = layer.dense.shape
    g = num_groups(layer.module)
    if layer.method == "exact":
        return float(rows) * d**3
    return float(g) * d**3 + float(rows) * d**2


def _trace_flops(rows: int, d: int, solver: SolverOptions) -> float:
    """Estimated flops of ``exact``'s greedy trace: every step's share of a flush, 2 x width^2 per row, and more."""
    chunk = min(rows, _tick_rows(rows, 2.0 * solver.lazy_steps * d * d))
    return 2.0 * rows * _trace_work(d, d, solver.lazy_steps, 0, 0.75, chunk)


def _refit_flops(rows: int, d: int, sparsity: float, solver: SolverOptions, method: str) -> float:
    """Estimated work of the refit (a k x k Cholesky per row, k kept), 0 where ``lobs``/``fast`` skip it."""
    flops = rows * (d * (1.0 - sparsity)) ** 3 / 3
    if method != "exact" and not (solver.refit is True or (solver.refit is None and flops <= REFIT_AUTO_MAX_FLOPS)):
        return 0.0
    return _REFIT_WORK_FACTOR * flops


def _allocation_work(layer: _Layer, solver: SolverOptions, curve_rows: int, levels: int, curve: bool) -> float:
    """Estimated flops of one layer's allocation costs: the trace (``exact``), the curve or the one-pass scores."""
    rows, d = layer.dense.shape
    g = num_groups(layer.module)
    if layer.method == "exact":
        return _trace_flops(rows, d, solver)
    if curve:
        return g * d**3 + 2.0 * min(rows, curve_rows) * levels * d * d
    return g * d**3 + float(rows) * d


def _solve_work(layer: _Layer, solver: SolverOptions, pattern: bool) -> float:
    """Estimated flops of one layer's solve at its target: what the progress ETA of the solve phase counts.

    An ``exact`` layer with a trace from the allocation only chooses its mask and refits; a layer the
    allocation left dense (target 0, no earlier mask, no N:M ``pattern``) costs next to nothing.
    """
    rows, d = layer.dense.shape
    g = num_groups(layer.module)
    if layer.target == 0 and layer.prior is None and not pattern:
        return float(rows) * d
    work = g * d**3 + _refit_flops(rows, d, layer.target, solver, layer.method)
    if layer.method == "exact":
        work += _MASK_WORK_PER_WEIGHT * rows * d
        return work + (0.0 if layer.trace is not None and layer.perm is None else _trace_flops(rows, d, solver))
    return work + 2.0 * rows * d * d


def _channel_last_perm(module: nn.Module) -> Optional[Tensor]:
    """Column permutation putting conv input channels innermost, so N:M groups run along channels."""
    if is_linear_like(module):
        return None
    k = int(math.prod(module.kernel_size))
    if k == 1:
        return None
    c = module.in_channels // module.groups
    return torch.arange(c * k).reshape(c, k).t().reshape(-1)


def _check_finite_parameters(model: nn.Module) -> None:
    """NaN/inf in any parameter is named here, before it shows up as some later layer's bad input."""
    bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise ValueError(
            f"parameters {bad} contain NaN or inf, so calibration would see non-finite activations; fix or "
            "reload those weights before pruning."
        )


class _Progress:
    """Emits :class:`PruneProgress` events, with an ETA from the phase's measured rate.

    Each phase's units (layers, batches) carry an estimated cost (floating-point operations for the
    solver phases); :meth:`step` finishes a unit, :meth:`advance` reports part of one (a kernel's tick).
    The ETA is the cost left divided by the cost done per second so far in the phase. ``clock`` is
    injectable so the arithmetic can be checked against simulated time.
    """

    def __init__(self, fn: Optional[ProgressFn], clock: Callable[[], float] = time.perf_counter) -> None:
        self.fn = fn
        self.clock = clock
        self.start = clock()
        self.phase = "calibrate"
        self.costs: Dict[str, float] = {}
        self.total = 0
        self.done = 0
        self.done_cost = 0.0
        self.partial: Dict[str, float] = {}  # unfinished units' fractions done
        self.phase_start = self.start

    def begin(self, phase: str, costs: Mapping[str, float]) -> None:
        self.phase, self.costs = phase, {k: max(float(c), 0.0) for k, c in costs.items()}
        self.total, self.done, self.done_cost, self.partial = len(costs), 0, 0.0, {}
        self.phase_start = self.clock()

    def advance(self, key: str, fraction: float, label: str = "") -> None:
        """Unit ``key`` is ``fraction`` done (it is finished only by :meth:`step`)."""
        if self.fn is None:
            return
        self.partial[key] = max(self.partial.get(key, 0.0), min(max(float(fraction), 0.0), 1.0))
        self._emit(label)

    def step(self, key: str, label: str = "") -> None:
        if self.fn is None:
            return
        self.partial.pop(key, None)
        self.done += 1
        self.done_cost += self.costs.get(key, 0.0)
        self._emit(label)

    def _emit(self, label: str) -> None:
        if self.fn is None:
            return
        now = self.clock()
        total = sum(self.costs.values())
        work = self.done_cost + sum(self.costs.get(k, 0.0) * f for k, f in self.partial.items())
        eta = None if work <= 0 else (now - self.phase_start) * max(total - work, 0.0) / work
        fraction = min(work / total, 1.0) if total > 0 else None
        self.fn(PruneProgress(self.phase, self.done, self.total, label, now - self.start, eta, fraction))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the engine


def prune(
    model: nn.Module,
    batches: Sequence[Any],
    options: PruneOptions,
    *,
    masks: Optional[MaskSet] = None,
    rank: Optional[RankInfo] = None,
    progress: Optional[ProgressFn] = None,
    on_commit: Optional[Callable[[PruneReport], None]] = None,
) -> PruneReport:
    """Prune ``model`` in place with OBS on the calibration ``batches``, as ``options`` say.

    ``masks`` (optional) holds masks of an earlier step: those weights stay pruned and the new
    masks are written into it. With ``rank`` in a torch.distributed group, each rank calibrates
    on its own batches, Hessians and sample counts are summed across ranks, the layer solves are
    spread over the ranks and their results broadcast, so all ranks end with identical weights
    and masks. ``progress`` receives a :class:`PruneProgress` after every layer of every phase.

    All or nothing: weights, biases, BatchNorm buffers and ``masks`` (their contents and attachment) change
    together; an exception anywhere (KeyboardInterrupt included) puts them back as they were before it
    propagates. ``on_commit(report)`` runs last inside that guarantee (a caller's own bookkeeping; if it
    raises, the prune is undone too).
    """
    if not isinstance(options, PruneOptions):
        raise TypeError(
            f"options must be a PruneOptions, got {type(options).__name__}; build one with PruneOptions(sparsity=..., ...)."
        )
    return _PruneRun(model, list(batches), options, masks, rank or RankInfo(), progress).run(on_commit)


class _PruneRun:
    """One prune, stage by stage; the state the stages share lives here instead of in long argument lists."""

    def __init__(
        self,
        model: nn.Module,
        batches: List[Any],
        options: PruneOptions,
        masks: Optional[MaskSet],
        rank: RankInfo,
        progress: Optional[ProgressFn],
    ) -> None:
        self.model = model
        self.options = options
        self.solver: SolverOptions = options.solver
        self.nm: Optional[NMPattern] = options.nm
        self.rank = rank
        self.masks = masks if masks is not None else MaskSet()
        self.device = _model_device(model)
        self.progress = _Progress(progress)
        forward_fn = options.forward_fn or default_forward
        self.run_batch: Callable[[Any], Any] = lambda batch: forward_fn(model, _move(batch, self.device))
        self.batches = [b for b in batches if not is_empty_batch(b)]
        self.empty_batches = len(batches) - len(self.batches)
        self.layers: Dict[str, _Layer] = {}
        self.selection: Optional[Selection] = None
        self.order: List[str] = []
        self.call_order: List[str] = []
        self.hessians: Dict[str, Tensor] = {}
        self.scales: Dict[str, float] = {}
        self.positions: Dict[str, float] = {}
        self.owners: Dict[str, int] = {}
        self.solved: Dict[str, _Solved] = {}
        self.t_cal = 0.0
        self.t_solve = 0.0
        self.layer_seconds: Dict[str, float] = {}  # time spent on a layer before its solve (trace or curve)

    # ------------------------------------------------------------------ stages

    def run(self, then: Optional[Callable[[PruneReport], None]] = None) -> PruneReport:
        """All stages as one transaction: weights, BatchNorm state and masks change together or not at all.

        What will change is saved first (the selected layers' weights and biases, BatchNorm buffers, the
        MaskSet's masks and attachment); the masks are written last, after the report is built, then
        ``then(report)`` runs (the callback records its schedule there). An exception anywhere, a
        KeyboardInterrupt included, puts every saved piece back before it propagates.
        """
        self.plan()
        modules = {n: l.module for n, l in self.layers.items()}
        snapshot = _param_state(modules)  # attention projections: copies of their blocks
        bn_dense = batchnorm_state(self.model)
        masks_before = _MaskSetState(self.masks)
        try:
            with _eval_no_grad(self.model), _attention.feeding(self.model, modules):
                if self.options.sequential:
                    self.order = self.execution_order()
                    self.owners = {n: i % self.rank.world_size for i, n in enumerate(self.order)}
                    self.allocate(self.dense_hessian, keep_traces=False)
                else:
                    self.calibrate(list(self.layers))
                    self.order = [n for n in self.call_order if n in self.layers]
                    self.owners = assign_layers({n: _solve_cost(self.layers[n]) for n in self.order}, self.rank.world_size)
                    self.allocate(self.hessians.__getitem__, keep_traces=True)
                self.solve()
                self.commit()
            bn_recalibrated = self.recalibrate_batchnorm()
            report = self.report(snapshot, bn_dense, bn_recalibrated)
            # Last: the masks (enforcing them when the set is attached), then the caller's own bookkeeping.
            new_masks = _attention.to_parameter_masks(
                self.model, modules, {n: self.solved[n].mask for n in self.order}, self.masks.masks
            )
            masks_before.save_enforced(new_masks)
            self.masks.update(new_masks)
            if then is not None:
                then(report)
            return report
        except BaseException:
            # Masks first: re-attaching the old ones re-applies them, and the weights below are then exact again.
            try:
                masks_before.restore()
            finally:
                _load_params(modules, snapshot)
                load_batchnorm_state(self.model, bn_dense)
            raise

    def plan(self) -> None:
        """Select layers, resolve methods, check weights, memory and cost: all before any work."""
        opts = self.options
        if not self.batches:
            raise ValueError(
                "no calibration batches"
                + (f": all {self.empty_batches} batches were empty" if self.empty_batches else "")
                + "; give a dataloader with samples (and calibration_batches >= 1)."
            )
        if self.empty_batches:
            warnings.warn(f"{self.empty_batches} calibration batch(es) had no samples and were left out.", UserWarning, stacklevel=4)
        heads: Dict[str, str] = {}
        if not opts.prune_head:
            with _eval_no_grad(self.model):
                heads = output_heads(self.model, lambda: self.run_batch(self.batches[0]))
        self.selection = select_layers(self.model, opts.sparsity, opts.exclude, self.nm, keep_dense=heads)
        _check_finite_parameters(self.model)
        modules = dict(self.model.named_modules())
        modules.update(_attention.projections(self.model))
        priors = MaskSet()  # by layer name: an attention projection's block of its Parameter's mask
        for n in self.selection.targets:
            prior = _attention.prior_mask(modules[n], n, self.masks.masks)
            if prior is not None:
                priors.masks[n] = prior
        check_prior_masks(priors, {n: modules[n] for n in self.selection.targets}, self.selection.targets, opts)
        for n, target in self.selection.targets.items():
            m = modules[n]
            prior = priors.get(n)
            self.layers[n] = _Layer(
                n,
                m,
                target,
                _resolve_method(opts.method, m),
                _channel_last_perm(m) if self.nm else None,
                weight_matrix(m),
                None if prior is None else to_rows(m, prior.to(m.weight.device)),
            )
        self.warn_cost()
        estimates = {
            n: layer_memory(
                n, l.module, l.method, opts.calibration.hessian_dtype, self.solver.dtype,
                self.solver.max_memory_bytes, self.solver.refit is not False,
            )
            for n, l in self.layers.items()
        }
        with fail_together(self.rank, self.device, "the memory check"):  # free memory differs between ranks
            check_budget(estimates, opts.calibration.memory_budget_bytes, opts.sequential, self.device)
        _broadcast_buffers(self.model, self.rank)

    def warn_cost(self) -> None:
        """An explicit ``exact`` that will take minutes says so, with the remedy, before starting."""
        if self.options.method != "exact":
            return
        cost = sum(_solve_cost(l) for l in self.layers.values())
        seconds = cost / EXACT_COST_PER_SECOND
        if seconds > EXACT_WARN_SECONDS:
            biggest = max(self.layers.values(), key=_solve_cost)
            warnings.warn(
                f"method='exact' will take about {seconds / 60:.0f} min on one CPU core ({len(self.layers)} layers; "
                f"'{biggest.name}' {tuple(biggest.dense.shape)} alone about {_solve_cost(biggest) / EXACT_COST_PER_SECOND / 60:.0f} "
                "min). method='auto' uses exact only where it takes seconds and SparseGPT ('fast') elsewhere; or "
                "exclude the biggest layers.",
                UserWarning,
                stacklevel=4,
            )

    def calibrate(self, names: Sequence[str], report: bool = True) -> Dict[str, Tensor]:
        """Hessians (normalised, see :meth:`normalise`) and positions of ``names``; records their call order.

        ``report=False`` inside another phase (sequential mode calibrates one layer at a time while allocating
        and solving, and those phases report per layer).
        """
        t0 = time.perf_counter()
        progress = self.progress if report else _Progress(None)
        progress.begin("calibrate", {str(i): 1.0 for i in range(len(self.batches))})
        hessians, positions, order, missing = _calibrate(
            self.model, self.batches, {n: self.layers[n].module for n in names}, self.options.calibration,
            self.run_batch, self.rank, progress,
        )
        self.drop_uncalled(missing)
        for n in names:
            if n in self.layers:
                self.hessians[n] = self.normalise(n, hessians[n])
                self.positions[n] = positions[n]
                progress.step(n, n)
        self.call_order = order
        self.t_cal += time.perf_counter() - t0
        return {n: self.hessians[n] for n in names if n in self.layers}

    def normalise(self, name: str, hessian: Tensor) -> Tensor:
        """H divided by its mean diagonal: the OBS solution does not change, and a float32 solve cannot overflow.

        Inputs of magnitude 1e20 are finite in float32, but their squares are not; the layer
        error is scaled back in :meth:`report`.
        """
        diag = torch.diagonal(hessian, dim1=-2, dim2=-1)
        scale = float(diag.mean()) if hessian.numel() else 1.0
        if not (scale > 0 and math.isfinite(scale)):
            scale = 1.0
        self.scales[name] = scale
        return hessian / scale

    def drop_uncalled(self, missing: Sequence[str]) -> None:
        """Layers the forward never called: an error when named exactly, else left dense with a warning."""
        if not missing:
            return
        named = [n for n in missing if n in self.selection.explicit]
        if named or len(missing) == len(self.layers):
            raise RuntimeError(
                f"layers {list(missing)} were never called during calibration, so they have no Hessian; exclude "
                "them or check forward_fn (the model must call these modules on the calibration batches)."
            )
        reasons = {n: "never called by the model's forward on the calibration batches" for n in missing}
        warn_skipped(reasons)
        self.selection.skipped.update(reasons)
        for n in missing:
            del self.layers[n]

    def dense_hessian(self, name: str) -> Tensor:
        """One layer's Hessian on the dense network (sequential mode computes allocation costs one at a time)."""
        return self.calibrate([name], report=False)[name]

    def execution_order(self) -> List[str]:
        """The selected layers in the order the forward first calls them, over all calibration batches.

        Batches are run until every layer has been seen (usually one), so a layer that only a later batch
        calls (a data-dependent branch, an MoE expert) is pruned as the non-sequential path prunes it.
        """
        order: List[str] = []
        modules = {n: l.module for n, l in self.layers.items()}
        handles = [
            m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
            for n, m in modules.items()
        ]
        try:
            for batch in self.batches:
                self.run_batch(batch)
                if len(order) == len(modules):
                    break
        finally:
            for h in handles:
                h.remove()
        self.drop_uncalled([n for n in modules if n not in order])
        return order

    def allocate(self, hessian_of: Callable[[str], Tensor], keep_traces: bool) -> None:
        config = self.options.global_allocation
        if config is None:
            return
        t0 = time.perf_counter()
        curve = config.costs == "curve" and any(self.layers[n].method != "exact" for n in self.order)
        levels = len(config.sparsity_grid())
        self.progress.begin(
            "allocate",
            {n: _allocation_work(self.layers[n], self.solver, config.curve_rows, levels, curve) for n in self.order},
        )
        started: Dict[str, float] = {}

        def on_layer(name: str, fraction: float) -> None:
            # The layer's time (its trace or curve, and its calibration in sequential mode) joins its `secs`.
            if name not in started:  # the layer starts: nothing to report yet
                started[name] = time.perf_counter()
            elif fraction >= 1.0:
                self.layer_seconds[name] = self.layer_seconds.get(name, 0.0) + time.perf_counter() - started[name]
                self.progress.step(name, name)
            else:
                self.progress.advance(name, fraction, name)

        allocate_layers(
            self.layers, self.order, float(self.options.sparsity), hessian_of, self.solver, _row_masks(self.layers),
            self.owners, self.rank, self.device, keep_traces, config, progress=on_layer,
        )
        self.t_solve += time.perf_counter() - t0

    def solve(self) -> None:
        """Solve every layer (this rank's share); sequential mode writes each before calibrating the next."""
        sequential = self.options.sequential
        self.progress.begin("solve", {n: _solve_work(self.layers[n], self.solver, self.nm is not None) for n in self.order})
        with fail_together(self.rank, self.device, "solving the layers", active=not sequential):
            for n in self.order:
                layer = self.layers[n]
                if sequential:
                    self.calibrate([n], report=False)
                t0 = time.perf_counter()
                with fail_together(self.rank, self.device, f"solving layer '{n}'", active=sequential):
                    if self.owners[n] == self.rank.rank:
                        tick = lambda f, n=n: self.progress.advance(n, min(f, 1.0 - 1e-9), n)  # noqa: E731
                        solved = _solve_one(layer, self.hessians[n], self.nm, self.solver, tick)
                        solved.seconds += self.layer_seconds.get(n, 0.0)  # before sharing: every rank reports it
                    else:  # another rank solves it; _share fills it in
                        solved = _Solved(torch.zeros_like(layer.dense), torch.ones_like(layer.module.weight, dtype=torch.bool), 0.0, 0.0, 0.0)
                if sequential:
                    solved = _share(solved, self.owners[n], self.rank, self.device)
                    set_weight_matrix(layer.module, solved.matrix)
                self.t_solve += time.perf_counter() - t0
                self.solved[n] = solved
                self.progress.step(n, n)

    def commit(self) -> None:
        """Write every layer's weights (only now, so a failed solve leaves no trace) and zero the pruned ones.

        The masks are written by :meth:`run` after the report, so a failure while measuring leaves the old ones.
        """
        t0 = time.perf_counter()
        if not self.options.sequential:
            for n in self.order:
                self.solved[n] = _share(self.solved[n], self.owners[n], self.rank, self.device)
            for n in self.order:
                set_weight_matrix(self.layers[n].module, self.solved[n].matrix)
        with torch.no_grad():
            for n in self.order:
                weight = self.layers[n].module.weight
                weight.masked_fill_(~self.solved[n].mask.to(weight.device), 0.0)
        self.t_solve += time.perf_counter() - t0

    def recalibrate_batchnorm(self) -> bool:
        if not self.options.recalibrate_bn:
            return False
        try:
            done = recalibrate_batchnorm(self.model, self.batches, self.run_batch)
        except Exception as err:  # the user's own exception, same type and arguments: only a note is added
            err.add_note(
                "lightning_lobs: raised during the BatchNorm re-estimation after pruning (recalibrate_bn=True); the "
                "model's weights and BatchNorm statistics were restored."
            )
            raise
        if done:
            _all_reduce_batchnorm(self.model, self.rank)
        return bool(done)

    def report(self, snapshot: Mapping[str, Tuple[Tensor, Optional[Tensor]]], bn_dense: Mapping[str, Tensor], bn_recalibrated: bool) -> PruneReport:
        """Measure the output errors and the bound, and report what the model now holds."""
        self.progress.begin("measure", {"measure": 1.0})
        reports: Dict[str, LayerReport] = {}
        for n in self.order:
            layer, solved = self.layers[n], self.solved[n]
            weight = layer.module.weight.detach()
            mask = solved.mask.to(weight.device)
            if bool((weight[~mask] != 0).any()):  # the model must hold what the masks say
                raise AssertionError(f"layer '{n}': pruned positions are not zero after the commit; please report this bug.")
            error = solved.error * self.scales.get(n, 1.0)
            reports[n] = LayerReport(
                name=n,
                kind=type(layer.module).__name__,
                shape=tuple(weight.shape),
                method=layer.method,
                target_sparsity=layer.target,
                sparsity=float((weight == 0).sum()) / max(weight.numel(), 1),
                layer_error=error,
                d_term=math.sqrt(max(0.0, 2.0 * error * self.positions[n])),
                norm_frobenius=float("nan"),
                norm_spectral=float("nan"),
                damp=solved.damp,
                positions=self.positions[n],
                seconds=solved.seconds,
            )
            if solved.damp > self.solver.damp:
                log.warning("layer %s needed relative damping %.3g (asked %.3g)", n, solved.damp, self.solver.damp)
        with _eval_no_grad(self.model), _attention.feeding(self.model, {n: self.layers[n].module for n in self.order}):
            out_err, model_err, example = _measure(
                self.model, self.batches, self.layers, self.order, {n: snapshot[n] for n in self.order}, bn_dense, reports,
                self.run_batch, self.rank, lambda f: self.progress.advance("measure", f),
            )
            bound, bound_spec, note = _bound(
                self.model, self.layers, self.order, reports, example, bn_recalibrated, self.options.sequential
            )
        self.progress.step("measure", "")
        total = sum(self.layers[n].module.weight.numel() for n in self.order)
        zeros = sum(int((self.layers[n].module.weight == 0).sum()) for n in self.order)
        counts = _parameter_counts(self.model)
        return PruneReport(
            layers=reports,
            sparsity=zeros / max(total, 1),
            bound=bound,
            bound_spectral=bound_spec,
            bound_note=note,
            output_error=out_err,
            model_output_error=model_err,
            calibration_seconds=self.t_cal,
            solve_seconds=self.t_solve,
            masks=self.masks,
            sequential=self.options.sequential,
            allocation=self.options.allocation_name,
            skipped=dict(self.selection.skipped),
            empty_batches=self.empty_batches,
            **counts,
        )


class _MaskSetState:
    """A MaskSet as it was (masks, attachment) to put back after a failed prune, and, once :meth:`save_enforced`
    ran, the optimizer state and gradients that enforcing new masks zeroes."""

    def __init__(self, masks: MaskSet) -> None:
        self.masks = masks
        self.saved = dict(masks.masks)  # the tensors themselves: MaskSet replaces entries, never edits them
        self.model = masks._model
        self.optimizers = list(masks._optimizers)
        self.written = False
        self.zeroed: List[Tuple[Tensor, Tensor, Tensor]] = []  # (tensor, positions, their values)

    def save_enforced(self, new: Mapping[str, Tensor]) -> None:
        """Before writing ``new`` into an attached set: keep what attaching zeroes (optimizer state shaped like a
        masked weight, and its ``.grad``, at the pruned positions)."""
        self.written = True
        model = self.masks._model
        if model is None:
            return
        for name, mask in new.items():
            weight = _resolve_weight(model, name)
            pruned = ~mask.to(weight.device)
            tensors = [weight.grad] if weight.grad is not None and weight.grad.layout == torch.strided else []
            for opt in self.masks._optimizers:
                tensors += [
                    v for v in (opt.state.get(weight) or {}).values()
                    if isinstance(v, Tensor) and v.layout == torch.strided and v.shape == weight.shape
                ]
            for t in tensors:
                where = pruned.to(t.device)
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


def _row_masks(layers: Mapping[str, _Layer]) -> MaskSet:
    """Earlier steps' keep-masks in the solvers' ``(out, d_w)`` row layout."""
    rows = MaskSet()
    for n, layer in layers.items():
        if layer.prior is not None:
            rows.set(n, layer.prior)
    return rows


def _parameter_counts(model: nn.Module) -> Dict[str, Any]:
    """Zeros over every weight of >= 2 dimensions, and nonzero/total parameters, each Parameter counted once."""
    params = list(model.parameters())  # unique: tied parameters appear once
    weights = [p for p in params if p.dim() >= 2]
    total_w = sum(p.numel() for p in weights)
    zeros_w = sum(int((p.detach() == 0).sum()) for p in weights)
    return {
        "model_sparsity": zeros_w / total_w if total_w else float("nan"),
        "nonzero_parameters": sum(int((p.detach() != 0).sum()) for p in params),
        "total_parameters": sum(p.numel() for p in params),
    }


def _param_state(modules: Mapping[str, nn.Module]) -> Dict[str, Tuple[Tensor, Optional[Tensor]]]:
    """Copies of each module's weight and bias, for :func:`_load_params`."""
    return {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone()) for n, m in modules.items()}


def _load_params(modules: Mapping[str, nn.Module], state: Mapping[str, Tuple[Tensor, Optional[Tensor]]]) -> None:
    with torch.no_grad():
        for n, (w, b) in state.items():
            modules[n].weight.copy_(w)
            if b is not None:
                modules[n].bias.copy_(b)


def _share(solved: _Solved, owner: int, rank: RankInfo, device: torch.device) -> _Solved:
    """Broadcast one layer's solve from its owner rank (no-op in a single process)."""
    if not rank.active:
        return solved
    matrix, mask = broadcast_tensors([solved.matrix.to(device), solved.mask.to(device)], owner, rank)
    values = broadcast_floats([float(getattr(solved, k)) for k in _Solved._FLOATS], owner, rank, device)
    return _Solved(matrix, mask, *values)


def _broadcast_buffers(model: nn.Module, rank: RankInfo) -> None:
    """Give every rank rank 0's buffers before calibrating.

    Under DDP each rank's BatchNorm running statistics drift apart (DDP only broadcasts
    rank 0's at the next training forward), so without this the ranks would calibrate,
    and sum the Hessians of, different networks.
    """
    if not rank.active:
        return
    with torch.no_grad():
        for buf in model.buffers():
            (received,) = broadcast_tensors([buf], 0, rank)
            if received is not buf:
                buf.copy_(received)


def _all_reduce_batchnorm(model: nn.Module, rank: RankInfo) -> None:
    """Combine re-estimated BatchNorm statistics over ranks (each saw its own batches).

    Each rank holds the average over its own batches; weighting by batch counts gives the
    average over every rank's batches, as one process calibrating on all of them would.
    """
    if not rank.active:
        return
    for bn in batchnorm_modules(model):
        count = bn.num_batches_tracked.to(torch.float64)
        total = count.clone()
        torch.distributed.all_reduce(total, group=rank.group)
        if float(total) == 0.0:  # not called on any rank: left as recalibrate_batchnorm left it
            continue
        for buf in (bn.running_mean, bn.running_var):
            if buf is not None:
                buf.mul_((count / total).to(buf.dtype))
                torch.distributed.all_reduce(buf, group=rank.group)
        bn.num_batches_tracked.copy_(total.to(bn.num_batches_tracked.dtype))


def _calibrate(
    model: nn.Module,
    batches: Sequence[Any],
    modules: Mapping[str, nn.Module],
    options: CalibrationOptions,
    run: Callable[[Any], Any],
    rank: RankInfo,
    progress: _Progress,
) -> Tuple[Dict[str, Tensor], Dict[str, float], List[str], List[str]]:
    """Stream H for ``modules`` over ``batches`` (summed over ranks).

    Returns the Hessians and output positions per sample of the layers that were called, the
    call order, and the layers never called (on any rank).
    """
    samples = {n: 0 for n in modules}
    order: List[str] = []
    handles = []

    def make_hook(name: str):  # noqa: ANN202 - closure
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            per_sample_dims = 1 if is_linear_like(module) else module.weight.dim() - 1
            samples[name] += x.shape[0] if x.dim() > per_sample_dims else 1
            if name not in order:
                order.append(name)

        return hook

    collector = HessianCollector(
        modules,
        dtype=options.hessian_dtype,
        max_chunk_elements=options.max_chunk_elements,
        position_stride=options.position_stride,
    )
    with fail_together(rank, _model_device(model), "calibration"):  # before the all-reduces below
        try:
            for n, m in modules.items():
                handles.append(m.register_forward_pre_hook(make_hook(n), with_kwargs=True))
            with collector:
                for i, batch in enumerate(batches):
                    run(batch)
                    progress.step(str(i), "")
        finally:
            for h in handles:
                h.remove()
    if rank.active:
        collector.reduce(rank.group)
        counts = torch.tensor([float(samples[n]) for n in modules], dtype=torch.float64, device=_model_device(model))
        torch.distributed.all_reduce(counts, group=rank.group)
        samples = dict(zip(modules, counts.tolist()))
    missing = [n for n in modules if samples[n] == 0]
    called = [n for n in modules if samples[n] > 0]
    # Finishing the Hessians is d^2 work per layer (seconds in all for wide convolutions): counted per layer, as
    # a second stretch of the phase (the caller normalises them and finishes each layer's step).
    progress.begin("calibrate", {n: float(collector.accumulators[n].sum.numel()) for n in called})
    hessians = {}
    for n in called:
        hessians[n] = collector.accumulators[n].hessian()
        progress.advance(n, 0.5, n)
    positions = {n: collector.accumulators[n].count / samples[n] for n in called}
    return hessians, positions, order, missing


def _solve_one(
    layer: _Layer, hessian: Tensor, nm: Optional[NMPattern], solver: SolverOptions, tick: Optional[Tick] = None
) -> _Solved:
    t0 = time.perf_counter()
    module = layer.module
    W = layer.dense
    if W.dtype not in (torch.float32, torch.float64):  # bf16/fp16 weights: solve in the solver's precision
        W = W.to(solver.dtype)
    bias_col = has_bias(module)
    weight, bias = (W[:, :-1], W[:, -1]) if bias_col else (W, None)
    H = hessian.to(W.device)
    prior = layer.prior
    perm = layer.perm
    if perm is not None:
        perm = perm.to(W.device)
        full = torch.cat([perm, torch.tensor([weight.shape[1]], device=W.device)]) if bias_col else perm
        weight = weight[:, perm]
        H = H[:, full][:, :, full]
        if prior is not None:
            prior = prior[:, perm]
    trace = layer.trace if perm is None else None  # traces are computed on the unpermuted columns
    res = solve_layer(
        weight, H, None if nm else layer.target, layer.method, bias=bias, pattern=nm, solver=solver, prior_mask=prior, trace=trace,
        tick=tick,
    )
    layer.trace = None  # one use; frees the memory
    new_w, mask2 = res.weight, res.mask
    if perm is not None:
        inv = torch.argsort(perm)
        new_w, mask2 = new_w[:, inv], mask2[:, inv]
    matrix = torch.cat([new_w, res.bias.unsqueeze(1)], dim=1) if bias_col else new_w
    return _Solved(matrix, from_rows(module, mask2), res.error, res.damp, time.perf_counter() - t0)


def _fill_norms(layers: Mapping[str, _Layer], order: Sequence[str], reports: Mapping[str, LayerReport], sequential: bool) -> None:
    for n in order:
        layer = layers[n]
        # Sequential calibration measures d^l on pruned inputs, so the recursion multiplies dense norms.
        W = layer.dense if sequential else weight_matrix(layer.module)
        reports[n].norm_frobenius = _bounds.operator_norm(layer.module, W, "frobenius")
        reports[n].norm_spectral = _bounds.operator_norm(layer.module, W, "spectral")


def _measure(
    model: nn.Module,
    batches: Sequence[Any],
    layers: Mapping[str, _Layer],
    order: Sequence[str],
    snapshot: Mapping[str, Tuple[Tensor, Optional[Tensor]]],
    bn_dense: Mapping[str, Tensor],
    reports: Mapping[str, LayerReport],
    run: Callable[[Any], Any],
    rank: RankInfo,
    tick: Optional[Tick] = None,
) -> Tuple[float, float, Any]:
    """RMS per-sample output errors (every pruned layer and the model output), pruned vs dense.

    Dense and pruned weights (and BatchNorm statistics) are swapped in batch by batch, so
    only one batch of layer outputs is held at a time. Errors are summed over ranks. Also
    returns the model's positional input for the first batch (for the bound's shape analysis).
    ``tick`` hears the fraction of batches done after each batch but the last.
    """
    modules = {n: layers[n].module for n in order}
    pruned_state = _param_state(modules)
    bn_pruned = batchnorm_state(model)

    def load_dense() -> None:
        _load_params(modules, snapshot)
        load_batchnorm_state(model, bn_dense)

    def load_pruned() -> None:
        _load_params(modules, pruned_state)
        load_batchnorm_state(model, bn_pruned)

    acc = {n: _bounds.RMSAccumulator() for n in order}
    model_acc = _bounds.RMSAccumulator()
    model_ok = True
    dense_layers: Dict[str, Tensor] = {}
    state = {"dense": True}

    def compare(name: str, out: Tensor) -> None:
        # Dense outputs are kept for one batch; each pruned output is compared as it appears and the dense one
        # freed, so at most one pruned layer output is held on top of the dense ones (a layer called twice in a
        # forward is compared on its first call).
        if state["dense"]:
            dense_layers.setdefault(name, out.detach())
        elif name in dense_layers:
            acc[name].add(dense_layers.pop(name), out.detach())

    handles = [modules[n].register_forward_hook(lambda mod, args, out, n=n: compare(n, out)) for n in order]
    inputs: List[Any] = []

    def keep_first_input(mod: nn.Module, args: tuple) -> None:
        if not inputs and len(args) == 1:
            inputs.append(args[0])

    handles.append(model.register_forward_pre_hook(keep_first_input))
    device = _model_device(model)
    try:
        with _eval_no_grad(model):
            for i, batch in enumerate(batches):
                if tick is not None and i:
                    tick(i / len(batches))
                load_dense()
                dense_layers.clear()
                state["dense"] = True
                dense_out = run(batch)
                load_pruned()
                state["dense"] = False
                out = run(batch)
                if model_ok and isinstance(out, Tensor) and isinstance(dense_out, Tensor) and out.shape == dense_out.shape:
                    model_acc.add(dense_out, out)
                else:
                    model_ok = False
    finally:
        for h in handles:
            h.remove()
        load_pruned()
    if rank.active:
        for a in [*acc.values(), model_acc]:
            a.all_reduce(rank.group, device)
    for n in order:
        reports[n].output_error = acc[n].value()
    example = inputs[0] if inputs else None
    return acc[order[-1]].value(), (model_acc.value() if model_ok else float("nan")), example


def _bound(
    model: nn.Module,
    layers: Mapping[str, _Layer],
    order: Sequence[str],
    reports: Mapping[str, LayerReport],
    example: Any,
    bn_recalibrated: bool,
    sequential: bool,
) -> Tuple[float, float, str]:
    """The paper's bound (Frobenius, spectral) from the model's traced structure, or NaN and why not."""
    if bn_recalibrated:
        return (
            float("nan"),
            float("nan"),
            "bound not applicable: BatchNorm statistics were re-estimated after pruning (the bound assumes the "
            "dense network's BatchNorm; pass recalibrate_bn=False to get it)",
        )
    chain = _bounds.analyze_chain(model, list(order), example_input=example)
    if not chain.is_chain:
        return float("nan"), float("nan"), f"bound not applicable: {chain.reason}"
    _fill_norms(layers, order, reports, sequential)
    terms = [_bounds.LayerTerm(n, reports[n].d_term, reports[n].norm_frobenius, reports[n].norm_spectral) for n in order]
    fro, spec = _bounds.error_bound(terms, chain)
    return fro, spec, ""
