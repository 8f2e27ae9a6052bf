"""The layer adapter: the one place that knows what a prunable layer is and how its weight reads as a matrix.

Every other module asks here about ``nn.Linear``, ``nn.Conv1d/2d/3d`` (groups, kernel, padding),
``transformers``' ``Conv1D`` (GPT-2's Linear with a transposed weight) and the ``nn.MultiheadAttention``
stand-ins of :mod:`lightning_lobs.attention` (each projection an ``nn.Linear``).

Names used throughout the package:

``rows``
    output features or channels: the rows of the layer's matrix.
``weight_cols``
    columns of the weight alone: ``in_features``, or ``C_in/groups * prod(kernel)`` for a convolution
    (ordered as ``weight.reshape(out, -1)``: channel, then kernel positions).
``matrix_cols``
    columns of the matrix the solvers see: ``weight_cols`` plus one when the layer has a bias.
the matrix
    ``rows x matrix_cols``: the weight's rows with the bias appended as the last column.

Two sets of layer types, deliberately different:

*prunable* (:func:`is_prunable`): a Hessian can be collected from its input and a solve written back:
``nn.Linear`` (attention projections included), ``nn.Conv1d/2d/3d``, ``transformers`` ``Conv1D``.

*maskable* (:data:`MASKABLE_TYPES`): what :meth:`MaskSet.from_model` masks by default and what the
export counts as a prunable weight: ``nn.Linear`` and every ``_ConvNd``, so ``ConvTranspose`` too (a mask
needs only a weight tensor, not a solve; a model pruned elsewhere keeps its transposed convs' zeros), but
not ``transformers`` ``Conv1D`` (the default set predates it; widening it would change saved mask sets).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from .attention import AttentionProjection
from .config import NMPattern
from .sharding import gather, is_sharded, local, write_full

__all__ = [
    "PRUNABLE_TYPES",
    "MASKABLE_TYPES",
    "LayerShape",
    "describe_layer",
    "is_hf_conv1d",
    "is_linear_like",
    "is_conv",
    "is_prunable",
    "is_maskable",
    "has_bias",
    "num_groups",
    "output_rows",
    "weight_cols",
    "matrix_cols",
    "to_rows",
    "from_rows",
    "weight_matrix",
    "set_weight_matrix",
    "conv_padding",
    "unfold_input",
    "channel_last_perm",
    "pattern_problem",
    "solve_cost",
    "weight_refusal",
    "why_not_prunable",
]

#: torch classes of prunable layers (``transformers`` ``Conv1D`` is recognised by :func:`is_hf_conv1d`).
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Classes whose weights masks cover by default: see the module docstring for why they differ from the prunable ones.
MASKABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, _ConvNd)

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


# --------------------------------------------------------------------------- #
# What a layer is
# --------------------------------------------------------------------------- #
def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` ``Conv1D`` (GPT-2's Linear with a transposed weight).

    Recognised by class, without importing ``transformers`` (an optional dependency that is
    slow to import): ``y = x @ W + b`` with ``W`` of shape ``(in, out)``.
    """
    weight = getattr(module, "weight", None)
    return (
        any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") for cls in type(module).__mro__)
        and isinstance(weight, Tensor)
        and weight.dim() == 2
    )


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or a ``transformers`` ``Conv1D``: one input row per sample (or token)."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def is_conv(module: nn.Module) -> bool:
    """A forward (not transposed) convolution: any ``_ConvNd`` with ``transposed`` False, which in torch means
    ``nn.Conv1d/2d/3d`` and their subclasses (the lazy ones included)."""
    return isinstance(module, _ConvNd) and not module.transposed


def is_prunable(module: nn.Module) -> bool:
    """Whether ``module`` is a layer whose input Hessian can be collected (Linear, Conv1d/2d/3d, HF Conv1D)."""
    return isinstance(module, PRUNABLE_TYPES) or is_hf_conv1d(module)


def is_maskable(module: nn.Module) -> bool:
    """Whether :meth:`MaskSet.from_model` masks ``module``'s weight by default (Linear and every ConvNd)."""
    return isinstance(module, MASKABLE_TYPES)


def _weight(module: nn.Module) -> Tensor:
    # nn.Module types its attributes as Tensor | Module; a layer's weight is a tensor (checked by the callers)
    return cast(Tensor, module.weight)


def _check_prunable(module: nn.Module) -> None:
    if not is_prunable(module):
        raise TypeError(
            f"unsupported layer type {type(module).__name__}; supported: "
            + ", ".join(t.__name__ for t in PRUNABLE_TYPES)
            + ", transformers Conv1D"
        )


def has_bias(module: nn.Module) -> bool:
    """Whether the layer has a bias (and hence a bias column in its matrix)."""
    return getattr(module, "bias", None) is not None


@dataclass(frozen=True)
class LayerShape:
    """A prunable layer's matrix geometry (see the module docstring for the names)."""

    rows: int
    weight_cols: int
    bias: bool
    groups: int
    #: kernel size of a convolution, ``()`` for a Linear-like layer
    kernel: tuple[int, ...]

    @property
    def matrix_cols(self) -> int:
        """Columns of the matrix: ``weight_cols`` plus the bias column when there is one."""
        return self.weight_cols + (1 if self.bias else 0)

    @property
    def channels(self) -> int:
        """Input channels (features) per group: the columns an N:M pattern runs along."""
        return self.weight_cols // math.prod(self.kernel)


def describe_layer(module: nn.Module) -> LayerShape:
    """The matrix geometry of a prunable layer; ``TypeError`` for any other module."""
    _check_prunable(module)
    w = _weight(module)
    if is_hf_conv1d(module):
        return LayerShape(int(w.shape[1]), int(w.shape[0]), has_bias(module), 1, ())
    cols = int(w[0].numel()) if w.shape[0] > 0 else int(math.prod(w.shape[1:]))
    if is_conv(module):
        conv = cast(_ConvNd, module)
        kernel = tuple(int(k) for k in conv.kernel_size)
        return LayerShape(int(w.shape[0]), cols, has_bias(module), int(conv.groups), kernel)
    return LayerShape(int(w.shape[0]), cols, has_bias(module), 1, ())


def num_groups(module: nn.Module) -> int:
    """Number of independent Hessians of the layer: ``groups`` for convs, 1 for Linear."""
    return describe_layer(module).groups


def output_rows(module: nn.Module) -> int:
    """Rows of the layer's matrix (output features or channels)."""
    return describe_layer(module).rows


def weight_cols(module: nn.Module) -> int:
    """Columns of the layer's weight, without the bias column."""
    return describe_layer(module).weight_cols


def matrix_cols(module: nn.Module) -> int:
    """Columns of the layer's matrix, the bias column included."""
    return describe_layer(module).matrix_cols


# --------------------------------------------------------------------------- #
# The weight as a matrix and back
# --------------------------------------------------------------------------- #
def to_rows(module: nn.Module, tensor: Tensor) -> Tensor:
    """A tensor in the layout of ``module.weight`` (a mask, say) as ``(rows, weight_cols)``."""
    return tensor.t() if is_hf_conv1d(module) else tensor.reshape(tensor.shape[0], -1)


def from_rows(module: nn.Module, rows: Tensor) -> Tensor:
    """Inverse of :func:`to_rows`: ``(rows, weight_cols)`` in the layout of ``module.weight``."""
    return rows.t() if is_hf_conv1d(module) else rows.reshape(_weight(module).shape)


def weight_matrix(module: nn.Module) -> Tensor:
    """Detached copy of the layer's matrix: ``(rows, matrix_cols)``, the bias as last column if present.

    A weight sharded by ``fully_shard`` (a ``DTensor``) is gathered whole: a collective, so every rank must call
    this for the same layers in the same order.
    """
    _check_prunable(module)
    mat = to_rows(module, gather(_weight(module).detach()))
    if has_bias(module):
        bias = gather(cast(Tensor, module.bias).detach())
        mat = torch.cat([mat, bias.reshape(-1, 1).to(mat.dtype)], dim=1)
    return mat.clone()


def set_weight_matrix(module: nn.Module, matrix: Tensor) -> None:
    """Write a ``(rows, matrix_cols)`` matrix (layout of :func:`weight_matrix`) back into the layer in place.

    A sharded weight (``DTensor``) gets its own slice of a whole ``matrix``; a ``matrix`` that is itself a
    ``DTensor`` sharded by rows as the weight and bias are (a Linear or convolution under ``fully_shard``) is
    written shard to shard, any other sharded ``matrix`` is gathered first (a collective).
    """
    shape = describe_layer(module)
    w = _weight(module)
    k = shape.weight_cols
    if tuple(matrix.shape) != (shape.rows, shape.matrix_cols):
        raise ValueError(
            f"expected a matrix of shape {(shape.rows, shape.matrix_cols)} for {type(module).__name__}, "
            f"got {tuple(matrix.shape)}"
        )
    bias = cast(Tensor, module.bias) if shape.bias else None
    if is_sharded(matrix) and _rows_aligned(module, matrix):
        with torch.no_grad():
            rows = local(matrix)
            local(w).copy_(rows[:, :k].reshape(local(w).shape))
            if bias is not None:
                local(bias).copy_(rows[:, k])
        return
    matrix = gather(matrix)
    write_full(w, from_rows(module, matrix[:, :k]))
    if bias is not None:
        write_full(bias, matrix[:, k])


def _rows_aligned(module: nn.Module, matrix: Tensor) -> bool:
    """Whether each rank's rows of a sharded ``matrix`` are exactly the rows of its weight (and bias) shard."""
    tensors = [_weight(module)] + ([cast(Tensor, module.bias)] if has_bias(module) else [])
    placements = matrix.placements  # type: ignore[attr-defined]
    return (
        not is_hf_conv1d(module)  # its weight's dim 0 is the input, not the rows
        and all(p.is_replicate() or (p.is_shard() and p.dim == 0) for p in placements)
        and all(
            is_sharded(t) and t.device_mesh == matrix.device_mesh and t.placements == placements  # type: ignore[attr-defined]
            for t in tensors
        )
    )


# --------------------------------------------------------------------------- #
# The input as rows the weight multiplies (convolution patches)
# --------------------------------------------------------------------------- #
def conv_padding(module: _ConvNd, spatial: int) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim, exactly as PyTorch applies it."""
    ks, dil = module.kernel_size, module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [(0, 0)] * spatial
        if module.padding == "same":
            pads = []
            for k, dl in zip(ks, dil):
                total = dl * (k - 1)
                left = total // 2
                pads.append((left, total - left))
            return pads
        raise ValueError(f"unknown padding string {module.padding!r}")
    return [(int(p), int(p)) for p in module.padding]


def batched_conv_input(module: _ConvNd, x: Tensor) -> Tensor:
    """A conv input as ``(B, C, S...)`` (an unbatched one gains the batch dim), checked against the layer."""
    spatial = len(module.kernel_size)
    if x.dim() == spatial + 1:  # unbatched (C, L...)
        x = x.unsqueeze(0)
    if x.dim() != spatial + 2:
        raise ValueError(
            f"{type(module).__name__} expects a {spatial + 1}-d or {spatial + 2}-d input, got shape {tuple(x.shape)}"
        )
    if x.shape[1] != module.in_channels:
        raise ValueError(f"{type(module).__name__} expects {module.in_channels} input channels, got {x.shape[1]}")
    return x


def pad_input(module: _ConvNd, x: Tensor) -> Tensor:
    """Pad a batched input ``(B, C, S...)`` with the layer's padding and padding mode."""
    spatial = x.dim() - 2
    pads = conv_padding(module, spatial)
    if all(p == (0, 0) for p in pads):
        return x
    flat: list[int] = []
    for left, right in reversed(pads):  # F.pad wants the last dim first
        flat += [left, right]
    mode = _PAD_MODES[module.padding_mode]
    if mode == "constant":
        return F.pad(x, flat, mode="constant", value=0.0)
    return F.pad(x, flat, mode=mode)


def patch_view(module: _ConvNd, xp: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Strided view ``(B, O1..ON, G, C/G, K1..KN)`` of patches of an already padded input, and ``(O1..ON)``."""
    spatial = xp.dim() - 2
    u = xp
    for i, (k, s, dl) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        span = (k - 1) * dl + 1
        if u.shape[2 + i] < span:
            raise ValueError(
                f"input spatial size {u.shape[2 + i]} (after padding) is smaller than the kernel span {span}"
            )
        u = u.unfold(2 + i, span, s)
        if dl > 1:
            u = u[..., ::dl]
    # u: (B, C, O1..ON, K1..KN)
    out_shape = tuple(u.shape[2 : 2 + spatial])
    g = module.groups
    u = u.unflatten(1, (g, module.in_channels // g))  # (B, G, Cg, O..., K...)
    perm = [0] + list(range(3, 3 + spatial)) + [1, 2] + list(range(3 + spatial, 3 + 2 * spatial))
    return u.permute(perm), out_shape


def unfold_input(module: nn.Module, x: Tensor) -> Tensor:
    """Rows ``(n_rows, groups, weight_cols)`` the layer weight multiplies (not bias-augmented).

    ``weight_cols`` is ``in_features`` for Linear (``groups == 1``) and ``C_in/groups * prod(kernel)``
    for convolutions, with columns ordered as ``weight.reshape(out, -1)``.  Conv rows are
    ordered ``(sample, output position)`` with positions in row-major order, so
    ``unfold_input(m, x)[:, j] @ W_j.T + b_j`` reproduces the output of group ``j``.
    """
    k = weight_cols(module)
    if is_linear_like(module):
        if x.shape[-1] != k:
            raise ValueError(f"{type(module).__name__} expects last dim {k}, got shape {tuple(x.shape)}")
        return x.reshape(-1, 1, k)
    conv = cast(_ConvNd, module)
    xb = pad_input(conv, batched_conv_input(conv, x))
    view, out_shape = patch_view(conv, xb)
    n = xb.shape[0] * math.prod(out_shape)
    return view.reshape(n, conv.groups, -1)


# --------------------------------------------------------------------------- #
# Patterns and cost
# --------------------------------------------------------------------------- #
def channel_last_perm(module: nn.Module) -> Tensor | None:
    """Column permutation putting conv input channels innermost, so N:M groups run along channels.

    None when the columns already are channels (a Linear-like layer, a 1x1 kernel). Applies to the
    weight columns; a bias column after them stays in place.
    """
    shape = describe_layer(module)
    k = math.prod(shape.kernel)
    if not shape.kernel or k == 1:
        return None
    c = shape.channels
    return torch.arange(c * k).reshape(c, k).t().reshape(-1)


def pattern_problem(module: nn.Module, pattern: NMPattern) -> str:
    """Why ``module`` cannot hold the N:M ``pattern`` ("" when it can): its input channels must split into groups of m."""
    cols = describe_layer(module).channels
    if cols % pattern.m:
        return f"its {cols} input channels are not a multiple of {pattern.m}"
    return ""


#: ``admm``'s cost relative to ``d^3`` per group and ``rows d^2``: :func:`lightning_lobs.solvers.admm.admm_work`
#: divided by 2 flops per multiply-add (the same count as the other methods here); a test checks they agree.
ADMM_CUBE_FACTOR = 4.5
ADMM_ROW_PASSES = 142.0


def solve_cost(module: nn.Module, method: str) -> float:
    """Relative cost of solving the layer with ``method`` (a resolved one): ``rows d^3`` for ``exact``, ``admm``'s
    eigendecomposition and iterations for ``admm``, else ``groups d^3 + rows d^2``, with ``d`` the matrix columns. Used to balance layers across ranks and to warn."""
    shape = describe_layer(module)
    rows, d, g = shape.rows, shape.matrix_cols, shape.groups
    if method == "exact":
        return float(rows) * d**3
    if method == "admm":  # an eigendecomposition, then ~60 ADMM + ~20 CG iterations of rows x d x d products
        return ADMM_CUBE_FACTOR * g * d**3 + ADMM_ROW_PASSES * rows * d**2
    return float(g) * d**3 + float(rows) * d**2


# --------------------------------------------------------------------------- #
# Why a module cannot be pruned
# --------------------------------------------------------------------------- #
def _weight_hook(module: nn.Module) -> str | None:
    """The name of an old-style hook (``weight_norm``/``spectral_norm``) that recomputes ``weight``, if any."""
    for hook in list(module._forward_pre_hooks.values()):
        if getattr(hook, "name", None) == "weight" and type(hook).__name__ in ("WeightNorm", "SpectralNorm"):
            return type(hook).__name__
    return None


def weight_refusal(module: nn.Module, name: str) -> str | None:
    """Why zeros written to this prunable layer's weight would not hold (None when they would).

    Such a weight is computed on every call (a parametrization, an old-style ``weight_norm`` hook, code
    outside the module): pruning it is always an error, never a warning. ``name`` is the layer's
    qualified name, quoted in the fix.
    """
    if isinstance(module, AttentionProjection):  # its weight is a view of the attention's Parameter by design
        return None
    if parametrize.is_parametrized(module, "weight"):
        parametrizations: Any = module.parametrizations
        names = ", ".join(type(p).__name__ for p in parametrizations["weight"])
        return (
            f"its weight is computed by a parametrization ({names}), so zeros written to it would not hold; "
            f"remove it first (torch.nn.utils.parametrize.remove_parametrizations(model.{name}, 'weight')) or exclude "
            "the layer"
        )
    hook = _weight_hook(module)
    if hook is not None or not isinstance(module._parameters.get("weight"), nn.Parameter):
        how = f"an old-style {hook} hook" if hook else "code outside the module"
        fix = "torch.nn.utils.remove_weight_norm / remove_spectral_norm" if hook else "making it a plain Parameter"
        return (
            f"its weight is recomputed by {how} on every call, so zeros written to it would not hold; prune it "
            f"after {fix}, or exclude the layer"
        )
    return None


def why_not_prunable(module: nn.Module, name: str = "", tied_to: Sequence[str] = ()) -> str | None:
    """Why ``module`` cannot be pruned as is (None when it can), judged from the module itself.

    In order: an unsupported type, a computed weight (:func:`weight_refusal`), a weight Parameter
    shared with the modules ``tied_to`` (the caller knows the model), an empty weight.
    """
    if isinstance(module, AttentionProjection):
        return None
    if not is_prunable(module):
        kind = type(module).__name__
        return f"{kind} layers are not supported (only nn.Linear, nn.Conv1d/2d/3d and transformers Conv1D)"
    refusal = weight_refusal(module, name)
    if refusal is not None:
        return refusal
    if tied_to:
        return (
            f"its weight Parameter is shared with {', '.join(tied_to)} (tied weights): one mask solved for this "
            "layer's inputs would also change the other users; exclude it or untie the weights"
        )
    if matrix_cols(module) < 1 or _weight(module).numel() == 0:
        return "its weight is empty"
    return None
