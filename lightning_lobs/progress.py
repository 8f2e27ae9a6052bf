"""A running prune's progress: :class:`PhaseProgress` emits the engine's steps with ETAs, and two renderers show
them: a console one for ``prune_model(progress=True)`` and one that draws through a Lightning trainer's own
progress bar (TQDM or Rich), or logs lines when it has none.

Both renderers take :class:`~lightning_lobs.config.PruneProgress` steps. Short prunes show
nothing (``after`` seconds must pass first) and updates are throttled to one every ``interval``
seconds, except the last step of each phase, so a fast loop over small layers costs nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from .config import ProgressFn, PruneProgress

__all__ = ["PhaseProgress", "Throttle", "console_progress", "trainer_progress"]


class Throttle:
    """Pass on a progress step when ``after`` seconds have passed since the prune started and
    ``interval`` since the last one passed on (the last step of a phase always passes)."""

    def __init__(self, emit: Callable[[PruneProgress], None], after: float = 0.0, interval: float = 0.5) -> None:
        if after < 0 or interval < 0:
            raise ValueError(f"after and interval must be >= 0 seconds, got after={after!r}, interval={interval!r}.")
        self.emit = emit
        self.after = after
        self.interval = interval
        self._last: float | None = None
        self.shown = 0  # steps passed on (tests and callers can tell whether anything was shown)

    def __call__(self, step: PruneProgress) -> None:
        if step.elapsed < self.after:
            return
        now = time.monotonic()
        last_of_phase = step.done >= step.total
        if self._last is not None and now - self._last < self.interval and not last_of_phase:
            return
        self._last = now
        self.shown += 1
        self.emit(step)


def console_progress(interval: float = 0.5, stream: TextIO | None = None, after: float = 0.0) -> ProgressFn:
    """A progress function printing ``PruneProgress.describe()`` lines to ``stream`` (default stderr),
    at most one every ``interval`` seconds plus the last step of each phase."""

    def emit(step: PruneProgress) -> None:
        out = stream if stream is not None else sys.stderr
        print(step.describe(), file=out, flush=True)

    return Throttle(emit, after=after, interval=interval)


class _BarStatus:
    """Writes a status text into the trainer's progress bar (TQDM postfix, Rich task description), or
    into the log when the trainer has no bar it can draw into; :meth:`clear` restores the bar."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.bar = getattr(trainer, "progress_bar_callback", None)
        # Without a bar, lines go through the trainer's own rank-zero logger, which Lightning shows by default.
        from ._lightning import namespace_of

        self.info: Callable[[str], None] = namespace_of(trainer).utilities.rank_zero_info
        self._rich_description: str | None = None
        self._tqdm = None

    def _tqdm_bar(self) -> Any:
        # TQDMProgressBar: the train bar exists from on_train_start on (the private attribute, because the
        # public property raises before that).
        bar = getattr(self.bar, "_train_progress_bar", None)
        return (
            bar if bar is not None and hasattr(bar, "set_postfix_str") and not getattr(bar, "disable", False) else None
        )

    def _rich(self) -> Any:
        progress = getattr(self.bar, "progress", None)
        task = getattr(self.bar, "train_progress_bar_id", None)
        return (progress, task) if progress is not None and task is not None and hasattr(progress, "update") else None

    def show(self, text: str) -> None:
        if not getattr(self.trainer, "is_global_zero", True):
            return
        tqdm_bar = self._tqdm_bar()
        if tqdm_bar is not None:
            self._tqdm = tqdm_bar
            tqdm_bar.set_postfix_str(text, refresh=True)
            return
        rich = self._rich()
        if rich is not None:
            progress, task = rich
            if self._rich_description is None:  # task ids are not list indices once Lightning removed a task
                current = next((t for t in progress.tasks if t.id == task), None)
                self._rich_description = current.description if current is not None else ""
            progress.update(task, description=f"{self._rich_description} {text}".strip())
            progress.refresh()
            return
        self.info(text)

    def clear(self) -> None:
        if self._tqdm is not None:
            self._tqdm.set_postfix_str("", refresh=True)
        rich = self._rich()
        if rich is not None and self._rich_description is not None:
            progress, task = rich
            progress.update(task, description=self._rich_description)
            progress.refresh()

    def print(self, text: str) -> None:
        """Print a block of text through the bar (so it does not collide with the bar's line), else log it."""
        if not getattr(self.trainer, "is_global_zero", True):
            return
        printer = getattr(self.bar, "print", None)
        if self.bar is not None and callable(printer) and getattr(self.bar, "is_enabled", True):
            printer(text)
        else:
            self.info(text)


def trainer_progress(trainer: Any, after: float = 2.0, interval: float = 0.5) -> tuple[ProgressFn, _BarStatus]:
    """A throttled progress function drawing into ``trainer``'s progress bar, and the bar handle
    (call ``.clear()`` when the prune is done, ``.print(text)`` for a block of text)."""
    status = _BarStatus(trainer)
    return Throttle(lambda step: status.show(step.describe()), after=after, interval=interval), status


class PhaseProgress:
    """Emits :class:`PruneProgress` events, with an ETA from the phase's measured rate.

    Each phase's units (layers, batches) carry an estimated cost (floating-point operations for the
    solver phases); :meth:`step` finishes a unit, :meth:`advance` reports part of one (a kernel's tick).
    The ETA is the cost left divided by the cost done per second so far in the phase. ``clock`` is
    injectable so the arithmetic can be checked against simulated time.
    """

    def __init__(self, fn: ProgressFn | None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.fn = fn
        self.clock = clock
        self.start = clock()
        self.phase = "calibrate"
        self.costs: dict[str, float] = {}
        self.total = 0
        self.done = 0
        self.done_cost = 0.0
        self.partial: dict[str, float] = {}  # unfinished units' fractions done
        self.phase_start = self.start

    def begin(self, phase: str, costs: Mapping[str, float]) -> None:
        self.phase, self.costs = phase, {k: max(float(c), 0.0) for k, c in costs.items()}
        self.total, self.done, self.done_cost, self.partial = len(costs), 0, 0.0, {}
        self.phase_start = self.clock()

    def advance(self, key: str, fraction: float, label: str = "") -> None:
        """Unit ``key`` is ``fraction`` done (it is finished only by :meth:`step`)."""
        if self.fn is None:
            return
        self.partial[key] = max(self.partial.get(key, 0.0), min(max(float(fraction), 0.0), 1.0))
        self._emit(label)

    def step(self, key: str, label: str = "") -> None:
        if self.fn is None:
            return
        self.partial.pop(key, None)
        self.done += 1
        self.done_cost += self.costs.get(key, 0.0)
        self._emit(label)

    def _emit(self, label: str) -> None:
        if self.fn is None:
            return
        now = self.clock()
        total = sum(self.costs.values())
        work = self.done_cost + sum(self.costs.get(k, 0.0) * f for k, f in self.partial.items())
        eta = None if work <= 0 else (now - self.phase_start) * max(total - work, 0.0) / work
        fraction = min(work / total, 1.0) if total > 0 else None
        self.fn(PruneProgress(self.phase, self.done, self.total, label, now - self.start, eta, fraction))  # type: ignore[arg-type]
