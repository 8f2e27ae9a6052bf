"""The example and benchmark scripts as modules, loaded from their files (they are scripts, not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path) -> ModuleType:
    """Import the file at ``path`` as a module named after it, once per session (later calls get the same module).

    The module is registered in ``sys.modules`` before it runs, as an import would, so that its dataclasses and
    pickling (the benchmarks' process pools) find it.
    """
    name = path.stem
    module = sys.modules.get(name)
    if module is not None and Path(getattr(module, "__file__", "")).resolve() == path.resolve():
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module."""
    return load_script(REPO / "examples" / f"{name}.py")


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module."""
    return load_script(REPO / "benchmarks" / f"{name}.py")
