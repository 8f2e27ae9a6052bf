"""Old import paths that keep working for one version, with a :class:`DeprecationWarning` naming the new one."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def moved_module_getattr(old: str, new: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old``: every public name is read from ``new``, with a warning naming it."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        target = importlib.import_module(new)
        try:
            value = getattr(target, name)
        except AttributeError:
            raise AttributeError(f"module {old!r} has no attribute {name!r}") from None
        warnings.warn(
            f"{old}.{name} moved to {new}.{name}; the old path stops working in the next minor version.",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    return __getattr__


def moved_names_getattr(old: str, moved: Mapping[str, tuple[str, str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old`` whose listed names moved: ``moved`` maps old name -> (module, new name)."""

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        module, new = moved[name]
        warnings.warn(
            f"{old}.{name} moved to {module}.{new}; the old path stops working in the next minor version.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), new)

    return __getattr__
