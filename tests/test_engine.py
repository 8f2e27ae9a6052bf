"""The engine's package shape: the pruner shim, the records, and a pure allocation."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_lobs
from lightning_lobs import engine
from lightning_lobs.allocation import LayerCosts, allocate_targets, removal_levels
from lightning_lobs.config import GlobalAllocation, PruneOptions
from lightning_lobs.engine.plan import layer_plan
from lightning_lobs.engine.records import LayerReport, Plan
from lightning_lobs.progress import PhaseProgress

PACKAGE = Path(lightning_lobs.__file__).parent


@pytest.mark.parametrize(
    "old,new",
    [
        ("PruneReport", engine.PruneReport),
        ("LayerReport", engine.LayerReport),
        ("prune", engine.prune),
        ("default_forward", engine.default_forward),
        ("output_heads", engine.output_heads),
        ("AUTO_EXACT_MAX_COST", engine.AUTO_EXACT_MAX_COST),
        ("_Progress", PhaseProgress),
        ("PruneOptions", PruneOptions),
    ],
)
def test_pruner_names_warn_with_their_new_home_and_are_the_same_objects(old, new):
    pruner = importlib.import_module("lightning_lobs.pruner")
    with pytest.warns(DeprecationWarning, match=r"lightning_lobs\.pruner\." + old + r" moved to lightning_lobs\."):
        value = getattr(pruner, old)
    assert value is new


def test_pruner_unknown_name_is_an_attribute_error():
    pruner = importlib.import_module("lightning_lobs.pruner")
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        pruner.nonsense  # noqa: B018


def test_a_report_pickled_under_the_old_module_path_still_loads():
    report = LayerReport("fc", "Linear", (4, 3), "fast", 0.5, 0.5, 1.0, 2.0, 3.0, 4.0, 0.01, 1.0, 0.1, output_error=0.2)
    old = pickle.dumps(report, protocol=0).replace(b"lightning_lobs.engine.records", b"lightning_lobs.pruner")
    assert b"lightning_lobs.pruner" in old
    with pytest.warns(DeprecationWarning, match="LayerReport"):
        loaded = pickle.loads(old)
    assert loaded == report and type(loaded) is LayerReport


def _imports(path: Path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_allocation_imports_nothing_of_the_engine_or_the_ranks():
    imports = _imports(PACKAGE / "allocation.py")
    assert not {i for i in imports if "engine" in i or "pruner" in i or "distributed" in i}, imports


_COLLECTIVES = {"all_reduce", "broadcast", "broadcast_tensors", "broadcast_floats", "reduce", "all_gather", "barrier"}


def _called(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return names


def test_only_the_collective_module_of_the_engine_runs_collectives():
    callers = sorted(p.name for p in (PACKAGE / "engine").glob("*.py") if _called(p) & _COLLECTIVES)
    assert callers == ["collective.py"], callers


def test_records_are_frozen_and_plans_change_by_copy():
    fc = nn.Linear(6, 4)
    layer = layer_plan("fc", fc, 0.5, "auto", None, None)
    assert (layer.rows, layer.cols, layer.weight_cols, layer.bias_column, layer.groups) == (4, 7, 6, True, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.target = 0.9  # type: ignore[misc]
    plan = Plan(layers={"fc": layer}, explicit=frozenset(), skipped={"head": "why"})
    moved = plan.with_targets({"fc": 0.25})
    assert moved.layers["fc"].target == 0.25 and plan.layers["fc"].target == 0.5
    dropped = plan.without({"fc": "never called"})
    assert dropped.layers == {} and dropped.skipped == {"head": "why", "fc": "never called"}
    assert plan.layers and plan.skipped == {"head": "why"}


def test_allocate_targets_is_a_function_of_plain_costs():
    """Per-weight costs pooled over two layers: the cheap layer gives more; the budget is removed exactly."""
    config = GlobalAllocation(costs="one-pass")
    cheap = torch.arange(12, dtype=torch.float64).reshape(3, 4) * 1e-3
    dear = torch.arange(12, dtype=torch.float64).reshape(3, 4) + 1.0
    costs = {}
    for name, values in (("cheap", cheap), ("dear", dear)):
        cap, levels = removal_levels(3, 4, None, 1, config)
        costs[name] = LayerCosts(rows=3, cols=4, prior=None, cap=cap, levels=levels, values=values, curve=False)
    targets = allocate_targets(costs, 0.5, config, min_kept=1)
    assert targets["cheap"] == 0.75 and targets["dear"] == 0.25  # 9 + 3 = 12 of 24; one weight per row stays
    with pytest.raises(ValueError, match="at most 18"):
        allocate_targets(costs, 0.9, config, min_kept=1)
