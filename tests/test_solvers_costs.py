"""The allocation's cost curves: one-pass OBS scores and the output energy, against their definitions."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lightning_lobs.solvers import (
    obs_scores,
    output_energy,
)
from solver_refs import (
    F64,
    OPT64,
    assert_close,
    grouped_data,
    hess,
    make_inputs,
    make_weight,
    ref_damped,
    subset_cost,
)


@pytest.mark.parametrize("bias", [False, True])
def test_obs_scores_are_single_removal_costs(bias):
    """L_q equals the brute-force cost of removing weight q alone and refitting the rest of its row."""
    X = make_inputs(40, 6, seed=63, bias=bias, kind="corr", dead=(2,))
    H = hess(X)
    Wt = make_weight(3, X.shape[1], 63)
    d = 6
    W, b = (Wt[:, :d], Wt[:, d]) if bias else (Wt, None)
    scores = obs_scores(W, H, bias=b, solver=OPT64)
    assert scores.shape == W.shape and scores.dtype == F64
    assert torch.all(scores[:, 2] == 0)  # dead input: free
    Xl = X.clone()
    for r in range(3):
        for q in range(d):
            if q == 2:
                continue
            brute = subset_cost(Wt[r], Xl, frozenset([q]))
            assert_close(scores[r, q], brute, msg=f"row {r} col {q}", H=H)


def test_obs_scores_damped_and_grouped():
    groups, per, d = 2, 3, 5
    Xs, H3, Wt = grouped_data(groups, per, d, 64, False)
    scores = obs_scores(Wt, H3, solver=replace(OPT64, damp=0.1))
    for g in range(groups):
        Hinv = torch.linalg.inv(ref_damped(H3[g], 0.1))
        sl = slice(g * per, (g + 1) * per)
        assert_close(scores[sl], Wt[sl].pow(2) / (2 * torch.diagonal(Hinv)), H=H3)


def test_output_energy_brute_force():
    X = make_inputs(40, 5, seed=65, bias=True, kind="corr")
    Wt = make_weight(4, 6, 65)
    H = hess(X)
    got = output_energy(Wt[:, :5], H, bias=Wt[:, 5])
    assert_close(got, (Wt @ X.T).pow(2).sum() / (2 * X.shape[0]), H=H)
    groups, per, d = 2, 3, 4
    Xs, H3, Wg = grouped_data(groups, per, d, 66, False)
    expect = sum(
        float((Wg[g * per : (g + 1) * per] @ Xs[g].T).pow(2).sum() / (2 * Xs[g].shape[0])) for g in range(groups)
    )
    assert_close(output_energy(Wg, H3), expect, H=H3)
