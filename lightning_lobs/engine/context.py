"""What every stage of one prune shares: the model, its options and batches, the ranks, progress and timings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import NMPattern, ProgressFn, PruneOptions, SolverOptions
from ..distributed import RankInfo
from ..masks import MaskSet
from ..progress import PhaseProgress
from .forward import default_forward, is_empty_batch, model_device, move_batch


@dataclass
class Timings:
    """Seconds spent so far, as the report shows them (the only state the stages add to as they go)."""

    calibration: float = 0.0
    solve: float = 0.0
    before_solve: dict[str, float] = field(default_factory=dict)
    """Per layer: time spent on it before its solve (its trace or curve, its calibration in sequential mode)."""


@dataclass
class Adjusted:
    """Options the plan changed for this run only (the user's stay as given)."""

    solver: SolverOptions | None = None
    """``SolverOptions`` with ``max_memory_bytes`` lowered to fit the memory budget (``plan.check_memory``)."""


@dataclass(frozen=True, eq=False)
class RunContext:
    """The inputs of one prune, fixed once it starts."""

    model: nn.Module
    options: PruneOptions
    masks: MaskSet
    rank: RankInfo
    device: torch.device
    batches: list[Any]
    """The calibration batches with samples (empty ones are left out and counted in ``empty_batches``)."""
    empty_batches: int
    run_batch: Callable[[Any], Any]
    progress: PhaseProgress
    timings: Timings
    adjusted: Adjusted = field(default_factory=Adjusted)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        batches: Sequence[Any],
        options: PruneOptions,
        masks: MaskSet | None,
        rank: RankInfo,
        progress: ProgressFn | None,
    ) -> RunContext:
        device = model_device(model)
        forward_fn = options.forward_fn or default_forward
        kept = [b for b in batches if not is_empty_batch(b)]
        return cls(
            model=model,
            options=options,
            masks=masks if masks is not None else MaskSet(),
            rank=rank,
            device=device,
            batches=kept,
            empty_batches=len(batches) - len(kept),
            run_batch=lambda batch: forward_fn(model, move_batch(batch, device)),
            progress=PhaseProgress(progress),
            timings=Timings(),
        )

    @property
    def solver(self) -> SolverOptions:
        """The run's solver options: the user's, or those the plan adjusted (:class:`Adjusted`)."""
        return self.adjusted.solver or self.options.solver

    @property
    def nm(self) -> NMPattern | None:
        return self.options.nm
