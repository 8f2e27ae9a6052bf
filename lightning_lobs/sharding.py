"""Parameters sharded by ``torch.distributed.fsdp.fully_shard`` (FSDP2): ``DTensor`` s read and written whole.

A sharded parameter is a ``DTensor``: each rank holds its shard (``to_local()``), and the whole tensor exists only
when gathered. The prune reads one layer's weight whole at a time with :func:`gather` (a collective: every rank of
the device mesh must call it, in the same order) and writes a whole new weight back with :func:`write_full`, which
copies each rank's own slice into its shard (no communication: every rank holds the same whole tensor then).

Masks of sharded weights are ``DTensor`` s too, on the weight's mesh with the weight's placements
(:func:`shard_like`): each rank holds the mask of its own shard. Every function here passes an ordinary tensor
through unchanged, so callers need not tell the two apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

try:  # torch.distributed may be compiled out (some builds); then nothing is ever sharded
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - not on the supported builds
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]

__all__ = [
    "any_sharded",
    "count",
    "gather",
    "is_sharded",
    "local",
    "mesh_size",
    "shard_like",
    "shard_rows_like",
    "sharded_parameters",
    "write_full",
]


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter of a ``fully_shard`` module, or a mask made like one)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def sharded_parameters(model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters that are ``DTensor`` s."""
    return [n for n, p in model.named_parameters() if is_sharded(p)]


def mesh_size(tensor: Tensor) -> int:
    """Ranks that hold a part of ``tensor`` (1 for an ordinary tensor)."""
    return int(tensor.device_mesh.size()) if is_sharded(tensor) else 1  # type: ignore[attr-defined]


def gather(tensor: Tensor) -> Tensor:
    """The whole tensor: ``full_tensor()`` of a ``DTensor`` (a collective), an ordinary tensor itself."""
    if is_sharded(tensor):
        return tensor.full_tensor()  # type: ignore[attr-defined]
    return tensor


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (a view: writing it writes the parameter), an ordinary tensor itself."""
    if is_sharded(tensor):
        return tensor.to_local()  # type: ignore[attr-defined]
    return tensor


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (the same whole tensor on every rank) sharded as ``like`` is; ``full`` itself when ``like`` is an
    ordinary tensor.

    No communication: each rank keeps a copy of its own slice, so the whole tensor can be freed after.
    """
    if not is_sharded(like):
        return full
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(
            f"shard_like: a tensor of shape {tuple(full.shape)} cannot be sharded like {tuple(like.shape)}"
        )
    return _distribute(full.to(like.device), like.device_mesh, like.placements)  # type: ignore[attr-defined]


def shard_rows_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` sharded along its rows (dim 0) over ``like``'s mesh, wherever ``like`` is sharded; ``full`` itself
    when ``like`` is an ordinary tensor. A Linear's or convolution's matrix so sharded holds on each rank the rows
    of its weight shard."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import Shard

    placements = [Shard(0) if p.is_shard() else p for p in like.placements]  # type: ignore[attr-defined]
    return _distribute(full.to(like.device), like.device_mesh, placements)  # type: ignore[attr-defined]


def _distribute(full: Tensor, mesh: Any, placements: Any) -> Tensor:
    # contiguous: a transposed whole tensor (Conv1D's mask, say) would give the DTensor strides its shards lack
    full = full.contiguous()
    sliced = distribute_tensor(full, mesh, placements, src_data_rank=None)
    # The slice may be a view of ``full``: copied so that holding the shard does not hold the whole tensor.
    return DTensor.from_local(
        sliced.to_local().clone(), mesh, placements, run_check=False, shape=full.shape, stride=sliced.stride()
    )


def write_full(param: Tensor, full: Tensor) -> None:
    """Write the whole tensor ``full`` into ``param`` in place: a sharded one gets its own slice in its shard."""
    with torch.no_grad():
        if is_sharded(param):
            local(param).copy_(local(shard_like(full.to(param.dtype), param)))
        else:
            param.data.copy_(full.to(device=param.device, dtype=param.dtype))


def count(mask: Tensor) -> int:
    """True entries of a bool tensor, over every shard of a ``DTensor`` (a collective then: a ``DTensor``'s own
    ``int(t.sum())`` would read this rank's shard alone)."""
    total = mask.sum()
    return int(total.full_tensor() if is_sharded(total) else total)  # type: ignore[attr-defined]


def any_sharded(tensors: Iterable[object]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor``."""
    return any(is_sharded(t) for t in tensors)
