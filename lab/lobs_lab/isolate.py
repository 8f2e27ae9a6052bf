"""Run one measurement in its own child process, under a resident-memory guard and a time limit.

Each pipeline of the GPT-2 benchmarks runs in a fresh interpreter so that its peak resident memory (the child's
``ru_maxrss``) is its own, not the high-water mark of whatever ran before it in the same process. The parent polls
the child's resident memory (``/proc/<pid>/status``) and kills it above a limit: the benchmark machines are shared,
and a pipeline that would take the machine's memory is stopped and reported as such instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lobs_lab.harness import current_rss_gib


@dataclass
class ChildResult:
    """What came back from :func:`run_guarded`: the child's last stdout line as JSON (None if it failed), why it
    failed, the highest RSS the parent saw while polling, and the wall time of the whole child."""

    result: dict[str, Any] | None
    error: str | None
    polled_peak_gib: float
    wall_seconds: float
    stderr_tail: str


def run_guarded(
    cmd: Sequence[str], rss_limit_gib: float, timeout_s: float, env: dict[str, str] | None = None, poll_s: float = 0.1
) -> ChildResult:
    """Run ``cmd``; kill it if its resident memory passes ``rss_limit_gib`` or it runs past ``timeout_s``.

    The child must print its result as one JSON object on its last stdout line. Its stdout and stderr go to
    temporary files (no pipe to fill and block on).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, text=True, env=env)
        peak, reason = 0.0, None
        while proc.poll() is None:
            rss = current_rss_gib(proc.pid)
            if rss == rss:  # not NaN: the process may have just exited
                peak = max(peak, rss)
            if rss > rss_limit_gib:
                reason = f"killed: resident memory {rss:.2f} GiB above the limit of {rss_limit_gib:g} GiB"
            elif time.perf_counter() - t0 > timeout_s:
                reason = f"killed: still running after {timeout_s:g} s"
            if reason:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if reason is None and proc.returncode != 0:
        reason = f"failed with exit status {proc.returncode}"
    result = None
    if reason is None:
        lines = stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            result = None
        if result is None:
            reason = "printed no JSON result"
    return ChildResult(result, reason, peak, wall, stderr[-4000:])
