"""What a prune says in the log: the reason a model is not a chain is in the report, not an INFO line; the block
pipeline's fallback to the per-layer path is a warning."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lightning_lobs import prune_model

transformers = pytest.importorskip("transformers")


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=61, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("lightning_lobs") and r.levelno >= level]


@pytest.mark.parametrize("sequential", [False, True])
def test_a_model_torch_fx_cannot_trace_logs_no_info_line_and_the_report_keeps_the_reason(caplog, sequential):
    """GPT-2 (torch.fx cannot trace it) with and without ``sequential=True``: nothing at INFO or above says "not a
    chain"; the reason is in ``report.bound_note``; the block pipeline ran (no fallback warning)."""
    batches = [torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with caplog.at_level(logging.DEBUG, logger="lightning_lobs"):
        report = prune_model(_gpt2(), batches, 0.5, "fast", allocation="uniform", sequential=sequential)
    assert "torch.fx could not trace" in report.bound_note
    assert not [r for r in _records(caplog, logging.INFO) if "not a chain" in r.getMessage()]
    assert any("not a chain" in r.getMessage() for r in _records(caplog, logging.DEBUG))  # still there for debugging
    assert not [r for r in _records(caplog, logging.WARNING) if "does not apply" in r.getMessage()]


def test_the_fallback_from_the_block_pipeline_is_one_warning(caplog):
    """A model without repeated blocks (a plain MLP) falls back to the per-layer path, and says so once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with caplog.at_level(logging.DEBUG, logger="lightning_lobs"):
        prune_model(model, [torch.randn(8, 8)], 0.5, "fast", sequential=True)
    fallbacks = [r for r in _records(caplog, logging.WARNING) if "does not apply" in r.getMessage()]
    assert len(fallbacks) == 1 and "no repeated blocks" in fallbacks[0].getMessage()
