"""``exact``'s kernel: the greedy OBS trace of a chunk of rows, each with its own copy of ``H^-1``.

Every row removes one weight per step. Downdates wait in a low-rank factor ``U`` and are flushed every ``lazy``
steps with one batched matmul. Only candidate columns (neither removed nor blocked) matter from then on: their
block of the downdated inverse is self-contained, so at a flush, once the candidates have shrunk below ``shrink``
of the current width, every row's state is compacted to them. That makes the total work about a third of keeping
full d x d matrices.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import NMPattern
from .core import Tick

#: One greedy step's fixed cost (Python and small kernels, about 100 us) in flops of the trace's matmuls; shared
#: by the chunk's rows, it is what makes the narrow last steps of a trace slower than their width suggests.
STEP_OVERHEAD_FLOPS = 2e6


def step_work(width: int, rows: int) -> float:
    """Estimated work per row of one greedy step at ``width`` columns, in units of half a flop (a flush's share is
    ``width^2``, the pending-downdate reads about ``16 width``)."""
    return float(width) ** 2 + 16.0 * width + STEP_OVERHEAD_FLOPS / (2.0 * rows)


def trace_work(width: int, steps: int, lazy: int, bias_cols: int, shrink: float, rows: int = 1) -> float:
    """Sum over the steps of :func:`greedy_rows` of :func:`step_work`, for unstructured chunks of ``rows`` rows."""
    dc, work, j = width, 0.0, 0
    for step in range(steps):
        work += step_work(dc, rows)
        j += 1
        if j == lazy or step == steps - 1:
            candidates = width - bias_cols - (step + 1)
            if step < steps - 1 and candidates <= shrink * dc:
                dc = candidates
            j = 0
    return max(work, 1.0)


def compact_in_place(Hinv: Tensor, keep: Tensor) -> Tensor:
    """``Hinv[r][keep[r]][:, keep[r]]`` for every row r, written over the front of ``Hinv``'s own storage.

    A fresh (R, w, w) tensor would cost more in page faults than the copy itself; row r's result ends
    before row r + 1's source begins (w < dc), and each row's source is read into a buffer first.
    """
    R, dc, _ = Hinv.shape
    width = keep.shape[1]
    flat = Hinv.reshape(-1)  # a view: Hinv is contiguous
    rows_buf = torch.empty(width, dc, dtype=Hinv.dtype, device=Hinv.device)
    for r in range(R):
        torch.index_select(Hinv[r], 0, keep[r], out=rows_buf)
        torch.index_select(
            rows_buf, 1, keep[r], out=flat[r * width * width : (r + 1) * width * width].view(width, width)
        )
    return flat[: R * width * width].view(R, width, width)


class _GreedyState:
    """The per-row state of :func:`greedy_rows`; every ``(R, dc)`` tensor shrinks together at a compaction.

    ``blocked`` is True on columns that can no longer be removed (removed, the bias, a full N:M group);
    ``colmap`` maps a compacted column back to the original one; ``U`` holds the pending downdates.
    """

    def __init__(
        self,
        W: Tensor,
        Hinv: Tensor,
        dead: Tensor,
        pattern: NMPattern | None,
        bias_cols: int,
        lazy: int,
        pruned_before: Tensor | None,
    ) -> None:
        R, d = W.shape
        device = W.device
        self.rows = torch.arange(R, device=device)
        self.W = W.clone()
        self.Hinv = Hinv
        self.diag = torch.diagonal(Hinv, dim1=1, dim2=2).clone()
        self.blocked = torch.zeros(R, d, dtype=torch.bool, device=device)
        if bias_cols:
            self.blocked[:, d - bias_cols :] = True
        self.cost = (~dead).to(W.dtype)  # (R, d): removing a dead input costs nothing
        self.colmap = torch.arange(d, device=device).expand(R, d).contiguous()
        self.pruned_before = pruned_before
        self.pattern = pattern
        self.groupmap: Tensor | None = None
        if pattern is not None:
            columns = d - bias_cols
            group_id = torch.cat(
                [torch.arange(columns, device=device) // pattern.m, torch.full((bias_cols,), -1, device=device)]
            )
            self.groupmap = group_id.expand(R, d).contiguous()
            self.group_count = torch.zeros(R, columns // pattern.m, dtype=torch.long, device=device)
        self.lazy = lazy
        self.U = torch.zeros(R, lazy, d, dtype=W.dtype, device=device)  # pending downdates, one row vector per removal
        self.tiny = torch.finfo(W.dtype).tiny

    def step(self, j: int) -> tuple[Tensor, Tensor]:
        """Remove every row's cheapest weight (``j`` downdates pending): ``(original column, OBS loss)``."""
        R, dc = self.W.shape
        W, diag, cost, U = self.W, self.diag, self.cost, self.U
        loss = W.square().div_(diag).mul_(cost).masked_fill_(self.blocked, math.inf)
        if self.pruned_before is not None:  # weights pruned earlier go first, at no cost to the allocation
            loss.masked_fill_(self.pruned_before & ~self.blocked, -1.0)
        q = loss.argmin(dim=1)
        row = self.Hinv.view(R * dc, dc).index_select(0, self.rows * dc + q)  # H^-1 row q before pending downdates
        if j:
            coeff = U[:, :j, :].gather(2, q.view(R, 1, 1).expand(R, j, 1))  # (R, j, 1)
            row.sub_(torch.bmm(coeff.transpose(1, 2), U[:, :j, :]).squeeze(1))
        q1 = q.unsqueeze(1)
        hqq = row.gather(1, q1).squeeze(1).clamp_min_(self.tiny)
        wq = W.gather(1, q1).squeeze(1)
        column = self.colmap.gather(1, q1).squeeze(1)
        increment = wq.square() / (2 * hqq) * cost.gather(1, q1).squeeze(1)
        W.addcmul_((wq / hqq).unsqueeze(1), row, value=-1.0)
        u = row.div_(hqq.sqrt().unsqueeze(1))
        U[:, j, :] = u
        diag.addcmul_(u, u, value=-1.0)
        W.scatter_(1, q1, 0.0)
        self.blocked.scatter_(1, q1, True)
        diag.scatter_(1, q1, 1.0)  # keeps the loss finite; the column is blocked from now on
        if self.groupmap is not None:
            self._block_full_groups(q1)
        return column, increment

    def _block_full_groups(self, q1: Tensor) -> None:
        """Block the rest of every N:M group that just reached its quota of removals."""
        assert self.groupmap is not None and self.pattern is not None
        gq = self.groupmap.gather(1, q1).squeeze(1)
        self.group_count[self.rows, gq] += 1
        full = self.group_count[self.rows, gq] >= self.pattern.m - self.pattern.n
        if bool(full.any()):
            self.blocked |= full.unsqueeze(1) & (self.groupmap == gq.unsqueeze(1))

    def flush(self, j: int, compact: bool, shrink: float) -> None:
        """Apply the ``j`` pending downdates; compact first when the candidates fell below ``shrink`` of the width."""
        R, dc = self.W.shape
        width = int((~self.blocked).sum(dim=1).max())
        if compact and width <= shrink * dc:
            # Compact every row to its candidates (then kept-but-blocked columns as padding; stable keeps
            # the order) before the flush, so the flush only updates the block that is still needed.
            keep = torch.argsort(self.blocked.to(torch.int8), dim=1, stable=True)[:, :width]
            self.Hinv = compact_in_place(self.Hinv, keep)
            Uk = self.U[:, :j, :].gather(2, keep.unsqueeze(1).expand(R, j, width))
            self.Hinv.baddbmm_(Uk.transpose(1, 2), Uk, alpha=-1)
            self.W, self.diag, self.blocked, self.cost, self.colmap = (
                t.gather(1, keep) for t in (self.W, self.diag, self.blocked, self.cost, self.colmap)
            )
            if self.pruned_before is not None:
                self.pruned_before = self.pruned_before.gather(1, keep)
            if self.groupmap is not None:
                self.groupmap = self.groupmap.gather(1, keep)
            self.U = torch.zeros(R, self.lazy, width, dtype=self.W.dtype, device=self.W.device)
        else:
            self.Hinv.baddbmm_(self.U[:, :j, :].transpose(1, 2), self.U[:, :j, :], alpha=-1)
            self.U.zero_()


def greedy_rows(
    W: Tensor,
    Hinv: Tensor,
    dead: Tensor,
    steps: int,
    pattern: NMPattern | None,
    bias_cols: int,
    lazy: int,
    pruned_before: Tensor | None = None,
    shrink: float = 0.75,
    tick: Tick | None = None,
) -> tuple[Tensor, Tensor]:  # ten parameters: the kernel's whole input, as the benchmarks and tests call it
    """Run greedy OBS on a chunk of rows; ``Hinv`` (R, d, d) is each row's own copy of H^-1 (downdated in place).

    Returns ``(order, increments)``: the original column removed at each step and the
    OBS loss ``w_q^2 / (2 [H^-1]_qq)`` of that removal (dead inputs cost 0). ``tick`` is called
    after every flush but the last with the estimated fraction of the work done (a flush costs
    the square of the current width).
    """
    R, d = W.shape
    state = _GreedyState(W, Hinv, dead, pattern, bias_cols, lazy, pruned_before)
    order = torch.empty(R, steps, dtype=torch.long, device=W.device)
    increments = torch.empty(R, steps, dtype=W.dtype, device=W.device)
    # Work is counted as the square of the columns held per step (a flush's cost); the total follows the
    # compaction schedule of unstructured rows (N:M rows compact sooner, so their fraction ends below 1).
    total_work = trace_work(d, steps, lazy, bias_cols, shrink, R)
    work = 0.0
    j = 0
    for step in range(steps):
        dc = state.W.shape[1]
        order[:, step], increments[:, step] = state.step(j)
        j += 1
        work += step_work(dc, R)
        if j == lazy or step == steps - 1:
            state.flush(j, step < steps - 1, shrink)
            j = 0
            if tick is not None and step < steps - 1:
                tick(min(work / total_work, 1.0))
    return order, increments
