"""Prune schedules: at which epochs (or global steps) to prune, and to what sparsity.

A schedule is a small pure object, usable and testable without a ``Trainer``: its points and one
sparsity spec per point are fixed (and checked) when it is built; it says what is due at a point,
whether every point is reachable by a training run, and what its checkpoint state is.
``LOBSPruning`` builds a :class:`PruneSchedule` from its ``sparsity``/``prune_epoch``/``prune_step``
lists, or takes one as ``schedule=``: a :class:`SparsitySchedule` (the sparsity as a function of the
epoch or step) or a :class:`GradualSchedule` (Zhu & Gupta's cubic ramp).

A function of the epoch is never passed as ``sparsity``: there a callable means a per-layer spec
``(name, module) -> fraction``, so the two cannot be confused.

:class:`ScheduleRun` is a schedule being followed: the schedule and the points already pruned at.
It holds every decision the callback makes about the schedule (is a prune due here and to which
step, is the rest reachable, what goes into a checkpoint and what a checkpoint restores), so those
are tested without a ``Trainer``; the callback only carries them out.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Union

from .checks import as_real, describe
from .config import SparsitySpec, as_fraction, normalize_sparsity
from .selection import is_literal

__all__ = [
    "Due",
    "GradualSchedule",
    "PruneSchedule",
    "ScheduleRun",
    "SparsitySchedule",
    "Unit",
    "schedule_from_args",
    "steps_per_epoch",
]

Unit = Literal["epoch", "step"]


def _as_point(value: Any, what: str, unit: str = "epoch") -> int:
    """An epoch (or step) number: ints (numpy's too) and integral floats such as ``1.0``; anything else is refused."""
    number = as_real(value)
    if number is None or not float(number).is_integer():
        raise ValueError(
            f"{what} must be a whole {unit} number >= 0 (or a list of them for iterative pruning), got {describe(value)}; "
            f"e.g. prune_{unit}=5 or prune_{unit}=[2, 4, 6]."
        )
    out = int(number)
    if out < 0:
        raise ValueError(
            f"{what} must be {'an' if unit == 'epoch' else 'a'} {unit} number >= 0, got {out}; {unit}s count from 0."
        )
    return out


def _as_list(value: Any) -> list | None:
    """A list/tuple/range/1-d array as a list; None for anything that is one value."""
    if isinstance(value, (list, tuple, range)):
        return list(value)
    if hasattr(value, "ndim") and hasattr(value, "tolist") and getattr(value, "ndim", 0) >= 1:
        return list(value.tolist())
    return None


def _as_unit(unit: Any) -> Unit:
    if unit not in ("epoch", "step"):
        raise ValueError(f"unit must be 'epoch' or 'step', got {unit!r}.")
    return unit


def describe_spec(spec: SparsitySpec) -> Any:
    """A checkpointable, comparable form of a sparsity spec (a callable by its qualified name)."""
    if isinstance(spec, Mapping):
        return {str(k): float(v) for k, v in spec.items()}
    if callable(spec):
        return f"{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', type(spec).__qualname__)}"
    return float(spec)


def _named_target(spec: SparsitySpec, name: str, uniform: bool) -> float | None:
    """The target a spec gives the layer called ``name``, where that is known without the model (else None).

    A float is every layer's target only without a global allocation (``uniform``); a mapping
    resolves as :func:`select_layers` does (the exact name first, then the first matching wildcard).
    """
    if isinstance(spec, float):
        return spec if uniform else None
    if isinstance(spec, Mapping):
        if name in spec:
            return float(spec[name])
        for pat, value in spec.items():
            if not is_literal(pat) and fnmatch.fnmatchcase(name, pat):
                return float(value)
    return None


def check_not_decreasing(
    specs: Sequence[SparsitySpec], uniform: bool = False, labels: Sequence[str] | None = None
) -> None:
    """Refuse a later step asking for less sparsity than an earlier one (pruned weights stay pruned).

    Besides equal keys, every layer named exactly in a later mapping is compared with what each
    earlier step asked for it (a float with a uniform allocation, a matching pattern). ``labels``
    name the steps in the messages (default ``sparsity[i]``).
    """
    label = list(labels) if labels is not None else [f"sparsity[{i}]" for i in range(len(specs))]
    for j in range(1, len(specs)):
        spec = specs[j]
        if not isinstance(spec, Mapping):
            continue
        for name in (k for k in spec if is_literal(k)):
            later = float(spec[name])
            for i in range(j):
                earlier = _named_target(specs[i], name, uniform)
                if earlier is not None and later < earlier:
                    raise ValueError(
                        f"layer '{name}' cannot reach {label[j]} = {later}: {label[i]} already prunes it to "
                        f"{earlier}, and weights pruned at an earlier step stay pruned (the masks are held). Give it at "
                        f"least {earlier} in {label[j]}, or a lower target in {label[i]}."
                    )
    for i in range(1, len(specs)):
        before, after = specs[i - 1], specs[i]
        if isinstance(before, float) and isinstance(after, float):
            pairs = [("", before, after)]
        elif isinstance(before, Mapping) and isinstance(after, Mapping):
            pairs = [(f"[{k!r}]", before[k], after[k]) for k in after if k in before]
        else:
            continue  # a callable, or a float against a mapping: not comparable without the model
        for key, a, b in pairs:
            if b < a:
                raise ValueError(
                    f"{label[i]}{key} = {b} is lower than {label[i - 1]}{key} = {a}: iterative pruning cannot "
                    "lower the sparsity, because weights pruned at an earlier step stay pruned (the masks are held). "
                    "Give non-decreasing sparsities, e.g. sparsity=[0.5, 0.8, 0.9]."
                )


class PruneSchedule:
    """Prune at ``points`` (epochs or global steps, as ``unit`` says), to ``sparsity[i]`` at ``points[i]``.

    Args:
        points: strictly increasing whole numbers >= 0 (a list, tuple or ``range``), or one number.
        sparsity: one spec per point (float in [0, 1), ``{"pattern": fraction}`` or ``(name, module) ->
            fraction``), or one spec for every point. Floats, and equal keys of mappings, must not decrease.
        unit: ``"epoch"`` (prune at the start of the epoch) or ``"step"`` (before the first batch of
            that optimizer step).
    """

    #: how the messages name the points (the ``LOBSPruning`` argument they came from, when they did)
    arg: str
    #: what a message asks to lower when a point is out of reach
    fix: str
    #: how the messages name each point's sparsity (``sparsity[i]``, ``fn(epoch)``, ``s(epoch)``)
    labels: tuple[str, ...]

    def __init__(
        self,
        points: int | Sequence[int],
        sparsity: SparsitySpec | Sequence[SparsitySpec],
        unit: Unit = "epoch",
    ) -> None:
        self.unit: Unit = _as_unit(unit)
        self.arg = self.fix = f"prune_{self.unit}"
        arg = self.arg
        listed = _as_list(points)
        pts = (
            [_as_point(points, arg, unit)]
            if listed is None
            else [_as_point(e, f"{arg}[{i}]", unit) for i, e in enumerate(listed)]
        )
        if not pts:
            raise ValueError(f"{arg} is an empty list; give at least one {unit}, e.g. {arg}=5.")
        if any(b <= a for a, b in zip(pts, pts[1:])):
            raise ValueError(f"{arg} must be strictly increasing, got {pts}; e.g. {arg}=[2, 4, 6].")
        spec_list = _as_list(sparsity)
        if spec_list is not None:
            if len(spec_list) != len(pts):
                raise ValueError(
                    f"sparsity has {len(spec_list)} entries but {arg} has {len(pts)}; give one sparsity per "
                    f"prune {unit}, or a single sparsity."
                )
            specs = [normalize_sparsity(s, f"sparsity[{i}]") for i, s in enumerate(spec_list)]
        else:
            specs = [normalize_sparsity(sparsity)] * len(pts)
        self.labels = tuple(f"sparsity[{i}]" for i in range(len(specs)))
        check_not_decreasing(specs, labels=self.labels)
        self.points: tuple[int, ...] = tuple(pts)
        self.sparsities: tuple[SparsitySpec, ...] = tuple(specs)

    def _set(
        self, points: Sequence[int], specs: Sequence[SparsitySpec], unit: Unit, arg: str, labels: Sequence[str]
    ) -> None:
        """For subclasses: points and specs already checked one by one; the order of both checked here."""
        if not points:
            raise ValueError(f"{arg} has no points; give at least one {unit}.")
        if any(b <= a for a, b in zip(points, points[1:])):
            raise ValueError(f"{arg} points must be strictly increasing, got {list(points)}.")
        check_not_decreasing(specs, labels=labels)
        self.labels = tuple(labels)
        self.fix = f"the schedule's last {unit}"
        self.unit = unit
        self.arg = arg
        self.points = tuple(points)
        self.sparsities = tuple(specs)

    def __repr__(self) -> str:
        table = ", ".join(f"{p}: {describe_spec(s)}" for p, s in zip(self.points, self.sparsities))
        return f"{type(self).__name__}({self.unit}s {{{table}}})"

    def key_fields(self) -> dict[str, Any]:
        """The schedule in a derived ``state_key``: its sparsities and points (one value each for a single point)."""
        specs = [describe_spec(s) for s in self.sparsities]
        points: Any = list(self.points) if len(self.points) > 1 else self.points[0]
        return {"sparsity": specs if len(specs) > 1 else specs[0], f"prune_{self.unit}": points}

    def sparsity_at(self, point: int) -> SparsitySpec:
        """The spec to prune to at ``point`` (a scheduled point; anything else is a ``KeyError``)."""
        if point not in self.points:
            raise KeyError(f"{self.unit} {point} is not a prune point of this schedule ({list(self.points)}).")
        return self.sparsities[self.points.index(point)]

    def pending(self, done: Iterable[int] = ()) -> list[int]:
        """The points not yet pruned at."""
        ran = set(done)
        return [p for p in self.points if p not in ran]

    def due(self, point: int, done: Iterable[int] = ()) -> list[int]:
        """The points due when training is at ``point`` (this epoch, or this global step).

        An epoch is due only at its own start. Steps are due once reached: every pending step
        ``<= point`` (several after a resume with a changed schedule; the last one subsumes the rest).
        """
        pending = self.pending(done)
        if self.unit == "epoch":
            return [point] if point in pending else []
        return [p for p in pending if p <= point]

    def check_reachable(
        self,
        done: Iterable[int] = (),
        *,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        """Refuse a pending point that training ends before (``None``/negative limits mean no limit).

        Without ``steps_per_epoch`` (unknown before the dataloader is built), epochs are checked against
        ``max_epochs`` and steps against ``max_steps``; with it, also steps against ``max_epochs`` and
        epochs against ``max_steps``.
        """
        pending = self.pending(done)
        if not pending:
            return
        last, arg = pending[-1], self.arg
        epochs = max_epochs if max_epochs is not None and max_epochs >= 0 else None
        steps = max_steps if max_steps is not None and max_steps >= 0 else None
        if self.unit == "epoch" and epochs is not None and last >= epochs:
            raise ValueError(
                f"{arg} {last} is beyond the last epoch of training (max_epochs={epochs}, "
                f"epochs are 0..{epochs - 1}); lower {self.fix} or raise max_epochs."
            )
        if self.unit == "step" and steps is not None and last >= steps:
            raise ValueError(
                f"{arg} {last} is never reached: max_steps={steps} ends training after step "
                f"{steps - 1}; lower {self.fix} or raise max_steps."
            )
        if steps_per_epoch is None:
            return
        per_epoch = steps_per_epoch
        if self.unit == "step":
            if epochs is None:
                return
            limit = epochs * per_epoch
            late = [s for s in pending if s >= limit]
            if late:
                raise ValueError(
                    f"{arg} {late[0]} is never reached: max_epochs={epochs} with {per_epoch} steps per epoch "
                    f"ends training after {limit} steps. Lower {self.fix} or raise max_epochs."
                )
            return
        if steps is None:
            return
        unreachable = [e for e in pending if e * per_epoch >= steps]
        if unreachable:
            raise ValueError(
                f"{arg} {unreachable[0]} is never reached: max_steps={steps} ends training after "
                f"{steps} optimizer steps, and with {per_epoch} steps per epoch epoch {unreachable[0]} starts after "
                f"{unreachable[0] * per_epoch}. Raise max_steps above {unreachable[-1] * per_epoch} or lower {self.fix}."
            )

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> list[dict[str, Any]]:
        """The schedule as a checkpoint stores it: ``[{"epoch": 2, "sparsity": 0.5}, ...]`` (callables by name)."""
        return [{self.unit: p, "sparsity": describe_spec(s)} for p, s in zip(self.points, self.sparsities)]

    def check_resume(self, saved: Sequence[Mapping[str, Any]], done: Mapping[str, Sequence[int]]) -> None:
        """Resuming from a checkpoint with schedule ``saved`` and points ``done`` (per unit) already pruned.

        Points already run must be in this schedule unchanged (else ``ValueError``); later points may
        change, with a warning.
        """

        def key(entry: Mapping[str, Any]) -> tuple:
            unit = "epoch" if "epoch" in entry else "step"
            return unit, int(entry[unit])

        now = {key(d): d["sparsity"] for d in self.state_dict()}
        before = {key(d): d["sparsity"] for d in saved}
        ran = [(u, int(p)) for u in ("epoch", "step") for p in done.get(u, ())]
        fmt = lambda sched: ", ".join(f"{u} {p}: {v}" for (u, p), v in sched.items()) or "none"  # noqa: E731
        if any(now.get(k) != before.get(k) for k in ran):
            raise ValueError(
                f"resuming with a different prune schedule: the checkpoint was pruned at "
                f"{', '.join(f'{u} {p}' for u, p in ran)} with {[before.get(k) for k in ran]}, but this LOBSPruning prunes "
                f"at {fmt(now)}. Resume with the schedule it was trained with ({fmt(before)}), or start a new fit "
                "without ckpt_path."
            )
        later_before = {k: v for k, v in before.items() if k not in ran}
        later_now = {k: v for k, v in now.items() if k not in ran}
        if later_before != later_now:
            from ._lightning import rank_zero_warn  # Lightning only when resuming; the schedule itself does not need it

            rank_zero_warn(
                f"LOBSPruning: the prune steps not yet run changed since the checkpoint ({fmt(later_before)} -> "
                f"{fmt(later_now)}); the new ones apply."
            )


SparsityValue = Union[float, dict[str, float]]


DEFAULT_SPARSITY = 0.9
"""``LOBSPruning``'s sparsity when neither ``sparsity`` nor ``schedule`` is given."""


def schedule_from_args(
    sparsity: Any, prune_epoch: Any, prune_step: Any, schedule: Any, *, uniform: bool
) -> PruneSchedule:
    """The schedule ``LOBSPruning``'s arguments describe: ``schedule`` itself, or one built from the lists.

    ``sparsity`` ``None`` means not given: :data:`DEFAULT_SPARSITY` without a schedule; any other value beside a
    ``schedule`` is an error (even 0.9: an explicit sparsity is never dropped silently). ``uniform``: every float
    is every layer's target (a uniform allocation without an N:M pattern), so a later mapping is also checked
    against the earlier floats.
    """
    sparsity_given = sparsity is not None
    if schedule is not None:
        if not isinstance(schedule, PruneSchedule):
            raise ValueError(
                f"schedule must be a PruneSchedule, e.g. GradualSchedule(initial=0.0, final=0.9, start=0, end=10) or "
                f"SparsitySchedule(lambda epoch: ..., points=range(0, 10, 2)), got {describe(schedule)}."
            )
        given = [n for n, v in (("prune_epoch", prune_epoch), ("prune_step", prune_step)) if v is not None]
        if sparsity_given:
            given.insert(0, "sparsity")
        if given:
            raise ValueError(
                f"give schedule or {' / '.join(given)}, not both: the schedule sets the prune points and their "
                f"sparsities (got schedule={schedule!r})."
            )
    else:
        if isinstance(sparsity, PruneSchedule):
            raise ValueError(
                f"sparsity={sparsity!r} is a schedule: pass it as LOBSPruning(schedule=...); sparsity takes a "
                "fraction, a {'pattern': fraction} mapping, a per-layer (name, module) -> fraction callable or a list of these."
            )
        if prune_epoch is not None and prune_step is not None:
            raise ValueError(
                f"give prune_epoch or prune_step, not both (got prune_epoch={prune_epoch!r}, prune_step={prune_step!r})."
            )
        value = prune_step if prune_step is not None else prune_epoch
        spec = DEFAULT_SPARSITY if sparsity is None else sparsity
        schedule = PruneSchedule(0 if value is None else value, spec, "step" if prune_step is not None else "epoch")
    if uniform:
        check_not_decreasing(list(schedule.sparsities), uniform=True, labels=schedule.labels)
    return schedule


@dataclass(frozen=True)
class Due:
    """A prune due now: to the schedule's ``sparsities[index]``, planned at ``point``.

    ``passed``: earlier points passed over (a resume with a changed schedule); the prune at ``point``
    subsumes them, so they count as done with it.
    """

    index: int
    point: int
    passed: tuple[int, ...] = ()


@dataclass(frozen=True)
class ScheduleRun:
    """A schedule being followed: ``schedule`` and the points already pruned at (``done``, in pruning order).

    Immutable: :meth:`with_done` and :meth:`from_state` return a new run, so a caller undoes a failed
    prune by keeping the run it had.
    """

    schedule: PruneSchedule
    done: tuple[int, ...] = ()

    @property
    def unit(self) -> Unit:
        return self.schedule.unit

    def pending(self) -> list[int]:
        """The points not yet pruned at."""
        return self.schedule.pending(self.done)

    def due(self, point: int) -> Due | None:
        """The prune due when training is at ``point`` (this epoch's start, or before this global step), if any."""
        points = self.schedule.due(point, self.done)
        if not points:
            return None
        return Due(self.schedule.points.index(points[-1]), points[-1], tuple(points[:-1]))

    def with_done(self, *points: int) -> ScheduleRun:
        """This run with ``points`` pruned at too."""
        return replace(self, done=self.done + tuple(points))

    def check_reachable(
        self, max_epochs: int | None = None, max_steps: int | None = None, steps_per_epoch: int | None = None
    ) -> None:
        """Refuse a pending point that training ends before (see :meth:`PruneSchedule.check_reachable`)."""
        self.schedule.check_reachable(
            self.done, max_epochs=max_epochs, max_steps=max_steps, steps_per_epoch=steps_per_epoch
        )

    def to_state(self) -> dict[str, Any]:
        """The checkpoint form: ``{"pruned_epochs": [...], "schedule": [...]}`` (``pruned_steps`` for steps)."""
        return {f"pruned_{self.unit}s": list(self.done), "schedule": self.schedule.state_dict()}

    def from_state(self, state: Mapping[str, Any]) -> ScheduleRun:
        """The run a checkpoint's ``state`` resumes, once the points it ran are checked against this schedule.

        A state without ``"schedule"`` (written before schedules were saved) is taken as is.
        """
        done = {u: [int(p) for p in state.get(f"pruned_{u}s", [])] for u in ("epoch", "step")}
        saved = state.get("schedule")
        if saved is not None:
            self.schedule.check_resume(list(saved), done)
        return replace(self, done=tuple(done[self.unit]))


def steps_per_epoch(batches: float, accumulate_grad_batches: int) -> int | None:
    """Optimizer steps in an epoch of ``batches`` batches, or None while that is unknown (infinite or 0)."""
    if not math.isfinite(batches) or batches <= 0:
        return None
    return math.ceil(batches / max(1, accumulate_grad_batches))  # the last partial window steps too


class SparsitySchedule(PruneSchedule):
    """The sparsity as a function of the epoch (or step): ``fn(point)`` at each of ``points``.

    ``fn`` is evaluated at every point when the schedule is built, so a bad value (outside [0, 1), a
    decrease, an exception) fails before any training. It returns what ``sparsity`` accepts for one
    step: a float, a ``{"pattern": fraction}`` mapping or a per-layer callable.

    Args:
        fn: ``point -> sparsity spec``, e.g. ``lambda epoch: min(0.9, 0.3 * (epoch + 1))``.
        points: the epochs (or steps) to prune at, a strictly increasing list or ``range``,
            e.g. ``range(0, 10, 2)``. A finite sequence, so that every value is checked up front.
        unit: ``"epoch"`` or ``"step"``.
    """

    def __init__(self, fn: Callable[[int], Any], points: Sequence[int], unit: Unit = "epoch") -> None:
        unit = _as_unit(unit)
        if not callable(fn):
            raise ValueError(f"fn must be a function of the {unit} (e.g. lambda {unit}: 0.5), got {describe(fn)}.")
        listed = _as_list(points)
        if listed is None:
            raise ValueError(
                f"points must be a list or range of {unit}s, got {describe(points)}; e.g. points=range(0, 10, 2)."
            )
        pts = [_as_point(p, f"points[{i}]", unit) for i, p in enumerate(listed)]
        specs, labels = [], []
        for p in pts:
            label = f"fn({p})"
            try:
                value = fn(p)
            except Exception as exc:
                raise ValueError(f"the sparsity function raised at {unit} {p}: {type(exc).__name__}: {exc}") from exc
            specs.append(normalize_sparsity(value, f"{label} (the sparsity at {unit} {p})"))
            labels.append(label)
        # fn is not kept: its values are, and a lambda would stop the callback pickling (ddp_spawn)
        self._set(pts, specs, unit, f"the schedule's {unit}", labels)


class GradualSchedule(PruneSchedule):
    """Gradual pruning (Zhu & Gupta 2017): a cubic ramp from ``initial`` to ``final`` sparsity.

    Prunes at ``start, start + every, ..., end`` (``n = (end - start) / every`` intervals), at point t to
    ``s_t = final + (initial - final) * (1 - (t - start) / (end - start)) ** 3``: fast at first, while
    many redundant weights remain, slower near ``final``. A point whose target is 0 (``initial=0`` at
    ``start``) prunes nothing and is left out of :attr:`points`.

    Args:
        initial: sparsity at ``start``, in [0, final).
        final: sparsity at ``end``, in (initial, 1).
        start: first point (epoch or global step).
        end: last point, ``> start``; ``end - start`` must be a multiple of ``every``.
        every: points between two prunes (>= 1).
        unit: ``"epoch"`` or ``"step"``.
    """

    def __init__(
        self,
        initial: float = 0.0,
        final: float = 0.9,
        start: int = 0,
        end: int = 10,
        every: int = 1,
        unit: Unit = "epoch",
    ) -> None:
        unit = _as_unit(unit)
        s_i, s_f = as_fraction(initial, "initial"), as_fraction(final, "final")
        if not s_i < s_f:
            raise ValueError(f"initial ({s_i}) must be below final ({s_f}): the ramp raises the sparsity.")
        t0, t1 = _as_point(start, "start", unit), _as_point(end, "end", unit)
        dt = as_real(every)
        if dt is None or not float(dt).is_integer() or dt < 1:
            raise ValueError(f"every must be a whole number of {unit}s >= 1, got {describe(every)}.")
        dt = int(dt)
        if t1 <= t0:
            raise ValueError(f"end ({t1}) must be after start ({t0}).")
        if (t1 - t0) % dt:
            raise ValueError(
                f"end - start = {t1 - t0} is not a multiple of every={dt}, so the ramp would not end at final; "
                f"e.g. end={t0 + (t1 - t0) // dt * dt} or end={t0 + ((t1 - t0) // dt + 1) * dt}."
            )
        self.initial, self.final, self.start, self.end, self.every = s_i, s_f, t0, t1, dt
        pts, specs = [], []
        for t in range(t0, t1 + 1, dt):
            s = self.sparsity_of(t)
            if s > 0.0:
                pts.append(t)
                specs.append(s)
        self._set(pts, specs, unit, f"the schedule's {unit}", [f"s({p})" for p in pts])

    def sparsity_of(self, t: int) -> float:
        """The ramp's value at ``t`` (``initial`` before ``start``, ``final`` after ``end``)."""
        if t <= self.start:  # the ends exactly, not within a rounding: a target repeated elsewhere compares equal
            return self.initial
        if t >= self.end:
            return self.final
        return self.final + (self.initial - self.final) * (1.0 - (t - self.start) / (self.end - self.start)) ** 3

    def __repr__(self) -> str:
        return (
            f"GradualSchedule(initial={self.initial}, final={self.final}, start={self.start}, end={self.end}, "
            f"every={self.every}, unit={self.unit!r})"
        )
