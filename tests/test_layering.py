"""The package's import graph: no cycle, no upward import, no private name taken from another module.

Read from the source with ``ast`` (nothing is imported), so a violation is found even in a function body that no
test runs. Every import counts: module level, inside functions (a deferred import is still a dependency; it only
hides a cycle from the interpreter), and inside ``if TYPE_CHECKING:`` blocks. TYPE_CHECKING imports count because a
type named in a lower module's signatures ties it to the higher module all the same; a lower module that needs one
declares a ``Protocol`` at its own level or takes the value untyped.

The levels are those of ``docs/architecture.md``: a module may import from its own
level and the levels below. Today's known violations sit in ``ALLOWED_*`` below, each with why; the redesign removes
them and the lead empties those lists after the merges. A listed violation that is gone fails
``test_allow_lists_name_only_current_violations``, so the lists only shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "lightning_lobs"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Module (relative to the package) -> level. A module not in this table fails the test: place it when you add it.
# Names that do not exist yet are skipped. Inside a package, `package.*` is every submodule without its own entry.
LEVELS: dict[str, int] = {
    "checks": 0,
    "config": 0,
    "_lightning": 0,
    "_deprecated": 0,  # the helper behind the shims' module __getattr__
    "attention": 1,
    "sharding": 1,  # DTensor helpers (fully_shard parameters): torch only
    "layers": 2,
    "blocks": 2,
    "hessian": 3,
    "solvers": 3,
    "solvers.*": 3,
    "masks": 3,
    "distributed": 3,
    "batchnorm": 3,
    "resources": 3,
    "progress": 3,
    "allocation": 4,
    "selection": 4,
    "bounds": 4,
    "export": 4,
    "engine": 5,
    "engine.*": 5,
    "api": 6,
    "schedules": 6,
    "callback": 7,
    # deprecated shims, one version: they re-export their new homes, and no module of the package may import them
    "options": 8,
    "pruner": 8,
    "": 9,  # lightning_lobs/__init__.py: the public API re-exports every level
}

# Order inside a package (same level): a lower rank may not import a higher one. solvers.core holds what every method
# shares, each method is one module, the registry in solvers/__init__ imports the methods.
RANKS: dict[str, int] = {"solvers.core": 0, "solvers.*": 1, "solvers": 2, "engine.*": 0, "engine": 1}

# Packages and scripts outside the library that it must never import (the lab is development-only, not in the wheel).
OUTSIDE = {"lab", "lobs_lab", "examples", "benchmarks", "tests", "mnist_data", "text_data", "deep_common", "bench_util"}

# ---------------------------------------------------------------------------------------------------------------------
# Allowed violations: empty since the structure of 0.3.0; never add to them, fix the import instead.

# (importer, imported): imports of a higher level.
ALLOWED_UPWARD: set[tuple[str, str]] = set()

# Sets of modules that import each other (strongly connected components of the graph); a cycle inside a listed set
# passes (breaking part of a cycle leaves a smaller one).
ALLOWED_CYCLES: set[frozenset[str]] = set()

# (importer, imported, name): private names taken from another module.
ALLOWED_PRIVATE: set[tuple[str, str, str]] = set()
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One dependency of ``importer`` on ``imported`` (module names relative to the package), at ``line``."""

    importer: str
    imported: str
    line: int
    names: tuple[str, ...] = ()  # the names taken by `from imported import ...` or read as `imported.name`


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name relative to the package ('' for its __init__, 'solvers.core', ...) -> its file."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str | None:
    """The absolute dotted module an ImportFrom reads from, relative to the package; None when outside it."""
    if node.level == 0:
        name = node.module or ""
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            return None
        return name[len(PACKAGE) + 1 :]
    base = importer.split(".") if importer else []
    if not is_package:
        base = base[:-1]  # a module's relative imports start from its package
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *(node.module.split(".") if node.module else [])])


def imports_of(name: str, path: Path, modules: set[str]) -> Iterator[Import]:
    """Every import of a package module in one file, wherever it stands (functions and TYPE_CHECKING included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases: dict[str, str] = {}  # local name bound to a package module by `import`/`from . import m` -> that module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    target = alias.name[len(PACKAGE) + 1 :]
                    if alias.asname:
                        aliases[alias.asname] = target
                    yield Import(name, target, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node, name, path.name == "__init__.py")
            if source is None:
                continue
            taken = []
            for alias in node.names:
                sub = f"{source}.{alias.name}" if source else alias.name
                if sub in modules:  # `from . import masks`: the submodule itself
                    aliases[alias.asname or alias.name] = sub
                    yield Import(name, sub, node.lineno)
                else:
                    taken.append(alias.name)
            if taken or not node.names:
                yield Import(name, source, node.lineno, tuple(taken))
    for node in ast.walk(tree):  # `masks._resolve_weight` through a module alias counts as taking the name
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            yield Import(name, aliases[node.value.id], node.lineno, (node.attr,))


def outside_imports(path: Path) -> Iterator[tuple[str, int]]:
    """Top-level names of imports from the lab, the examples, the benchmarks or the tests."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OUTSIDE:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in OUTSIDE:
                yield node.module, node.lineno


def _lookup(table: dict[str, int], module: str) -> int | None:
    if module in table:
        return table[module]
    parts = module.split(".")
    for i in range(len(parts) - 1, 0, -1):
        wildcard = ".".join(parts[:i]) + ".*"
        if wildcard in table:
            return table[wildcard]
    return None


def level(module: str) -> int | None:
    """The module's level, or None when the table does not place it."""
    return _lookup(LEVELS, module)


def is_upward(importer: str, imported: str) -> bool:
    """Whether importing ``imported`` from ``importer`` goes up a level, or up the order inside one package."""
    low, high = level(importer), level(imported)
    assert low is not None and high is not None
    if high != low:
        return high > low
    top = importer.split(".")[0]
    if imported.split(".")[0] != top or top not in {k.split(".")[0] for k in RANKS}:
        return False
    return (_lookup(RANKS, imported) or 0) > (_lookup(RANKS, importer) or 0)


def graph(root: Path = ROOT) -> list[Import]:
    """Every import between the package's modules (a module's imports of itself dropped)."""
    files = module_files(root)
    edges = []
    for name, path in files.items():
        edges.extend(e for e in imports_of(name, path, set(files)) if e.imported != name)
    return edges


def cycles(edges: list[Import]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        succ.setdefault(e.importer, set()).add(e.imported)
        succ.setdefault(e.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(succ):
        if start in index:
            continue
        work = [(start, iter(sorted(succ[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.add(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(frozenset(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(succ[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def violations(root: Path = ROOT) -> dict[str, set]:
    """Everything the layering rules find in the package under ``root``, before the allow-lists."""
    files = module_files(root)
    edges = graph(root)
    unplaced = {m for m in files if level(m) is None}
    upward = {(e.importer, e.imported) for e in edges if not unplaced & {e.importer, e.imported}}
    upward = {pair for pair in upward if is_upward(*pair)}
    private = {
        (e.importer, e.imported, n)
        for e in edges
        for n in e.names
        if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))
    }
    outside = {(m, f"{name}:{line}") for m, path in files.items() for name, line in outside_imports(path)}
    return {
        "unplaced": unplaced,
        "upward": upward,
        "cycles": set(cycles(edges)),
        "private": private,
        "outside": outside,
    }


def _where(importer: str, imported: str, root: Path = ROOT) -> str:
    lines = sorted({e.line for e in graph(root) if e.importer == importer and e.imported == imported})
    path = module_files(root)[importer].relative_to(root.parent)
    return f"{path}:{','.join(map(str, lines))}"


@pytest.fixture(scope="module")
def found() -> dict[str, set]:
    return violations()


def test_every_module_has_a_level(found):
    assert not found["unplaced"], f"modules missing from LEVELS in {__file__}: {sorted(found['unplaced'])}"


def test_no_module_imports_from_a_higher_level(found):
    new = found["upward"] - ALLOWED_UPWARD
    detail = [f"{a} (level {level(a)}) imports {b} (level {level(b)}) at {_where(a, b)}" for a, b in sorted(new)]
    assert not new, "imports from a higher level:\n  " + "\n  ".join(detail)


def test_no_import_cycle(found):
    new = [c for c in found["cycles"] if not any(c <= allowed for allowed in ALLOWED_CYCLES)]
    assert not new, f"import cycles: {[sorted(c) for c in new]}"


def test_no_module_imports_a_private_name_of_another(found):
    new = found["private"] - ALLOWED_PRIVATE
    detail = [f"{a} takes {b}.{n} at {_where(a, b)}" for a, b, n in sorted(new)]
    assert not new, "private names imported from another module (make them public or move them):\n  " + "\n  ".join(
        detail
    )


def test_the_library_imports_nothing_from_the_lab_examples_or_tests(found):
    assert not found["outside"], f"imports from outside the library: {sorted(found['outside'])}"


def test_allow_lists_name_only_current_violations(found):
    stale = [
        *(f"ALLOWED_UPWARD {p}" for p in sorted(ALLOWED_UPWARD - found["upward"])),
        *(f"ALLOWED_CYCLES {sorted(a)}" for a in ALLOWED_CYCLES if not any(len(c & a) > 1 for c in found["cycles"])),
        *(f"ALLOWED_PRIVATE {p}" for p in sorted(ALLOWED_PRIVATE - found["private"])),
    ]
    assert not stale, "fixed violations still allowed, remove them from tests/test_layering.py:\n  " + "\n  ".join(
        stale
    )


def test_the_rules_catch_each_kind_of_violation(tmp_path):
    """The checks themselves, on a made-up package: a deferred upward import closing a cycle, a TYPE_CHECKING
    import, a private name read through a module alias, a module with no level, and a lab import."""
    pkg = tmp_path / PACKAGE
    (pkg / "solvers").mkdir(parents=True)
    files = {
        "__init__.py": "from .callback import X\n",
        "checks.py": "",
        "masks.py": "def late():\n    from .callback import X\n    return X\n",
        "hessian.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .allocation import A\n",
        "allocation.py": "from . import checks as c\nA = c._hidden\n",
        "callback.py": "from lightning_lobs.masks import late\nimport lab.data\nX = 1\n",
        "solvers/__init__.py": "from .core import f\n",
        "solvers/core.py": "from . import exact\nf = 1\n",
        "solvers/exact.py": "from ..checks import __name__ as n\n",
        "unplaced.py": "",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    found = violations(pkg)
    assert found["unplaced"] == {"unplaced"}
    assert found["upward"] == {("masks", "callback"), ("hessian", "allocation"), ("solvers.core", "solvers.exact")}
    assert found["cycles"] == {frozenset({"masks", "callback"})}
    assert found["private"] == {("allocation", "checks", "_hidden")}
    assert found["outside"] == {("callback", "lab.data:2")}
