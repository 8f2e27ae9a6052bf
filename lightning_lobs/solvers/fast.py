"""``fast``: SparseGPT (Frantar & Alistarh 2023).

Cholesky factor of ``H^-1``, columns processed left to right in blocks with lazy updates, the mask chosen per
block; then (unless ``SolverOptions(refit=False)``) the kept weights are refitted to the least-squares optimum for
SparseGPT's mask: by one Cholesky per row where that is cheaper, else by batched conjugate gradients on all rows at
once warm-started from the sweep's weights (:func:`~lightning_lobs.solvers.cg.refit_kept`). The per-row minimum is never pruned, and the block quotas move so that every removal is still
compensated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..config import NMPattern, SolverOptions
from .cg import refit_kept
from .core import (
    LayerInputs,
    Solution,
    Tick,
    inverse_with_damping,
    one_pass_floor,
    refit_planned,
    refit_work,
    sub_tick,
    tick_if_long,
)


class FastSolver:
    """SparseGPT's column sweep per Hessian group, then the joint refit (direct or CG, whichever is cheaper)."""

    name = "fast"

    def solve(self, inputs: LayerInputs, options: SolverOptions, tick: Tick | None) -> Solution:
        """Prune ``inputs`` to its sparsity (already lowered to the per-row minimum)."""
        work = inputs.W.to(options.dtype)
        _, Hinv, damp, dead = inverse_with_damping(inputs.H.to(work.device), options, stacklevel=4)
        tick_if_long(tick, Hinv.shape[0] * Hinv.shape[-1] ** 3)
        kept_by_floor = one_pass_floor(inputs, options, work, Hinv, dead)
        sweep_share = _sweep_share(inputs, options)
        rows, groups = inputs.rows, inputs.groups
        per = rows // groups
        sparsity, columns = inputs.sparsity, inputs.columns
        quota = lambda g: int(round(sparsity * g * per * columns))  # noqa: E731 - layer-wide rounding
        outs, masks = [], []
        for g in range(groups):
            sl = slice(g * per, (g + 1) * per)
            sweep = ColumnSweep(
                inputs.pattern,
                inputs.bias_cols,
                options.block_size,
                inputs.pruned_before[sl] if inputs.pruned_before is not None else None,
                kept_by_floor[sl] if kept_by_floor is not None else None,
            )
            part = sub_tick(tick, sweep_share * g / groups, sweep_share / groups)
            o, m = sweep.run(work[sl], Hinv[g], dead[g], [quota(g + 1) - quota(g)], part)
            outs.append(o[0])
            masks.append(m[0])
            if tick is not None and g + 1 < groups:
                tick(sweep_share * (g + 1) / groups)
        new, kept = torch.cat(outs), torch.cat(masks)
        if refit_planned(options, 0.0):
            if tick is not None:
                tick(sweep_share)
            part = sub_tick(tick, sweep_share, 1.0 - sweep_share)
            new, _ = refit_kept(work, inputs.H, kept, replace(options, damp=damp), x0=new, tick=part)
        return Solution(new, kept, damp)


def _sweep_share(inputs: LayerInputs, options: SolverOptions) -> float:
    """The sweep's share of the solve's work (the rest is the refit, when one is planned)."""
    rows, width = inputs.rows, inputs.width
    sweep_flops = 2.0 * rows * width * width  # the lazy block updates
    direct_flops = rows * (width * (1.0 - inputs.sparsity)) ** 3 / 3
    return sweep_flops / (sweep_flops + refit_work(options, rows, width, direct_flops))


def lowest(scores: Tensor, k: int) -> Tensor:
    """Bool mask of ``scores``' shape, True on exactly ``k`` (``1 <= k <= numel``) of its lowest entries.

    ``kthvalue`` finds the threshold (a selection, about 3x faster than ``topk``'s on a block of a big layer); every
    score below it is taken and the rest of the ``k`` from the scores equal to it, the first in flat order.
    """
    flat = scores.reshape(-1)
    threshold = flat.kthvalue(k).values
    below = flat < threshold
    tie = flat == threshold
    tie &= tie.cumsum(0) <= k - int(below.sum())
    return (below | tie).reshape(scores.shape)


@dataclass
class ColumnSweep:
    """SparseGPT on one Hessian group's rows at ``K = len(totals)`` sparsity levels at once.

    Level ``k`` prunes ``totals[k]`` weights (unstructured; ignored with an N:M pattern): each block of columns
    prunes its share of the running quota among its lowest ``w^2 / [U]_qq^2`` scores. ``kept_by_floor`` weights
    (the per-row minimum) are never pruned: a block then prunes at most its unprotected weights and at least what
    the later blocks could not take, so the quota is always met and every removal is compensated; without them
    the blocks prune exactly SparseGPT's quotas. The levels share one Cholesky factor and one column sweep.

    After :meth:`run`, :attr:`losses` holds each level's accumulated OBS losses ``sum err^2 / 2`` (float64, ``(K,)``):
    each column's removal costs ``(w - q)^2 / (2 U_ii^2)`` given the earlier columns and the later ones
    re-optimised, so their sum is the level's error ``1/2 sum (w^ - w) H (w^ - w)^T`` under the damped H that
    ``Hinv`` inverts (up to rounding), at no extra product. :attr:`filled` says which levels
    :meth:`_fill_short` pruned uncompensated weights at the end (their losses miss those removals).

    Attributes:
        pattern: N:M pattern, or None.
        bias_cols: 1 when the last column is the bias (never pruned).
        block: columns per block of lazy updates.
        pruned_before: ``(rows, width)`` True where a prior mask pruned, or None.
        kept_by_floor: ``(rows, columns)`` True on the weights the per-row minimum keeps, or None.
    """

    pattern: NMPattern | None
    bias_cols: int
    block: int
    pruned_before: Tensor | None
    kept_by_floor: Tensor | None
    _pruned: list[int] = field(default_factory=list, init=False)
    losses: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64), init=False)
    filled: list[bool] = field(default_factory=list, init=False)

    def run(
        self, W: Tensor, Hinv: Tensor, dead: Tensor, totals: Sequence[int], tick: Tick | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(K, rows, width)`` pruned weights and keep-masks; ``tick`` gets the fraction of columns done per block."""
        rows, width = W.shape
        K = len(totals)
        block = self.block
        if self.pattern is not None:
            block = -(-block // self.pattern.m) * self.pattern.m  # an N:M group never straddles two blocks
        U = torch.linalg.cholesky(Hinv, upper=True)
        tick_if_long(tick, width**3 / 3)
        W = W.unsqueeze(0).repeat(K, 1, 1)
        kept = torch.ones(K, rows, width, dtype=torch.bool, device=W.device)
        self._pruned = [0] * K
        self.losses = torch.zeros(K, dtype=torch.float64, device=W.device)
        self.filled = [False] * K
        free_after = self._free_after(rows, width - self.bias_cols)
        udiag, live = torch.diagonal(U), (~dead).to(W.dtype)
        for i1 in range(0, width, block):
            i2 = min(i1 + block, width)
            W1 = W[:, :, i1:i2].clone()
            if self.pattern is None:
                self._block_mask(W1, udiag, live, kept, i1, i2, totals, free_after)
            Err1 = self._sweep_block(W1, U, udiag, live, kept, i1)
            self.losses += 0.5 * Err1.pow(2).sum(dim=(1, 2), dtype=torch.float64)
            W[:, :, i1:i2] = W1
            W[:, :, i2:] -= Err1 @ U[i1:i2, i2:]
            if tick is not None and i2 < width:
                tick(i2 / width)
        if self.pattern is None:
            self._fill_short(W, udiag, live, kept, totals)
        return W * kept, kept

    def _free_after(self, rows: int, columns: int) -> list[int]:
        """Prunable weights from column c on, for every c (and 0 after the last)."""
        free_col = torch.full((columns,), rows, dtype=torch.long)
        if self.kept_by_floor is not None:
            free_col -= self.kept_by_floor.sum(dim=0).cpu()
        return torch.cat([free_col.flip(0).cumsum(0).flip(0), free_col.new_zeros(1)]).tolist()

    def _block_mask(
        self,
        W1: Tensor,
        udiag: Tensor,
        live: Tensor,
        kept: Tensor,
        i1: int,
        i2: int,
        totals: Sequence[int],
        free_after: list[int],
    ) -> None:
        """Unstructured: each level prunes its quota's share of the block ``[i1, i2)`` (in ``kept``, in place)."""
        rows = W1.shape[1]
        columns = kept.shape[2] - self.bias_cols
        prunable = max(0, min(i2, columns) - i1)
        if prunable <= 0:
            return
        scores = (W1.pow(2) / udiag[i1:i2].pow(2) * live[i1:i2])[:, :, :prunable]
        free = rows * prunable
        if self.kept_by_floor is not None:
            p = self.kept_by_floor[:, i1 : i1 + prunable]
            scores = scores.masked_fill(p, math.inf)
            free -= int(p.sum())
        n_before = 0
        if self.pruned_before is not None:
            f = self.pruned_before[:, i1 : i1 + prunable]
            scores = scores.masked_fill(f, -1.0)
            n_before = int(f.sum())
        for lv, total in enumerate(totals):
            target = int(round(total * min(i2, columns) / max(columns, 1)))  # cumulative quota after column i2
            need = total - self._pruned[lv] - free_after[min(i2, columns)]  # what the later blocks cannot take
            k = min(max(target - self._pruned[lv], n_before, need), free)
            if k > 0:
                kept[lv, :, i1 : i1 + prunable] = ~lowest(scores[lv], k)
                self._pruned[lv] += k

    def _sweep_block(self, W1: Tensor, U: Tensor, udiag: Tensor, live: Tensor, kept: Tensor, i1: int) -> Tensor:
        """Prune and compensate the block's columns one by one (in ``W1``); returns the block's errors."""
        Err1 = torch.zeros_like(W1)
        U1 = U[i1 : i1 + W1.shape[2], i1 : i1 + W1.shape[2]]
        flat = W1.view(-1, W1.shape[2])  # W1 is a fresh contiguous clone: (K rows, block) rows of rank-1 updates
        columns = kept.shape[2] - self.bias_cols
        for i in range(W1.shape[2]):
            col = i1 + i
            if self.pattern is not None and col < columns and col % self.pattern.m == 0:
                self._group_mask(W1[:, :, i : i + self.pattern.m], udiag, live, kept, col)
            err = W1[:, :, i].masked_fill(kept[:, :, col], 0.0).div_(U1[i, i])  # (w - q) / U_ii, q = w or 0
            flat[:, i:].addr_(err.reshape(-1), U1[i, i:], alpha=-1.0)  # in place, no (K rows) x block temporary
            Err1[:, :, i] = err
        return Err1

    def _group_mask(self, Wg: Tensor, udiag: Tensor, live: Tensor, kept: Tensor, col: int) -> None:
        """N:M: prune the ``M - N`` lowest scores of the group of columns starting at ``col`` (in ``kept``)."""
        assert self.pattern is not None
        m = self.pattern.m
        scores = Wg.pow(2) / udiag[col : col + m].pow(2) * live[col : col + m]
        if self.pruned_before is not None:
            scores = scores.masked_fill(self.pruned_before[:, col : col + m], -1.0)
        drop = scores.topk(m - self.pattern.n, dim=-1, largest=False).indices
        kept[:, :, col : col + m].scatter_(2, drop, False)

    def _fill_short(self, W: Tensor, udiag: Tensor, live: Tensor, kept: Tensor, totals: Sequence[int]) -> None:
        """Only when totals exceed the unprotected weights: prune the cheapest of what is left (in ``kept``)."""
        rows = W.shape[1]
        columns = W.shape[2] - self.bias_cols
        for lv, total in enumerate(totals):
            short = total - self._pruned[lv]
            if short <= 0:
                continue
            scores = (W[lv, :, :columns].pow(2) / udiag[:columns].pow(2) * live[:columns]).masked_fill(
                ~kept[lv, :, :columns], math.inf
            )
            if self.kept_by_floor is not None:
                scores = scores.masked_fill(self.kept_by_floor, math.inf)
            short = min(short, int(torch.isfinite(scores).sum()))
            self.filled[lv] = short > 0
            drop = scores.reshape(-1).topk(short, largest=False).indices
            sub = kept[lv, :, :columns].reshape(-1).clone()
            sub[drop] = False
            kept[lv, :, :columns] = sub.reshape(rows, columns)
