"""Shared test fixtures (helpers that tests import live in helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# The demo data and models (examples/mnist_data.py) and the example scripts are not part of the package;
# tests import them as top-level modules (`import mnist_data`, `import lenet300_mnist`).
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


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
