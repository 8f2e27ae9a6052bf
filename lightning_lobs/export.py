"""What a pruned model is worth outside training: a compressed file and sparse inference kernels.

* :func:`save_sparse` / :func:`load_sparse` write and read a compressed copy of a model's whole
  ``state_dict`` (weights, biases, buffers, any dtype). Each tensor gets the smallest of three
  encodings, chosen by bytes: ``dense`` (raw), ``bitmask`` (one bit per entry + the kept values) or
  ``csr`` (int32 row pointers, int16 or int32 column indices + the kept values). Values keep the
  tensor's own dtype and are copied as raw bits, so a load gives back every entry bit for bit (NaN
  payloads included), except that a zero loads as ``+0.0`` even where it was ``-0.0`` (equal under
  ``torch.equal``; weights pruned by multiplication hold ``-0.0`` and must not count as kept). The file is a small JSON header plus one raw payload
  (no pickle: loading a file never runs code) with a CRC-32 of the payload.
* :func:`to_sparse_inference` swaps pruned ``nn.Linear`` layers for ones that run on sparse
  kernels (CSR ``torch.sparse.mm``; on CUDA GPUs with 2:4 support,
  ``torch.sparse.to_sparse_semi_structured``) where a quick measurement says that is faster.
* :func:`export_sparse` gives masked weights as torch sparse tensors (CSR with int32 indices, or COO).

File layout (little-endian)::

    b"LOBSSPRS" | uint32 version | uint32 header length | zlib(JSON header) | payload

Every payload part starts at a multiple of 8 bytes, so parts are viewed in place as their dtype.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import struct
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masks import _PRUNABLE_TYPES, MaskSet

__all__ = [
    "CSRLinear",
    "LayerPlan",
    "SemiStructuredLinear",
    "SparseFileInfo",
    "export_sparse",
    "load_sparse",
    "plan_sparse_inference",
    "read_sparse",
    "save_sparse",
    "to_sparse_inference",
]

log = logging.getLogger(__name__)

MAGIC = b"LOBSSPRS"
VERSION = 1
_PREAMBLE = struct.Struct("<8sII")  # magic, version, header length
_ALIGN = 8

# Integer dtype with the same item size, for bitwise nonzero tests and bit-exact copies.
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --------------------------------------------------------------------------- result


@dataclass
class SparseFileInfo:
    """What a sparse file holds and how much it saves (returned by :func:`save_sparse` and :func:`load_sparse`).

    ``cr`` is the paper's compression ratio: kept weights / all weights, counted over the ``weight`` of
    every ``nn.Linear`` / ``nn.ConvNd`` module and of every masked module (kept = the mask's ``True``
    entries where a mask was given, else the nonzero entries). ``file_ratio`` is the real one: the file's
    bytes over the bytes of ``torch.save(model.state_dict())``.
    """

    path: str
    file_bytes: int
    dense_bytes: int
    raw_bytes: int
    kept_weights: int
    total_weights: int
    encodings: dict[str, str] = field(default_factory=dict)

    @property
    def cr(self) -> float:
        """Kept weights / all weights of the prunable layers (1.0 for a model without any)."""
        return self.kept_weights / self.total_weights if self.total_weights else 1.0

    @property
    def file_ratio(self) -> float:
        """File bytes / bytes of ``torch.save(model.state_dict())``."""
        return self.file_bytes / self.dense_bytes if self.dense_bytes else float("nan")

    def summary(self) -> str:
        """One line: CR and the file ratio side by side."""
        return (
            f"CR {100 * self.cr:.2f}% (kept {self.kept_weights:,} of {self.total_weights:,} weights); "
            f"file {self.file_bytes:,} B = {self.file_ratio:.3f}x torch.save ({self.dense_bytes:,} B)"
        )


# --------------------------------------------------------------------------- encoding helpers


def _dtype_from_str(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in sparse file")
    return dtype


def _int_view(flat: Tensor) -> Tensor | None:
    """``flat`` (1-D, contiguous) viewed as the signed/unsigned integer dtype of its item size, or None."""
    int_dtype = _INT_VIEW.get(flat.element_size())
    if int_dtype is None or flat.dtype.is_complex:
        return None
    return flat if flat.dtype == int_dtype else flat.view(int_dtype)


def _pack_bits(bits: Tensor) -> Tensor:
    """Pack a 1-D bool tensor into uint8, bit ``i % 8`` of byte ``i // 8`` (little bit order)."""
    n = bits.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8)
    padded[:n] = bits.to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, n: int) -> Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:n].bool()


def _csr_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    """CSR view of a tensor: ``(shape[0], rest)``; 0-d and 1-d tensors are one row."""
    numel = math.prod(shape)
    if len(shape) < 2:
        return 1, numel
    return shape[0], numel // shape[0] if shape[0] else 0


def _col_dtype(cols: int) -> torch.dtype:
    # int16 holds column indices up to 65535: those above 32767 wrap to negative and are read back with
    # `& 0xFFFF`, so 2 bytes per kept weight cover every layer narrower than 65,536 inputs.
    if cols <= 1 << 16:
        return torch.int16
    return torch.int32 if cols <= 1 << 31 else torch.int64


def _encoding_sizes(numel: int, nnz: int, itemsize: int, shape: tuple[int, ...]) -> dict[str, int]:
    """Bytes of each encoding (payload only, before alignment padding)."""
    rows, cols = _csr_dims(shape)
    ptr_size = 4 if nnz < 1 << 31 else 8
    return {
        "dense": numel * itemsize,
        "bitmask": -(-numel // 8) + nnz * itemsize,
        "csr": (rows + 1) * ptr_size + nnz * torch.empty((), dtype=_col_dtype(cols)).element_size() + nnz * itemsize,
    }


@dataclass
class _Entry:
    key: str
    tensor: Tensor  # CPU, contiguous
    structure: Tensor | None  # bool, flat; None: dense only
    masked: bool


def _encode(entry: _Entry) -> tuple[str, list[tuple[str, Tensor]]]:
    """Choose the smallest encoding of one tensor; return its name and the parts to write."""
    t = entry.tensor
    flat = t.reshape(-1)
    if entry.structure is None or flat.numel() == 0:
        return "dense", [("data", flat)]
    structure = entry.structure
    nnz = int(structure.sum())
    sizes = _encoding_sizes(flat.numel(), nnz, t.element_size(), tuple(t.shape))
    if entry.masked:
        sizes.pop("dense")  # a masked weight keeps its mask in the file (at most 1 bit per weight more)
    encoding = min(sizes, key=lambda k: (sizes[k], k != "dense"))
    ints = _int_view(flat)
    assert ints is not None  # structure is only computed where an integer view exists
    values = ints[structure]
    if encoding == "dense":
        return "dense", [("data", flat)]
    if encoding == "bitmask":
        return "bitmask", [("bits", _pack_bits(structure)), ("values", values)]
    rows, cols = _csr_dims(tuple(t.shape))
    s2 = structure.view(rows, cols)
    ptr_dtype = torch.int32 if nnz < 1 << 31 else torch.int64
    crow = torch.zeros(rows + 1, dtype=ptr_dtype)
    torch.cumsum(s2.sum(1), 0, out=crow[1:])
    col = s2.nonzero()[:, 1]
    col_dtype = _col_dtype(cols)
    col = (col.to(torch.int32) if col_dtype == torch.int16 else col).to(col_dtype)  # int16 wraps above 32767
    return "csr", [("crow", crow), ("col", col), ("values", values)]


def _decode(encoding: str, parts: Mapping[str, Tensor], dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    numel = math.prod(shape)
    if encoding == "dense":
        return parts["data"].view(dtype).reshape(shape)
    int_dtype = _INT_VIEW[torch.empty((), dtype=dtype).element_size()]
    out = torch.zeros(numel, dtype=int_dtype)
    values = parts["values"]
    if encoding == "bitmask":
        out[_unpack_bits(parts["bits"], numel)] = values
    elif encoding == "csr":
        rows, cols = _csr_dims(shape)
        crow = parts["crow"].long()
        col = parts["col"]
        col = (col.to(torch.int64) & 0xFFFF) if col.dtype == torch.int16 else col.long()
        row = torch.repeat_interleave(torch.arange(rows), crow.diff())
        out[row * cols + col] = values
    else:
        raise ValueError(f"unknown encoding {encoding!r} in sparse file")
    return out.view(dtype).reshape(shape) if dtype != int_dtype else out.reshape(shape)


def _nonzero(flat: Tensor, ints: Tensor) -> Tensor:
    """Entries that are not 0 by value. A weight pruned by multiplication holds -0.0 wherever the kept value
    was negative: those are zeros (they load back as +0.0, equal under ``torch.equal``); storing them would
    keep half the pruned weights. NaN is nonzero, so its payload is stored bit for bit."""
    return flat != 0 if flat.is_floating_point() else ints != 0


def _state_entries(model: nn.Module, masks: Mapping[str, Tensor]) -> list[_Entry]:
    state = model.state_dict()
    unknown = [name for name in masks if f"{name}.weight" not in state]
    if unknown:
        raise KeyError(
            f"mask for module {unknown[0]!r}: the model's state_dict has no key {unknown[0] + '.weight'!r}"
        )
    mask_of = {f"{name}.weight": mask for name, mask in masks.items()}
    entries = []
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; save_sparse stores tensors only"
            )
        if value.layout != torch.strided or value.is_quantized or value.is_meta:
            raise TypeError(
                f"state_dict entry {key!r} is a {value.layout} / quantized / meta tensor; save_sparse stores dense "
                "strided tensors (save before to_sparse_inference)"
            )
        t = value.detach().to("cpu").contiguous()
        flat = t.reshape(-1)
        ints = _int_view(flat)
        mask = mask_of.get(key)
        if mask is not None:
            if tuple(mask.shape) != tuple(t.shape):
                raise ValueError(f"mask for {key!r} has shape {tuple(mask.shape)}, the tensor {tuple(t.shape)}")
            if ints is None:
                raise TypeError(f"cannot sparse-encode {key!r} of dtype {t.dtype}")
            structure = mask.detach().to("cpu").reshape(-1).bool()
            stray = _nonzero(flat, ints) & ~structure
            if bool(stray.any()):
                raise ValueError(
                    f"{key!r} has {int(stray.sum())} nonzero entries where its mask is False; apply the masks "
                    "first (MaskSet.apply(model)) or save without masks"
                )
            entries.append(_Entry(key, t, structure, masked=True))
        else:
            entries.append(_Entry(key, t, None if ints is None else _nonzero(flat, ints), masked=False))
    return entries


def _masks_mapping(masks: MaskSet | Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    if masks is None:
        return {}
    if isinstance(masks, MaskSet):
        return dict(masks.masks)
    return dict(masks)


class _CountingWriter:
    """File-like sink that only counts bytes (the size of ``torch.save`` without holding a copy)."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> int:
        self.n += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _torch_save_bytes(model: nn.Module) -> int:
    sink = _CountingWriter()
    try:
        torch.save(model.state_dict(), sink)
    except (AttributeError, io.UnsupportedOperation):  # a torch whose writer needs seek/tell
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        return buf.getbuffer().nbytes
    return sink.n


def _weight_counts(model: nn.Module, masks: Mapping[str, Tensor]) -> tuple[int, int]:
    kept = total = 0
    for name, module in model.named_modules():
        if not (isinstance(module, _PRUNABLE_TYPES) or name in masks):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.layout != torch.strided:
            continue
        total += weight.numel()
        mask = masks.get(name)
        kept += int(mask.sum()) if mask is not None else int(torch.count_nonzero(weight.detach()))
    return kept, total


# --------------------------------------------------------------------------- save / load


def save_sparse(
    model: nn.Module,
    path: str | os.PathLike[str],
    masks: MaskSet | Mapping[str, Tensor] | None = None,
) -> SparseFileInfo:
    """Write ``model.state_dict()`` to ``path`` in the compressed sparse format; return sizes and CR.

    Every tensor (weights, biases, buffers) is stored with the smallest of the ``dense``, ``bitmask`` and
    ``csr`` encodings of its nonzero entries; loading gives back every bit, except that ``-0.0`` loads as
    ``+0.0`` where a sparse encoding was chosen. ``masks`` (a :class:`MaskSet` or
    ``{module name: bool mask}``, e.g. ``LOBSPruning.masks``) makes a masked weight's structure its mask:
    kept weights that are 0 are stored too, and a masked weight is never stored without its mask. Its
    pruned entries must be zero (``ValueError`` otherwise). The file is written to a temporary name and
    renamed, so ``path`` never holds half a file. Under DDP call it on one rank (``trainer.is_global_zero``);
    ``LOBSPruning(save_sparse="model.lobs")`` does exactly that at the end of ``fit``.
    """
    path = os.fspath(path)
    mask_map = _masks_mapping(masks)
    entries = _state_entries(model, mask_map)

    header_entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    offset = 0
    for entry in entries:
        encoding, parts = _encode(entry)
        part_records = []
        for part_name, part in parts:
            data = part.contiguous().view(torch.uint8).numpy().tobytes() if part.numel() else b""
            pad = -offset % _ALIGN
            if pad:
                chunks.append(b"\0" * pad)
                offset += pad
            part_records.append(
                {"name": part_name, "dtype": str(part.dtype), "offset": offset, "nbytes": len(data)}
            )
            chunks.append(data)
            offset += len(data)
        header_entries.append(
            {
                "key": entry.key,
                "dtype": str(entry.tensor.dtype),
                "shape": list(entry.tensor.shape),
                "encoding": encoding,
                "masked": entry.masked,
                "parts": part_records,
            }
        )
    payload = b"".join(chunks)
    kept, total = _weight_counts(model, mask_map)
    dense_bytes = _torch_save_bytes(model)
    header = {
        "format": "lightning-lobs-sparse",
        "byteorder": sys.byteorder,
        "model": type(model).__name__,
        "entries": header_entries,
        "payload_bytes": len(payload),
        "payload_crc32": zlib.crc32(payload),
        "kept_weights": kept,
        "total_weights": total,
        "dense_bytes": dense_bytes,
        "raw_bytes": sum(e.tensor.numel() * e.tensor.element_size() for e in entries),
    }
    header_bytes = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    preamble = _PREAMBLE.pack(MAGIC, VERSION, len(header_bytes))
    pad = -(len(preamble) + len(header_bytes)) % _ALIGN  # payload offsets are relative to an aligned start

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(preamble)
            f.write(header_bytes)
            f.write(b"\0" * pad)
            f.write(payload)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    info = _info_from_header(header, path, os.path.getsize(path))
    log.info("save_sparse %s: %s", path, info.summary())
    return info


def _info_from_header(header: Mapping[str, Any], path: str, file_bytes: int) -> SparseFileInfo:
    return SparseFileInfo(
        path=path,
        file_bytes=file_bytes,
        dense_bytes=int(header["dense_bytes"]),
        raw_bytes=int(header["raw_bytes"]),
        kept_weights=int(header["kept_weights"]),
        total_weights=int(header["total_weights"]),
        encodings={e["key"]: e["encoding"] for e in header["entries"]},
    )


def _read(path: str) -> tuple[dict[str, Any], Tensor]:
    """Header and payload (a uint8 tensor over the file's bytes) of a sparse file, checked."""
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    if len(blob) < _PREAMBLE.size or bytes(blob[:8]) != MAGIC:
        raise ValueError(f"{path!r} is not a lightning-lobs sparse file (written by save_sparse)")
    _, version, header_len = _PREAMBLE.unpack_from(blob)
    if version != VERSION:
        raise ValueError(f"{path!r} has sparse format version {version}; this lightning-lobs reads {VERSION}")
    start = _PREAMBLE.size
    try:
        header = json.loads(zlib.decompress(bytes(blob[start : start + header_len])))
    except (zlib.error, ValueError) as err:
        raise ValueError(f"{path!r}: corrupted header ({err})") from None
    if header.get("byteorder") != sys.byteorder:
        raise ValueError(f"{path!r} was written on a {header.get('byteorder')}-endian machine")
    begin = start + header_len
    begin += -begin % _ALIGN
    payload = memoryview(blob)[begin:]
    if len(payload) != header["payload_bytes"] or zlib.crc32(payload) != header["payload_crc32"]:
        raise ValueError(f"{path!r} is truncated or corrupted (payload size or CRC-32 does not match)")
    data = torch.frombuffer(blob, dtype=torch.uint8, offset=begin) if len(payload) else torch.empty(0, dtype=torch.uint8)
    return header, data


def _decode_entry(entry: Mapping[str, Any], data: Tensor) -> Tensor:
    parts = {}
    for part in entry["parts"]:
        raw = data[part["offset"] : part["offset"] + part["nbytes"]]
        parts[part["name"]] = raw.view(_dtype_from_str(part["dtype"]))
    return _decode(entry["encoding"], parts, _dtype_from_str(entry["dtype"]), tuple(entry["shape"]))


def read_sparse(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Decode a file written by :func:`save_sparse` into a plain (CPU) ``state_dict``, without a model."""
    header, data = _read(os.fspath(path))
    return {e["key"]: _decode_entry(e, data).clone() for e in header["entries"]}


def load_sparse(model: nn.Module, path: str | os.PathLike[str]) -> SparseFileInfo:
    """Load a file written by :func:`save_sparse` into ``model`` in place, bit for bit; return its info.

    The file must have been written for the same architecture: the same ``state_dict`` keys, shapes and
    dtypes. Otherwise ``ValueError`` names the first difference and nothing is loaded. Values are copied
    onto the model's own devices.
    """
    path = os.fspath(path)
    header, data = _read(path)
    state = model.state_dict()
    in_file = {e["key"]: e for e in header["entries"]}
    where = f"{path!r} (saved from a {header.get('model', '?')}) does not match this {type(model).__name__}"
    for key, value in state.items():
        entry = in_file.get(key)
        if entry is None:
            raise ValueError(f"{where}: the model has {key!r}, the file does not")
        if not isinstance(value, Tensor):
            raise ValueError(f"{where}: the model's {key!r} is not a tensor")
        if list(value.shape) != list(entry["shape"]):
            raise ValueError(
                f"{where}: {key!r} has shape {tuple(entry['shape'])} in the file, {tuple(value.shape)} in the model"
            )
        if str(value.dtype) != entry["dtype"]:
            raise ValueError(f"{where}: {key!r} is {entry['dtype']} in the file, {value.dtype} in the model")
    extra = [key for key in in_file if key not in state]
    if extra:
        raise ValueError(f"{where}: the file has {extra[0]!r}, the model does not")
    decoded = {key: _decode_entry(entry, data) for key, entry in in_file.items()}
    model.load_state_dict(decoded, strict=True)
    return _info_from_header(header, path, os.path.getsize(path))


# --------------------------------------------------------------------------- torch sparse export


def export_sparse(model: nn.Module, masks: MaskSet, layout: str = "csr") -> dict[str, Tensor]:
    """Export masked weights as torch sparse tensors for deployment.

    Returns ``{"<module>.weight": sparse tensor}`` for every masked module only. Each weight is viewed as
    2-D ``(shape[0], rest)`` (e.g. ``out x in*kh*kw`` for Conv2d); the sparsity structure is the mask (kept
    weights that happen to be 0 are stored explicitly). ``layout`` is ``"csr"`` (int32 row and column
    indices where the counts fit, else int64) or ``"coo"`` (coalesced; torch requires int64 indices).
    Tensors are detached and stay on the weight's device. For a file, use :func:`save_sparse`.
    """
    if layout not in ("csr", "coo"):
        raise ValueError(f"layout must be 'csr' or 'coo', got {layout!r}")
    out: dict[str, Tensor] = {}
    for name, weight in masks._resolve_all(model).items():
        w2d = weight.detach().reshape(weight.shape[0], -1) if weight.dim() else weight.detach().reshape(1, 1)
        m2d = masks.masks[name].to(weight.device).reshape(w2d.shape)
        if layout == "csr":
            rows, cols = w2d.shape
            nnz = int(m2d.sum())
            idx_dtype = torch.int32 if max(nnz, cols) < 1 << 31 else torch.int64
            crow = torch.zeros(rows + 1, dtype=idx_dtype, device=w2d.device)
            torch.cumsum(m2d.sum(1), 0, out=crow[1:])
            col = m2d.nonzero()[:, 1].to(idx_dtype)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                out[f"{name}.weight"] = torch.sparse_csr_tensor(
                    crow, col, w2d[m2d], size=(rows, cols), dtype=w2d.dtype, device=w2d.device,
                    check_invariants=False,  # built from nonzero(): sorted, in range by construction
                )
        else:
            out[f"{name}.weight"] = torch.sparse_coo_tensor(
                m2d.nonzero().t(), w2d[m2d], size=tuple(w2d.shape), dtype=w2d.dtype, device=w2d.device,
                check_invariants=False,
            ).coalesce()
    return out


# --------------------------------------------------------------------------- sparse inference


class CSRLinear(nn.Module):
    """Inference-only ``nn.Linear`` whose weight is a CSR tensor (int32 indices) multiplied with
    ``torch.sparse.mm``: ``y = (W_csr @ x^T)^T + b``. Not trainable."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach()
        mask = w != 0
        crow = torch.zeros(w.shape[0] + 1, dtype=torch.int32, device=w.device)
        torch.cumsum(mask.sum(1), 0, out=crow[1:])
        col = mask.nonzero()[:, 1].to(torch.int32)  # int32 indices ran faster than int64 in MKL's CSR kernels here
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = torch.sparse_csr_tensor(crow, col, w[mask], size=tuple(w.shape), check_invariants=False)
        self.register_buffer("weight", csr)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> CSRLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight, x2.t().contiguous()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight._nnz()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}, bias={self.bias is not None}"


def is_two_four(weight: Tensor) -> bool:
    """Whether every group of 4 consecutive inputs of each row holds at most 2 nonzeros (2:4 sparsity)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.detach() != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


class SemiStructuredLinear(nn.Module):
    """Inference-only ``nn.Linear`` with a 2:4 weight in PyTorch's semi-structured format (CUDA, sm80+),
    multiplied by ``F.linear`` on the sparse tensor cores. Not trainable."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(to_sparse_semi_structured(weight.detach().contiguous()), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SemiStructuredLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4, bias={self.bias is not None}"


Kernel = Literal["dense", "csr", "semi_structured"]
_BUILDERS: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "csr": CSRLinear.from_linear,
    "semi_structured": SemiStructuredLinear.from_linear,
}


@dataclass
class LayerPlan:
    """The kernel chosen for one ``nn.Linear`` and why (times: median ms per forward at the planned batch)."""

    name: str
    shape: tuple[int, int]
    sparsity: float
    kernel: Kernel
    reason: str
    dense_ms: float | None = None
    sparse_ms: dict[str, float] = field(default_factory=dict)


def _semi_structured_unsupported(weight: Tensor) -> str | None:
    """Why the 2:4 semi-structured kernel cannot take ``weight`` (None: it can)."""
    if not weight.is_cuda:
        return "2:4 kernels need a CUDA device"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return "2:4 kernels need compute capability 8.0+"
    if not is_two_four(weight):
        return "weight is not 2:4"
    return None


def _candidates(weight: Tensor, sparsity: float, min_sparsity: float) -> tuple[list[str], list[str]]:
    kernels, why_not = [], []
    reason = _semi_structured_unsupported(weight)
    if reason is None:
        kernels.append("semi_structured")
    elif weight.is_cuda:
        why_not.append(reason)
    if sparsity < min_sparsity:
        why_not.append(f"sparsity {sparsity:.3f} < min_sparsity {min_sparsity}")
    elif weight.dtype not in (torch.float32, torch.float64) and not weight.is_cuda:
        why_not.append(f"no CPU CSR kernel for {weight.dtype}")
    else:
        kernels.append("csr")
    return kernels, why_not


def _median_ms(fns: Mapping[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """Median ms per call of each fn. The fns take turns call by call, so a burst of load from other
    processes slows all of them alike instead of whichever happened to run during it."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - t0)
    return {key: 1e3 * sorted(ts)[len(ts) // 2] for key, ts in times.items()}


def plan_sparse_inference(
    model: nn.Module,
    batch_size: int = 1,
    mode: Literal["auto", "sparse", "dense"] = "auto",
    min_sparsity: float = 0.5,
    min_speedup: float = 1.1,
    repeats: int = 20,
    warmup: int = 3,
) -> dict[str, LayerPlan]:
    """Choose a kernel for every plain ``nn.Linear`` of ``model`` (subclasses, e.g. attention's out_proj
    whose weight is read directly, are left alone).

    Candidates: ``semi_structured`` for 2:4 weights on CUDA devices of compute capability 8.0+, ``csr``
    for weights at least ``min_sparsity`` sparse (float32/float64 on CPU). ``mode="auto"`` times the dense
    layer and each candidate on a random ``(batch_size, in_features)`` input (median of ``repeats`` calls
    each, taking turns, after ``warmup``, with the current thread count) and takes the fastest candidate if it beats dense by
    ``min_speedup``; ``"sparse"`` takes the first candidate unmeasured (2:4 before CSR); ``"dense"`` none.
    """
    if mode not in ("auto", "sparse", "dense"):
        raise ValueError(f"mode must be 'auto', 'sparse' or 'dense', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plans: dict[str, LayerPlan] = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        weight = module.weight.detach()
        sparsity = 1.0 - int(torch.count_nonzero(weight)) / max(weight.numel(), 1)
        plan = LayerPlan(name, tuple(weight.shape), sparsity, "dense", "")
        plans[name] = plan
        kernels, why_not = _candidates(weight, sparsity, min_sparsity)
        if mode == "dense" or not kernels:
            plan.reason = "mode='dense'" if mode == "dense" else "; ".join(why_not) or "no sparse kernel applies"
            continue
        if mode == "sparse":
            plan.kernel, plan.reason = kernels[0], "mode='sparse'"
            continue
        x = torch.randn(batch_size, weight.shape[1], dtype=weight.dtype, device=weight.device)
        with torch.inference_mode():
            fns: dict[str, Callable[[], Any]] = {"dense": lambda: module(x)}
            for kernel in kernels:
                try:
                    layer = _BUILDERS[kernel](module)
                    layer(x)
                    fns[kernel] = lambda layer=layer: layer(x)
                except (RuntimeError, NotImplementedError) as err:  # e.g. a shape/dtype the kernel refuses
                    why_not.append(f"{kernel} failed: {str(err).splitlines()[0][:120]}")
            times = _median_ms(fns, weight.device, repeats, warmup)
        plan.dense_ms = times.pop("dense")
        plan.sparse_ms = times
        if plan.sparse_ms:
            best = min(plan.sparse_ms, key=plan.sparse_ms.__getitem__)
            speedup = plan.dense_ms / plan.sparse_ms[best]
            if speedup >= min_speedup:
                plan.kernel, plan.reason = best, f"{best} {speedup:.2f}x faster at batch {batch_size}"
            else:
                plan.reason = f"{best} only {speedup:.2f}x dense speed at batch {batch_size}"
        else:
            plan.reason = "; ".join(why_not)
    return plans


def to_sparse_inference(
    model: nn.Module,
    batch_size: int = 1,
    mode: Literal["auto", "sparse", "dense"] = "auto",
    *,
    inplace: bool = False,
    plan: Mapping[str, LayerPlan] | None = None,
    **plan_kwargs: Any,
) -> nn.Module:
    """Return ``model`` for inference with its pruned ``nn.Linear`` layers on sparse kernels where faster.

    By default a deep copy is changed and returned (the original stays trainable and untouched);
    ``inplace=True`` swaps the layers of ``model`` itself. The choice per layer is
    :func:`plan_sparse_inference` (``batch_size``, ``mode`` and ``plan_kwargs`` go to it), or ``plan`` if
    given. The swapped layers compute the same function up to float rounding (sums in another order);
    they are inference-only and hold no trainable weight, so save the model with :func:`save_sparse`
    before swapping. Apply the masks first (the sparsity is read from the zeros of the weights).
    """
    if plan is None:
        plan = plan_sparse_inference(model, batch_size=batch_size, mode=mode, **plan_kwargs)
    target = model if inplace else copy.deepcopy(model)
    for name, layer_plan in plan.items():
        if layer_plan.kernel == "dense":
            continue
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        linear = getattr(parent, child)
        if type(linear) is not nn.Linear:
            raise TypeError(f"plan names {name!r}, which is a {type(linear).__name__}, not an nn.Linear")
        setattr(parent, child, _BUILDERS[layer_plan.kernel](linear))
        log.info("to_sparse_inference: %s -> %s (%s)", name, layer_plan.kernel, layer_plan.reason)
    return target
