"""``method="admm"`` end to end: ``prune_model``, the callback, N:M, prior masks, sequential, the estimates and
progress. The solver itself (against brute force and ALPS-like references) is tested in test_solvers_admm.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lobs.solvers.core as solvers_core
from helpers import make_cnn, make_mlp
from lightning_helpers import lit_mlp, make_trainer, numel, zeros
from lightning_lobs import LOBSPruning, MaskSet, PruneOptions, SolverOptions, prune_model
from lightning_lobs.config import METHODS
from lightning_lobs.engine.estimates import solve_work
from lightning_lobs.engine.plan import resolve_method
from lightning_lobs.layers import solve_cost
from lightning_lobs.resources import layer_memory
from lightning_lobs.solvers import solve_layer
from lightning_lobs.solvers.admm import ADMM_ITERATIONS, admm_work
from lightning_lobs.solvers.core import GEMM_TICK_FACTOR

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"),
]


def mlp_loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(512, 32, generator=g)
    x = base + 0.5 * base @ (torch.randn(32, 32, generator=g) / math.sqrt(32))  # correlated: H is not ~identity
    return DataLoader(TensorDataset(x, torch.zeros(512, dtype=torch.long)), batch_size=64)


def cnn_loader() -> DataLoader:
    g = torch.Generator().manual_seed(3)
    return DataLoader(TensorDataset(torch.randn(128, 3, 8, 8, generator=g), torch.zeros(128)), batch_size=32)


def prunable(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def check_masks_hold(model: nn.Module, masks: MaskSet) -> None:
    for name, module in prunable(model).items():
        assert torch.all(module.weight.detach()[~masks[name]] == 0), name


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("make, loader", [(make_mlp, mlp_loader), (make_cnn, cnn_loader)], ids=["mlp", "cnn"])
def test_prune_model_admm_meets_the_sparsity_and_beats_fast(make, loader, allocation):
    reports = {}
    for method in ("fast", "admm"):
        model, masks = make(), MaskSet()
        reports[method] = prune_model(model, loader(), 0.6, method, allocation=allocation, masks=masks, prune_head=True)
        check_masks_hold(model, masks)
    admm, fast = reports["admm"], reports["fast"]
    assert {r.method for r in admm.layers.values()} == {"admm"}
    assert admm.sparsity == pytest.approx(0.6, abs=2e-3)
    for name, layer in admm.layers.items():  # the same targets, each met to the weight
        n = numel(model, name)
        assert layer.target_sparsity == fast.layers[name].target_sparsity
        assert zeros(model, name) == round(layer.target_sparsity * n) == round(layer.sparsity * n)
    # Observed on these seeds: admm's summed layer error is 0.68-0.97x fast's (mlp 0.68-0.70, cnn 0.81-0.97).
    total = {m: sum(r.layer_error for r in rep.layers.values()) for m, rep in reports.items()}
    assert total["admm"] <= total["fast"]


def test_sequential_admm_prunes_like_the_dense_path():
    dense, sequential = make_mlp(), make_mlp()
    a = prune_model(dense, mlp_loader(), 0.6, "admm", allocation="uniform", prune_head=True)
    b = prune_model(sequential, mlp_loader(), 0.6, "admm", allocation="uniform", sequential=True, prune_head=True)
    assert set(a.layers) == set(b.layers) and {r.method for r in b.layers.values()} == {"admm"}
    assert b.sparsity == pytest.approx(a.sparsity, abs=1e-12)
    # the first layer sees the same inputs either way: the same solve
    assert torch.equal(dense[0].weight, sequential[0].weight)


def test_admm_2_to_4_and_a_per_layer_mapping():
    model = make_mlp()
    report = prune_model(model, mlp_loader(), 0.5, "admm", pattern="2:4", prune_head=True)
    for name, module in prunable(model).items():
        nonzero = (module.weight.detach().reshape(module.weight.shape[0], -1, 4) != 0).sum(-1)
        assert int(nonzero.max()) <= 2, name
        assert report.layers[name].method == "admm"
    model = make_mlp()
    report = prune_model(model, mlp_loader(), {"0": 0.8, "2": 0.5}, "admm", prune_head=True)
    assert zeros(model, "0") == round(0.8 * numel(model, "0")) and zeros(model, "2") == round(0.5 * numel(model, "2"))
    assert zeros(model, "4") == 0 and set(report.layers) == {"0", "2"}


@pytest.mark.parametrize("sequential", [False, True])
def test_a_second_admm_prune_keeps_the_first_ones_zeros(sequential):
    model, masks = make_mlp(), MaskSet()
    prune_model(model, mlp_loader(), 0.5, "fast", masks=masks, prune_head=True)
    first = {n: masks[n].clone() for n in masks}
    report = prune_model(model, mlp_loader(), 0.8, "admm", masks=masks, sequential=sequential, prune_head=True)
    assert report.sparsity == pytest.approx(0.8, abs=2e-3)
    for name, module in prunable(model).items():
        assert not torch.any(masks[name] & ~first[name]), name  # nothing pruned before comes back
        assert torch.all(module.weight.detach()[~first[name]] == 0), name
    check_masks_hold(model, masks)


def test_the_callback_prunes_with_admm_and_the_masks_hold():
    model = lit_mlp("pytorch_lightning")
    lobs = LOBSPruning(
        sparsity=[0.5, 0.8], prune_epoch=[1, 2], method="admm", calibration_batches=4, log_table=False, prune_head=True
    )
    make_trainer("pytorch_lightning", 3, [lobs]).fit(model)
    assert lobs.pruned_epochs == [1, 2] and lobs.method == "admm"
    assert all({r.method for r in rep.layers.values()} == {"admm"} for rep in lobs.reports)
    assert lobs.reports[1].sparsity == pytest.approx(0.8, abs=2e-3)
    for name in lobs.masks:
        weight = model.get_submodule(name).weight.detach()
        assert torch.all(weight[~lobs.masks[name]] == 0), name  # held through the training after the prunes


def test_bad_method_names_are_refused_listing_admm():
    assert "admm" in METHODS
    with pytest.raises(ValueError, match=r"method must be one of .*'admm'"):
        PruneOptions(method="admmm", prune_head=True)
    with pytest.raises(ValueError, match=r"method must be one of .*'admm'"):
        solve_layer(torch.randn(4, 8), torch.eye(8), 0.5, "alps")
    with pytest.raises(ValueError, match=r"method must be one of .*'admm'"):
        LOBSPruning(sparsity=0.5, method="ADMM")


def test_auto_does_not_pick_admm():
    for layer in (nn.Linear(8, 4), nn.Linear(3072, 768), nn.Conv2d(64, 64, 3)):
        assert resolve_method("auto", layer) in ("exact", "fast")
    assert resolve_method("admm", nn.Linear(8, 4)) == "admm"


def test_admm_estimates_count_its_eigendecomposition_and_iterations():
    linear, conv = nn.Linear(768, 3072), nn.Conv2d(64, 128, 3, groups=2)
    # layers.solve_cost (level 2, no solver import) repeats admm_work's counts per multiply-add; d has the bias column
    assert 2 * solve_cost(linear, "admm") == pytest.approx(admm_work(3072, 769))
    assert 2 * solve_cost(conv, "admm") == pytest.approx(admm_work(128, 32 * 9 + 1, groups=2))
    assert solve_cost(linear, "admm") > 10 * solve_cost(linear, "fast")  # tens of row passes, not one
    assert admm_work(3072, 768, iterations=ADMM_ITERATIONS) > admm_work(3072, 768)
    fp32 = layer_memory("l", linear, "admm", torch.float64, SolverOptions())
    fast = layer_memory("l", linear, "fast", torch.float64, SolverOptions(refit=False))
    assert fp32.hessian_bytes == fast.hessian_bytes == 769 * 769 * 8
    assert fp32.solve_bytes >= 12 * 3072 * 769 * 4 + 7 * 769 * 769 * 4  # a dozen rows x d tensors, d x d copies


def test_prune_model_admm_reports_progress_from_inside_the_solve(monkeypatch):
    budget = 5e6  # the work between two ticks: GEMM_TICK_FACTOR x PROGRESS_TICK_FLOPS for admm's products
    monkeypatch.setattr(solvers_core, "PROGRESS_TICK_FLOPS", budget / GEMM_TICK_FACTOR)
    torch.manual_seed(0)
    rows, d = 96, 192
    model = nn.Sequential(nn.Linear(d, rows, bias=False))
    g = torch.Generator().manual_seed(0)
    events = []
    prune_model(model, [torch.randn(256, d, generator=g)], 0.5, "admm", prune_head=True, progress=events.append)
    inside = [e for e in events if e.phase == "solve" and e.done == 0 and e.fraction]
    # the loop ran dozens of iterations on this layer (at least 10 asserted), each in row chunks with a tick after each
    assert len(inside) >= 10 * math.ceil(4 * rows * d * d / budget)
    assert [e.fraction for e in inside] == sorted(e.fraction for e in inside)
    assert all(e.layer == "0" and e.eta is not None for e in inside)
    assert [e.fraction for e in events if e.phase == "solve" and e.done == 1] == [1.0]


def test_solve_work_of_an_admm_layer_is_admm_work():
    from lightning_lobs.engine.plan import layer_plan

    layer = layer_plan("l", nn.Linear(48, 20), 0.5, "admm", None, None)
    assert solve_work(layer, SolverOptions(), False, False) == admm_work(20, 49)


def _problem(rows: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
    return torch.randn(rows, d, generator=g, dtype=torch.float64), X.T @ X / X.shape[0]


def test_admm_ticks_within_each_iteration_and_the_ticks_change_nothing(monkeypatch):
    budget = 5e6
    rows, d = 96, 192
    W, H = _problem(rows, d)
    unchunked = solve_layer(W, H, 0.5, "admm")
    monkeypatch.setattr(solvers_core, "PROGRESS_TICK_FLOPS", budget / GEMM_TICK_FACTOR)
    fractions: list[float] = []
    res = solve_layer(W, H, 0.5, "admm", tick=fractions.append)
    assert all(0 <= f <= 1 for f in fractions) and fractions == sorted(fractions) and fractions[-1] == 1.0
    per_iteration = 0.9 / ADMM_ITERATIONS
    loop = [f for f in fractions if 0 < f <= 0.9]
    iterations = round(max(loop) / per_iteration)
    assert iterations >= 10
    # one tick per chunk of rows: each iteration's 4 rows d^2 flops split so that no chunk exceeds the budget
    assert len(loop) >= iterations * math.ceil(4 * rows * d * d / budget)
    refit = [f for f in fractions[:-1] if f > 0.9]  # the CG refit ticks too, per chunk of its product
    assert len(refit) >= math.ceil(2 * rows * d * d / budget)
    plain = solve_layer(W, H, 0.5, "admm")
    assert torch.equal(res.weight, plain.weight) and torch.equal(res.mask, plain.mask)
    # chunking the ridge solve by rows only reorders floating-point sums
    assert torch.equal(res.mask, unchunked.mask)
    assert torch.allclose(res.weight, unchunked.weight, rtol=1e-9, atol=1e-12)
