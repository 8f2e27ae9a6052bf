"""The sparse-file reader against thousands of seeded random mutations of valid files, under a memory ceiling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the memory ceiling is RLIMIT_AS read from /proc")
def test_mutated_files_are_refused_or_load_equal_within_a_memory_ceiling():
    """3,000 mutants (bit flips, truncations, spliced files, inflated shapes, offsets, counts and CSR widths in
    the header and metadata with the CRC recomputed, broken CSR/bitmask/bool content) of two small files: each
    is refused by read_sparse and load_sparse with ValueError (the model unchanged) or decodes exactly to a
    saved state. The run has 64 MiB of address space above what it mapped after a warm-up (a refused
    allocation is a RuntimeError, so a failure); the files are 1.3 and 4.6 KB, so a reader that trusted a
    declared shape (1 GiB and more here) fails the test. The script checks that the ceiling bites first."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(HERE / "sparse_fuzz.py"), "--seed", "0", "--mutants", "3000", "--ceiling-mib", "64"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["probe"] == "enforced", result["probe"]
    assert result["n_failures"] == 0, json.dumps(result["failures"], indent=1)
    refused = "read refused, load refused"
    assert sum(result["outcomes"].values()) == 3000 and result["outcomes"][refused] > 2000
    # every kind of mutation reached the reader and was refused at least sometimes
    kinds = {
        "flip",
        "flip_header",
        "truncate",
        "extend",
        "splice",
        "record",
        "entry",
        "meta",
        "content",
        "values_count",
        "big_csr",
    }
    assert kinds <= set(result["kinds"]) and all(result["kinds"][k].get(refused, 0) > 0 for k in kinds)
