"""What a pruned model is worth outside training: a compressed file and sparse inference kernels.

* :func:`save_sparse` / :func:`load_sparse` / :func:`read_sparse` write and read a compressed copy of a
  model's whole ``state_dict`` (weights, biases, buffers, any dtype). Each tensor gets the smallest of
  three encodings, chosen by bytes: ``dense`` (raw), ``bitmask`` (one bit per entry + the kept values) or
  ``csr`` (int32 row pointers, int16 or int32 column indices + the kept values). Values keep the tensor's
  own dtype and are copied as raw bits, so a load gives back every entry bit for bit (NaN payloads
  included), except that a zero loads as ``+0.0`` even where it was ``-0.0`` (equal under
  ``torch.equal``; weights pruned by multiplication hold ``-0.0`` and must not count as kept).
  ``load_sparse`` also gives back the masks saved with the file (``SparseFileInfo.masks``), for retraining.
* :func:`to_sparse_inference` swaps pruned ``nn.Linear`` and ``transformers`` ``Conv1D`` layers for ones that
  run on sparse kernels (CSR ``torch.sparse.mm``; on CUDA GPUs with 2:4 support,
  ``torch.sparse.to_sparse_semi_structured``) where a quick measurement says that is faster, and says which
  layers it kept dense and why.
* :func:`export_sparse` gives masked weights as torch sparse tensors (CSR with int32 indices, or COO).

The file is a `safetensors <https://github.com/huggingface/safetensors>`_ file (format version 2): a
little-endian uint64 header length, a JSON header naming every tensor's dtype, shape and byte range, then the
raw bytes. A dense-encoded entry is stored under its ``state_dict`` key as itself (dtypes safetensors lacks,
e.g. complex128, as raw ``uint8`` bytes); a sparse one as plain tensors ``<key>:bits`` + ``<key>:values``
(bitmask) or ``<key>:crow`` + ``<key>:col`` + ``<key>:values`` (CSR). ``__metadata__`` holds
``format="lightning-lobs-sparse"``, ``format_version="2"``, ``entries`` (JSON: key, dtype, shape, encoding,
masked, per ``state_dict`` entry), a CRC-32 over ``entries`` and every tensor's bytes (in name order), the
model's class name and the sizes of :class:`SparseFileInfo`. The header's keys are sorted, so one model always
gives the same bytes.

What a file can do to the reader: be refused with one ``ValueError`` naming the file and what is wrong, or
load the values it holds; nothing else. No pickle, so no code runs. The header length is checked against the
file's size (and safetensors' 100 MB cap) before the header is read. Every tensor's dtype, shape and byte range
(in bounds, contiguous, covering the data exactly) and every entry's parts (the dtypes and shapes its encoding
implies) are validated from the header alone; ``load_sparse`` then checks every key, shape and dtype against the
model and ``read_sparse`` the decoded size against ``max_bytes``, all before the data is read. The CRC, CSR row
pointers (from 0, monotone, ending at the value count), column indices (in the row, increasing), bitmask
population (the value count) and bool bytes (0 or 1) are checked as each entry is decoded into a new tensor,
before the first value reaches the model. So ``load_sparse`` allocates about the file plus one copy of the
model's state, and a refused file leaves the model as it was. Files of the old custom format (``b"LOBSSPRS"``,
version 1) are refused with a note on how to convert them.

:func:`save_sparse` is atomic: a temporary file created exclusively (``tempfile.mkstemp``: random name, no symlink
followed) in the target's directory is written, fsynced and ``os.replace``-d onto the target, and removed on any
failure.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import logging
import math
import os
import struct
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import is_hf_conv1d, is_maskable
from .masks import MaskSet, resolve_weight
from .sharding import sharded_parameters

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

FORMAT = "lightning-lobs-sparse"
VERSION = 2
_OLD_MAGIC = b"LOBSSPRS"  # format version 1, lightning-lobs 0.1.0's own layout
_MAX_HEADER = 100_000_000  # the safetensors library refuses longer headers, so no writer makes them
# Dimensions of a tensor in a file: a bound on the reader's work for a crafted header (math.prod over a shape of
# millions of huge counts); torch tensors in practice have a handful, and save_sparse refuses more before writing.
_MAX_DIMS = 1024
_SHAPE_RULE = f"at most {_MAX_DIMS} dimensions, each below 2**63"
# read_sparse's default bound on decoded bytes: 100x the file (float32 at 99% sparsity in CSR decodes to ~66x),
# at least 1 MiB (small files with all-zero buffers); load_sparse is bounded by the model instead.
_READ_RATIO = 100
_READ_FLOOR = 1 << 20

# Bits set in each byte value.
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)

# Integer dtype with the same item size, for bitwise nonzero tests and bit-exact copies.
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# safetensors' dtype names (its specification), for the dtypes this torch has.
_ST_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "C64": "complex64",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
}
_ST_DTYPES: dict[str, torch.dtype] = {
    st: getattr(torch, name) for st, name in _ST_NAMES.items() if isinstance(getattr(torch, name, None), torch.dtype)
}
# The dtypes a file may hold: safetensors' own, plus those stored as raw bytes.
_FILE_DTYPES: dict[str, torch.dtype] = {str(d): d for d in _ST_DTYPES.values()}
for _extra in (torch.complex128, torch.complex32):
    _FILE_DTYPES[str(_extra)] = _extra


# --------------------------------------------------------------------------- result


@dataclass
class SparseFileInfo:
    """What a sparse file holds and how much it saves (returned by :func:`save_sparse` and :func:`load_sparse`).

    ``masks`` are the masks the file holds, ``{name: bool mask}`` on the CPU, named as a :class:`MaskSet`
    names them (a module's name for its ``weight``, a Parameter's own name such as ``attn.in_proj_weight``):
    those given to :func:`save_sparse`, or those :func:`load_sparse` read back (names relative to the model
    loaded into), so a reloaded model can be retrained with its pruned weights held at 0
    (:meth:`mask_set`). Empty for a file saved without masks.

    ``cr`` is the paper's compression ratio: kept weights / all weights, counted once per tensor over the
    ``weight`` of every ``nn.Linear`` / ``nn.ConvNd`` module and every masked tensor (a module's weight, or a
    Parameter such as an attention's ``in_proj_weight``; kept = the mask's ``True`` entries where a mask was
    given, else the nonzero entries). ``file_ratio`` is the real one: the file's
    bytes over the bytes of ``torch.save(model.state_dict())``.
    """

    path: str
    file_bytes: int
    dense_bytes: int
    raw_bytes: int
    kept_weights: int
    total_weights: int
    encodings: dict[str, str] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)  # ==: the sizes, as before

    def mask_set(self) -> MaskSet:
        """The file's masks as a :class:`MaskSet`: ``info.mask_set().attach(model, optimizer)`` holds the pruned
        weights at 0 through retraining, as ``LOBSPruning`` does after a prune."""
        masks = MaskSet()
        masks.update(self.masks)
        return masks

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


def refuse_sharded(model: nn.Module, what: str) -> None:
    """``ValueError`` before any work when ``model`` has ``fully_shard`` (DTensor) parameters: each rank holds
    only its shards, and a file or a sparse copy made from them would silently be part of the model."""
    names = sharded_parameters(model)
    if names:
        raise ValueError(
            f"{what} needs whole weights, but {len(names)} parameters of this model are sharded by fully_shard "
            f"(FSDP2), e.g. {names[:3]}: each rank holds only its shards. Gather a full copy first, e.g. with "
            "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
            "full_state_dict=True)) loaded into an unsharded model on one rank, then call it there."
        )


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


def _unpack_bits(packed: Tensor) -> Tensor:
    """Every bit of ``packed`` (uint8) as a bool tensor of ``8 * packed.numel()`` entries, padding included."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.unsqueeze(1) >> shifts) & 1).view(-1).bool()


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


def _ptr_dtype(nnz: int) -> torch.dtype:
    return torch.int32 if nnz < 1 << 31 else torch.int64


def _encoding_sizes(numel: int, nnz: int, itemsize: int, shape: tuple[int, ...]) -> dict[str, int]:
    """Bytes of each encoding (tensor data only)."""
    rows, cols = _csr_dims(shape)
    return {
        "dense": numel * itemsize,
        "bitmask": -(-numel // 8) + nnz * itemsize,
        "csr": (rows + 1) * _ptr_dtype(nnz).itemsize + nnz * _col_dtype(cols).itemsize + nnz * itemsize,
    }


def _dense_storage(dtype: torch.dtype) -> torch.dtype:
    """The dtype a dense entry is stored as: its own where safetensors has it, else raw bytes."""
    return dtype if dtype in _ST_DTYPES.values() else torch.uint8


def _values_storage(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a sparse entry's values: its own where safetensors has it, else the same-size integer."""
    return dtype if dtype in _ST_DTYPES.values() else _INT_VIEW[dtype.itemsize]


@dataclass
class _Entry:
    key: str
    tensor: Tensor  # CPU, contiguous
    structure: Tensor | None  # bool, flat; None: dense only
    masked: bool


def _encode(entry: _Entry) -> tuple[str, dict[str, Tensor]]:
    """Choose the smallest encoding of one tensor; return its name and its parts."""
    t = entry.tensor
    flat = t.reshape(-1)
    if entry.structure is None or flat.numel() == 0:
        return "dense", {"data": _as_dense_part(t)}
    structure = entry.structure
    nnz = int(structure.sum())
    sizes = _encoding_sizes(flat.numel(), nnz, t.element_size(), tuple(t.shape))
    if entry.masked:
        sizes.pop("dense")  # a masked weight keeps its mask in the file (at most 1 bit per weight more)
    encoding = min(sizes, key=lambda k: (sizes[k], k != "dense"))
    if encoding == "dense":
        return "dense", {"data": _as_dense_part(t)}
    ints = _int_view(flat)
    assert ints is not None  # structure is only computed where an integer view exists
    values = ints[structure].view(_values_storage(t.dtype))
    if encoding == "bitmask":
        return "bitmask", {"bits": _pack_bits(structure), "values": values}
    rows, cols = _csr_dims(tuple(t.shape))
    s2 = structure.view(rows, cols)
    crow = torch.zeros(rows + 1, dtype=_ptr_dtype(nnz))
    torch.cumsum(s2.sum(1), 0, out=crow[1:])
    col = s2.nonzero()[:, 1]
    col_dtype = _col_dtype(cols)
    col = (col.to(torch.int32) if col_dtype == torch.int16 else col).to(col_dtype)  # int16 wraps above 32767
    return "csr", {"crow": crow, "col": col, "values": values}


def _as_dense_part(t: Tensor) -> Tensor:
    storage = _dense_storage(t.dtype)
    return t if storage == t.dtype else t.reshape(-1).view(torch.uint8)


def _part_name(key: str, encoding: str, part: str) -> str:
    """The safetensors name of one part: a dense entry is stored under its own key, so tools see it as is."""
    return key if encoding == "dense" else f"{key}:{part}"


def _nonzero(flat: Tensor, ints: Tensor) -> Tensor:
    """Entries that are not 0 by value. A weight pruned by multiplication holds -0.0 wherever the kept value
    was negative: those are zeros (they load back as +0.0, equal under ``torch.equal``); storing them would
    keep half the pruned weights. NaN is nonzero, so its payload is stored bit for bit."""
    return flat != 0 if flat.is_floating_point() else ints != 0


def _check_storable(key: str, value: Any) -> None:
    """Refuse a ``state_dict`` entry the file cannot hold, or that the reader would refuse, naming the way out."""
    if not isinstance(value, Tensor):
        raise TypeError(
            f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; save_sparse stores tensors only"
        )
    if value.layout != torch.strided or value.is_quantized or value.is_meta:
        raise TypeError(
            f"state_dict entry {key!r} is a {value.layout} / quantized / meta tensor; save_sparse stores dense "
            "strided tensors (save before to_sparse_inference)"
        )
    if str(value.dtype) not in _FILE_DTYPES:
        raise TypeError(f"state_dict entry {key!r} has dtype {value.dtype}, which save_sparse cannot store")
    if value.dim() > _MAX_DIMS:
        # The reader bounds a shape's length so that a crafted header cannot make it multiply millions of numbers;
        # writing what it would refuse would give a file that cannot be loaded back.
        raise ValueError(
            f"state_dict entry {key!r} has {value.dim()} dimensions; a sparse file holds tensors of at most "
            f"{_MAX_DIMS} (load_sparse refuses more): keep it with fewer dimensions in the state_dict (e.g. a "
            "flattened buffer reshaped in forward), or save this model with torch.save"
        )


def _state_entries(model: nn.Module, masks: Mapping[str, Tensor]) -> list[_Entry]:
    state = model.state_dict()
    mask_of: dict[str, Tensor] = {}
    for name, mask in masks.items():
        # a module's mask covers '<name>.weight'; a Parameter's (an attention's in_proj_weight) '<name>' itself
        key = f"{name}.weight" if f"{name}.weight" in state else name
        if key not in state:
            raise KeyError(f"mask {name!r}: the model's state_dict has neither {name + '.weight'!r} nor {name!r}")
        mask_of[key] = mask
    entries = []
    seen_storage: set[int] = set()
    for key, value in state.items():
        _check_storable(key, value)
        t = value.detach().to("cpu").contiguous()
        if t.numel():
            # safetensors refuses tensors sharing memory (tied weights appear under two keys): copy the second
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storage:
                t = t.clone()
            seen_storage.add(t.untyped_storage().data_ptr())
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
    """Kept and total entries of the masked weights and of every other prunable layer's weight, each tensor once."""
    kept = total = 0
    counted: set[int] = set()
    for name, mask in masks.items():
        weight = resolve_weight(model, name)
        if id(weight) not in counted:
            counted.add(id(weight))
            total += weight.numel()
            kept += int(mask.sum())
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not is_maskable(module) or not isinstance(weight, Tensor) or weight.layout != torch.strided:
            continue
        if id(weight) not in counted:
            counted.add(id(weight))
            total += weight.numel()
            kept += int(torch.count_nonzero(weight.detach()))
    return kept, total


def _tensor_bytes(t: Tensor) -> memoryview:
    return t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else memoryview(b"")


def _checksum(entries_json: str, tensors: Mapping[str, Any]) -> int:
    """CRC-32 of the entries' JSON and every tensor's bytes in name order (independent of the file's layout)."""
    crc = zlib.crc32(entries_json.encode())
    for name in sorted(tensors):
        crc = zlib.crc32(tensors[name], crc)
    return crc


# --------------------------------------------------------------------------- atomic write


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:  # Linux: read without changing it (os.umask races other threads)
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_atomic(path: str, chunks: list[bytes | memoryview]) -> None:
    """Write ``chunks`` to ``path`` all or nothing: a temporary file created exclusively (random name, no symlink
    followed) in the target's directory, flushed and fsynced, then renamed onto ``path``; removed on failure."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # the name is cut so the temporary one stays within the file system's 255-byte limit
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)[:200]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # mkstemp makes it 0600; give it the mode a plain open() would
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError, AttributeError):  # the rename itself survives a crash (POSIX only)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --------------------------------------------------------------------------- save


def _encode_entries(entries: list[_Entry]) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """Each state entry's record for the file's ``entries`` metadata, and every tensor part by its name in the file."""
    records: list[dict[str, Any]] = []
    tensors: dict[str, Tensor] = {}
    for entry in entries:
        encoding, parts = _encode(entry)
        for part, tensor in parts.items():
            name = _part_name(entry.key, encoding, part)
            if name in tensors:
                raise ValueError(
                    f"state_dict keys {entry.key!r} and {name!r} would share the tensor name {name!r} in the file; "
                    "rename the buffer"
                )
            tensors[name] = tensor.contiguous()
        records.append(
            {
                "key": entry.key,
                "dtype": str(entry.tensor.dtype),
                "shape": list(entry.tensor.shape),
                "encoding": encoding,
                "masked": entry.masked,
            }
        )
    return records, tensors


def _sorted_header(blob: memoryview) -> list[bytes | memoryview]:
    """The safetensors file ``blob`` as parts to write, its JSON header rewritten with sorted keys.

    safetensors writes ``__metadata__`` in hash-map order, which changes from call to call: the header is written
    again with sorted keys, so one model always gives the same bytes (same offsets, same length).
    """
    (header_len,) = struct.unpack("<Q", blob[:8])
    parsed = json.loads(bytes(blob[8 : 8 + header_len]))
    header = json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(header) > header_len:  # not expected (the same compact JSON, reordered): keep safetensors' own
        header = bytes(blob[8 : 8 + header_len])
    header += b" " * (header_len - len(header))
    return [blob[:8], header, blob[8 + header_len :]]


def save_sparse(
    model: nn.Module,
    path: str | os.PathLike[str],
    masks: MaskSet | Mapping[str, Tensor] | None = None,
) -> SparseFileInfo:
    """Write ``model.state_dict()`` to ``path`` as a compressed sparse safetensors file; return sizes and CR.

    Every tensor (weights, biases, buffers) is stored with the smallest of the ``dense``, ``bitmask`` and
    ``csr`` encodings of its nonzero entries; loading gives back every bit, except that ``-0.0`` loads as
    ``+0.0`` where a sparse encoding was chosen. ``masks`` (a :class:`MaskSet` or
    ``{module name: bool mask}``, e.g. ``LOBSPruning.masks``) makes a masked weight's structure its mask:
    kept weights that are 0 are stored too, and a masked weight is never stored without its mask. Its
    pruned entries must be zero (``ValueError`` otherwise). The save is atomic: the file is written to a
    temporary file created exclusively in ``path``'s directory, fsynced and renamed onto ``path``, so
    ``path`` never holds half a file, concurrent saves to one path all succeed (the last rename wins), and
    a symlink at ``path`` is replaced, not followed. Under DDP call it on one rank
    (``trainer.is_global_zero``); ``LOBSPruning(save_sparse="model.lobs")`` does exactly that at the end of
    ``fit``.
    """
    from safetensors.torch import save as st_save

    refuse_sharded(model, "save_sparse")
    path = os.fspath(path)
    mask_map = _masks_mapping(masks)
    entries = _state_entries(model, mask_map)

    records, tensors = _encode_entries(entries)
    entries_json = json.dumps(records, separators=(",", ":"))
    kept, total = _weight_counts(model, mask_map)
    metadata = {
        "format": FORMAT,
        "format_version": str(VERSION),
        "model": type(model).__name__,
        "entries": entries_json,
        "crc32": str(_checksum(entries_json, {n: _tensor_bytes(t) for n, t in tensors.items()})),
        "kept_weights": str(kept),
        "total_weights": str(total),
        "dense_bytes": str(_torch_save_bytes(model)),
        "raw_bytes": str(sum(e.tensor.numel() * e.tensor.element_size() for e in entries)),
    }
    blob = memoryview(st_save(tensors, metadata=metadata))
    _write_atomic(path, _sorted_header(blob))
    info = _info_from_metadata(metadata, records, path, len(blob))
    info.masks = {name: mask.detach().to("cpu").bool() for name, mask in mask_map.items()}
    log.info("save_sparse %s: %s", path, info.summary())
    return info


def _info_from_metadata(
    metadata: Mapping[str, str], records: list[dict[str, Any]], path: str, file_bytes: int
) -> SparseFileInfo:
    return SparseFileInfo(
        path=path,
        file_bytes=file_bytes,
        dense_bytes=int(metadata["dense_bytes"]),
        raw_bytes=int(metadata["raw_bytes"]),
        kept_weights=int(metadata["kept_weights"]),
        total_weights=int(metadata["total_weights"]),
        encodings={e["key"]: e["encoding"] for e in records},
    )


# --------------------------------------------------------------------------- read: validation


class _Invalid(Exception):
    """What is wrong with a file; turned into one ValueError naming the file."""


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0  # JSON true/false are Python bools: not counts


def _is_shape(x: Any) -> bool:
    # bounded, so a crafted shape cannot make math.prod multiply a million huge integers (CPU, not memory)
    return isinstance(x, list) and len(x) <= _MAX_DIMS and all(_is_count(d) and d < 1 << 63 for d in x)


@dataclass
class _Header:
    """A validated file header: safetensors tensors ``{name: (dtype, shape, begin, end)}`` and our entries."""

    path: str
    file_bytes: int
    data_start: int
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]
    metadata: dict[str, str]
    entries: list[dict[str, Any]]

    def decoded_bytes(self) -> int:
        return sum(math.prod(e["shape"]) * _FILE_DTYPES[e["dtype"]].itemsize for e in self.entries)


def _parse_container(path: str, f: Any, file_bytes: int) -> tuple[dict[str, Any], int]:
    """The safetensors header of an open file, its length checked before it is read; returns (header, data start)."""
    head = f.read(8)
    if head == _OLD_MAGIC:
        raise ValueError(
            f"{path!r} is in lightning-lobs' old sparse format (version 1, 'LOBSSPRS'), which this version no "
            "longer reads; to convert it, load it with lightning-lobs 0.1.0 (load_sparse into the model) and "
            "save_sparse it again with this version"
        )
    if len(head) < 8:
        raise _Invalid(f"{file_bytes} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > file_bytes - 8 or header_len > _MAX_HEADER:
        raise _Invalid(f"its header claims {header_len:,} bytes, the file has {file_bytes - 8:,} after the length")
    raw = f.read(header_len)
    if len(raw) != header_len:
        raise _Invalid("the file changed while it was read")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _Invalid(f"its header is not JSON ({str(err)[:80]})") from None
    if not isinstance(header, dict):
        raise _Invalid("its header is not a JSON object")
    return header, 8 + header_len


def _parse_tensors(
    header: Mapping[str, Any], data_bytes: int
) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """Every tensor's dtype, shape and byte range, checked: sizes agree, ranges in bounds, contiguous, no gap."""
    tensors = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise _Invalid(f"tensor {name!r}: not a safetensors tensor record")
        dtype = _ST_DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
        if dtype is None:
            raise _Invalid(f"tensor {name!r}: unknown dtype {spec['dtype']!r}")
        shape, offsets = spec["shape"], spec["data_offsets"]
        if not _is_shape(shape):
            raise _Invalid(f"tensor {name!r}: shape {str(shape)[:60]} is not a list of counts ({_SHAPE_RULE})")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise _Invalid(f"tensor {name!r}: data_offsets {offsets!r} are not two counts")
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end > data_bytes:
            raise _Invalid(f"truncated: tensor {name!r} ends at byte {end:,}, the data has {data_bytes:,} bytes")
        if end - begin != nbytes:
            raise _Invalid(
                f"tensor {name!r}: bytes {begin}..{end} do not hold its {nbytes:,} bytes within the "
                f"{data_bytes:,} bytes of data"
            )
        tensors[name] = (dtype, tuple(shape), begin, end)
    cursor = 0
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != cursor:
            raise _Invalid(f"tensor {name!r} starts at byte {begin}, the previous one ends at {cursor}")
        cursor = end
    if cursor != data_bytes:
        raise _Invalid(f"its tensors end at byte {cursor} of {data_bytes} bytes of data")
    return tensors


def _entry_parts(entry: Mapping[str, Any], nnz: int | None) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The parts an entry's encoding needs, with the dtype and shape the entry implies (``nnz``: value count)."""
    dtype = _FILE_DTYPES[entry["dtype"]]
    shape = tuple(entry["shape"])
    numel = math.prod(shape)
    if entry["encoding"] == "dense":
        storage = _dense_storage(dtype)
        return {"data": (storage, shape if storage == dtype else (numel * dtype.itemsize,))}
    assert nnz is not None
    values = (_values_storage(dtype), (nnz,))
    if entry["encoding"] == "bitmask":
        return {"bits": (torch.uint8, (-(-numel // 8),)), "values": values}
    rows, cols = _csr_dims(shape)
    return {"crow": (_ptr_dtype(nnz), (rows + 1,)), "col": (_col_dtype(cols), (nnz,)), "values": values}


def _parse_entries(metadata: Mapping[str, str], tensors: Mapping[str, Any]) -> list[dict[str, Any]]:
    try:
        records = json.loads(metadata.get("entries", ""))
    except (ValueError, RecursionError):
        raise _Invalid("its 'entries' metadata is not JSON") from None
    if not isinstance(records, list):
        raise _Invalid("its 'entries' metadata is not a list")
    fields = {"key", "dtype", "shape", "encoding", "masked"}
    seen: set[str] = set()
    used: set[str] = set()
    for i, entry in enumerate(records):
        if not isinstance(entry, dict) or set(entry) != fields:
            raise _Invalid(f"entry {i} is not a record of {sorted(fields)}")
        key = entry["key"]
        if not isinstance(key, str) or key in seen:
            raise _Invalid(f"entry {i}: key {key!r} is not a string or repeats")
        seen.add(key)
        if not isinstance(entry["dtype"], str) or entry["dtype"] not in _FILE_DTYPES:
            raise _Invalid(f"{key!r}: unknown dtype {entry['dtype']!r}")
        shape = entry["shape"]
        if not _is_shape(shape):
            raise _Invalid(f"{key!r}: shape {str(shape)[:60]} is not a list of counts ({_SHAPE_RULE})")
        if entry["encoding"] not in ("dense", "bitmask", "csr") or not isinstance(entry["masked"], bool):
            raise _Invalid(f"{key!r}: unknown encoding {entry['encoding']!r} or masked flag {entry['masked']!r}")
        dtype = _FILE_DTYPES[entry["dtype"]]
        nnz = None
        if entry["encoding"] != "dense":
            if _int_view(torch.empty(0, dtype=dtype)) is None:
                raise _Invalid(f"{key!r}: {entry['encoding']} encoding of {dtype}")
            values = tensors.get(_part_name(key, entry["encoding"], "values"))
            nnz = values[1][0] if values is not None and len(values[1]) == 1 else -1
            if not 0 <= nnz <= math.prod(shape):
                raise _Invalid(f"{key!r}: its values are missing or not a vector of at most {math.prod(shape)} entries")
        for part, (want_dtype, want_shape) in _entry_parts(entry, nnz).items():
            name = _part_name(key, entry["encoding"], part)
            have = tensors.get(name)
            if have is None:
                raise _Invalid(f"{key!r}: the {entry['encoding']} part {name!r} is missing")
            if have[0] != want_dtype or have[1] != want_shape:
                raise _Invalid(
                    f"{key!r}: part {name!r} is {have[0]} of shape {have[1]}, its {entry['dtype']} "
                    f"{tuple(shape)} entry needs {want_dtype} of shape {want_shape}"
                )
            used.add(name)
    extra = sorted(set(tensors) - used)
    if extra:
        raise _Invalid(f"tensor {extra[0]!r} belongs to no entry")
    return records


def _read_header(path: str, f: Any) -> _Header:
    """Parse and validate everything but the tensor data; no allocation beyond the header's own size."""
    file_bytes = os.fstat(f.fileno()).st_size
    try:
        header, data_start = _parse_container(path, f, file_bytes)
        metadata = header.get("__metadata__", {})
        if not isinstance(metadata, dict):
            raise _Invalid("its __metadata__ is not a mapping")
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"{path!r} is not a lightning-lobs sparse file (written by save_sparse): a safetensors file "
                "without lightning-lobs metadata"
            )
        if not all(isinstance(v, str) for v in metadata.values()):
            raise _Invalid("its metadata values are not all strings")
        if metadata.get("format_version") != str(VERSION):
            raise ValueError(
                f"{path!r} has sparse format version {metadata.get('format_version')}; this lightning-lobs reads "
                f"version {VERSION}"
            )
        for name in ("crc32", "kept_weights", "total_weights", "dense_bytes", "raw_bytes"):
            if not metadata.get(name, "").isdigit():
                raise _Invalid(f"its {name!r} metadata is not a count")
        tensors = _parse_tensors(header, file_bytes - data_start)
        entries = _parse_entries(metadata, tensors)
    except _Invalid as err:
        raise ValueError(f"{path!r} is not a valid lightning-lobs sparse file: {err}") from None
    if sys.byteorder != "little":
        raise ValueError(f"reading {path!r}: sparse files are little-endian and this machine is not")
    return _Header(path, file_bytes, data_start, tensors, metadata, entries)


def _read_data(header: _Header, f: Any) -> dict[str, Tensor]:
    """Every tensor of the file as a view of one buffer of the file's data, its CRC checked."""
    size = header.file_bytes - header.data_start
    buf = bytearray(size)
    if f.readinto(buf) != size:
        raise ValueError(f"{header.path!r} changed while it was read")
    data = memoryview(buf)
    crc = _checksum(header.metadata["entries"], {n: data[b:e] for n, (_, _, b, e) in header.tensors.items()})
    if crc != int(header.metadata["crc32"]):
        raise ValueError(
            f"{header.path!r} is not a valid lightning-lobs sparse file: corrupted (its CRC-32 does not match)"
        )
    whole = torch.frombuffer(buf, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
    out = {}
    for name, (dtype, shape, begin, end) in header.tensors.items():
        raw = whole[begin:end]
        if begin % dtype.itemsize:  # safetensors writers align every tensor; another writer may not
            raw = raw.clone()
        out[name] = raw.view(dtype).reshape(shape)
    return out


def _decode(entry: Mapping[str, Any], tensors: Mapping[str, Tensor], path: str) -> tuple[Tensor, Tensor | None]:
    """One entry as a new tensor, its structure validated first (``ValueError`` naming what is wrong), and that
    structure: the flat bool positions the file stores (for a masked entry, its mask), ``None`` for a dense one."""
    key, encoding = entry["key"], entry["encoding"]
    dtype = _FILE_DTYPES[entry["dtype"]]
    shape = tuple(entry["shape"])
    numel = math.prod(shape)
    parts = {part: tensors[_part_name(key, encoding, part)] for part in _entry_parts(entry, 0)}

    def invalid(what: str) -> ValueError:
        return ValueError(f"{path!r} is not a valid lightning-lobs sparse file: {key!r}: {what}")

    if encoding == "dense":
        data = parts["data"]
        if dtype == torch.bool and bool((data.view(torch.uint8) > 1).any()):
            raise invalid("a bool byte other than 0 or 1")
        return data.reshape(-1).clone().view(dtype).reshape(shape), None  # clone first: a fresh, aligned buffer
    values = parts["values"].view(_INT_VIEW[dtype.itemsize])
    if dtype == torch.bool and bool((values > 1).any()):
        raise invalid("a bool byte other than 0 or 1")
    nnz = values.numel()
    if encoding == "bitmask":
        packed = parts["bits"]
        if numel % 8 and int(packed[-1]) >> (numel % 8):  # only the last byte has padding bits
            raise invalid("bits set beyond its entries")
        population = int(_POPCOUNT[packed.long()].sum(dtype=torch.int64))  # ~10x faster than summing the bools
        if population != nnz:
            raise invalid(f"its bitmask has {population} bits set, the file holds {nnz} values")
        structure = _unpack_bits(packed)[:numel]
        out = torch.zeros(numel, dtype=values.dtype)
        out[structure] = values
    else:
        rows, cols = _csr_dims(shape)
        idx = torch.int32 if numel < 1 << 31 else torch.int64
        crow = parts["crow"].to(torch.int64)
        counts = crow.diff()
        if int(crow[0]) != 0 or bool((counts < 0).any()) or int(crow[-1]) != nnz:
            raise invalid(
                f"its CSR row pointers run from {int(crow[0])} to {int(crow[-1])} (must rise from 0 to the "
                f"{nnz} values the file holds)"
            )
        col = parts["col"]
        col = (col.to(idx) & 0xFFFF) if col.dtype == torch.int16 else col.to(idx)
        if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
            raise invalid(f"a CSR column index out of range 0..{cols - 1}")
        flat = torch.repeat_interleave(torch.arange(rows, dtype=idx), counts.to(torch.int64)) * cols + col
        if nnz > 1 and not bool((flat.diff() > 0).all()):
            raise invalid("CSR column indices not increasing along a row")
        positions = flat.long() if idx != torch.int64 else flat
        out = torch.zeros(numel, dtype=values.dtype)
        out[positions] = values
        structure = torch.zeros(numel, dtype=torch.bool)
        structure[positions] = True
    return (out.view(dtype).reshape(shape) if dtype != out.dtype else out.reshape(shape)), structure


# --------------------------------------------------------------------------- read / load


def _read(path: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The validated metadata (with ``entries`` parsed) and tensors (views of the file's data) of a sparse file."""
    with open(path, "rb") as f:
        header = _read_header(path, f)
        tensors = _read_data(header, f)
    return {**header.metadata, "entries": header.entries}, tensors


def read_sparse(path: str | os.PathLike[str], max_bytes: int | None = None) -> dict[str, Tensor]:
    """Decode a file written by :func:`save_sparse` into a plain (CPU) ``state_dict``, without a model.

    Without a model to compare the shapes with, a small file can declare large tensors (a zero-filled
    ``bitmask``/``csr`` entry costs a few bytes in the file). So the decoded tensors may total at most
    ``max_bytes``: by default 100 times the file's size, at least 1 MiB (a float32 layer at 99% sparsity
    decodes to about 66 times its bytes). A file that decodes to more is refused with ``ValueError`` before
    anything is allocated; pass a larger ``max_bytes`` for a file you trust, or use :func:`load_sparse`,
    which is bounded by the model.
    """
    path = os.fspath(path)
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise ValueError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}")
    with open(path, "rb") as f:
        header = _read_header(path, f)
        limit = max(_READ_RATIO * header.file_bytes, _READ_FLOOR) if max_bytes is None else max_bytes
        decoded = header.decoded_bytes()
        if decoded > limit:
            raise ValueError(
                f"{path!r} decodes to {decoded:,} bytes, more than read_sparse's limit of {limit:,} bytes "
                f"({'max_bytes' if max_bytes is not None else f'{_READ_RATIO}x the file, at least 1 MiB'}); "
                "pass read_sparse(path, max_bytes=...) for a file you trust, or load_sparse(model, path)"
            )
        tensors = _read_data(header, f)
    return {e["key"]: _decode(e, tensors, path)[0] for e in header.entries}


def _find_prefixes(state_keys: list[str], file_keys: Mapping[str, Any]) -> list[str]:
    """Every ``p`` under which the file holds all of the model's keys (``<p>.<key>``), shortest first."""
    if not state_keys:
        return []
    first = "." + state_keys[0]
    candidates = {f[: -len(first)] for f in file_keys if f.endswith(first) and len(f) > len(first)}
    return sorted(
        (p for p in candidates if all(f"{p}.{key}" in file_keys for key in state_keys)), key=lambda p: (len(p), p)
    )


def _guess_prefix(keys: list[str], in_file: Mapping[str, Any], where: str) -> str | None:
    """The one prefix under which the file holds the model's ``keys`` (None: none), for ``load_sparse(prefix=None)``.

    ``ValueError`` when several prefixes fit, or when the file holds entries besides the model's under the prefix.
    """
    found = _find_prefixes(keys, in_file)
    if len(found) > 1:
        raise ValueError(
            f"{where} as it is, and holds its entries under each of "
            f"{', '.join(repr(p + '.') for p in found)}: pass load_sparse(model, path, prefix=...) with one of "
            f"{', '.join(repr(p) for p in found)}"
        )
    if not found:
        return None
    under = {f"{found[0]}.{key}" for key in keys}
    others = sorted(key for key in in_file if key not in under)
    if others:
        raise ValueError(
            f"{where} as it is; it holds the model's entries under {found[0] + '.'!r} and {len(others)} "
            f"other(s) ({others[0]!r}...): pass load_sparse(model, path, prefix={found[0]!r}) to load those "
            "and ignore the rest"
        )
    return found[0]


def _check_entries(state: Mapping[str, Any], in_file: Mapping[str, Any], where: str) -> None:
    """``ValueError`` naming the first difference between the model's state and the file's entries (keys, shapes,
    dtypes)."""
    for key, value in state.items():
        entry = in_file.get(key)
        if entry is None:
            raise ValueError(f"{where}: the model has {key!r}, the file does not")
        if not isinstance(value, Tensor):
            raise ValueError(f"{where}: the model's {key!r} is not a tensor")
        if tuple(value.shape) != tuple(entry["shape"]):
            raise ValueError(
                f"{where}: {key!r} has shape {tuple(entry['shape'])} in the file, {tuple(value.shape)} in the model"
            )
        if str(value.dtype) != entry["dtype"]:
            raise ValueError(f"{where}: {key!r} is {entry['dtype']} in the file, {value.dtype} in the model")
    extra = [key for key in in_file if key not in state]
    if extra:
        raise ValueError(f"{where}: the file has {extra[0]!r}, the model does not")


def load_sparse(model: nn.Module, path: str | os.PathLike[str], prefix: str | None = None) -> SparseFileInfo:
    """Load a file written by :func:`save_sparse` into ``model`` in place, bit for bit; return its info.

    The file must have been written for the same architecture: the same ``state_dict`` keys, shapes and
    dtypes. A file saved from a wrapper, e.g. a ``LightningModule`` holding the model as ``self.model``
    (what ``LOBSPruning(save_sparse=...)`` writes), loads into the bare inner model too: ``prefix=None``
    (default) takes the file's keys as they are when they are the model's, else as ``<prefix>.<key of the
    model>`` when every key of the file has that form for exactly one prefix. ``prefix="model"`` loads the
    entries under ``model.`` and ignores the rest (a teacher, a loss's buffers); ``prefix=""`` means the keys
    as they are. Otherwise ``ValueError`` names the first difference, or the prefixes to choose from. Every
    check (of the whole file's structure and CRC, and of the loaded entries against the model) happens
    before the first value is written, so a refused file leaves the model as it was. Values are copied onto
    the model's own devices.

    The returned info's ``masks`` are the masks saved with the file (``save_sparse(..., masks=...)``,
    ``LOBSPruning(save_sparse=...)``), named relative to ``model``; ``info.mask_set().attach(model, optimizer)``
    holds the pruned weights at 0 while the reloaded model retrains.
    """
    path = os.fspath(path)
    if prefix is not None and not isinstance(prefix, str):
        raise ValueError(
            f"prefix must be a str (e.g. 'model' for a LightningModule's self.model) or None, got {prefix!r}"
        )
    state = model.state_dict()
    with open(path, "rb") as f:
        header = _read_header(path, f)
        in_file = {e["key"]: e for e in header.entries}
        where = (
            f"{path!r} (saved from a {header.metadata.get('model', '?')}) does not match this {type(model).__name__}"
        )
        if prefix is None and set(in_file) != set(state):
            prefix = _guess_prefix(list(state), in_file, where)
        if prefix:
            lead = prefix.rstrip(".") + "."
            in_file = {key[len(lead) :]: entry for key, entry in in_file.items() if key.startswith(lead)}
            where += f" under the prefix {lead!r}"
            if not in_file:
                raise ValueError(f"{where}: the file has no key starting with {lead!r}")
        _check_entries(state, in_file, where)
        tensors = _read_data(header, f)
    decoded: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for key, entry in in_file.items():
        decoded[key], structure = _decode(entry, tensors, path)
        if entry["masked"]:  # a masked entry is never dense-encoded (save_sparse keeps its mask as its structure)
            mask = structure if structure is not None else torch.ones(decoded[key].numel(), dtype=torch.bool)
            masks[_mask_name(model, key)] = mask.view(decoded[key].shape)
    del tensors
    model.load_state_dict(decoded, strict=True)
    if prefix:
        log.info("load_sparse %s: loaded the entries under %r into the %s", path, prefix, type(model).__name__)
    info = _info_from_metadata(header.metadata, list(in_file.values()), path, header.file_bytes)
    info.masks = masks
    return info


def _mask_name(model: nn.Module, key: str) -> str:
    """The MaskSet name of a masked ``state_dict`` key: ``<module>`` for ``<module>.weight``, else the key itself
    (a Parameter such as ``attn.in_proj_weight``), as ``save_sparse`` maps names to keys."""
    owner, _, attr = key.rpartition(".")
    if attr == "weight" and owner:
        try:
            model.get_submodule(owner)
            return owner
        except AttributeError:
            pass
    return key


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
    refuse_sharded(model, "export_sparse")
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
                    crow,
                    col,
                    w2d[m2d],
                    size=(rows, cols),
                    dtype=w2d.dtype,
                    device=w2d.device,
                    check_invariants=False,  # built from nonzero(): sorted, in range by construction
                )
        else:
            out[f"{name}.weight"] = torch.sparse_coo_tensor(
                m2d.nonzero().t(),
                w2d[m2d],
                size=tuple(w2d.shape),
                dtype=w2d.dtype,
                device=w2d.device,
                check_invariants=False,
            ).coalesce()
    return out


# --------------------------------------------------------------------------- sparse inference


def _linear_weight(module: nn.Module) -> Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear``, or of a ``transformers`` ``Conv1D`` (stored ``(in, out)``)."""
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    return weight.t() if is_hf_conv1d(module) else weight


def _bias(module: nn.Module) -> Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, Tensor) else None


def _swappable(module: nn.Module) -> bool:
    # subclasses of nn.Linear are left alone: attention's out_proj has its weight read by its parent directly
    return type(module) is nn.Linear or is_hf_conv1d(module)


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
    def from_linear(cls, linear: nn.Module) -> CSRLinear:
        """From an ``nn.Linear`` or a ``transformers`` ``Conv1D`` (whose ``(in, out)`` weight is transposed)."""
        return cls(_linear_weight(linear), _bias(linear))

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight, x2.t().contiguous()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight._nnz()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}, bias={self.bias is not None}"
        )


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
    def from_linear(cls, linear: nn.Module) -> SemiStructuredLinear:
        """From an ``nn.Linear`` or a ``transformers`` ``Conv1D`` (whose ``(in, out)`` weight is transposed)."""
        return cls(_linear_weight(linear), _bias(linear))

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4, bias={self.bias is not None}"


Kernel = Literal["dense", "csr", "semi_structured"]
_BUILDERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "csr": CSRLinear.from_linear,
    "semi_structured": SemiStructuredLinear.from_linear,
}


@dataclass
class LayerPlan:
    """The kernel chosen for one layer and why (times: median ms per forward at the planned batch).

    ``shape`` is ``(out, in)`` for a Linear or HF ``Conv1D``, the weight's shape for a layer that has no
    sparse kernel here (``kernel="dense"``, ``reason`` naming its type)."""

    name: str
    shape: tuple[int, ...]
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


def _median_ms(
    fns: Mapping[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
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


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why a weight-bearing layer that is not swapped has no sparse kernel here (None: not such a layer)."""
    kind = type(module).__name__
    if isinstance(module, nn.Linear):
        return f"unsupported type {kind} (a Linear subclass: its parent may read its weight directly)"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"unsupported type {kind} (no sparse convolution kernel)"
    if isinstance(module, nn.MultiheadAttention):
        return f"unsupported type {kind} (its projections are applied functionally)"
    return None


def _sparsity(weight: Tensor | None) -> float:
    if not isinstance(weight, Tensor):
        return 0.0
    return 1.0 - int(torch.count_nonzero(weight.detach())) / max(weight.numel(), 1)


def _unsupported_plan(name: str, module: nn.Module) -> LayerPlan | None:
    """A ``"dense"`` plan naming why a weight-bearing layer has no sparse kernel here (None: not such a layer)."""
    reason = _unsupported_reason(module)
    if reason is None:
        return None
    weight = getattr(module, "weight", getattr(module, "in_proj_weight", None))
    shape = tuple(weight.shape) if isinstance(weight, Tensor) else ()
    return LayerPlan(name, shape, _sparsity(weight), "dense", reason)


def _time_kernels(
    module: nn.Module, x: Tensor, kernels: list[str], why_not: list[str], repeats: int, warmup: int
) -> dict[str, float]:
    """Median milliseconds of the dense layer (``"dense"``) and of each kernel that builds and runs on ``x``.

    A kernel that fails is left out and its error appended to ``why_not``.
    """
    with torch.inference_mode():
        fns: dict[str, Callable[[], Any]] = {"dense": functools.partial(module, x)}
        for kernel in kernels:
            try:
                layer = _BUILDERS[kernel](module)
                layer(x)
                fns[kernel] = functools.partial(layer, x)
            except (RuntimeError, NotImplementedError) as err:  # e.g. a shape/dtype the kernel refuses
                why_not.append(f"{kernel} failed: {str(err).splitlines()[0][:120]}")
        return _median_ms(fns, x.device, repeats, warmup)


def plan_sparse_inference(
    model: nn.Module,
    batch_size: int = 1,
    mode: Literal["auto", "sparse", "dense"] = "auto",
    min_sparsity: float = 0.5,
    min_speedup: float = 1.1,
    repeats: int = 20,
    warmup: int = 3,
) -> dict[str, LayerPlan]:
    """Choose a kernel for every plain ``nn.Linear`` and ``transformers`` ``Conv1D`` (GPT-2's transposed
    Linear) of ``model``, and say why each other weight-bearing layer stays dense.

    Candidates: ``semi_structured`` for 2:4 weights on CUDA devices of compute capability 8.0+, ``csr``
    for weights at least ``min_sparsity`` sparse (float32/float64 on CPU). ``mode="auto"`` times the dense
    layer and each candidate on a random ``(batch_size, in_features)`` input (median of ``repeats`` calls
    each, taking turns, after ``warmup``, with the current thread count) and takes the fastest candidate if it beats dense by
    ``min_speedup``; ``"sparse"`` takes the first candidate unmeasured (2:4 before CSR); ``"dense"`` none.
    Convolutions, ``nn.MultiheadAttention`` and subclasses of ``nn.Linear`` (attention's ``out_proj``, whose
    weight its parent reads directly) get a ``"dense"`` plan whose ``reason`` names the unsupported type.
    """
    if mode not in ("auto", "sparse", "dense"):
        raise ValueError(f"mode must be 'auto', 'sparse' or 'dense', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plans: dict[str, LayerPlan] = {}
    for name, module in model.named_modules():
        if not _swappable(module):
            unsupported = _unsupported_plan(name, module)
            if unsupported is not None:
                plans[name] = unsupported
            continue
        weight = _linear_weight(module).detach()
        sparsity = _sparsity(weight)
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
        times = _time_kernels(module, x, kernels, why_not, repeats, warmup)
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
    """Return ``model`` for inference with its pruned ``nn.Linear`` and ``transformers`` ``Conv1D`` layers on
    sparse kernels where faster.

    By default a deep copy is changed and returned (the original stays trainable and untouched);
    ``inplace=True`` swaps the layers of ``model`` itself. The choice per layer is
    :func:`plan_sparse_inference` (``batch_size``, ``mode`` and ``plan_kwargs`` go to it), or ``plan`` if
    given. The swapped layers compute the same function up to float rounding (sums in another order);
    they are inference-only and hold no trainable weight, so save the model with :func:`save_sparse`
    before swapping. Apply the masks first (the sparsity is read from the zeros of the weights).

    What was done is the returned model's ``sparse_inference_plan`` (``{layer name: LayerPlan}``: kernel
    and reason for every layer, swapped or not), one log line (INFO) says how many layers were swapped, and
    one ``UserWarning`` lists every layer kept dense and why (too dense, slower when timed, an unsupported
    type), unless ``mode="dense"`` asked for none.
    """
    refuse_sharded(model, "to_sparse_inference")
    if plan is None:
        plan = plan_sparse_inference(model, batch_size=batch_size, mode=mode, **plan_kwargs)
    target = model if inplace else copy.deepcopy(model)
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for name, layer_plan in plan.items():
        if layer_plan.kernel == "dense":
            continue
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        layer = getattr(parent, child)
        if not _swappable(layer):
            raise TypeError(
                f"plan names {name!r}, which is a {type(layer).__name__}, not an nn.Linear or a transformers Conv1D"
            )
        swaps.append((parent, child, _BUILDERS[layer_plan.kernel](layer)))
    for parent, child, layer in swaps:  # every layer built before the first is swapped: a failure changes nothing
        setattr(parent, child, layer)
    swapped = [f"{n} -> {p.kernel}" for n, p in plan.items() if p.kernel != "dense"]
    dense = [f"{n} ({p.reason})" for n, p in plan.items() if p.kernel == "dense" and p.reason != "mode='dense'"]
    log.info(
        "to_sparse_inference: swapped %d of %d layers%s",
        len(swapped),
        len(plan),
        f": {', '.join(swapped)}" if swapped else "",
    )
    if dense and mode != "dense":
        warnings.warn(
            f"to_sparse_inference: swapped {len(swapped)} of {len(plan)} layers; kept dense: {'; '.join(dense)}",
            stacklevel=2,
        )
    target.sparse_inference_plan = dict(plan)  # type: ignore[assignment]  # a plain attribute, not a Parameter
    return target
