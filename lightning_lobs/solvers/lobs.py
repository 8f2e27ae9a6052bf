"""``lobs``: the L-OBS paper's rule (Dong et al. 2017).

One damped ``H^-1`` per layer, every weight ranked once, layer-wide, by ``L_q = w_q^2 / (2 [H^-1]_qq)``. The
removed set is then compensated jointly: the kept weights move to the least-squares optimum for that mask (the
multi-weight OBS update: :func:`~lightning_lobs.solvers.core.refit`, one Cholesky per row, or where that is dearer
the batched conjugate gradients of :func:`~lightning_lobs.solvers.cg.refit_kept`). With
``SolverOptions(refit=False)`` the paper's literal sequence is used instead: the lowest-ranked are removed one after
another, each applying the single-weight correction ``-(w_q / [H^-1]_qq) H^-1 e_q`` with that same, stale ``H^-1``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from ..config import SolverOptions
from .cg import refit_kept
from .core import (
    LayerInputs,
    Solution,
    Tick,
    inverse_with_damping,
    mask_from_scores,
    one_pass_floor,
    refit_planned,
    row_groups,
    single_removal_costs,
    tick_if_long,
)


class LobsSolver:
    """One-pass OBS ranking, then a joint refit (or the paper's literal sequential updates)."""

    name = "lobs"

    def solve(self, inputs: LayerInputs, options: SolverOptions, tick: Tick | None) -> Solution:
        """Prune ``inputs`` to its sparsity (already lowered to the per-row minimum)."""
        work = inputs.W.to(options.dtype)
        _, Hinv, damp, dead = inverse_with_damping(inputs.H.to(work.device), options, stacklevel=4)
        tick_if_long(tick, Hinv.shape[0] * Hinv.shape[-1] ** 3)
        kept_by_floor = one_pass_floor(inputs, options, work, Hinv, dead)
        kept, scores = lobs_mask(work, Hinv, dead, inputs, kept_by_floor)
        if refit_planned(options, 0.0):
            new, _ = refit_kept(work, inputs.H, kept, replace(options, damp=damp), tick=tick)
        else:
            new = lobs_sequential(work, Hinv, kept, scores)
        return Solution(new, kept, damp)


def lobs_mask(
    W: Tensor, Hinv: Tensor, dead: Tensor, inputs: LayerInputs, kept_by_floor: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The paper's one-pass ranking: ``(keep-mask, L_q scores)``, every weight ranked layer-wide.

    Weights pruned before rank first; ``kept_by_floor`` weights (the per-row minimum) rank last and stay.
    """
    scores = single_removal_costs(W, Hinv, dead)
    pruned_before, bias_cols = inputs.pruned_before, inputs.bias_cols
    if pruned_before is not None:
        scores = scores.masked_fill(pruned_before, -math.inf)
    if bias_cols:
        scores[:, -bias_cols:] = math.inf
    ranked = scores
    if kept_by_floor is not None:
        ranked = scores.clone()
        ranked[:, : kept_by_floor.shape[1]].masked_fill_(kept_by_floor, math.inf)
    return mask_from_scores(ranked, inputs.sparsity, inputs.pattern, bias_cols), scores


def lobs_sequential(W: Tensor, Hinv: Tensor, kept: Tensor, scores: Tensor) -> Tensor:
    """The paper's literal updates: removals in rank order, each corrected with the same, stale ``H^-1``.

    Those corrections also move weights that were already removed, which the final mask then zeroes, so the
    literal sequence can end worse than no correction at all (see BENCHMARKS.md).
    """
    rows = W.shape[0]
    gidx = row_groups(rows, Hinv.shape[0], W.device)
    pruned = ~kept
    # Per-row removal order: that row's pruned weights by ascending L_q (the global rank order).
    order_key = torch.where(pruned, scores, torch.full_like(scores, math.inf))
    order = order_key.argsort(dim=1)
    counts = pruned.sum(dim=1)
    arange = torch.arange(rows, device=W.device)
    W = W.clone()
    for t in range(int(counts.max().item()) if rows else 0):
        q = order[:, t]
        active = (t < counts).to(W.dtype)
        hqq = Hinv[gidx, q, q]
        coef = active * W[arange, q] / hqq
        W -= coef.unsqueeze(1) * Hinv[gidx, q, :]
    return W * kept
