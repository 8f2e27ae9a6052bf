"""The installed Lightning namespaces and the ``ns`` fixture over them (not a test module).

Imports no Lightning package: tests/conftest.py loads this before pytest collects, and importing
``lightning.pytorch`` while the root logger has no handler makes Lightning stop propagating its log
records, which ``caplog`` then never sees.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import pytest

NAMESPACES = [n for n in ("lightning.pytorch", "pytorch_lightning") if importlib.util.find_spec(n.split(".")[0])]


@pytest.fixture(params=NAMESPACES)
def ns(request) -> ModuleType:
    """The Lightning namespace a test runs under (every installed one)."""
    return importlib.import_module(request.param)
