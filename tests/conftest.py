"""Shared test fixtures (helpers that tests import live in helpers.py)."""

from __future__ import annotations

import pytest
import torch


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
