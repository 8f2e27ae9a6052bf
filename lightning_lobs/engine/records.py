"""The engine's records: what each stage hands the next, and the public reports.

A stage returns a new record instead of writing into one it was given, so each record is whole once built:
:class:`LayerPlan` (plan; the allocation gives a new one with its target), :class:`Calibration` (calibrate),
:class:`Solution` (solve), :class:`Measurement` (report's measuring), then :class:`LayerReport` and
:class:`PruneReport`, the public results (mutable dataclasses as before: their fields are public API).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor, nn

from ..masks import MaskSet

__all__ = ["Calibration", "LayerPlan", "LayerReport", "Measurement", "Plan", "PruneReport", "Solved", "Solution"]


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """One selected layer as the plan stage sees it: its module, method, target and shape facts."""

    name: str
    module: nn.Module
    method: str
    target: float
    """Fraction of the layer's weights to remove (the selection's, or the global allocation's)."""
    dense: Tensor
    """``(out, d)`` weight matrix, the bias column included, before this step."""
    perm: Tensor | None
    """Channel-last column permutation (N:M on a convolution), or None."""
    prior: Tensor | None
    """``(out, d_w)`` keep-mask of an earlier step, or None."""
    groups: int
    bias_column: bool

    @property
    def rows(self) -> int:
        return int(self.dense.shape[0])

    @property
    def cols(self) -> int:
        """Columns of :attr:`dense`, the bias column included."""
        return int(self.dense.shape[1])

    @property
    def weight_cols(self) -> int:
        """Columns without the bias column: the weights a row can lose."""
        return self.cols - int(self.bias_column)


@dataclass(frozen=True, eq=False)
class Plan:
    """The layers one prune will solve, in selection order, and the modules it leaves dense and why."""

    layers: Mapping[str, LayerPlan]
    explicit: frozenset[str]
    """Layers named exactly by the user (an error, not a warning, if the forward never calls one)."""
    skipped: Mapping[str, str]

    def with_targets(self, targets: Mapping[str, float]) -> Plan:
        """The plan with these layers' targets replaced (the global allocation's)."""
        layers = {n: replace(l, target=targets[n]) if n in targets else l for n, l in self.layers.items()}
        return replace(self, layers=layers)

    def without(self, dropped: Mapping[str, str]) -> Plan:
        """The plan without ``dropped`` (``name -> why``), which join :attr:`skipped`."""
        layers = {n: l for n, l in self.layers.items() if n not in dropped}
        return replace(self, layers=layers, skipped={**self.skipped, **dropped})


@dataclass(frozen=True, eq=False)
class Calibration:
    """What calibrating some layers gave: their normalised Hessians and the numbers the report needs."""

    hessians: Mapping[str, Tensor]
    """H divided by its mean diagonal (``scales``), per called layer."""
    positions: Mapping[str, float]
    """Output positions per sample (1 for a Linear on 2-d inputs)."""
    scales: Mapping[str, float]
    order: tuple[str, ...]
    """Every calibrated layer the forward called, in the order it first called them."""
    missing: tuple[str, ...]
    """Calibrated layers the forward never called (on any rank)."""


@dataclass(frozen=True, eq=False)
class Solution:
    """One layer's solve: the new ``(out, d)`` matrix, the keep-mask in the weight's layout, and its numbers."""

    matrix: Tensor
    mask: Tensor
    error: float
    """Layer error on the normalised Hessian (the report scales it back)."""
    damp: float
    seconds: float

    FLOATS = ("error", "damp", "seconds")  # what travels between ranks as floats


@dataclass(frozen=True, eq=False)
class Solved:
    """What a pipeline (one pass, or sequential) hands the commit: every solved layer, in solve order."""

    plan: Plan
    order: tuple[str, ...]
    solutions: Mapping[str, Solution]
    positions: Mapping[str, float]
    scales: Mapping[str, float]
    written: bool
    """Whether the pipeline already wrote the new weights into the model (the sequential one does, layer by layer)."""
    compared: Any = None
    """The block pipeline's pruned-vs-dense output errors, measured as it went (a ``report.Comparison``); None:
    the report measures them with a dense and a pruned forward per batch."""
    example: Any = None
    """With ``compared``: the model's positional input on the first batch (for the bound's shape analysis)."""


@dataclass(frozen=True, eq=False)
class Measurement:
    """Pruned-vs-dense output errors and the bound, measured after the commit."""

    output_errors: Mapping[str, float]
    output_error: float
    model_output_error: float
    norms: Mapping[str, tuple[float, float]]
    """(Frobenius, spectral) operator norm per layer, where the bound was computed."""
    bound: float
    bound_spectral: float
    bound_note: str


@dataclass
class LayerReport:
    """What pruning did to one layer."""

    name: str
    kind: str
    shape: tuple[int, ...]
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

    layers: dict[str, LayerReport]
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
    skipped: dict[str, str] = field(default_factory=dict)
    model_sparsity: float = float("nan")
    nonzero_parameters: int = 0
    total_parameters: int = 0
    empty_batches: int = 0
    """Calibration batches with no samples, left out."""

    def metrics(self, prefix: str = "lobs/") -> dict[str, float]:
        """Flat metric dict (``lobs/<layer>/layer_error``, ``lobs/sparsity``, ...); NaN values are left out."""
        out: dict[str, float] = {}
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
