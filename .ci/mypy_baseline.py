#!/usr/bin/env python
"""mypy with a baseline that only shrinks.

Runs mypy on the package (configuration: ``[tool.mypy]`` in pyproject.toml) and counts its errors per file. Fails when
a file has more errors than ``.ci/mypy_baseline.json`` allows it (a file not listed allows none); when a file has fewer,
it passes and says how to lower the baseline, so the fix is kept.

    python .ci/mypy_baseline.py                  # the check (.ci/run)
    python .ci/mypy_baseline.py --update         # write today's counts; refused if a file would get more
                                                 # (unless there is no baseline yet)
    python .ci/mypy_baseline.py --update --moved # code moved between files: files may grow, the total may not

Errors are counted per file, not matched by line, so an edit that shifts lines does not break the check.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / ".ci" / "mypy_baseline.json"
ERROR = re.compile(r"^(?P<file>[^:\s][^:]*\.pyi?):\d+(?::\d+)?: error: ")


def count_errors(mypy_output: str) -> Counter[str]:
    """Errors per file in mypy's text output (notes do not count)."""
    counts: Counter[str] = Counter()
    for line in mypy_output.splitlines():
        match = ERROR.match(line)
        if match:
            counts[match["file"].replace("\\", "/")] += 1
    return counts


def run_mypy() -> tuple[Counter[str], str]:
    """Run mypy from the checkout's root; its errors per file and its whole output."""
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--no-pretty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode not in (0, 1) or proc.stderr.strip():  # 2: mypy itself failed (configuration, crash)
        sys.exit(f"mypy failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return count_errors(proc.stdout), proc.stdout


def compare(counts: Counter[str], baseline: dict[str, int]) -> tuple[list[str], list[str]]:
    """(files over their baseline, files under it), each as a readable line."""
    over = [
        f"{f}: {n} errors, baseline {baseline.get(f, 0)}" for f, n in sorted(counts.items()) if n > baseline.get(f, 0)
    ]
    under = [
        f"{f}: {counts.get(f, 0)} errors, baseline {n}" for f, n in sorted(baseline.items()) if counts.get(f, 0) < n
    ]
    return over, under


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true", help="write the current counts as the baseline")
    parser.add_argument("--moved", action="store_true", help="with --update: let files grow if the total does not")
    args = parser.parse_args(argv)
    baseline: dict[str, int] = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
    counts, output = run_mypy()
    over, under = compare(counts, baseline)
    if args.update:
        growth_allowed = not BASELINE.exists() or (args.moved and sum(counts.values()) <= sum(baseline.values()))
        if over and not growth_allowed:
            print("refused: the baseline only shrinks; fix these first:\n  " + "\n  ".join(over), file=sys.stderr)
            return 1
        BASELINE.write_text(json.dumps(dict(sorted(counts.items())), indent=2) + "\n")
        print(f"wrote {BASELINE.relative_to(ROOT)}: {sum(counts.values())} errors in {len(counts)} files")
        return 0
    if over:
        files = {line.split(":")[0] for line in over}
        new = [line for line in output.splitlines() if (m := ERROR.match(line)) and m["file"] in files]
        print("mypy: more errors than the baseline (.ci/mypy_baseline.json) allows:\n  " + "\n  ".join(over))
        print("\nthe errors of those files (fix the new ones):\n" + "\n".join(new))
        return 1
    total = sum(counts.values())
    print(f"mypy: {total} errors, none over the baseline ({sum(baseline.values())})")
    if under:
        print(
            "fewer errors than the baseline, keep the gain: python .ci/mypy_baseline.py --update\n  "
            + "\n  ".join(under)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
