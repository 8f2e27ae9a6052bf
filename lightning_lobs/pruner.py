"""The pruning engine shared by :func:`prune_model` and the :class:`LOBSPruning` callback.

One call prunes a model in place: choose layers, calibrate their Hessians on a few
batches, spread the sparsity over the layers (global allocation), solve each layer,
write the pruned weights, then measure the output error and the error bound. Everything
is validated before the first weight changes, and any failure restores the model's
weights and train/eval modes.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import bounds as _bounds
from .batchnorm import batchnorm_modules, batchnorm_state, load_batchnorm_state, recalibrate_batchnorm
from .allocation import allocate_layers
from .distributed import RankInfo, assign_layers, broadcast_floats, broadcast_tensors, fail_together
from .hessian import HessianCollector, has_bias, is_supported, num_groups, set_weight_matrix, weight_matrix
from .masks import MaskSet
from .resources import check_budget, layer_memory
from .solvers import (
    METHODS,
    GreedyTrace,
    NMPattern,
    SolverOptions,
    parse_pattern,
    solve_layer,
)

log = logging.getLogger(__name__)

_fail_together = fail_together  # the old private name, still used below

SparsitySpec = Union[float, Mapping[str, float], Callable[[str, nn.Module], Optional[float]]]
ForwardFn = Callable[[nn.Module, Any], Any]

ALL_METHODS = ("auto",) + METHODS
ALLOCATIONS = ("global", "uniform")
#: ``auto`` uses ``exact`` where rows * d^3 is at most this (a few seconds on 2 CPU cores), else ``fast``.
AUTO_EXACT_MAX_COST = 1e12


@dataclass(frozen=True)
class CalibrationOptions:
    """How layer-input Hessians are gathered.

    Attributes:
        hessian_dtype: accumulation precision of H (float64 keeps long sums exact).
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
        if self.hessian_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"hessian_dtype must be torch.float32 or torch.float64, got {self.hessian_dtype}.")
        if not isinstance(self.max_chunk_elements, int) or self.max_chunk_elements < 1:
            raise ValueError(f"max_chunk_elements must be a positive int, got {self.max_chunk_elements!r}.")
        if not isinstance(self.position_stride, int) or self.position_stride < 1:
            raise ValueError(f"position_stride must be a positive int, got {self.position_stride!r}.")
        if self.memory_budget_bytes is not None and (
            not isinstance(self.memory_budget_bytes, int) or self.memory_budget_bytes < 1
        ):
            raise ValueError(f"memory_budget_bytes must be a positive int or None, got {self.memory_budget_bytes!r}.")


@dataclass
class LayerReport:
    """What pruning did to one layer."""

    name: str
    kind: str
    shape: Tuple[int, ...]
    method: str
    target_sparsity: float
    sparsity: float
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
    output_error: float = float("nan")
    """Measured RMS (per sample) error of this layer's output, pruned vs dense network."""


@dataclass
class PruneReport:
    """Per-layer numbers and whole-network errors of one pruning step."""

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
    """How per-layer sparsities were set: "global" (chosen from pooled OBS costs), "uniform" (one float or an
    N:M pattern for every layer) or "per-layer" (a mapping or callable)."""

    def metrics(self, prefix: str = "lobs/") -> Dict[str, float]:
        """Flat metric dict: ``lobs/<layer>/layer_error``, ``lobs/<layer>/sparsity``, ``lobs/bound``..."""
        out: Dict[str, float] = {}
        for name, layer in self.layers.items():
            out[f"{prefix}{name}/layer_error"] = layer.layer_error
            out[f"{prefix}{name}/sparsity"] = layer.sparsity
            if not math.isnan(layer.output_error):
                out[f"{prefix}{name}/output_error"] = layer.output_error
        out[f"{prefix}sparsity"] = self.sparsity
        out[f"{prefix}bound"] = self.bound
        out[f"{prefix}bound_spectral"] = self.bound_spectral
        out[f"{prefix}output_error"] = self.output_error
        if not math.isnan(self.model_output_error):
            out[f"{prefix}model_output_error"] = self.model_output_error
        return out

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
            f"total sparsity {self.sparsity:.4f} ({self.allocation}) | output error {self.output_error:.4g} | bound (Frobenius) "
            f"{self.bound:.4g} | bound (spectral) {self.bound_spectral:.4g}"
            + (f" | {self.bound_note}" if self.bound_note else "")
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------- layer selection


def _check_fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) < 1.0):
        raise ValueError(f"{what} must be a float in [0, 1), got {value!r}.")
    return float(value)


def validate_sparsity(sparsity: SparsitySpec, what: str = "sparsity") -> None:
    """Check a sparsity spec's form (values of a mapping too) without a model."""
    if callable(sparsity) and not isinstance(sparsity, Mapping):
        return
    if isinstance(sparsity, Mapping):
        if not sparsity:
            raise ValueError(f"{what} mapping is empty; give at least one 'pattern': fraction entry.")
        for key, value in sparsity.items():
            if not isinstance(key, str):
                raise ValueError(f"{what} mapping keys must be module-name patterns (str), got {key!r}.")
            _check_fraction(value, f"{what}[{key!r}]")
        return
    _check_fraction(sparsity, what)


def _supported_msg(name: str, module: nn.Module) -> str:
    return (
        f"module '{name}' ({type(module).__name__}) cannot be pruned: only nn.Linear and nn.Conv1d/2d/3d are "
        "supported; remove it from the sparsity mapping or narrow the pattern."
    )


def select_layers(
    model: nn.Module,
    sparsity: SparsitySpec,
    exclude: Sequence[str] = (),
    pattern: Optional[NMPattern] = None,
) -> Dict[str, float]:
    """Resolve a sparsity spec to ``{qualified name: target sparsity}`` for the layers to prune.

    ``sparsity`` is a float for every Linear/ConvNd, a mapping from fnmatch patterns on
    qualified module names to floats (first matching pattern wins; unmatched layers are
    left alone), or a callable ``(name, module) -> float | None``. ``exclude`` patterns
    remove layers. Patterns that match nothing, and unsupported modules named in a
    mapping, are errors. Layers with a 0 target are skipped.
    """
    validate_sparsity(sparsity)
    named = [(n, m) for n, m in model.named_modules() if n]
    if isinstance(exclude, str):
        exclude = (exclude,)
    for pat in exclude:
        if not any(fnmatch.fnmatchcase(n, pat) for n, _ in named):
            raise ValueError(f"exclude pattern {pat!r} matches no module; module names look like {_example_names(named)}.")
    excluded = {n for n, _ in named if any(fnmatch.fnmatchcase(n, p) for p in exclude)}
    chosen: Dict[str, float] = {}
    explicit: set = set()
    if isinstance(sparsity, Mapping):
        for pat, value in sparsity.items():
            hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise ValueError(
                    f"sparsity pattern {pat!r} matches no module; module names look like {_example_names(named)}."
                )
            supported = [(n, m) for n, m in hits if is_supported(m)]
            if not supported:
                n, m = hits[0]
                raise ValueError(_supported_msg(n, m))
            if not any(ch in pat for ch in "*?["):
                explicit.add(pat)
            for n, _ in supported:
                if n not in chosen:
                    chosen[n] = float(value)
    elif callable(sparsity):
        for n, m in named:
            if not is_supported(m):
                continue
            value = sparsity(n, m)
            if value is not None:
                chosen[n] = _check_fraction(value, f"sparsity({n!r})")
    else:
        value = float(sparsity)
        chosen = {n: value for n, m in named if is_supported(m)}
    modules = dict(named)
    result: Dict[str, float] = {}
    for n, value in chosen.items():
        if n in excluded or value == 0.0:
            continue
        if pattern is not None:
            reason = _pattern_problem(modules[n], pattern)
            if reason:
                if n in explicit:
                    raise ValueError(f"layer '{n}' cannot hold pattern '{pattern}': {reason}.")
                warnings.warn(f"skipping layer '{n}': {reason} for pattern '{pattern}'.", UserWarning, stacklevel=3)
                continue
            value = pattern.sparsity
        result[n] = value
    if not result:
        raise ValueError(
            "no layer selected for pruning: the model has no nn.Linear/nn.Conv layer matching the sparsity spec "
            "(or all were excluded)."
        )
    return result


def _example_names(named: Sequence[Tuple[str, nn.Module]]) -> str:
    names = [n for n, m in named if is_supported(m)][:4] or [n for n, _ in named][:4]
    return ", ".join(repr(n) for n in names) or "(none)"


def _pattern_problem(module: nn.Module, pattern: NMPattern) -> str:
    if isinstance(module, nn.Linear):
        cols = module.in_features
    else:
        cols = module.in_channels // module.groups
    if cols % pattern.m:
        return f"its {cols} input channels are not a multiple of {pattern.m}"
    return ""


def _channel_last_perm(module: nn.Module) -> Optional[Tensor]:
    """Column permutation putting conv input channels innermost, so N:M groups run along channels."""
    if isinstance(module, nn.Linear):
        return None
    k = int(math.prod(module.kernel_size))
    if k == 1:
        return None
    c = module.in_channels // module.groups
    return torch.arange(c * k).reshape(c, k).t().reshape(-1)


# --------------------------------------------------------------------------- batches


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Feed one batch to the model: a tensor as is, the first item of a tuple/list, or a dict's input entry."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)) and batch:
        return model(batch[0])
    if isinstance(batch, Mapping):
        for key in ("x", "input", "inputs", "image", "images", "pixel_values", "input_ids"):
            if key in batch:
                return model(batch[key])
    raise TypeError(
        f"cannot tell the model input in a batch of type {type(batch).__name__}; pass "
        "forward_fn=lambda model, batch: model(...) to say how to run the model on a batch."
    )


def _move(batch: Any, device: torch.device) -> Any:
    from lightning_fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, device)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd and a forked RNG (so the training shuffle is untouched); modes restored after."""
    modes = {m: m.training for m in model.modules()}
    device = _model_device(model)
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


# --------------------------------------------------------------------------- the engine


@dataclass
class _Layer:
    name: str
    module: nn.Module
    target: float
    method: str
    perm: Optional[Tensor]
    dense: Tensor  # weight matrix (incl. bias column) before this step
    trace: Optional[GreedyTrace] = None  # exact's greedy sequence, when global allocation computed it


def validate_allocation(allocation: Any) -> str:
    if allocation not in ALLOCATIONS:
        raise ValueError(
            f"allocation must be one of {ALLOCATIONS}, got {allocation!r}: 'global' picks per-layer sparsities from "
            "pooled OBS costs, 'uniform' prunes every layer to the same sparsity."
        )
    return allocation


def _uses_global(allocation: str, sparsity: SparsitySpec, nm: Optional[NMPattern]) -> bool:
    """Global allocation applies to one float sparsity; a mapping, callable or N:M pattern fixes each layer's own."""
    return allocation == "global" and nm is None and isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool)


def _resolve_method(method: str, module: nn.Module) -> str:
    if method != "auto":
        return method
    rows = module.weight.shape[0] // num_groups(module)
    d = weight_matrix(module).shape[1]
    return "exact" if rows * d**3 <= AUTO_EXACT_MAX_COST else "fast"


def _solve_cost(layer: "_Layer") -> float:
    rows, d = layer.dense.shape
    g = num_groups(layer.module)
    if layer.method == "exact":
        return float(rows) * d**3
    return float(g) * d**3 + float(rows) * d**2


def prune(
    model: nn.Module,
    batches: Sequence[Any],
    sparsity: SparsitySpec,
    method: str = "auto",
    *,
    pattern: Union[str, NMPattern, None] = None,
    exclude: Sequence[str] = (),
    sequential: bool = False,
    solver: Optional[SolverOptions] = None,
    calibration: Optional[CalibrationOptions] = None,
    forward_fn: Optional[ForwardFn] = None,
    masks: Optional[MaskSet] = None,
    recalibrate_bn: bool = True,
    rank: Optional[RankInfo] = None,
    allocation: str = "global",
) -> PruneReport:
    """Prune ``model`` in place with OBS on the given calibration ``batches``.

    ``allocation="global"`` (with one float ``sparsity`` and no N:M pattern) chooses each
    layer's sparsity so that ``sparsity`` of all selected weights go where the removal
    costs, relative to each layer's output energy, are smallest (greedy-trace costs for
    ``exact`` layers, whose solves then reuse the trace; one-pass ``L_q`` for the others);
    ``"uniform"`` prunes every layer to ``sparsity``. A per-layer mapping, a callable or a
    pattern fixes the per-layer sparsities and ignores ``allocation``.

    ``masks`` (optional) holds masks of an earlier step: those weights stay pruned and
    the new masks are written into it. ``recalibrate_bn`` re-estimates BatchNorm running
    statistics on the batches after pruning. With ``rank`` in a torch.distributed group,
    each rank calibrates on its own batches, Hessians and sample counts are summed across
    ranks, the layer solves are spread over the ranks and their results broadcast, so all
    ranks end with identical weights and masks.
    """
    if method not in ALL_METHODS:
        raise ValueError(f"method must be one of {ALL_METHODS}, got {method!r}.")
    validate_allocation(allocation)
    nm = parse_pattern(pattern)
    solver = solver or SolverOptions()
    calibration = calibration or CalibrationOptions()
    forward_fn = forward_fn or default_forward
    rank = rank or RankInfo()
    if len(batches) < 1:
        raise ValueError("no calibration batches: the dataloader is empty or calibration_batches < 1.")
    targets = select_layers(model, sparsity, exclude, nm)
    global_alloc = _uses_global(allocation, sparsity, nm)
    modules = dict(model.named_modules())
    masks = masks if masks is not None else MaskSet()
    device = _model_device(model)
    layers = {
        n: _Layer(
            n,
            modules[n],
            t,
            _resolve_method(method, modules[n]),
            _channel_last_perm(modules[n]) if nm else None,
            weight_matrix(modules[n]),
        )
        for n, t in targets.items()
    }
    estimates = {
        n: layer_memory(
            n, l.module, l.method, calibration.hessian_dtype, solver.dtype, solver.max_memory_bytes, solver.refit is not False
        )
        for n, l in layers.items()
    }
    with _fail_together(rank, device, "the memory check"):  # free memory differs between ranks
        check_budget(estimates, calibration.memory_budget_bytes, sequential, device)
    _broadcast_buffers(model, rank)

    snapshot = _param_state({n: modules[n] for n in layers})
    bn_dense = batchnorm_state(model)

    def restore() -> None:
        _load_params(modules, snapshot)
        load_batchnorm_state(model, bn_dense)

    reports: Dict[str, Dict[str, Any]] = {}
    new_masks: Dict[str, Tensor] = {}
    t_cal = t_solve = 0.0
    order: List[str] = []
    run = lambda batch: forward_fn(model, _move(batch, device))  # noqa: E731
    try:
        with _eval_no_grad(model):
            hessians: Dict[str, Tensor] = {}
            positions: Dict[str, float] = {}
            if not sequential:
                t0 = time.perf_counter()
                hessians, positions, order = _calibrate(model, batches, {n: l.module for n, l in layers.items()}, calibration, run, rank)
                t_cal += time.perf_counter() - t0
                owners = assign_layers({n: _solve_cost(layers[n]) for n in order}, rank.world_size)
                if global_alloc:
                    t0 = time.perf_counter()
                    allocate_layers(layers, order, float(sparsity), hessians.__getitem__, solver, masks, owners, rank, device, True)
                    t_solve += time.perf_counter() - t0
            else:
                order = _execution_order(model, batches[0], {n: l.module for n, l in layers.items()}, run)
                owners = {n: i % rank.world_size for i, n in enumerate(order)}
                if global_alloc:
                    # The costs come from the dense network, one layer's H at a time (sequential keeps
                    # only one H in memory); the solves below then see the already pruned layers, so
                    # the dense traces are not reused for them.
                    def dense_hessian(n: str) -> Tensor:
                        h, _, _ = _calibrate(model, batches, {n: layers[n].module}, calibration, run, rank)
                        return h[n]

                    t0 = time.perf_counter()
                    allocate_layers(layers, order, float(sparsity), dense_hessian, solver, masks, owners, rank, device, False)
                    t_cal += time.perf_counter() - t0
            with _fail_together(rank, device, "solving the layers", active=not sequential):
                for n in order:
                    layer = layers[n]
                    if sequential:
                        t0 = time.perf_counter()
                        h, s, _ = _calibrate(model, batches, {n: layer.module}, calibration, run, rank)
                        hessians[n], positions[n] = h[n], s[n]
                        t_cal += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    with _fail_together(rank, device, f"solving layer '{n}'", active=sequential):
                        if owners[n] == rank.rank:
                            rep, mask = _solve_one(layer, hessians[n], positions[n], nm, solver, masks.get(n))
                            rep["seconds"] = time.perf_counter() - t0
                        else:
                            rep = _placeholder(layer, positions[n])
                            mask = torch.ones_like(layer.module.weight, dtype=torch.bool)
                    if sequential:
                        rep, mask = _share(rep, mask, owners[n], rank, device)
                        set_weight_matrix(layer.module, rep.pop("matrix"))
                    t_solve += time.perf_counter() - t0
                    reports[n] = rep
                    new_masks[n] = mask
            if not sequential:
                t0 = time.perf_counter()
                for n in order:
                    reports[n], new_masks[n] = _share(reports[n], new_masks[n], owners[n], rank, device)
                t_solve += time.perf_counter() - t0
                # Weights are written only once every solve succeeded, so a failure leaves no trace.
                for n in order:
                    set_weight_matrix(layers[n].module, reports[n].pop("matrix"))
            with torch.no_grad():
                for n in order:
                    layers[n].module.weight.masked_fill_(~new_masks[n].to(layers[n].module.weight.device), 0.0)
        bn_recalibrated = bool(recalibrate_bn and recalibrate_batchnorm(model, batches, run))
        if bn_recalibrated:
            _all_reduce_batchnorm(model, rank)
        # Measuring runs forward_fn again: a failure there must also leave the model (and masks) as they were.
        layer_reports = _finish_reports(layers, reports, order)
        out_err, model_err, example = _measure(model, batches, layers, order, snapshot, bn_dense, layer_reports, run, rank)
        bound, bound_spec, note = _bound(model, layers, order, layer_reports, example, bn_recalibrated, sequential)
    except BaseException:
        restore()
        raise

    masks.update(new_masks)
    total = sum(int(new_masks[n].numel()) for n in order)
    pruned = sum(int((~new_masks[n]).sum()) for n in order)
    return PruneReport(
        layers=layer_reports,
        sparsity=pruned / max(total, 1),
        bound=bound,
        bound_spectral=bound_spec,
        bound_note=note,
        output_error=out_err,
        model_output_error=model_err,
        calibration_seconds=t_cal,
        solve_seconds=t_solve,
        masks=masks,
        sequential=sequential,
        allocation="global" if global_alloc else ("per-layer" if isinstance(sparsity, Mapping) or callable(sparsity) else "uniform"),
    )


def _param_state(modules: Mapping[str, nn.Module]) -> Dict[str, Tuple[Tensor, Optional[Tensor]]]:
    """Copies of each module's weight and bias, for :func:`_load_params`."""
    return {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone()) for n, m in modules.items()}


def _load_params(modules: Mapping[str, nn.Module], state: Mapping[str, Tuple[Tensor, Optional[Tensor]]]) -> None:
    with torch.no_grad():
        for n, (w, b) in state.items():
            modules[n].weight.copy_(w)
            if b is not None:
                modules[n].bias.copy_(b)


_SHARED_FLOATS = ("sparsity", "layer_error", "d_term", "damp", "seconds")


def _placeholder(layer: "_Layer", positions: float) -> Dict[str, Any]:
    """A report for a layer another rank solves; filled in by :func:`_share`."""
    return {
        "name": layer.name,
        "kind": type(layer.module).__name__,
        "shape": tuple(layer.module.weight.shape),
        "method": layer.method,
        "target_sparsity": layer.target,
        "positions": positions,
        "matrix": torch.zeros_like(layer.dense),
        **{k: 0.0 for k in _SHARED_FLOATS},
    }


def _share(rep: Dict[str, Any], mask: Tensor, owner: int, rank: RankInfo, device: torch.device) -> Tuple[Dict[str, Any], Tensor]:
    """Broadcast one layer's solve from its owner rank (no-op in a single process)."""
    if not rank.active:
        return rep, mask
    matrix, mask = broadcast_tensors([rep["matrix"].to(device), mask.to(device)], owner, rank)
    values = broadcast_floats([float(rep[k]) for k in _SHARED_FLOATS], owner, rank, device)
    rep = dict(rep, matrix=matrix, **dict(zip(_SHARED_FLOATS, values)))
    return rep, mask


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
) -> Tuple[Dict[str, Tensor], Dict[str, float], List[str]]:
    """Stream H for ``modules`` over ``batches`` (summed over ranks); also samples per layer and call order."""
    samples = {n: 0 for n in modules}
    order: List[str] = []
    handles = []

    def make_hook(name: str):  # noqa: ANN202 - closure
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            samples[name] += x.shape[0] if x.dim() > (1 if isinstance(module, nn.Linear) else module.weight.dim() - 1) else 1
            if name not in order:
                order.append(name)

        return hook

    collector = HessianCollector(
        modules,
        dtype=options.hessian_dtype,
        max_chunk_elements=options.max_chunk_elements,
        position_stride=options.position_stride,
    )
    with _fail_together(rank, _model_device(model), "calibration"):  # before the all-reduces below
        try:
            for n, m in modules.items():
                handles.append(m.register_forward_pre_hook(make_hook(n), with_kwargs=True))
            with collector:
                for batch in batches:
                    run(batch)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in modules if samples[n] == 0]
        if missing:
            raise RuntimeError(
                f"layers {missing} were never called during calibration, so they have no Hessian; exclude them "
                "or check forward_fn."
            )
    if rank.active:
        collector.reduce(rank.group)
        counts = torch.tensor([float(samples[n]) for n in modules], dtype=torch.float64, device=_model_device(model))
        torch.distributed.all_reduce(counts, group=rank.group)
        samples = dict(zip(modules, counts.tolist()))
    hessians = collector.hessians()
    rows = {n: collector.accumulators[n].count for n in modules}
    positions = {n: rows[n] / samples[n] for n in modules}
    return hessians, positions, order


def _execution_order(model: nn.Module, batch: Any, modules: Mapping[str, nn.Module], run: Callable[[Any], Any]) -> List[str]:
    order: List[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None) for n, m in modules.items()]
    try:
        run(batch)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if n not in order]
    if missing:
        raise RuntimeError(f"layers {missing} are never called by the model's forward; exclude them or check forward_fn.")
    return order


def _solve_one(
    layer: _Layer,
    hessian: Tensor,
    positions: float,
    nm: Optional[NMPattern],
    solver: SolverOptions,
    prior: Optional[Tensor],
) -> Tuple[Dict[str, Any], Tensor]:
    module = layer.module
    W = weight_matrix(module)
    bias_col = has_bias(module)
    weight, bias = (W[:, :-1], W[:, -1]) if bias_col else (W, None)
    H = hessian.to(W.device)
    prior2 = None if prior is None else prior.reshape(weight.shape[0], -1).to(W.device)
    perm = layer.perm
    if perm is not None:
        perm = perm.to(W.device)
        full = torch.cat([perm, torch.tensor([weight.shape[1]], device=W.device)]) if bias_col else perm
        weight = weight[:, perm]
        H = H[:, full][:, :, full]
        if prior2 is not None:
            prior2 = prior2[:, perm]
    trace = layer.trace if perm is None else None  # traces are computed on the unpermuted columns
    res = solve_layer(
        weight, H, None if nm else layer.target, layer.method, bias=bias, pattern=nm, options=solver, prior_mask=prior2, trace=trace
    )
    layer.trace = None  # one use; frees the memory
    new_w, mask2 = res.weight, res.mask
    if perm is not None:
        inv = torch.argsort(perm)
        new_w, mask2 = new_w[:, inv], mask2[:, inv]
    matrix = torch.cat([new_w, res.bias.unsqueeze(1)], dim=1) if bias_col else new_w
    mask = mask2.reshape(module.weight.shape)
    report = {
        "name": layer.name,
        "kind": type(module).__name__,
        "shape": tuple(module.weight.shape),
        "method": layer.method,
        "target_sparsity": layer.target,
        "sparsity": 1.0 - mask.float().mean().item(),
        "layer_error": res.error,
        "d_term": math.sqrt(max(0.0, 2.0 * res.error * positions)),
        "damp": res.damp,
        "positions": positions,
        "matrix": matrix,
    }
    if res.damp > solver.damp:
        log.warning("layer %s needed relative damping %.3g (asked %.3g)", layer.name, res.damp, solver.damp)
    return report, mask


def _finish_reports(layers: Mapping[str, _Layer], reports: Mapping[str, Any], order: Sequence[str]) -> Dict[str, LayerReport]:
    """Reports without the weight norms: those are computed only where the bound applies (SVDs are costly)."""
    out: Dict[str, LayerReport] = {}
    for n in order:
        rep = dict(reports[n])
        rep.pop("matrix", None)
        out[n] = LayerReport(norm_frobenius=float("nan"), norm_spectral=float("nan"), **rep)
    return out


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
) -> Tuple[float, float, Any]:
    """RMS per-sample output errors (every pruned layer and the model output), pruned vs dense.

    Dense and pruned weights (and BatchNorm statistics) are swapped in batch by batch, so
    only one batch of layer outputs is held at a time. Errors are summed over ranks. Also
    returns the model's positional input for the first batch (for the bound's shape analysis).
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
    captured: Dict[str, Tensor] = {}
    handles = [
        modules[n].register_forward_hook(lambda mod, args, out, n=n: captured.__setitem__(n, out.detach()))
        for n in order
    ]
    inputs: List[Any] = []

    def keep_first_input(mod: nn.Module, args: tuple) -> None:
        if not inputs and len(args) == 1:
            inputs.append(args[0])

    handles.append(model.register_forward_pre_hook(keep_first_input))
    device = _model_device(model)
    try:
        with _eval_no_grad(model):
            for batch in batches:
                load_dense()
                captured.clear()
                dense_out = run(batch)
                dense_layers = dict(captured)
                load_pruned()
                captured.clear()
                out = run(batch)
                for n in order:
                    acc[n].add(dense_layers[n], captured[n])
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
