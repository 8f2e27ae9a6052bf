"""Memory estimates made before calibration, so a too-big layer fails early with advice.

The promise for a model sharded by ``fully_shard`` (FSDP2), per rank: its shards (the pruned layers' up to three
times: the model's, the transaction's copy that undoes a failed prune, and the report's copy of the pruned weights
while it compares dense and pruned outputs), plus the Hessians, plus ONE whole layer at a time: its gathered weight
and its solution (and the solver's workspace on the rank that solves it). The Hessians: while calibrating, each
rank's own partial sums of every layer calibrated together (every selected layer's in the one-pass pipeline, one
block's when the model's blocks are walked: by default and with ``sequential=True``); once they are summed over the
ranks, only those of the layers the rank owns (each Hessian is reduced onto its owner and freed elsewhere). :func:`layer_memory` counts the
gathered layer, :func:`check_budget` the two phases per rank; like the unsharded check it counts the prune's work
memory (Hessians, gathered layer, solve), not the weights already resident nor their copies.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from .config import SolverOptions
from .layers import describe_layer
from .solvers.core import refit_workspace_bytes
from .solvers.exact import exact_workspace_bytes

#: ``exact``'s workspace beyond its row chunks and the common ``base``, in ``d x d`` words of the solve dtype (the
#: float64 copies of H that rescaling and the refit make, the trace's per-row state): the part of the measured peaks
#: (in :func:`layer_memory`) that does not grow with the chunk was 17-21 words, of which ``base`` counts 6.
EXACT_FIXED_WORDS = 15


@dataclass(frozen=True)
class LayerMemory:
    """Bytes one layer needs: its Hessian while calibrating, and the solver's workspace."""

    name: str
    hessian_bytes: int
    solve_bytes: int
    gathered_bytes: int = 0
    """Of ``solve_bytes``: the whole weight gathered from its shards and its whole solution (``fully_shard``), held
    by every rank while the layer is solved, the rank that solves it or not."""


def layer_memory(
    name: str,
    module: nn.Module,
    method: str,
    hessian_dtype: torch.dtype | str,
    solver: SolverOptions,
    gathered: bool = False,
) -> LayerMemory:
    """Estimate the memory of calibrating and solving one layer with ``method``.

    ``solver``: its dtype, ``max_memory_bytes`` (``exact``'s and the direct refit's row chunks), ``lazy_steps``
    (``exact``'s chunks are also bounded by its work between two ticks) and ``refit`` (of ``lobs``/``fast``: True
    the direct refit, None the cheaper of it and CG).
    ``gathered``: the layer's weight is sharded (``fully_shard``), so solving it first gathers it whole and then
    receives its whole solution on every rank: two ``rows x matrix_cols`` matrices in the weight's dtype on top.
    """
    shape = describe_layer(module)
    g, d, rows = shape.groups, shape.matrix_cols, shape.rows
    # "mixed": a float64 sum, plus a float32 partial sum while fewer than 2,048 rows are pending
    hbytes = 12 if isinstance(hessian_dtype, str) else torch.empty((), dtype=hessian_dtype).element_size()
    sbytes = torch.empty((), dtype=solver.dtype).element_size()
    max_bytes, refit = solver.max_memory_bytes, solver.refit
    hessian = g * d * d * hbytes
    square = d * d * sbytes
    # Damped H, its factor and inverse (a few d x d copies) in the solve dtype, per group, plus the float64
    # copy of H that the layer-error evaluation makes (measured on a VGG-16 fc6 proxy: ~5.75 d^2 float32 words).
    base = 4 * g * square + g * d * d * 8
    if method == "admm":
        # The eigenvectors and their transpose, the eigensolver's workspace, then about a dozen rows x d tensors
        # alive at once: the dense, projected, dual and ridge copies with their temporaries in the ADMM loop, the
        # right-hand side, residual, direction and product in the CG refit (admm.py, cg.py).
        extra = 3 * g * square + 12 * rows * d * sbytes
    elif method == "exact":
        # The trace's chunk of per-row H^-1 copies, then the refit's chunk of batched systems (the chunks as the
        # solver sizes them: max_memory_bytes and the ticks), plus the float64 copies of H that rescaling makes and
        # the trace's per-row state. Measured peak RSS of a 500 x 801 float32 trace over its start: 53 MiB in chunks
        # of 1 row, 57 with 6, 149-151 with 48 (the default's), 303 with 104: 1.0 d^2 words per chunk row. This
        # counted 3 x max_memory_bytes (3 GiB) until 0.3, which refused LeNet-5 where 2.3 GiB were free.
        extra = exact_workspace_bytes(rows, d, sbytes, max_bytes, solver.lazy_steps) + EXACT_FIXED_WORDS * g * square
    else:
        extra = 4 * rows * d * sbytes
        if refit is not False:
            # The direct refit: batched (kept x kept) systems and their Cholesky factors, rows chunked by
            # max_memory_bytes and the ticks (solvers.core.refit_chunk). refit=None uses it only on tiny layers
            # (about 48 columns at most: under 100 rows x d words) and the CG refit's ten rows x d tensors elsewhere
            # (solvers.core.refit_plan).
            direct = refit_workspace_bytes(rows, d, sbytes, max_bytes)
            extra += direct if refit else min(direct, 100 * rows * d * sbytes)
    whole = 0
    if gathered:
        whole = 2 * rows * d * torch.empty((), dtype=cast(torch.Tensor, module.weight).dtype).element_size()
    return LayerMemory(name, hessian, base + extra + whole, whole)


def mem_available(meminfo: str = "/proc/meminfo") -> int | None:
    """Linux's ``MemAvailable`` in bytes (free pages plus the page cache the kernel can drop), or None."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    value, unit = line.split()[1:3]
                    return int(value) * 1024 if unit == "kB" else None
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device: torch.device) -> int | None:
    """Memory on ``device`` a prune can still use, in bytes, or None when it cannot be told.

    On the CPU this is Linux's ``MemAvailable``, not the free pages alone: on a machine whose page cache fills
    the RAM the free pages are a small fraction of what can be had, and the budget check refused models that fit.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    available = mem_available()
    if available is not None:
        return available
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
        return int(pages * size)
    except (ValueError, OSError, AttributeError):
        return None


def check_budget(
    estimates: Mapping[str, LayerMemory],
    budget: int | None,
    sequential: bool,
    device: torch.device,
    groups: Sequence[Collection[str]] = (),
    owned: Collection[str] | None = None,
) -> dict[str, int]:
    """Raise ``MemoryError`` naming the layer and the remedy when the plan will not fit.

    Calibrating in one pass holds every Hessian at once; walking (``sequential``: the sequential pipelines, and the
    default one on a model with blocks) one at a time, or, with ``groups`` (the selected layers of each block the
    walk takes, and those outside the blocks), one group's at a time. The solves run one layer at a
    time on top of the Hessians. ``budget`` None means 80% of the memory available on ``device`` now. Returns the
    totals it checked.

    ``owned`` (in a group of ranks: the layers this rank solves, whose Hessians are summed onto it alone): while
    calibrating, a rank holds its own partial sums of every layer calibrated together (as above); once they are
    reduced, only its owned layers' Hessians, the workspace of its own solves, and the gathered whole weight and
    solution (``gathered_bytes``) of a sharded layer another rank solves. The peak is the larger of the two phases.
    None: this rank solves every layer.
    """
    if budget is None:
        avail = available_memory(device)
        if avail is None:
            return {}
        budget = int(0.8 * avail)
    if not estimates:
        return {"budget": budget, "peak": 0}
    held = _held(estimates, sequential, groups)
    mine = {n: e for n, e in estimates.items() if owned is None or n in owned}
    work = max([e.solve_bytes for e in mine.values()] + [e.gathered_bytes for e in estimates.values()])
    peak = max(held, (_held(mine, sequential, groups) if mine else 0) + work)
    if peak > budget:
        biggest = max(estimates.values(), key=lambda e: e.hessian_bytes + e.solve_bytes)
        raise MemoryError(
            f"pruning needs about {_size(peak)} but the memory budget is {_size(budget)}: layer "
            f"'{biggest.name}' alone needs {_size(biggest.hessian_bytes)} for its Hessian and "
            f"{_size(biggest.solve_bytes)} to solve. Use method='fast' for it, "
            f"CalibrationOptions(hessian_dtype=torch.float32), sequential=True (one block's Hessians at a time; "
            f"sequential_unit='layer': one), exclude=['{biggest.name}'], or raise "
            "CalibrationOptions.memory_budget_bytes."
        )
    return {"budget": budget, "peak": peak}


def _held(estimates: Mapping[str, LayerMemory], sequential: bool, groups: Sequence[Collection[str]]) -> int:
    """Hessian bytes held at once: all of them, or (sequential) the largest one's or one group's."""
    if not sequential:
        return sum(e.hessian_bytes for e in estimates.values())
    held = max(e.hessian_bytes for e in estimates.values())
    for group in groups:
        held = max(held, sum(estimates[n].hessian_bytes for n in group if n in estimates))
    return held


def _size(n: int) -> str:
    """Bytes in a readable unit (small budgets in tests and scripts must not all read 0.00 GiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"
