"""Shared test fixtures (helpers that tests import live in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# `ns` (the Lightning namespace a test runs under): a fixture in conftest reaches every test module without an
# import the linter reads as unused. namespaces.py imports no Lightning package (its docstring says why).
from namespaces import ns  # noqa: F401


@pytest.fixture
def one_thread():
    """One intra-op thread for the test. On 2 cores shared with other jobs, 2 OpenMP threads spin at every
    barrier, and small solves and BLAS calls ran 10-40x slower than on one thread."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _mutation_tests() -> dict:
    """``[tool.lightning_lobs.mutation_tests]`` of pyproject.toml: module -> the test files that may kill its mutants."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: no filter, every test that called the function runs
        return {}
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.exists():
        return {}
    with open(pyproject, "rb") as fh:
        return tomllib.load(fh).get("tool", {}).get("lightning_lobs", {}).get("mutation_tests", {})


def pytest_collection_modifyitems(config, items):
    """Under mutmut, run a mutant only against its module's test files (pyproject.toml), so a mutant of a helper
    that every pruning test calls is judged by the tests written for that module, in seconds, not by the suite."""
    import os

    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if "__mutmut_" not in mutant:
        return  # a normal run, or mutmut's stats, clean and forced-fail runs
    files = next((f for module, f in _mutation_tests().items() if mutant.startswith(module + ".")), None)
    if files is None:
        return
    kept = [item for item in items if item.nodeid.split("::")[0] in files]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid.split("::")[0] not in files])
        items[:] = kept
