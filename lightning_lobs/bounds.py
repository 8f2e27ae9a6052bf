r"""Error bounds of layer-wise OBS pruning (Dong et al., NeurIPS 2017, Theorem 3.2).

Definitions
-----------
*Layer-wise error.*  A pruned layer ``l`` has a weight matrix ``W`` of shape ``(out, d)``
(a convolution filter is unfolded to ``C_in/groups * prod(kernel)`` columns in the order of
``weight.reshape(out, -1)``; the bias, when present, is appended as the last column) and a
layer-input Hessian ``H`` of shape ``(groups, d, d)`` (or ``(d, d)``)::

    H = (1/n) sum_i x~_i x~_i^T

over all ``n`` rows the weight multiplies, i.e. all ``(sample, output position)`` pairs, with
``x~ = [x; 1]`` when the layer has a bias.  For a grouped convolution the output rows are split
into ``groups`` contiguous blocks and block ``j`` uses ``H[j]``.  The layer-wise error of a new
weight ``W^`` is::

    dE = 1/2 sum_rows (w^ - w) H (w^ - w)^T  =  1/(2n) ||(W^ - W) X~||_F^2.

*Network error.*  Norms are taken per sample over the whole output tensor of a layer::

    eps^l = sqrt( mean_samples ||y^_l - y_l||^2 ),

``y_l`` being layer ``l``'s output in the dense network and ``y^_l`` in the pruned one.  With
``P_l`` output positions per sample (1 for a Linear layer on ``(N, F)`` inputs, the product of the
output spatial sizes for a convolution), the layer term is::

    d^l = sqrt(2 dE^l P_l)  =  sqrt( mean_samples ||(W^_l - W_l) x_l||^2 ).

*Chain recursion.*  For a chain ``layer_1 -> f_1 -> layer_2 -> ... -> layer_L`` where ``f_{l-1}``
(everything between the output of pruned layer ``l-1`` and the input of layer ``l``) is
``c_{l-1}``-Lipschitz, ``y^_l - y_l = W^_l (x^_l - x_l) + (W^_l - W_l) x_l`` and Minkowski's
inequality over samples give::

    eps^l <= L_l c_{l-1} eps^{l-1} + d^l,      eps^1 = d^1,
    eps^L <= sum_k ( prod_{l>k} c_{l-1} L_l ) d^k,

where ``L_l`` bounds the operator norm of layer ``l``'s linear map (bias excluded) with the
*pruned* weights.  ``L_l = ||W^||`` for a Linear layer; for a convolution an input element is read
by at most ``m = prod_i ceil(k_i * gcd(dil_i, s_i) / s_i)`` output positions (the exact maximum
number of taps ``t < k`` with ``t * dil = r (mod s)``; for dilation 1 this is ``ceil(k/s)``), hence
``L_l = ||W^_unf|| sqrt(m)`` (times ``sqrt(copies)`` for reflect/replicate/circular padding, which
duplicates input elements).  A grouped convolution is block diagonal: its spectral norm is the
maximum over the groups.  Frobenius norms (of the whole weight matrix) give the paper's bound
(``bound``/``bound_frobenius``), spectral norms the tighter ``bound_spectral``.

*Sequential variant.*  When ``d^l`` is measured on inputs from the already pruned network
(``H`` built from ``x^_l``), ``y^_l - y_l = (W^_l - W_l) x^_l + W_l (x^_l - x_l)`` and the same
recursion holds with the norms of the **dense** weights ``W_l``: see
:func:`make_layer_term` (``sequential=True``).

Bounds concern networks in eval mode (dropout off, batch norm with running statistics).
Known Lipschitz constants (``c``): ReLU/ReLU6/Hardtanh/Tanh/Softsign/Softplus/CELU/Identity/
Dropout/Flatten/view/reshape 1, LeakyReLU ``max(1, |slope|)``, ELU ``max(1, |alpha|)``, GELU 1.13
(max slope 1.1290), SiLU 1.1, Mish 1.089, SELU ``scale * alpha``, Hardswish 1.5, Sigmoid 1/4,
Hardsigmoid 1/6, MaxPool ``sqrt(m)``, AvgPool ``sqrt(m / prod k)``, BatchNorm (eval)
``max |gamma| / sqrt(running_var + eps)``; compositions multiply.
"""

from __future__ import annotations

import inspect
import logging
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .layers import conv_padding, describe_layer, is_conv, is_linear_like
from .sharding import any_sharded, gather
from .solvers import layer_error

__all__ = [
    "GELU_LIPSCHITZ",
    "SILU_LIPSCHITZ",
    "MISH_LIPSCHITZ",
    "SELU_LIPSCHITZ",
    "layer_error",
    "conv_overlap",
    "operator_norm",
    "positions_per_sample",
    "ChainLink",
    "ChainInfo",
    "analyze_chain",
    "LayerTerm",
    "make_layer_term",
    "error_bound",
    "rms_error",
    "RMSAccumulator",
]

logger = logging.getLogger(__name__)

#: max |d/dx x Phi(x)| = 1.12890 (erf form; the tanh approximation peaks at 1.12899).
GELU_LIPSCHITZ = 1.13
#: max |d/dx x sigmoid(x)| = 1.09984.
SILU_LIPSCHITZ = 1.1
#: max |d/dx x tanh(softplus(x))| = 1.08850.
MISH_LIPSCHITZ = 1.089
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
#: SELU's slope on the negative side peaks at scale * alpha = 1.7581.
SELU_LIPSCHITZ = _SELU_SCALE * _SELU_ALPHA * (1 + 1e-12)


# --------------------------------------------------------------------------- #
# Layer-wise quantities
# --------------------------------------------------------------------------- #
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def conv_overlap(kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int] | None = None) -> int:
    """Max number of output positions that read one input element of a conv / pooling window.

    Per dimension this is ``ceil(k * gcd(dil, s) / s)``: the taps ``t < k`` reading a given input
    element satisfy ``t * dil = r (mod s)``, an arithmetic progression with step ``s / gcd(dil, s)``
    (``ceil(k / s)`` without dilation).  Dimensions multiply.
    """
    if dilation is None:
        dilation = [1] * len(kernel_size)
    total = 1
    for k, s, dl in zip(kernel_size, stride, dilation):
        k, s, dl = int(k), int(s), int(dl)
        if k < 1 or s < 1 or dl < 1:
            raise ValueError(f"invalid kernel/stride/dilation {(k, s, dl)}")
        total *= _ceil_div(k * math.gcd(dl, s), s)
    return total


def _padding_copies(module: _ConvNd) -> int:
    """Max number of times an input element appears in the padded input (1 for zero padding)."""
    if module.padding_mode == "zeros":
        return 1
    copies = 1
    for left, right in conv_padding(module, len(module.kernel_size)):
        if module.padding_mode == "replicate":
            copies *= 1 + left + right
        else:  # reflect / circular: each side copies an element at most once
            copies *= 1 + int(left > 0) + int(right > 0)
    return copies


def _check_layer(module: nn.Module) -> None:
    if is_linear_like(module) or is_conv(module):
        return
    raise TypeError(f"operator_norm supports nn.Linear and nn.ConvNd layers, got {type(module).__name__}")


def operator_norm(module: nn.Module, weight_matrix: Tensor, kind: str = "spectral") -> float:
    """Upper bound ``L`` on the operator norm (bias excluded) of ``module``'s linear map with weights ``weight_matrix``.

    ``weight_matrix`` is ``(out, d)`` (a trailing bias column is dropped when ``module.bias`` is not
    None) or the weight in its original shape.  ``kind="spectral"`` uses the largest singular
    value (max over the groups of a grouped conv), ``kind="frobenius"`` the Frobenius norm of the
    whole matrix (the paper's choice).  For convolutions the norm is multiplied by
    ``sqrt(conv_overlap(...) * padding copies)``.
    """
    if kind not in ("spectral", "frobenius"):
        raise ValueError(f"kind must be 'spectral' or 'frobenius', got {kind!r}")
    _check_layer(module)
    shape = describe_layer(module)  # a transformers Conv1D's (in, out) weight is given as (out, in) rows here
    out, cols, groups = shape.rows, shape.weight_cols, shape.groups
    factor = 1.0
    if not is_linear_like(module):
        conv = cast(_ConvNd, module)
        factor = math.sqrt(conv_overlap(conv.kernel_size, conv.stride, conv.dilation) * _padding_copies(conv))
    W = weight_matrix.detach()
    if W.dim() != 2:
        W = W.reshape(W.shape[0], -1)
    if W.shape[0] != out:
        raise ValueError(f"expected {out} rows for {type(module).__name__}, got {W.shape[0]}")
    if W.shape[1] == cols + 1 and getattr(module, "bias", None) is not None:
        W = W[:, :cols]
    elif W.shape[1] != cols:
        raise ValueError(f"expected {cols} columns (+1 bias column) for {type(module).__name__}, got {W.shape[1]}")
    W = W.double()
    if W.numel() == 0:
        return 0.0
    if kind == "frobenius":
        norm = float(torch.linalg.matrix_norm(W, ord="fro"))
    else:
        blocks = W.reshape(groups, out // groups, cols)
        norm = float(spectral_norm(blocks).max())
    return norm * factor


def spectral_norm(W: Tensor) -> Tensor:
    """Largest singular value of ``W`` (``(..., m, n)``), from the smaller Gram matrix in float64.

    ``sqrt(lambda_max(W W^T))`` with a symmetric eigensolver: the same value as
    ``matrix_norm(ord=2)`` to rounding (relative error ~1e-16 for the largest eigenvalue), and
    faster on CPU than its SVD (one thread: 4096 x 25,088 10.5 s vs 44.7 s, 512 x 4608 0.04 s vs 0.56 s).
    """
    W = W.double()
    G = W @ W.transpose(-2, -1) if W.shape[-2] <= W.shape[-1] else W.transpose(-2, -1) @ W
    return torch.linalg.eigvalsh(G)[..., -1].clamp_min(0.0).sqrt()


def positions_per_sample(module: nn.Module, output_shape: Sequence[int]) -> int:
    """``P_l``: rows per sample the weight multiplies, from a batched output shape ``(N, ...)``.

    ``prod(spatial)`` for ``(N, C, *spatial)`` conv outputs, ``prod(middle dims)`` for a Linear
    layer applied to ``(N, ..., F)``.
    """
    _check_layer(module)
    shape = tuple(int(s) for s in output_shape)
    if is_linear_like(module):
        return int(math.prod(shape[1:-1]))
    return int(math.prod(shape[2:]))


# --------------------------------------------------------------------------- #
# Chain analysis
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ChainLink:
    """A pruned layer of a chain and the Lipschitz constant of the ops feeding it.

    ``op_factor`` covers everything between the previous pruned layer's output and this layer's
    input (1.0 for the first layer, whose input is identical in the dense and pruned networks).
    """

    name: str
    op_factor: float


@dataclass(frozen=True)
class ChainInfo:
    """Result of :func:`analyze_chain`: ``links`` in data-path order; ``reason`` set when not a chain."""

    links: tuple[ChainLink, ...]
    is_chain: bool
    reason: str = ""


_DATA, _META, _CONST, _OTHER = "data", "meta", "const", "other"

_META_METHODS = {"size", "dim", "numel", "nelement", "ndimension", "get_device", "is_contiguous", "is_floating_point"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}

# Unary functions / methods with Lipschitz constant 1 (dropout: eval mode).
_ONE_FUNCS: set[Any] = {
    F.relu,
    torch.relu,
    torch.relu_,
    F.relu_,
    F.relu6,
    F.hardtanh,
    F.hardtanh_,
    torch.tanh,
    F.tanh,
    F.softsign,
    F.tanhshrink,
    F.softshrink,
    F.softplus,
    F.celu,
    F.logsigmoid,
    torch.flatten,
    torch.squeeze,
    torch.unsqueeze,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.t,
    torch.clone,
    torch.detach,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.dropout,
    operator.neg,
    operator.pos,
    torch.neg,
    torch.clamp,
    torch.clamp_min,
    torch.clamp_max,
    torch.clip,
}
_ONE_METHODS = {
    "relu",
    "relu_",
    "tanh",
    "tanh_",
    "flatten",
    "view",
    "reshape",
    "squeeze",
    "unsqueeze",
    "contiguous",
    "permute",
    "transpose",
    "t",
    "clone",
    "detach",
    "neg",
    "float",
    "double",
    "view_as",
    "reshape_as",
    "clamp",
    "clamp_",
    "clamp_min",
    "clamp_max",
    "clip",
}
_CONST_FUNCS: dict[Any, float] = {
    torch.sigmoid: 0.25,
    F.sigmoid: 0.25,
    F.hardsigmoid: 1.0 / 6.0,
    F.hardswish: 1.5,
    F.silu: SILU_LIPSCHITZ,
    F.mish: MISH_LIPSCHITZ,
    F.selu: SELU_LIPSCHITZ,
    torch.selu: SELU_LIPSCHITZ,
    F.gelu: GELU_LIPSCHITZ,
}
_CONST_METHODS = {"sigmoid": 0.25, "sigmoid_": 0.25}
_ONE_MODULES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Tanh,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Softshrink,
    nn.Softplus,
    nn.CELU,
    nn.LogSigmoid,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.Flatten,
    nn.Unflatten,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)
_CONST_MODULES: dict[type, float] = {
    nn.Sigmoid: 0.25,
    nn.Hardsigmoid: 1.0 / 6.0,
    nn.Hardswish: 1.5,
    nn.SiLU: SILU_LIPSCHITZ,
    nn.Mish: MISH_LIPSCHITZ,
    nn.SELU: SELU_LIPSCHITZ,
    nn.GELU: GELU_LIPSCHITZ,
}
_MAXPOOL_FUNCS = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    torch.max_pool1d: 1,
    torch.max_pool2d: 2,
    torch.max_pool3d: 3,
}
_AVGPOOL_FUNCS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_ADAPTIVE_AVG_FUNCS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}
_ADAPTIVE_MAX_FUNCS = {F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3}
_ADD_FUNCS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub}
_ADD_METHODS = {"add", "sub", "add_", "sub_"}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}
_DIV_FUNCS = {operator.truediv, operator.itruediv, torch.div}
_DIV_METHODS = {"div", "div_"}
_INPLACE_FUNCS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    torch.relu_,
    F.relu_,
    F.hardtanh_,
    F.leaky_relu_,
    F.elu_,
}


# positional index of the ``inplace`` argument of functional ops
_INPLACE_ARG_INDEX: dict[Any, int] = {
    F.relu: 1,
    F.relu6: 1,
    F.hardtanh: 3,
    F.leaky_relu: 2,
    F.elu: 2,
    F.selu: 1,
    F.celu: 2,
    F.dropout: 3,
    F.dropout1d: 3,
    F.dropout2d: 3,
    F.dropout3d: 3,
    F.alpha_dropout: 3,
    F.feature_alpha_dropout: 3,
    F.hardswish: 1,
    F.hardsigmoid: 1,
    F.silu: 1,
    F.mish: 1,
}


class _Unsupported(Exception):
    """An op on the data path whose Lipschitz constant is unknown."""


def _describe(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    if node.op == "call_module":
        kind = type(gm.get_submodule(str(node.target))).__name__ if gm is not None else "module"
        return f"module '{node.target}' ({kind})"
    if node.op == "call_method":
        return f"method '.{node.target}()'"
    if node.op == "call_function":
        target = node.target
        mod = getattr(target, "__module__", None) or ""
        mod = "operator" if mod == "_operator" else mod
        name = getattr(target, "__name__", repr(target))
        if name == "fn" and hasattr(target, "__qualname__"):  # boolean_dispatch wrappers
            name = str(node.name)
        return f"function '{(mod + '.') if mod else ''}{name}'"
    return f"{node.op} '{node.target}'"


def _flat_nodes(node: fx.Node) -> list[fx.Node]:
    """Node arguments of ``node`` with multiplicity (args then kwargs)."""
    found: list[fx.Node] = []

    def _collect(n: fx.Node) -> fx.Node:
        found.append(n)
        return n

    fx.node.map_arg((node.args, node.kwargs), _collect)
    return found


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _const(value: Any, gm: fx.GraphModule, what: str) -> Any:
    """Concrete value of an argument (get_attr nodes resolved); raise if it depends on runtime values."""
    if isinstance(value, fx.Node):
        if value.op == "get_attr":
            obj: Any = gm
            for part in str(value.target).split("."):
                obj = getattr(obj, part)
            return obj
        raise _Unsupported(f"non-constant {what}")
    if isinstance(value, (list, tuple)) and any(isinstance(v, fx.Node) for v in value):
        raise _Unsupported(f"non-constant {what}")
    return value


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return tuple(int(value[0]) for _ in range(n))
        return tuple(int(v) for v in value)
    return tuple(int(value) for _ in range(n))


def _max_pool_factor(n: int, kernel: Any, stride: Any, dilation: Any) -> float:
    k = _tuple(kernel, n)
    s = k if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else _tuple(stride, n)
    return math.sqrt(conv_overlap(k, s, _tuple(dilation, n)))


def _avg_pool_factor(
    n: int, kernel: Any, stride: Any, ceil_mode: bool, count_include_pad: bool, divisor_override: Any, padding: Any
) -> float:
    k = _tuple(kernel, n)
    s = k if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else _tuple(stride, n)
    count = conv_overlap(k, s)
    K = math.prod(k)
    if divisor_override:
        # |sum_window / D|^2 <= K ||window||^2 / D^2
        return math.sqrt(count * K) / abs(float(divisor_override))
    pads = _tuple(padding, n)
    if not ceil_mode and (count_include_pad or all(p == 0 for p in pads)):
        return math.sqrt(count / K)  # every window is divided by K
    return math.sqrt(count)  # divisor >= number of summed elements >= 1


def _adaptive_windows(size_in: int, size_out: int) -> list[tuple[int, int]]:
    return [((i * size_in) // size_out, _ceil_div((i + 1) * size_in, size_out)) for i in range(size_out)]


def _adaptive_factor(n: int, output_size: Any, in_shape: Sequence[int] | None, average: bool) -> float:
    outs = list(output_size) if isinstance(output_size, (list, tuple)) else [output_size] * n
    if len(outs) == 1 and n > 1:
        outs = outs * n
    if in_shape is None:
        if all(o == 1 for o in outs):
            return 1.0  # one window per channel: averaging norm 1/sqrt(N) <= 1, max is 1-Lipschitz
        raise _Unsupported("adaptive pooling needs example_input to know its input size")
    spatial = list(in_shape)[-n:]
    factor = 1.0
    for size_in, size_out in zip(spatial, outs):
        size_out = size_in if size_out is None else int(size_out)
        windows = _adaptive_windows(int(size_in), size_out)
        if average:  # separable: the norm is the product of the 1-d averaging matrices' norms
            A = torch.zeros(size_out, int(size_in), dtype=torch.float64)
            for i, (a, b) in enumerate(windows):
                A[i, a:b] = 1.0 / (b - a)
            factor *= float(torch.linalg.matrix_norm(A, ord=2))
        else:
            cover = [0] * int(size_in)
            for a, b in windows:
                for j in range(a, b):
                    cover[j] += 1
            factor *= math.sqrt(max(cover))
    return factor


def _input_shape(node: fx.Node) -> Sequence[int] | None:
    src = node.args[0] if node.args else None
    if isinstance(src, fx.Node):
        meta = src.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            return tuple(meta.shape)
    return None


def _module_factor(node: fx.Node, module: nn.Module) -> float:
    if isinstance(module, _ONE_MODULES):
        return 1.0
    for cls, value in _CONST_MODULES.items():
        if isinstance(module, cls):
            return value
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(float(module.negative_slope)))
    if isinstance(module, nn.ELU):
        return max(1.0, abs(float(module.alpha)))
    if isinstance(module, nn.PReLU):
        return max(1.0, float(gather(module.weight.detach()).abs().max()))
    if isinstance(module, nn.RReLU):
        return max(1.0, abs(float(module.lower)), abs(float(module.upper)))
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        if module.return_indices:
            raise _Unsupported(f"{type(module).__name__} with return_indices")
        n = int(type(module).__name__[-2])
        return _max_pool_factor(n, module.kernel_size, module.stride, module.dilation)
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        n = int(type(module).__name__[-2])
        return _avg_pool_factor(
            n,
            module.kernel_size,
            module.stride,
            module.ceil_mode,
            module.count_include_pad,
            getattr(module, "divisor_override", None),
            module.padding,
        )
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        n = int(type(module).__name__[-2])
        return _adaptive_factor(n, module.output_size, _input_shape(node), average=True)
    if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        if module.return_indices:
            raise _Unsupported(f"{type(module).__name__} with return_indices")
        n = int(type(module).__name__[-2])
        return _adaptive_factor(n, module.output_size, _input_shape(node), average=False)
    if isinstance(module, _BatchNorm):
        if module.running_var is None:
            raise _Unsupported(f"{type(module).__name__} without running statistics")
        scale = 1.0 / torch.sqrt(module.running_var.detach().double() + module.eps)
        if module.weight is not None:
            scale = scale * gather(module.weight.detach()).double().abs()
        return float(scale.max()) if scale.numel() else 1.0
    if isinstance(module, nn.Linear) or is_conv(module):
        # an unpruned layer: identical in both networks, Lipschitz = its operator norm
        return operator_norm(module, gather(cast(Tensor, module.weight).detach()), "spectral")
    raise _Unsupported(f"unknown op {_wrapped_class(module).__name__}")


def _scalar_factor(value: Any, gm: fx.GraphModule, invert: bool) -> float:
    value = _const(value, gm, "operand")
    if isinstance(value, Tensor):
        a = value.detach().double().abs()
        if a.numel() == 0:
            return 1.0
        return float(1.0 / a.min()) if invert else float(a.max())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 1.0 / abs(float(value)) if invert else abs(float(value))
    raise _Unsupported(f"operand of type {type(value).__name__}")


def _binary_operands(node: fx.Node, data: fx.Node) -> tuple[Any, bool]:
    """The operand that is not ``data`` and whether ``data`` is the first operand."""
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    if a is data:
        return b, True
    if b is data:
        return a, False
    raise _Unsupported("the data tensor is not an operand")


def _method_factor(node: fx.Node, gm: fx.GraphModule, data_first: bool) -> float:
    """Lipschitz constant of a tensor method call on the data tensor."""
    target = node.target
    if not data_first:
        raise _Unsupported("method not called on the data tensor")
    if target in _ONE_METHODS:
        return 1.0
    if target in _CONST_METHODS:
        return _CONST_METHODS[target]
    if target in _ADD_METHODS:
        return 1.0  # x + alpha * const
    if target in _MUL_METHODS:
        return _scalar_factor(_arg(node, 1, "other"), gm, invert=False)
    if target in _DIV_METHODS:
        if node.kwargs.get("rounding_mode") is not None:
            raise _Unsupported("division with rounding")
        return _scalar_factor(_arg(node, 1, "other"), gm, invert=True)
    raise _Unsupported("unknown op")


def _pool_function_factor(node: fx.Node, gm: fx.GraphModule) -> float:
    """Lipschitz constant of a functional pooling call on the data tensor (its first argument)."""
    target = node.target
    if target in _MAXPOOL_FUNCS:
        n = _MAXPOOL_FUNCS[target]
        if _const(_arg(node, 6, "return_indices", False), gm, "return_indices"):
            raise _Unsupported("max pooling with return_indices")
        return _max_pool_factor(
            n,
            _const(_arg(node, 1, "kernel_size"), gm, "kernel_size"),
            _const(_arg(node, 2, "stride"), gm, "stride"),
            _const(_arg(node, 4, "dilation", 1), gm, "dilation"),
        )
    if target in _AVGPOOL_FUNCS:
        n = _AVGPOOL_FUNCS[target]
        get = lambda i, name, default: _const(_arg(node, i, name, default), gm, name)  # noqa: E731
        divisor = get(6, "divisor_override", None) if n > 1 else None
        return _avg_pool_factor(
            n,
            get(1, "kernel_size", None),
            get(2, "stride", None),
            bool(get(4, "ceil_mode", False)),
            bool(get(5, "count_include_pad", True)),
            divisor,
            get(3, "padding", 0),
        )
    if target in _ADAPTIVE_AVG_FUNCS:
        return _adaptive_factor(
            _ADAPTIVE_AVG_FUNCS[target],
            _const(_arg(node, 1, "output_size"), gm, "output_size"),
            _input_shape(node),
            average=True,
        )
    if target in _ADAPTIVE_MAX_FUNCS:
        if _const(_arg(node, 2, "return_indices", False), gm, "return_indices"):
            raise _Unsupported("max pooling with return_indices")
        return _adaptive_factor(
            _ADAPTIVE_MAX_FUNCS[target],
            _const(_arg(node, 1, "output_size"), gm, "output_size"),
            _input_shape(node),
            average=False,
        )
    raise _Unsupported("unknown op")


def _getitem_factor(node: fx.Node, data_first: bool) -> float:
    """Plain slicing of the data tensor selects distinct elements: 1; any other indexing is unsupported."""
    index = node.args[1]
    items = index if isinstance(index, tuple) else (index,)
    if data_first and all(
        isinstance(i, (int, slice, type(None), type(Ellipsis))) and not isinstance(i, bool) for i in items
    ):
        if all(
            not isinstance(i, slice) or not any(isinstance(v, fx.Node) for v in (i.start, i.stop, i.step))
            for i in items
        ):
            return 1.0  # basic indexing selects distinct elements
    raise _Unsupported("indexing other than plain slicing")


def _function_factor(node: fx.Node, gm: fx.GraphModule, data: fx.Node, data_first: bool) -> float:
    """Lipschitz constant of a free function call as a function of its data argument ``data``."""
    target = node.target
    if target in _ONE_FUNCS:
        return 1.0
    if target in _CONST_FUNCS:
        return _CONST_FUNCS[target]
    if target in (F.leaky_relu, F.leaky_relu_):
        return max(1.0, abs(float(_const(_arg(node, 1, "negative_slope", 0.01), gm, "slope"))))
    if target in (F.elu, F.elu_):
        return max(1.0, abs(float(_const(_arg(node, 1, "alpha", 1.0), gm, "alpha"))))
    if target is F.prelu:
        weight = _const(_arg(node, 1, "weight"), gm, "weight")
        return max(1.0, float(torch.as_tensor(weight).detach().abs().max()))
    if target is getattr:
        raise _Unsupported("attribute access")
    if target is operator.getitem:
        return _getitem_factor(node, data_first)
    if target in _ADD_FUNCS:
        alpha = node.kwargs.get("alpha", 1)
        if not data_first and alpha != 1:
            return abs(float(_const(alpha, gm, "alpha")))
        return 1.0
    if target in _MUL_FUNCS:
        other, _ = _binary_operands(node, data)
        return _scalar_factor(other, gm, invert=False)
    if target in _DIV_FUNCS:
        other, first = _binary_operands(node, data)
        if not first:
            raise _Unsupported("division by the data tensor")
        if node.kwargs.get("rounding_mode") is not None:
            raise _Unsupported("division with rounding")
        return _scalar_factor(other, gm, invert=True)
    if not data_first:
        raise _Unsupported("unknown op")
    return _pool_function_factor(node, gm)


def _node_factor(node: fx.Node, gm: fx.GraphModule, data: fx.Node) -> float:
    """Lipschitz constant of ``node`` as a function of its single data argument ``data``."""
    data_first = bool(node.args) and node.args[0] is data
    if node.op == "call_module":
        return _module_factor(node, gm.get_submodule(str(node.target)))
    if node.op == "call_method":
        return _method_factor(node, gm, data_first)
    if node.op != "call_function":
        raise _Unsupported("unknown op")
    return _function_factor(node, gm, data, data_first)


def _is_meta_op(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _META_METHODS
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _META_ATTRS
    return False


def _is_inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCS:
            return True
        index = _INPLACE_ARG_INDEX.get(node.target)
        return index is not None and len(node.args) > index and node.args[index] is True
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    return False


def _wrapped_class(module: nn.Module) -> type:
    """The class a ``fully_shard`` (FSDP2) module had before sharding (FSDP2 makes a subclass of ``FSDPModule``
    and it, defined in ``torch.distributed``), or the module's own class."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return type(module)
    if not isinstance(module, FSDPModule):
        return type(module)
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


class _Tracer(fx.Tracer):
    """fx's tracer, with a ``fully_shard`` layer a leaf as the layer it wraps would be: traced through, it would
    read its sharded parameters (and FSDP's own hooks) instead of calling the layer."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        cls = _wrapped_class(m)
        if cls is type(m):
            return super().is_leaf_module(m, module_qualified_name)
        return cls.__module__.startswith(("torch.nn", "torch.ao.nn")) and not issubclass(cls, nn.Sequential)


def _symbolic_trace(model: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model, concrete_args=concrete_args)
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def _trace(model: nn.Module) -> fx.GraphModule:
    """``fx.symbolic_trace`` (with ``fully_shard`` layers as leaves); parameters with defaults are specialised to
    them when that works."""
    concrete: dict[str, Any] = {}
    try:
        params = list(inspect.signature(model.forward).parameters.values())
        for p in params[1:]:
            if p.default is not inspect.Parameter.empty and p.kind in (
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                inspect.Parameter.KEYWORD_ONLY,
            ):
                concrete[p.name] = p.default
    except (TypeError, ValueError):
        concrete = {}
    if concrete:
        try:
            return _symbolic_trace(model, concrete_args=concrete)
        except Exception as exc:  # noqa: BLE001 - fall back to a plain trace
            logger.debug("tracing with concrete_args=%s failed (%s); retrying without", concrete, exc)
    return _symbolic_trace(model)


def _propagate_shapes(gm: fx.GraphModule, model: nn.Module, example_input: Any) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as exc:  # noqa: BLE001 - shapes are optional
        logger.warning("shape propagation with example_input failed: %s", exc)
    finally:
        for m, training in modes.items():
            m.training = training


def _not_chain(reason: str) -> ChainInfo:
    # DEBUG: the reason is the result (the report's bound_note), and an HF model is never a chain; at INFO it was
    # noise on every such prune (the block pipeline handles those models; its own fallback is a warning)
    logger.debug("not a chain: %s", reason)
    return ChainInfo(links=(), is_chain=False, reason=reason)


class _NotAChain(Exception):
    """Raised by a step of :func:`analyze_chain` with the reason the layers do not form a chain."""


def _classify(graph_nodes: Sequence[fx.Node], source: fx.Node) -> dict[fx.Node, str]:
    """Each node's kind: data (depends on the input tensor), meta (shape queries), const, other input."""
    kind: dict[fx.Node, str] = {}
    for node in graph_nodes:
        if node.op == "placeholder":
            kind[node] = _DATA if node is source else _OTHER
        elif node.op == "get_attr":
            kind[node] = _CONST
        elif node.op != "output":
            kinds = {kind[a] for a in _flat_nodes(node)}
            if _is_meta_op(node) or (kinds <= {_META, _CONST} and _META in kinds):
                kind[node] = _META
            elif _DATA in kinds:
                kind[node] = _DATA
            elif _OTHER in kinds:
                kind[node] = _OTHER
            else:
                kind[node] = _CONST
    return kind


def _locate_pruned(
    model: nn.Module, gm: fx.GraphModule, names: Sequence[str], kind: Mapping[fx.Node, str]
) -> dict[fx.Node, str]:
    """The one call node of each pruned layer, which must be a Linear/ConvNd on the data path."""
    graph_nodes = list(gm.graph.nodes)
    fx_modules = {id(m): name for name, m in gm.named_modules()}
    pruned: dict[fx.Node, str] = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise _NotAChain(f"layer '{name}' is not a submodule of the model") from None
        if not (isinstance(module, nn.Linear) or is_conv(module)):
            raise _NotAChain(f"layer '{name}' is a {_wrapped_class(module).__name__}, not a Linear/ConvNd layer")
        target = fx_modules.get(id(module))
        calls = [
            n
            for n in graph_nodes
            if n.op == "call_module" and target is not None and gm.get_submodule(n.target) is module
        ]
        if not calls:
            raise _NotAChain(f"layer '{name}' is not called in the traced forward")
        if len(calls) > 1:
            raise _NotAChain(f"layer '{name}' is called {len(calls)} times")
        if target is not None and any(
            n.op == "get_attr" and str(n.target).startswith(target + ".") for n in graph_nodes
        ):
            raise _NotAChain(f"the parameters of layer '{name}' are also used outside the layer")
        if kind[calls[0]] != _DATA:
            raise _NotAChain(f"layer '{name}' does not depend on the model input")
        pruned[calls[0]] = name
    return pruned


def _walk_back(
    gm: fx.GraphModule, pruned: Mapping[fx.Node, str], kind: Mapping[fx.Node, str], position: Mapping[fx.Node, int]
) -> tuple[tuple[ChainLink, ...], dict[fx.Node, fx.Node]]:
    """Walk the single data path back from the last pruned layer to the first, multiplying Lipschitz factors.

    Returns the links in data-path order and, for each node on the path, the next node on it.
    """
    last = max(pruned, key=position.__getitem__)
    remaining = set(pruned) - {last}
    links_rev: list[ChainLink] = []
    current_layer, factor = last, 1.0
    next_on_path: dict[fx.Node, fx.Node] = {}
    node = last
    while True:
        if node is not last and node in pruned:
            links_rev.append(ChainLink(pruned[current_layer], factor))
            current_layer, factor = node, 1.0
            remaining.discard(node)
        if not remaining:
            break
        inputs = [a for a in _flat_nodes(node) if kind[a] in (_DATA, _OTHER)]
        if len(inputs) != 1:
            raise _NotAChain(
                f"{_describe(node, gm)} combines {len(inputs)} tensors on the data path to layer "
                f"'{pruned[current_layer]}' (residual connection / concatenation / branch merge)"
            )
        prev = inputs[0]
        if kind[prev] == _OTHER:
            raise _NotAChain(f"{_describe(node, gm)} depends on a second model input")
        if node not in pruned:
            try:
                factor *= _node_factor(node, gm, data=prev)
            except _Unsupported as exc:
                raise _NotAChain(
                    f"{_describe(node, gm)} on the data path to layer '{pruned[current_layer]}': {exc}"
                ) from None
        next_on_path[prev] = node
        if prev.op == "placeholder":
            missing = ", ".join(f"'{pruned[n]}'" for n in sorted(remaining, key=position.__getitem__))
            raise _NotAChain(f"layer(s) {missing} are not on the data path to layer '{pruned[last]}'")
        node = prev
    links_rev.append(ChainLink(pruned[current_layer], 1.0))
    return tuple(reversed(links_rev)), next_on_path


def _check_side_branches(
    gm: fx.GraphModule, next_on_path: Mapping[fx.Node, fx.Node], kind: Mapping[fx.Node, str]
) -> None:
    """Side branches leaving the data path must not modify it in place."""
    for on_path, nxt in next_on_path.items():
        for user in on_path.users:
            if user is nxt or kind.get(user) == _META:
                continue
            stack, seen = [user], set()
            while stack:
                u = stack.pop()
                if u in seen:
                    continue
                seen.add(u)
                if u.op != "output" and _is_inplace(u, gm):
                    raise _NotAChain(f"in-place {_describe(u, gm)} in a side branch of the data path")
                stack.extend(u.users)


def analyze_chain(model: nn.Module, layer_names: Sequence[str], example_input: Any | None = None) -> ChainInfo:
    """Check that the pruned layers form a chain and compute the Lipschitz factor between them.

    The forward of ``model`` is traced with :func:`torch.fx.symbolic_trace` (``fully_shard`` layers are leaves, as
    the layers they wrap; a sharded model's shapes are not propagated).  Walking back from the
    last pruned layer, the data path must be a single path of unary ops (no residual add / cat)
    through all pruned layers, every op on it between the first and the last pruned layer must
    have a known Lipschitz constant (activations, pooling, eval-mode dropout / batch norm, shape
    ops, scaling by constants, unpruned Linear/Conv layers), and side branches leaving the path
    must not modify it in place.  Ops before the first and after the last pruned layer do not
    matter.  ``links`` are returned in data-path order.  ``example_input`` is only needed for
    adaptive pooling with an output size other than 1.
    """
    names = list(layer_names)
    if not names:
        return _not_chain("no pruned layers given")
    if len(set(names)) != len(names):
        return _not_chain("duplicate layer names")
    try:
        gm = _trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "cannot analyse"
        return _not_chain(f"torch.fx could not trace the model: {type(exc).__name__}: {exc}")
    # Not on a sharded model: running its layers gathers their weights (collectives), and a rank whose shape
    # propagation failed would leave the others waiting in them. Only adaptive pooling needs the shapes.
    if example_input is not None and not any_sharded(model.parameters()):
        _propagate_shapes(gm, model, example_input)

    graph_nodes = list(gm.graph.nodes)
    placeholders = [n for n in graph_nodes if n.op == "placeholder"]
    if not placeholders:
        return _not_chain("the traced forward has no input")
    kind = _classify(graph_nodes, placeholders[0])
    position = {n: i for i, n in enumerate(graph_nodes)}
    try:
        pruned = _locate_pruned(model, gm, names, kind)
        links, next_on_path = _walk_back(gm, pruned, kind, position)
        _check_side_branches(gm, next_on_path, kind)
    except _NotAChain as exc:
        return _not_chain(str(exc))
    logger.debug("chain: %s", links)
    return ChainInfo(links=links, is_chain=True, reason="")


# --------------------------------------------------------------------------- #
# Bound
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class LayerTerm:
    """Per-layer ingredients of the bound: ``d`` = ``sqrt(2 dE P)`` and operator norms ``L`` to use."""

    name: str
    d: float
    norm_frobenius: float
    norm_spectral: float


def make_layer_term(
    name: str,
    module: nn.Module,
    weight_dense: Tensor,
    weight_pruned: Tensor,
    hessian: Tensor,
    positions: int,
    sequential: bool = False,
) -> LayerTerm:
    """Build a :class:`LayerTerm` from the dense and pruned ``(out, d)`` weight matrices.

    ``hessian`` must come from the dense network's layer inputs (``sequential=False``: norms of the
    pruned weights) or from the pruned network's inputs (``sequential=True``: norms of the dense
    weights).  ``positions`` is ``P_l`` (see :func:`positions_per_sample`).
    """
    dE = max(layer_error(weight_dense, weight_pruned, hessian), 0.0)
    d = math.sqrt(2.0 * dE * float(positions))
    w = weight_dense if sequential else weight_pruned
    return LayerTerm(
        name=name,
        d=d,
        norm_frobenius=operator_norm(module, w, "frobenius"),
        norm_spectral=operator_norm(module, w, "spectral"),
    )


def error_bound(terms: Sequence[LayerTerm], chain: ChainInfo) -> tuple[float, float]:
    """``(bound_frobenius, bound_spectral)`` on the RMS error of the last pruned layer's output.

    Unrolls ``eps^l <= L_l c_{l-1} eps^{l-1} + d^l`` along ``chain.links`` (terms are matched by
    name).  Returns ``(nan, nan)`` when ``chain`` is not a chain.
    """
    if not chain.is_chain:
        return math.nan, math.nan
    by_name = {t.name: t for t in terms}
    if len(by_name) != len(terms):
        raise ValueError("duplicate layer names in terms")
    chain_names = [link.name for link in chain.links]
    missing = [n for n in chain_names if n not in by_name]
    extra = [n for n in by_name if n not in set(chain_names)]
    if missing or extra:
        raise ValueError(f"terms do not match the chain: missing {missing}, unexpected {extra}")
    eps_f = eps_s = 0.0
    for link in chain.links:
        t = by_name[link.name]
        eps_f = t.norm_frobenius * link.op_factor * eps_f + t.d
        eps_s = t.norm_spectral * link.op_factor * eps_s + t.d
    return eps_f, eps_s


# --------------------------------------------------------------------------- #
# Measured error
# --------------------------------------------------------------------------- #
def _sq_norms(reference: Tensor, other: Tensor) -> Tensor:
    if reference.shape != other.shape:
        raise ValueError(f"shape mismatch: {tuple(reference.shape)} vs {tuple(other.shape)}")
    diff = other.detach().double() - reference.detach().double().to(other.device)
    # A 0-d output (a model that returns a scalar, e.g. its loss) is one sample, not a batch.
    rows = diff.shape[0] if diff.dim() else 1
    return diff.reshape(rows, -1).pow(2).sum(dim=1)


def rms_error(reference: Tensor, other: Tensor) -> float:
    """``sqrt(mean over dim 0 of ||other_i - reference_i||^2)`` in float64 (nan for an empty batch)."""
    sq = _sq_norms(reference, other)
    if sq.numel() == 0:
        return math.nan
    return math.sqrt(float(sq.mean()))


class RMSAccumulator:
    """Streaming :func:`rms_error` over many batches."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget all accumulated samples."""
        self._sum = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        """Number of samples seen."""
        return self._count

    def add(self, reference: Tensor, other: Tensor) -> None:
        """Accumulate the per-sample squared errors of one batch."""
        sq = _sq_norms(reference, other)
        self._sum += float(sq.sum())
        self._count += int(sq.numel())

    def all_reduce(self, group: Any = None, device: torch.device | None = None) -> None:
        """Sum the squared errors and sample counts over the ranks of a torch.distributed group."""
        buf = torch.tensor([self._sum, float(self._count)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(buf, group=group)
        self._sum, self._count = float(buf[0]), int(buf[1])

    def value(self) -> float:
        """RMS error over all samples added so far (nan when empty)."""
        return math.sqrt(self._sum / self._count) if self._count else math.nan
