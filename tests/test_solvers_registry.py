"""The registry of methods: it lists exactly ``config.METHODS``, :func:`solve_layer` dispatches through it, and
every registered solver, called through its one entry point, meets brute-force references on tiny layers.

The brute-force tests run over ``SOLVERS``, so a new method gets them by being registered.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import lightning_lobs.solvers.registry as registry
from lightning_lobs.solvers import METHODS, SOLVERS, Solution, prepare_inputs, solve_layer
from lightning_lobs.solvers.admm import REFIT_RTOL
from solver_refs import OPT64, assert_close, condition, hess, ls_err, ls_fit, make_inputs, make_weight, solve_tol

REFIT64 = replace(OPT64, refit=True)


def test_registry_lists_exactly_the_methods_in_their_order():
    assert list(SOLVERS) == list(METHODS)
    assert all(solver.name == name for name, solver in SOLVERS.items())


def test_solve_layer_dispatches_through_the_registry(monkeypatch):
    """Replacing a registry entry replaces the method: solve_layer has no per-method branch of its own."""
    seen = []

    class Spy:
        name = "lobs"

        def solve(self, inputs, options, tick):
            seen.append((inputs.sparsity, inputs.columns, inputs.bias_cols))
            return Solution(inputs.W.to(options.dtype), torch.ones_like(inputs.W, dtype=torch.bool), 0.5)

    monkeypatch.setitem(registry.SOLVERS, "lobs", Spy())
    X = make_inputs(30, 6, seed=90, bias=True)
    Wt = make_weight(3, 7, 90)
    res = solve_layer(Wt[:, :6], hess(X), 0.5, "lobs", bias=Wt[:, 6], solver=OPT64)
    assert seen == [(0.5, 6, 1)]
    assert res.damp == 0.5 and res.method == "lobs" and bool(res.mask.all())
    assert torch.equal(res.weight, Wt[:, :6]) and torch.equal(res.bias, Wt[:, 6])


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("seed", [91, 92, 93])
def test_every_solver_refits_its_mask_to_the_least_squares_optimum(name, seed):
    """A 1 x 6 row at 50% (and a 3 x 6 layer with a bias): the solver keeps the asked count, its kept weights are
    ``torch.linalg.lstsq``'s fit of the layer outputs on its kept inputs, and solve_layer reports that fit's error.
    (How good the mask is, against exhaustive search, is each method's own test in test_solvers.py.)"""
    for rows, bias in ((1, False), (3, True)):
        X = make_inputs(40, 6, seed=seed, bias=bias, kind="corr")
        H = hess(X)
        Wt = make_weight(rows, X.shape[1], seed)
        x = prepare_inputs(Wt[:, :6], H, 0.5, Wt[:, 6] if bias else None, None, None)
        out = SOLVERS[name].solve(x, REFIT64, None)
        assert out.weight.shape == Wt.shape and out.kept.shape == Wt.shape
        assert int((~out.kept[:, :6]).sum()) == 3 * rows
        assert bool(out.kept[:, 6:].all())  # the bias column is never pruned
        assert bool((out.weight[~out.kept] == 0).all())
        if name == "admm":  # an iterative refit: CG stops at REFIT_RTOL, so the fit is within cond(H) times that
            tol = condition(H, REFIT64.damp) * REFIT_RTOL
            assert_close(out.weight, ls_fit(Wt, X, out.kept), rtol=tol, atol=tol * float(Wt.abs().max()), msg=name)
        else:
            assert_close(out.weight, ls_fit(Wt, X, out.kept), H=H, msg=name)
        res = solve_layer(Wt[:, :6], H, 0.5, name, bias=Wt[:, 6] if bias else None, solver=REFIT64)
        assert torch.equal(res.mask, out.kept[:, :6])
        err = ls_err(Wt, out.weight, X)
        assert abs(res.error - err) <= solve_tol(H) * max(err, 1.0), (name, res.error, err)
