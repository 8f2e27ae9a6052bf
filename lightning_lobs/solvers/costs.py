"""Cost curves for the allocation across layers (``lightning_lobs.allocation``).

:func:`error_curve` measures a layer's relative SparseGPT error at a grid of sparsities in one batched sweep;
:func:`obs_scores` gives the one-pass OBS costs; errors are divided by :func:`output_energy` so that layers compare
relative output errors. (``exact`` layers use :func:`~lightning_lobs.solvers.greedy_trace` instead.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import SolverOptions
from .core import (
    LayerInputs,
    RowFloor,
    Tick,
    as_groups,
    inverse_with_damping,
    layer_error,
    prepare_inputs,
    row_groups,
    single_removal_costs,
    sub_tick,
    tick_if_long,
)
from .fast import ColumnSweep


def obs_scores(
    weight: Tensor, hessian: Tensor, *, bias: Tensor | None = None, solver: SolverOptions | None = None
) -> Tensor:
    """One-pass OBS cost ``L_q = w_q^2 / (2 [H^-1]_qq)`` of removing each weight alone.

    Same shapes as :func:`~lightning_lobs.solvers.solve_layer` (``hessian`` includes the bias column when
    ``bias`` is given); H is damped as in the solvers. Weights on dead inputs cost 0. Returns a float64 tensor
    of the weight's shape.
    """
    solver = solver or SolverOptions()
    x = prepare_inputs(weight, hessian, 0.0, bias, None, None)
    _, Hinv, _, dead = inverse_with_damping(x.H.to(x.W.device), solver)
    return single_removal_costs(x.W.double(), Hinv, dead)[:, : x.columns].reshape(x.shape)


def output_energy(weight: Tensor, hessian: Tensor, *, bias: Tensor | None = None) -> float:
    """``1/2 sum_rows w~ H w~^T``: half the mean squared output of the layer (undamped H).

    Dividing a layer's errors by it makes them relative, hence comparable across layers.
    """
    x = prepare_inputs(weight, hessian, 0.0, bias, None, None)
    return layer_error(x.W, torch.zeros_like(x.W), x.H)  # the error of removing every weight


def damping_shift(hessian: Tensor, damp: float) -> Tensor:
    """``(groups, D)`` float64: what :func:`~lightning_lobs.solvers.core.damped_hessian` adds to each diagonal entry
    of ``hessian`` (groups, D, D): the damping ``damp x mean(diag)``, plus 1 on dead inputs (zero diagonal)."""
    diag = torch.diagonal(as_groups(hessian), dim1=-2, dim2=-1).double()
    repaired = torch.where(diag <= 0, torch.ones_like(diag), diag)
    return damp * repaired.mean(dim=-1, keepdim=True) + (repaired - diag)


def sampled_rows(rows: int, count: int, device: torch.device) -> Tensor:
    """``count`` evenly spaced row indices (all rows when there are fewer), the same on every call."""
    if count >= rows:
        return torch.arange(rows, device=device)
    return torch.linspace(0, rows - 1, count, device=device).round().long().unique()


def error_curve(
    weight: Tensor,
    hessian: Tensor,
    sparsities: Sequence[float],
    *,
    bias: Tensor | None = None,
    solver: SolverOptions | None = None,
    prior_mask: Tensor | None = None,
    sample_rows: int = 64,
    tick: Tick | None = None,
) -> Tensor:
    """Relative layer error of SparseGPT (``fast`` without the refit) at each of ``sparsities``.

    Runs on ``sample_rows`` evenly spaced rows (all rows when fewer), every level in one
    batched sweep over the columns with one Cholesky factor, and returns, per level, the
    sampled rows' error ``1/2 sum (w^ - w) H (w^ - w)^T`` divided by their output energy
    ``1/2 sum w H w^T`` (float64, shape ``(len(sparsities),)``; zeros when that energy is 0). Each level's error is
    the sweep's accumulated OBS losses less the damping's share (no product per level), so in ``solver.dtype``'s
    rounding. Arguments as in :func:`~lightning_lobs.solvers.solve_layer`; the per-row minimum
    ``solver.min_kept_per_row`` holds. ``tick`` (optional) is called with the fraction done, per block of columns.
    """
    solver = solver or SolverOptions()
    levels = [float(v) for v in sparsities]
    if not levels or any(not (0.0 <= v <= 1.0) for v in levels):
        raise ValueError(f"sparsities must be a non-empty sequence of floats in [0, 1], got {sparsities!r}.")
    if isinstance(sample_rows, bool) or not isinstance(sample_rows, int) or sample_rows < 1:
        raise ValueError(f"sample_rows must be a positive int, got {sample_rows!r}.")
    x = prepare_inputs(weight, hessian, 0.0, bias, None, prior_mask)
    curve = _Curve(x, solver, levels, tick)
    return curve.run(sample_rows)


class _Curve:
    """:func:`error_curve` on one layer: the sampled rows of every Hessian group in turn."""

    def __init__(self, x: LayerInputs, solver: SolverOptions, levels: list[float], tick: Tick | None) -> None:
        self.x, self.solver, self.levels, self.tick = x, solver, levels, tick
        self.work = x.W.to(solver.dtype)
        _, self.Hinv, damp, self.dead = inverse_with_damping(x.H.to(self.work.device), solver, stacklevel=4)
        tick_if_long(tick, self.Hinv.shape[0] * self.Hinv.shape[-1] ** 3)
        self.Hd = x.H.to(device=self.work.device, dtype=torch.float64)
        self.shift = damping_shift(self.Hd, damp)
        self.err = torch.zeros(len(levels), dtype=torch.float64)
        self.energy = 0.0

    def run(self, count: int) -> Tensor:
        rows, G = self.work.shape[0], self.x.H.shape[0]
        sel = sampled_rows(rows, count, self.work.device)
        gidx = row_groups(rows, G, self.work.device)[sel]
        group_list = gidx.unique().tolist()
        for i, g in enumerate(group_list):
            self._group(g, sel[gidx == g], i / len(group_list), 1 / len(group_list))
        if not self.energy > 0:
            return torch.zeros(len(self.levels), dtype=torch.float64)
        return self.err / self.energy

    def _group(self, g: int, rs: Tensor, start: float, share: float) -> None:
        """Add the errors and energy of the sampled rows ``rs`` of group ``g`` (the ``share`` of work from ``start``)."""
        x, solver, levels, tick = self.x, self.solver, self.levels, self.tick
        columns = x.columns
        Wg = self.work[rs]
        f = x.pruned_before[rs] if x.pruned_before is not None else None
        f_cols = None if f is None else f[:, :columns]
        floor = RowFloor(solver.min_kept_per_row)
        costs = single_removal_costs(Wg, self.Hinv[g : g + 1], self.dead[g : g + 1])[:, :columns]
        kept_by_floor = floor.kept_by_floor(costs, f_cols)
        limit = floor.most_removable(rs.numel(), columns, f_cols)
        totals = [min(int(round(v * rs.numel() * columns)), limit) for v in levels]
        sweep = ColumnSweep(None, x.bias_cols, solver.block_size, f, kept_by_floor)
        new, _ = sweep.run(Wg, self.Hinv[g], self.dead[g], totals, sub_tick(tick, start, share))
        delta = (new - Wg.unsqueeze(0)).double()
        # Each level's error is the sweep's own summed OBS losses (the error under the damped H) less the damping's
        # share: no (K r) x d x d product. A level whose quota the sweep could not meet had weights pruned without
        # compensation after it (ColumnSweep._fill_short): its error is evaluated directly.
        err = sweep.losses - 0.5 * (delta.pow(2) * self.shift[g]).sum(dim=(1, 2))
        for k in (k for k, filled in enumerate(sweep.filled) if filled):
            err[k] = 0.5 * torch.einsum("ri,ij,rj->", delta[k], self.Hd[g], delta[k])
        self.err += err.cpu()
        w64 = Wg.double()
        self.energy += 0.5 * float(torch.einsum("ri,ij,rj->", w64, self.Hd[g], w64))
