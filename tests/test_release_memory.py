"""Issue 19 (peak memory): freed heap memory is handed back to the OS (glibc's ``malloc_trim(0)``) between the
groups of a block walk and after the one-pass allocation, by :func:`lightning_lobs.resources.release_freed_memory`,
which never raises and is a no-op where glibc's symbol is not there.

What the trim saves is measured in BENCHMARKS.md (GPT-2 end to end); here: the helper's contract, and that every
pipeline calls it between two groups' calibrations (when one group's Hessians are dead, before the next's exist).
"""

from __future__ import annotations

import platform
import sys

import pytest
import torch
from torch import nn

import lightning_lobs.engine.run as run_mod
import lightning_lobs.engine.sequential as sequential_mod
from lightning_lobs import prune_model, resources

transformers = pytest.importorskip("transformers")


@pytest.fixture
def fresh_lookup():
    """The libc lookup is cached per process: start and end each test with it forgotten."""
    resources._malloc_trim.cache_clear()
    yield
    resources._malloc_trim.cache_clear()


def test_release_runs_on_this_platform(fresh_lookup):
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert resources.release_freed_memory() is glibc
    assert resources.release_freed_memory() is glibc  # and again, from the cached lookup


class _LibcWithout:
    """A C library without ``malloc_trim`` (musl, or a libc that dropped it)."""


def test_release_is_a_noop_without_the_symbol(monkeypatch, fresh_lookup):
    monkeypatch.setattr(resources.sys, "platform", "linux")
    monkeypatch.setattr(resources.ctypes, "CDLL", lambda name: _LibcWithout())
    assert resources.release_freed_memory() is False


def test_release_is_a_noop_without_the_library(monkeypatch, fresh_lookup):
    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(resources.sys, "platform", "linux")
    monkeypatch.setattr(resources.ctypes, "CDLL", missing)
    assert resources.release_freed_memory() is False


def test_release_is_a_noop_off_linux(monkeypatch, fresh_lookup):
    def never(name):
        raise AssertionError("no C library is opened off Linux")

    monkeypatch.setattr(resources.sys, "platform", "darwin")
    monkeypatch.setattr(resources.ctypes, "CDLL", never)
    assert resources.release_freed_memory() is False


def test_release_never_raises_when_the_call_fails(monkeypatch, fresh_lookup):
    class Failing:  # a foreign function that takes argtypes and restype, then fails when called
        def __call__(self, pad):
            raise RuntimeError("the call failed")

    class Libc:
        malloc_trim = Failing()

    monkeypatch.setattr(resources.sys, "platform", "linux")
    monkeypatch.setattr(resources.ctypes, "CDLL", lambda name: Libc())
    assert resources.release_freed_memory() is False


def _gpt2(n_layer: int = 3) -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=4, vocab_size=61, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def _tokens() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 61, (4, 12), generator=g) for _ in range(3)]


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).logits


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"sequential": True}, {"sequential": True, "sequential_unit": "layer"}, {"allocation": "uniform"}],
    ids=["default-global", "sequential", "sequential-layer", "default-uniform"],
)
def test_block_walks_release_between_groups(monkeypatch, kwargs):
    """Every pair of consecutive group calibrations (the allocation's dense walk's and the solving walk's) has a
    release between them: one group's Hessians are never kept in the heap while the next's are accumulated."""
    events: list[str] = []
    calibrate = sequential_mod.calibrate

    def spy_calibrate(ctx, plan, names, **kw):
        events.append("calibrate")
        return calibrate(ctx, plan, names, **kw)

    monkeypatch.setattr(sequential_mod, "calibrate", spy_calibrate)
    monkeypatch.setattr(sequential_mod, "release_freed_memory", lambda: events.append("release") or True)
    prune_model(_gpt2(), _tokens(), 0.5, forward_fn=_logits, **kwargs)
    assert events.count("calibrate") >= 3  # a walk over the 3 blocks at least
    at = [k for k, e in enumerate(events) if e == "calibrate"]
    for i, j in zip(at[:-1], at[1:]):
        assert "release" in events[i + 1 : j], f"no release between calibrations {i} and {j}: {events}"
    assert events[-1] == "release"  # after the last group's solve too


def test_one_pass_releases_after_the_allocation(monkeypatch):
    calls: list[str] = []
    solve_all = run_mod.solve_all

    def spy_solve(*args, **kw):
        calls.append("solve")
        return solve_all(*args, **kw)

    monkeypatch.setattr(run_mod, "find_chain", lambda ctx, plan: "forced one pass")
    monkeypatch.setattr(run_mod, "solve_all", spy_solve)
    monkeypatch.setattr(run_mod, "release_freed_memory", lambda: calls.append("release") or True)
    prune_model(_gpt2(), _tokens(), 0.5, forward_fn=_logits)
    assert calls == ["release", "solve"]
