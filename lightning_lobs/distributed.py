"""Spreading layer solves across ranks of a torch.distributed group.

Each rank solves a share of the layers (:func:`assign_layers`), each layer's Hessian summed onto its owner (in the
one-pass pipeline; every rank holds them in the sequential one), and broadcasts its results, so all ranks end with
identical weights and masks.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .sharding import sharded_parameters


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the group (world_size 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def current(cls, group: Any = None) -> RankInfo:
        """The default process group's rank and size, or a single-process RankInfo."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(torch.distributed.get_rank(group), torch.distributed.get_world_size(group), group)
        return cls()

    @classmethod
    def for_model(cls, model: nn.Module) -> RankInfo:
        """The default process group's ranks when ``model`` has ``fully_shard`` (``DTensor``) parameters, which
        every rank must then prune together; else a single process (a replicated model may be pruned alone)."""
        return cls.current() if sharded_parameters(model) else cls()


def assign_layers(costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """Owner rank of every layer: longest-processing-time-first onto the least loaded rank.

    Deterministic (ties broken by name), so every rank computes the same assignment.
    """
    loads = [(0.0, r) for r in range(world_size)]
    heapq.heapify(loads)
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        load, rank = heapq.heappop(loads)
        owners[name] = rank
        heapq.heappush(loads, (load + costs[name], rank))
    return owners


def broadcast_tensors(tensors: Sequence[Tensor], src: int, info: RankInfo) -> list[Tensor]:
    """Broadcast tensors (same shapes/dtypes on every rank) from ``src``; returns the received ones.

    Bool tensors travel as uint8 (not every backend reduces bools). Every buffer is made contiguous: a backend
    sends and receives storage order, so a transposed tensor (a Conv1D layer's mask) would arrive scrambled.
    """
    if not info.active:
        return list(tensors)
    out = []
    for t in tensors:
        buf = (t.to(torch.uint8) if t.dtype == torch.bool else t).contiguous()
        torch.distributed.broadcast(buf, src=src, group=info.group)
        out.append(buf.to(torch.bool) if t.dtype == torch.bool else buf)
    return out


def broadcast_floats(
    values: Sequence[float], src: int, info: RankInfo, device: torch.device | None = None
) -> list[float]:
    """Broadcast a few Python floats from ``src`` (float64 on ``device``)."""
    if not info.active:
        return list(values)
    buf = torch.tensor(list(values), dtype=torch.float64, device=device)
    torch.distributed.broadcast(buf, src=src, group=info.group)
    return [float(v) for v in buf.tolist()]


@contextmanager
def fail_together(rank: RankInfo, device: torch.device, what: str, active: bool = True) -> Iterator[None]:
    """Run a step that may fail on some ranks only; afterwards every rank fails if any did.

    A rank raising alone would leave the others waiting in their next collective. Every rank
    must enter the block (with the same ``active``); the block itself must not run collectives.
    The failing rank re-raises its own error, the others a RuntimeError naming that rank.
    """
    if not (rank.active and active):
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised below, once every rank knows
        error = err
    flag = torch.tensor([float(rank.rank + 1) if error is not None else 0.0], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=rank.group)
    if error is not None:
        raise error
    if flag.item() > 0:
        raise RuntimeError(
            f"{what} failed on rank {int(flag.item()) - 1} (see that rank's error); every rank stops so that none "
            "is left waiting for the others."
        )
