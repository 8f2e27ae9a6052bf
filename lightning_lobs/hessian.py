"""Streaming layer-input Hessians for Linear and ConvNd layers.

For a layer with weight matrix ``W`` of shape ``(out, d)`` (a convolution filter
is flattened as ``weight.reshape(out, -1)``, i.e. columns ordered
``(channel, k1, k2, ...)``), the layer-wise OBS objective needs

.. math::  H = \\frac{1}{n} \\sum_i \\tilde x_i \\tilde x_i^T,

where ``x_i`` runs over every row the weight multiplies (every sample for a
Linear layer, every ``(sample, output position)`` patch for a convolution) and
``x~ = [x; 1]`` is bias-augmented only when the layer has a bias.  Grouped
convolutions get one Hessian per group, so Hessians always have shape
``(groups, d, d)``.

The Hessian is accumulated from forward pre-hooks in bounded-size chunks; raw
activations are never stored.  Three precisions (:data:`HessianPrecision`):

* ``"mixed"`` (the default of :class:`~lightning_lobs.config.CalibrationOptions`): rows are multiplied in float32
  (GEMM speed) into a float32 partial sum of at most :data:`MIXED_CHUNK_ROWS` rows (across batches), which then
  joins a float64 running sum, so the float32 rounding is that of a sum of at most ``MIXED_CHUNK_ROWS`` terms however
  many rows arrive (float64 inputs are multiplied in float64). The partial sum, ``(groups, d, d)`` float32, is held
  only while it fills;
* ``torch.float64``: rows cast to float64, products and sum in float64 (the reference; about 2x the GEMM time);
* ``torch.float32``: products and sum in float32 (half the memory; the sum's rounding grows with the row count).

BENCHMARKS.md ("Hessian precision") measures the three on real activations.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from . import layers
from ._deprecated import moved_names_getattr
from .layers import (
    batched_conv_input,
    conv_padding,
    describe_layer,
    is_prunable,
    pad_input,
    patch_view,
)

__all__ = ["MIXED_CHUNK_ROWS", "HessianAccumulator", "HessianCollector", "HessianPrecision"]

#: How H is accumulated: ``"mixed"`` (float32 products per chunk, float64 sum), or one dtype for both.
HessianPrecision = Literal["mixed"] | torch.dtype

#: ``"mixed"``: the most rows summed in float32 before their sum joins the float64 one. Short enough that the float32
#: rounding stays within ``2048 eps_32`` of the entries' scale (``~sqrt(2048) eps_32`` typically), long enough that
#: the float64 adds (``d^2`` each, memory-bound) cost a few percent of the ``2 * 2048 * d^2`` flops of the products.
MIXED_CHUNK_ROWS = 2048
#: ``"mixed"`` multiplies in float32 only while every input magnitude is within these bounds: a float32 partial sum of
#: MIXED_CHUNK_ROWS squares then stays below a quarter of float32's largest value, and the squares stay well above its
#: smallest normal number (about 1.2e-38); outside them it multiplies in float64.
MIXED_MAX_ABS = math.sqrt(torch.finfo(torch.float32).max / (4 * MIXED_CHUNK_ROWS))
MIXED_MIN_ABS = 1e-15


def _float32_products_safe(max_abs: float) -> bool:
    return max_abs == 0.0 or MIXED_MIN_ABS <= max_abs <= MIXED_MAX_ABS


#: The layer helpers this module exported before 0.3.0, now in :mod:`lightning_lobs.layers` (old name -> new home).
_MOVED_TO_LAYERS = {
    "SUPPORTED_TYPES": "PRUNABLE_TYPES",
    "is_supported": "is_prunable",
    "weight_columns": "matrix_cols",
    **{
        name: name
        for name in (
            "is_linear_like",
            "is_hf_conv1d",
            "output_rows",
            "to_rows",
            "from_rows",
            "num_groups",
            "has_bias",
            "weight_matrix",
            "set_weight_matrix",
            "unfold_input",
        )
    },
}
__getattr__ = moved_names_getattr(
    __name__, {old: ("lightning_lobs.layers", new) for old, new in _MOVED_TO_LAYERS.items()}
)

logger = logging.getLogger(__name__)


@contextmanager
def _full_float32_matmul() -> Iterator[None]:
    """Full float32 products inside: TF32 / bf16 matmuls (often allowed for training speed) keep 10 or 7 bits."""
    saved = torch.get_float32_matmul_precision()
    if saved == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


# --------------------------------------------------------------------------- #
# Accumulator
# --------------------------------------------------------------------------- #
class HessianAccumulator:
    """Running sum of ``x~ x~^T`` for one layer (all groups) plus the row count.

    Args:
        module: a prunable layer (see :func:`lightning_lobs.layers.is_prunable`).
        dtype: accumulation precision: ``torch.float64`` (default: products and sum in float64), ``torch.float32``,
            or ``"mixed"`` (float32 products of at most :data:`MIXED_CHUNK_ROWS` rows, float64 sum; ``sum`` and the
            Hessian are float64).
        max_chunk_elements: upper bound on the number of elements of any patch chunk
            materialised at once; batches are processed in chunks over samples and, if a
            single sample is too large, over output positions.
        position_stride: for convolutions, keep only every ``k``-th output position of
            each sample (flattened row-major) to cut the cost on very large maps.
        name: optional layer name used in error messages.
    """

    def __init__(
        self,
        module: nn.Module,
        dtype: HessianPrecision = torch.float64,
        max_chunk_elements: int = 2**24,
        position_stride: int = 1,
        name: str | None = None,
    ) -> None:
        shape = describe_layer(module)  # TypeError for a module that is not a prunable layer
        if not (isinstance(dtype, str) and dtype == "mixed") and dtype not in (torch.float64, torch.float32):
            raise ValueError(f"accumulation dtype must be torch.float64, torch.float32 or 'mixed', got {dtype!r}")
        if max_chunk_elements < 1:
            raise ValueError("max_chunk_elements must be >= 1")
        if position_stride < 1:
            raise ValueError("position_stride must be >= 1")
        self.module = module
        self.name = name if name is not None else type(module).__name__
        self.mixed = dtype == "mixed"
        #: dtype of the running sum and of the Hessian (float64 for ``"mixed"``)
        self.dtype: torch.dtype = torch.float64 if self.mixed else cast(torch.dtype, dtype)
        self._rows_dtype = self.dtype  # dtype the rows are multiplied in (set per input for "mixed")
        self.max_chunk_elements = int(max_chunk_elements)
        self.position_stride = int(position_stride)
        self._bias = shape.bias
        self._dw = shape.weight_cols
        self._groups = shape.groups
        device = cast(Tensor, module.weight).device
        self._sum = torch.zeros(self._groups, self.d, self.d, dtype=self.dtype, device=device)
        # "mixed": float32 sum of the latest < MIXED_CHUNK_ROWS rows, added to ``_sum`` when full (or when read)
        self._partial: Tensor | None = None
        self._partial_rows = 0
        self.count: int = 0
        self.max_abs: float = 0.0  # largest input magnitude seen, to explain an overflowed sum
        #: ``"mixed"`` met inputs whose float32 products would overflow or underflow: float64 products since then
        self.mixed_fallback = False

    @property
    def sum(self) -> Tensor:
        """The running sum of ``x~ x~^T`` (``"mixed"``: with its pending float32 part added first)."""
        self._flush()
        return self._sum

    @property
    def d(self) -> int:
        """Hessian side length: the layer's ``matrix_cols`` (weight columns, +1 if the layer has a bias)."""
        return self._dw + (1 if self._bias else 0)

    @property
    def groups(self) -> int:
        """Number of per-group Hessians."""
        return self._groups

    # ---------------------------------------------------------------- private
    def _accumulate(self, rows: Tensor) -> None:
        """Add rows ``(n, G, d_w)`` (any dtype/device) to the running sum."""
        n = rows.shape[0]
        if n == 0:
            return
        if self._rows_dtype != self.dtype:
            start = 0
            while start < n:  # pieces that fill the pending float32 part up to MIXED_CHUNK_ROWS
                piece = rows[start : start + MIXED_CHUNK_ROWS - self._partial_rows]
                self._accumulate_mixed(piece)
                start += piece.shape[0]
            return
        rows = rows.to(device=self._sum.device, dtype=self.dtype)
        xg = rows.transpose(0, 1)  # (G, n, d_w)
        k = self._dw
        if self._bias:
            self._sum[:, :k, :k].baddbmm_(xg.transpose(1, 2), xg)
            col = xg.sum(dim=1)  # (G, d_w)
            self._sum[:, :k, k] += col
            self._sum[:, k, :k] += col
            self._sum[:, k, k] += n
        else:
            self._sum.baddbmm_(xg.transpose(1, 2), xg)
        self.count += n

    def _accumulate_mixed(self, rows: Tensor) -> None:
        """``"mixed"``: add the float32 product of at most the rows the pending part lacks; flush it when full."""
        xg = rows.to(device=self._sum.device, dtype=self._rows_dtype).transpose(0, 1)  # (G, n, d_w)
        if self._bias:  # the ones column joins the product (counts <= 2048 are exact in float32)
            xg = torch.cat([xg, xg.new_ones(xg.shape[0], xg.shape[1], 1)], dim=2)
        # autocast off: under bf16/16-mixed training it would run the product in half precision (and return it so)
        with _full_float32_matmul(), torch.autocast(xg.device.type, enabled=False):
            if self._partial is None:
                self._partial = torch.bmm(xg.transpose(1, 2), xg)
            else:
                self._partial.baddbmm_(xg.transpose(1, 2), xg)
        self._partial_rows += rows.shape[0]
        self.count += rows.shape[0]
        if self._partial_rows >= MIXED_CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        """Add the pending float32 part to the float64 sum and free it."""
        if self._partial is not None:
            self._sum += self._partial.to(self._sum.dtype)  # converted first: ~2x faster than a mixed-dtype add
            self._partial, self._partial_rows = None, 0

    def _add_linear(self, x: Tensor) -> None:
        rows = x.reshape(-1, self._dw)
        step = max(1, self.max_chunk_elements // max(1, self._dw))
        for start in range(0, rows.shape[0], step):
            self._accumulate(rows[start : start + step].unsqueeze(1))

    def _add_conv(self, x: Tensor) -> None:
        m = cast(_ConvNd, self.module)
        xb = batched_conv_input(m, x)
        batch = xb.shape[0]
        if batch == 0:
            return
        spatial = xb.dim() - 2
        pads = conv_padding(m, spatial)
        padded_sizes = [s + l + r for s, (l, r) in zip(xb.shape[2:], pads)]
        out_shape = []
        for size, k, s, dl in zip(padded_sizes, m.kernel_size, m.stride, m.dilation):
            out_shape.append((size - (k - 1) * dl - 1) // s + 1 if size >= (k - 1) * dl + 1 else 0)
        positions = math.prod(out_shape)
        if positions == 0:
            raise ValueError(f"input of shape {tuple(x.shape)} is too small for layer {self.name!r}")
        ps = self.position_stride
        kept = -(-positions // ps)
        row_elems = self._groups * self._dw  # = C_in * prod(kernel)
        per_sample = max(kept * row_elems, m.in_channels * math.prod(padded_sizes))
        cap = self.max_chunk_elements

        if per_sample <= cap:
            step = max(1, cap // per_sample)
            for start in range(0, batch, step):
                chunk = pad_input(m, xb[start : start + step].to(self._rows_dtype))
                view, oshape = patch_view(m, chunk)
                b = chunk.shape[0]
                if ps == 1:
                    rows = view.reshape(b * positions, self._groups, self._dw)
                else:
                    idx = torch.arange(0, positions, ps, device=view.device)
                    sel = view[(slice(None),) + tuple(torch.unravel_index(idx, oshape))]
                    rows = sel.reshape(b * idx.numel(), self._groups, self._dw)
                self._accumulate(rows)
            return

        # A single sample is too large: chunk over (kept) output positions.
        pos_step = max(1, cap // max(1, row_elems)) * ps
        for s_idx in range(batch):
            sample = pad_input(m, xb[s_idx : s_idx + 1].to(self._rows_dtype))
            view, oshape = patch_view(m, sample)
            for start in range(0, positions, pos_step):
                idx = torch.arange(start, min(start + pos_step, positions), ps, device=view.device)
                sel = view[(slice(None),) + tuple(torch.unravel_index(idx, oshape))]
                self._accumulate(sel.reshape(idx.numel(), self._groups, self._dw))

    # ----------------------------------------------------------------- public
    def add(self, x: Tensor) -> None:
        """Accumulate one layer input (as the forward hook sees it) into the running sum."""
        if not isinstance(x, Tensor):
            raise TypeError(f"layer {self.name!r}: expected a Tensor input, got {type(x).__name__}")
        with torch.no_grad():
            x = x.detach()
            if self.mixed:  # float64 inputs keep their precision; anything else is multiplied in float32
                self._rows_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            if not x.is_floating_point():
                x = x.to(self._rows_dtype)
            if not bool(torch.isfinite(x).all()):
                raise ValueError(
                    f"input to layer {self.name!r} contains non-finite values (NaN or inf); "
                    "check the calibration data (and the model's earlier layers)"
                )
            if x.numel():
                self.max_abs = max(self.max_abs, float(x.abs().max()))
            if self.mixed and self._rows_dtype == torch.float32 and not _float32_products_safe(self.max_abs):
                # Products this large (or small) would overflow (or underflow) in float32: this layer's rows are
                # multiplied in float64 from here on, as hessian_dtype=torch.float64 would; the sum was float64.
                self.mixed_fallback = True
            if self.mixed_fallback:
                self._rows_dtype = torch.float64
            # qualified: a bare ``is_linear_like`` here would bypass the old name's DeprecationWarning
            if layers.is_linear_like(self.module):
                if x.shape[-1] != self._dw:
                    raise ValueError(
                        f"layer {self.name!r} expects last input dim {self._dw}, got shape {tuple(x.shape)}"
                    )
                self._add_linear(x)
            else:
                self._add_conv(x)

    def hessian(self) -> Tensor:
        """Averaged Hessian ``sum / count`` of shape ``(groups, d, d)`` (exactly symmetrised)."""
        if self.count == 0:
            raise RuntimeError(f"no calibration rows reached layer {self.name!r}; was it called during calibration?")
        if self.released:
            raise RuntimeError(
                f"the running sum of layer {self.name!r} was released (reduced to another rank, or its Hessian was "
                "already taken); take the Hessian on the rank it was reduced to, before releasing it."
            )
        h = self.sum / self.count
        if not bool(torch.isfinite(h).all()):
            raise ValueError(
                f"the Hessian of layer {self.name!r} overflowed {'float32 products' if self.mixed else self.dtype} "
                f"(its inputs reach {self.max_abs:.3g}, "
                f"squares up to {self.max_abs**2:.3g}); accumulate in CalibrationOptions(hessian_dtype=torch.float64) "
                "or normalise the inputs."
            )
        h = h + h.transpose(1, 2)  # the quotient freed here, and halved in place: two d x d copies alive, not three
        return h.mul_(0.5)

    def reduce(self, group: Any = None, dst: int | None = None) -> None:
        """Sum ``sum`` and ``count`` over all ranks if ``torch.distributed`` is initialised; no-op otherwise.

        ``dst`` (a rank of ``group``): only that rank receives the summed ``sum`` (``dist.reduce``), and every other
        rank frees its own (:meth:`release`): the Hessian then lives on the one rank that solves the layer. The
        count is summed on every rank either way (the output positions per sample are needed everywhere).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        device = self._sum.device
        if dst is None:
            dist.all_reduce(self.sum, op=dist.ReduceOp.SUM, group=group)
        else:
            dist.reduce(self.sum, dst=dist.get_global_rank(group, dst) if group is not None else dst, group=group)
            if dist.get_rank(group) != dst:
                self.release()
        count = torch.tensor([self.count], dtype=torch.int64, device=device)
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
        self.count = int(count.item())

    @property
    def released(self) -> bool:
        """Whether :meth:`release` freed the running sum (it is then a meta tensor of its shape: no data)."""
        return self._sum.device.type == "meta"

    def release(self) -> None:
        """Free the running sum (and ``"mixed"``'s pending part), keeping its shape and the count: after a reduce to
        another rank, or once :meth:`hessian` was taken. :meth:`hessian` raises afterwards; :meth:`reset` allocates
        a new sum."""
        self._sum = torch.empty(self._sum.shape, dtype=self._sum.dtype, device="meta")
        self._partial, self._partial_rows = None, 0

    def reset(self) -> None:
        """Zero the running sum and count."""
        if self.released:
            self._sum = torch.zeros(self._sum.shape, dtype=self.dtype, device=cast(Tensor, self.module.weight).device)
        self._sum.zero_()
        self._partial, self._partial_rows = None, 0
        self.count = 0
        self.max_abs, self.mixed_fallback = 0.0, False

    def state_dict(self) -> dict[str, Any]:
        """Serializable state: a copy of ``sum`` and ``count``."""
        return {"sum": self.sum.detach().clone(), "count": int(self.count)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`."""
        s = state["sum"]
        if tuple(s.shape) != tuple(self._sum.shape):
            raise ValueError(
                f"layer {self.name!r}: state sum has shape {tuple(s.shape)}, expected {tuple(self._sum.shape)}"
            )
        if self.released:
            self._sum = torch.empty(self._sum.shape, dtype=self.dtype, device=cast(Tensor, self.module.weight).device)
        self._sum.copy_(s.to(device=self._sum.device, dtype=self.dtype))
        self._partial, self._partial_rows = None, 0
        self.count = int(state["count"])

    def memory_bytes(self) -> int:
        """Bytes held by the running sum (and by ``"mixed"``'s pending float32 part while there is one)."""
        if self.released:
            return 0
        held = [self._sum] if self._partial is None else [self._sum, self._partial]
        return sum(t.numel() * t.element_size() for t in held)

    def __repr__(self) -> str:
        return (
            f"HessianAccumulator(name={self.name!r}, groups={self.groups}, d={self.d}, "
            f"count={self.count}, dtype={'mixed' if self.mixed else self.dtype})"
        )


# --------------------------------------------------------------------------- #
# Collector
# --------------------------------------------------------------------------- #
class HessianCollector:
    """Context manager streaming the inputs of named layers into :class:`HessianAccumulator` s.

    Registers a forward pre-hook on every module on ``__enter__``; every call of a module
    (including repeated calls of a weight-shared layer) is accumulated.  All hooks are
    removed on ``__exit__``, also when an exception propagates.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        dtype: HessianPrecision = torch.float64,
        max_chunk_elements: int = 2**24,
        position_stride: int = 1,
    ) -> None:
        self.modules: dict[str, nn.Module] = dict(modules)
        for name, mod in self.modules.items():
            if not is_prunable(mod):
                raise TypeError(f"layer {name!r} of type {type(mod).__name__} is not supported")
        self.accumulators: dict[str, HessianAccumulator] = {
            name: HessianAccumulator(
                mod,
                dtype=dtype,
                max_chunk_elements=max_chunk_elements,
                position_stride=position_stride,
                name=name,
            )
            for name, mod in self.modules.items()
        }
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _make_hook(self, name: str):
        acc = self.accumulators[name]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if args:
                x = args[0]
            elif "input" in kwargs:
                x = kwargs["input"]
            else:
                raise RuntimeError(f"could not find the input of layer {name!r} in its forward call")
            acc.add(x)

        return hook

    def __enter__(self) -> HessianCollector:
        self.remove()
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._make_hook(name), with_kwargs=True))
        logger.debug("collecting Hessians for %d layers", len(self._handles))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove all hooks (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def reduce(self, group: Any = None, owners: Mapping[str, int | None] | None = None) -> None:
        """All-reduce every accumulator across ranks (no-op without ``torch.distributed``); with ``owners`` (layer
        name -> rank of ``group``; a layer it does not name, or names None, is all-reduced), reduce each one to its
        owner only, freeing it on the others, one at a time (the memory held falls as the reduces go)."""
        for name, acc in self.accumulators.items():
            acc.reduce(group, None if owners is None else owners.get(name))

    def hessians(self) -> dict[str, Tensor]:
        """Averaged Hessians ``{name: (groups, d, d)}``."""
        return {name: acc.hessian() for name, acc in self.accumulators.items()}

    def memory_bytes(self) -> int:
        """Total bytes held by all running sums."""
        return sum(acc.memory_bytes() for acc in self.accumulators.values())
