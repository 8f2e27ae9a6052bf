"""Every collective of the engine, in one place: what ranks of a torch.distributed group exchange during a prune.

# ---- COLLECTIVES: the only engine module that talks to other ranks.
Each function is a no-op in a single process. Every rank must call each one, in the same order: the stages call
them at the same points on every rank (the rank loop of the solve is :func:`lightning_lobs.engine.solve.solve_owned`,
whose results :func:`share_solution` broadcasts from their owner).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import cast

import torch
from torch import Tensor, nn

from ..batchnorm import batchnorm_modules
from ..distributed import RankInfo, broadcast_floats, broadcast_tensors, fail_together
from ..hessian import HessianCollector
from ..layers import to_rows, weight_matrix
from ..sharding import gather, is_sharded, shard_like, shard_rows_like
from .records import LayerPlan, Solution

__all__ = [
    "all_reduce_batchnorm",
    "broadcast_buffers",
    "broadcast_costs",
    "dense_matrices",
    "fail_together",
    "gather_layer",
    "reduce_calibration",
    "reduce_errors",
    "share_scales",
    "share_solution",
]


def share_solution(
    solved: Solution, owner: int, rank: RankInfo, device: torch.device, like: nn.Module | None = None
) -> Solution:
    """Broadcast one layer's solve from its owner rank (no-op in a single process).

    With ``like`` a layer whose weight is sharded (``fully_shard``), every rank keeps only its slice: the matrix
    sharded by rows and the mask sharded like the weight (:func:`lightning_lobs.sharding.shard_like`), so solutions
    never add up to a whole model on any rank.
    """
    if rank.active:
        matrix, mask = broadcast_tensors([solved.matrix.to(device), solved.mask.to(device)], owner, rank)
        values = broadcast_floats([float(getattr(solved, k)) for k in Solution.FLOATS], owner, rank, device)
        solved = Solution(matrix, mask, *values)
    weight = None if like is None else cast(Tensor, like.weight)
    if weight is None or not is_sharded(weight):
        return solved
    matrix = shard_rows_like(solved.matrix, weight)
    return replace(solved, matrix=matrix, mask=shard_like(solved.mask.to(torch.bool), weight))


def gather_layer(layer: LayerPlan) -> LayerPlan:
    """The layer with its whole matrix when its weight is sharded: a collective, so every rank
    calls it for the same layers in the same order; the plan itself holds none of them (see
    :func:`~lightning_lobs.engine.plan.layer_plan`). An unsharded layer is returned as it is."""
    if not is_sharded(layer.module.weight):
        return layer
    return replace(layer, dense=weight_matrix(layer.module))


class _GatheredDense(Mapping):
    """Sharded layers' matrices before the prune, each gathered from the transaction's snapshot when read."""

    def __init__(self, layers: Mapping[str, LayerPlan], snapshot: Mapping[str, tuple[Tensor, Tensor | None]]) -> None:
        self.layers, self.snapshot = layers, snapshot

    def __getitem__(self, name: str) -> Tensor:
        layer = self.layers[name]
        if not is_sharded(layer.module.weight):
            return layer.dense
        weight, bias = self.snapshot[name]
        mat = to_rows(layer.module, gather(weight))
        return mat if bias is None else torch.cat([mat, gather(bias).reshape(-1, 1).to(mat.dtype)], dim=1)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def dense_matrices(
    layers: Mapping[str, LayerPlan], snapshot: Mapping[str, tuple[Tensor, Tensor | None]]
) -> Mapping[str, Tensor]:
    """Every layer's matrix before the prune: :attr:`LayerPlan.dense`, or for a sharded layer gathered from
    ``snapshot`` (the transaction's copy of its shards) when read, one at a time (a collective per read)."""
    return _GatheredDense(layers, snapshot)


def broadcast_buffers(model: nn.Module, rank: RankInfo) -> None:
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


def all_reduce_batchnorm(model: nn.Module, rank: RankInfo) -> None:
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


def reduce_calibration(
    collector: HessianCollector,
    samples: Mapping[str, float],
    rank: RankInfo,
    device: torch.device,
    owners: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Sum the Hessians (in ``collector``) and the per-layer sample counts over ranks; returns the summed counts.

    ``owners`` (layer -> the rank that will solve it): each Hessian is summed onto its owner alone and freed on the
    other ranks (:meth:`~lightning_lobs.hessian.HessianCollector.reduce`), so that after calibrating a rank holds
    only the Hessians of the layers it owns. Layers ``owners`` does not name are summed onto every rank.
    """
    if not rank.active:
        return dict(samples)
    if owners is None:
        collector.reduce(rank.group)
    else:
        collector.reduce(rank.group, {n: owners.get(n) for n in collector.accumulators})
    counts = torch.tensor([float(samples[n]) for n in samples], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(counts, group=rank.group)
    return dict(zip(samples, counts.tolist()))


def share_scales(
    scales: Mapping[str, float], names: Sequence[str], owners: Mapping[str, int], rank: RankInfo, device: torch.device
) -> dict[str, float]:
    """Every layer's Hessian scale (its mean diagonal, :func:`~lightning_lobs.engine.calibrate.normalise`) on every
    rank, from the rank that holds that Hessian (``scales`` has this rank's own; the report needs them all)."""
    if not rank.active:
        return {n: scales[n] for n in names}
    # A layer no owner names is held on every rank, alike: rank 0's counts. Each entry is then one rank's value plus
    # zeros, so the sum is exact.
    mine = [float(scales[n]) if owners.get(n, 0) == rank.rank else 0.0 for n in names]
    buf = torch.tensor(mine, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(buf, group=rank.group)
    return dict(zip(names, buf.tolist()))


def broadcast_costs(
    values: Mapping[str, Tensor], owners: Mapping[str, int], rank: RankInfo, device: torch.device
) -> dict[str, Tensor]:
    """Every layer's allocation costs from the rank that computed them (in ``values``' order)."""
    if not rank.active:
        return dict(values)
    return {n: broadcast_tensors([v.to(device, torch.float64)], owners[n], rank)[0] for n, v in values.items()}


def reduce_errors(accumulators: Iterable, rank: RankInfo, device: torch.device) -> None:
    """Sum RMS error accumulators (:class:`lightning_lobs.bounds.RMSAccumulator`) over ranks, in place."""
    if not rank.active:
        return
    for a in accumulators:
        a.all_reduce(rank.group, device)
