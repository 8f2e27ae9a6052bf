"""Helpers of the tests that run real torch.distributed ranks (gloo, on the CPU) in child processes."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed gloo",
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(cmd: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float = 300) -> None:
    """Run ``cmd`` (which starts the ranks) and fail the test with its output if it fails or hangs.

    The command gets its own session: on a hang (a rank waiting forever in a collective) every rank is killed, not
    just the parent.
    """
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung (killed after {timeout:.0f} s):\n{output[-6000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-6000:]}"


def rank_env(root: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a child that starts ranks: no torch.distributed / Lightning rank variables
    and no Lightning seed inherited (the child picks its own rendezvous and seeds), ``root`` first on
    ``PYTHONPATH``, one thread, warnings quiet; ``extra`` on top."""
    env = dict(os.environ)
    for key in (
        "LOCAL_RANK",
        "NODE_RANK",
        "WORLD_SIZE",
        "GROUP_RANK",
        "RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "PL_GLOBAL_SEED",
    ):
        env.pop(key, None)
    env.update(
        PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    env.update(extra)
    return env


def script_module(path: Path) -> ModuleType:
    """A rank script loaded as a module (importing one starts nothing), for its helpers and constants."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None, path
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def torchrun(script: Path, *args: str) -> list[str]:
    """The command that starts ``script`` on 2 local ranks with ``torch.distributed.run`` (a free rendezvous port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    return [*cmd, "--master_port", str(free_port()), str(script), *args]
