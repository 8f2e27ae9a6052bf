"""Option values as Python numbers: the one place that says what counts as a number.

Every options class (``SolverOptions``, ``CalibrationOptions``, ``GlobalAllocation``, ``PruneOptions``,
``LOBSPruning``, ``prune_model``) accepts numbers given as Python, numpy or 0-d torch scalars (a value
read from a config, a tensor computed in a notebook) and stores them as Python ``int``/``float``.
Booleans are never numbers here: ``damp=True`` or ``block_size=True`` would silently mean 1.
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["as_int", "as_real", "count_or_none", "describe", "set_positive_ints"]


def _unwrap(value: object) -> object:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return value
        return value.item()
    return value


def as_real(value: object) -> int | float | None:
    """``value`` as a Python int or float, or None if it is not a real number (bools are not)."""
    value = _unwrap(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None  # numpy's bool_ is not a numbers.Real either
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value)


def as_int(value: object) -> int | None:
    """``value`` as a Python int, or None if it is not an integer type (a float 64.0 is not a count)."""
    value = _unwrap(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def count_or_none(value: object, minimum: int = 1) -> int | None:
    """``value`` as a Python int >= ``minimum`` (Python, numpy or 0-d torch integers), else None.

    ``True``/``False`` are not counts (``block_size=True`` would mean 1); nor is a float such as 64.0.
    """
    out = as_int(value)
    return out if out is not None and out >= minimum else None


def describe(value: object) -> str:
    """``value`` and its type, for an error message."""
    return f"{value!r} of type {type(value).__name__}"


def set_positive_ints(options: object, names: tuple[str, ...]) -> None:
    """Check that each field ``names`` of a frozen options dataclass is an int >= 1 and store it as a Python int.

    The error names the class, the field, the value and the field's default.
    """
    cls = type(options)
    for name in names:
        given = getattr(options, name)
        value = count_or_none(given)
        if value is None:
            raise ValueError(
                f"{cls.__name__}.{name} must be a positive int, got {describe(given)}; the default is {getattr(cls, name)}."
            )
        object.__setattr__(options, name, value)


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` (Python 3.11+); on 3.10 the note joins ``__notes__`` as PEP 678's backports do.

    The package supports Python 3.10, where ``BaseException.add_note`` does not exist: calling it there replaced the
    user's own exception by an AttributeError.
    """
    if hasattr(error, "add_note"):
        error.add_note(note)
        return
    notes = getattr(error, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
        error.__notes__ = notes  # type: ignore[attr-defined]
    notes.append(note)
