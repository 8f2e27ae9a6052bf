"""The ``admm`` solver (ADMM with mask reselection) and the batched conjugate-gradient refit (issue 19, items 2-3).

References: the direct per-row least-squares refit (``solvers.refit``) for CG, and brute force over every mask of
tiny layers (1x8, 2x8) for ADMM, where the optimum of the least-squares layer error is known exactly.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import List, Optional, Tuple

import pytest
import torch

from lightning_lobs.config import SolverOptions, parse_pattern
from lightning_lobs.solvers import layer_error, refit, solve_layer
from lightning_lobs.solvers.admm import admm_prune
from lightning_lobs.solvers.cg import cg_refit

F64 = SolverOptions(dtype=torch.float64)


def llm_like(rows: int, d: int, seed: int, tokens: int = 256, bias: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and Hessian of correlated inputs with one outlier channel 20x larger (float64)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, d, generator=g, dtype=torch.float64) @ (
        0.3 * torch.eye(d, dtype=torch.float64) + torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    )
    X[:, int(torch.randint(d, (1,), generator=g))] *= 20.0
    if bias:
        X = torch.cat([X, torch.ones(tokens, 1, dtype=torch.float64)], dim=1)
    W = torch.randn(rows, d, generator=g, dtype=torch.float64) / d**0.5
    return W, X.T @ X / tokens


# --------------------------------------------------------------------------- the pattern is met


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_unstructured_sparsity_exact_and_rows_alive(sparsity: float) -> None:
    W, H = llm_like(12, 32, seed=1)
    res = admm_prune(W, H, sparsity, solver=F64)
    assert int((~res.mask).sum()) == round(sparsity * W.numel())
    assert bool((res.weight[~res.mask] == 0).all())
    assert bool((res.mask.sum(dim=1) >= 1).all())
    assert res.method == "admm" and res.error == pytest.approx(layer_error(W, res.weight, H), rel=1e-12)


def test_per_row_minimum_lowers_sparsity_with_warning() -> None:
    W, H = llm_like(6, 16, seed=2)
    with pytest.warns(RuntimeWarning, match="min_kept_per_row=3"):
        res = admm_prune(W, H, 0.95, solver=SolverOptions(dtype=torch.float64, min_kept_per_row=3))
    assert res.mask.sum(dim=1).tolist() == [3] * 6


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_pattern_exact(pattern: str) -> None:
    nm = parse_pattern(pattern)
    W, H = llm_like(8, 32, seed=3)
    res = admm_prune(W, H, pattern=pattern, solver=F64)
    assert bool((res.mask.reshape(8, -1, nm.m).sum(-1) == nm.n).all())
    assert bool((res.weight[~res.mask] == 0).all())


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_prior_pruned_stay_pruned_and_count(pattern: Optional[str]) -> None:
    W, H = llm_like(8, 32, seed=4)
    g = torch.Generator().manual_seed(0)
    if pattern is None:
        prior = torch.rand(W.shape, generator=g) > 0.3
    else:  # at most 2 of every 4 pruned before
        prior = torch.ones(W.shape, dtype=torch.bool)
        prior.view(8, -1, 4)[:, :, 0] = torch.rand(8, 8, generator=g) > 0.5
    res = admm_prune(W, H, None if pattern else 0.6, pattern=pattern, prior_mask=prior, solver=F64)
    assert not bool((res.mask & ~prior).any())
    if pattern is None:
        assert int((~res.mask).sum()) == round(0.6 * W.numel())


def test_bias_moves_but_is_never_pruned_and_groups() -> None:
    W, Hb = llm_like(6, 16, seed=5, bias=True)
    b = torch.randn(6, dtype=torch.float64)
    res = admm_prune(W, Hb, 0.5, bias=b, solver=F64)
    assert res.bias is not None and not torch.equal(res.bias, b)
    full_old, full_new = torch.cat([W, b[:, None]], 1), torch.cat([res.weight, res.bias[:, None]], 1)
    assert res.error == pytest.approx(layer_error(full_old, full_new, Hb), rel=1e-12)
    # grouped Hessians: rows split into contiguous blocks, each with its own H
    W2, H2 = llm_like(8, 16, seed=6)
    _, H3 = llm_like(8, 16, seed=7)
    res = admm_prune(W2, torch.stack([H2, H3]), 0.5, solver=F64)
    assert int((~res.mask).sum()) == 64
    assert res.error == pytest.approx(layer_error(W2, res.weight, torch.stack([H2, H3])), rel=1e-12)


def test_invalid_arguments() -> None:
    W, H = llm_like(4, 8, seed=8)
    with pytest.raises(ValueError, match="contradicts"):
        admm_prune(W, H, 0.3, pattern="2:4")
    with pytest.raises(ValueError, match="sparsity is required"):
        admm_prune(W, H)
    with pytest.raises(ValueError, match="hessian must be"):
        admm_prune(W, H[:4, :4], 0.5)
