"""No function in the package is longer than 60 lines or takes more than 8 parameters without a written reason.

Length is counted from the ``def`` line to the function's last line (docstring and comments included, decorators
not), so a nested function counts in its own length and in its parent's. Parameters are every name a caller can
pass (positional, keyword-only, ``*args``, ``**kwargs``), without ``self`` or ``cls``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lightning_lobs"
MAX_LINES = 60
MAX_PARAMS = 8

# "module:Qualified.name" -> why it may be longer or take more. A new entry needs a reason a reviewer accepts (a public signature that must not change, one algorithm that reads best on
# one screen), not "it grew".
ALLOWED: dict[str, str] = {
    "api:prune_model": "public signature (README, docs): its keyword arguments are the API",
    "callback:LOBSPruning.__init__": "LightningCLI reads the constructor's signature, which must not change",
    "solvers.registry:solve_layer": "public signature (lightning_lobs.solve_layer): its keyword arguments are the API",
    "solvers.trace:greedy_rows": "the greedy kernel's whole input as benchmarks and tests call it (reason beside it)",
}


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return names[1:] if names and names[0] in ("self", "cls") else names


def functions(root: Path = ROOT) -> dict[str, tuple[int, int]]:
    """ "module:Qualified.name" -> (lines, parameters) for every function and method under ``root``."""
    out: dict[str, tuple[int, int]] = {}
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix("__init__").rstrip(".")
        stack: list[tuple[ast.AST, str]] = [(ast.parse(path.read_text(), filename=str(path)), "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = prefix + child.name
                    out[f"{module}:{name}"] = (child.end_lineno - child.lineno + 1, len(_params(child)))
                    stack.append((child, name + "."))
                elif isinstance(child, ast.ClassDef):
                    stack.append((child, prefix + child.name + "."))
                else:
                    stack.append((child, prefix))
    return out


def offenders(root: Path = ROOT) -> dict[str, str]:
    """Functions over either limit -> what is over."""
    out = {}
    for name, (lines, params) in functions(root).items():
        over = [f"{lines} lines"] * (lines > MAX_LINES) + [f"{params} parameters"] * (params > MAX_PARAMS)
        if over:
            out[name] = ", ".join(over)
    return out


@pytest.fixture(scope="module")
def found() -> dict[str, str]:
    return offenders()


def test_functions_are_short_and_take_few_parameters(found):
    new = {name: why for name, why in found.items() if name not in ALLOWED}
    assert not new, (
        f"over {MAX_LINES} lines or {MAX_PARAMS} parameters (split it, group the parameters in a dataclass, or add "
        "it to ALLOWED in tests/test_code_shape.py with the reason):\n  "
        + "\n  ".join(f"{n}: {w}" for n, w in sorted(new.items()))
    )


def test_allow_list_names_only_current_offenders(found):
    stale = sorted(set(ALLOWED) - set(found))
    assert not stale, f"within the limits now (or gone), remove from ALLOWED: {stale}"


def test_the_measure_counts_lines_and_parameters(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES - 1))  # def line + 59 = 60 lines: allowed
    (tmp_path / "m.py").write_text(
        f"def ok(a, b, c, d, e, f, g, h):\n{body}\n\n"
        f"def long(a):\n{body}\n    return a\n\n"
        "class C:\n    def many(self, a, b, c, d, e, f, g, *h, i):\n        pass\n"
    )
    assert functions(tmp_path) == {"m:ok": (60, 8), "m:long": (61, 1), "m:C.many": (2, 9)}
    assert offenders(tmp_path) == {"m:long": "61 lines", "m:C.many": "9 parameters"}
