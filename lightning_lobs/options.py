"""Deprecated: the options moved to :mod:`lightning_lobs.config` (0.3.0); this module goes in 0.4.0."""

from __future__ import annotations

from ._deprecated import moved_module_getattr

__getattr__ = moved_module_getattr(__name__, "lightning_lobs.config")


def __dir__() -> list[str]:
    from . import config

    return sorted(n for n in vars(config) if not n.startswith("_"))


__all__: list[str] = []
