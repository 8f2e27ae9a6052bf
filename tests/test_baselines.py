"""Tests of lobs_lab.baselines (magnitude, OBD, Wanda, IHT, layer-wise IHT) on tiny problems."""

from __future__ import annotations

import itertools

import pytest
import torch
from lobs_lab import baselines as B
from lobs_lab.mnist import MNISTSplits
from lobs_lab.models import lenet300_100

from script_loader import load_benchmark


def _problem(rows: int = 6, d: int = 9, n: int = 40, seed: int = 0, correlated: bool = True):
    """A weight matrix and the (positive definite) Hessian ``X X^T / n`` of correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, n, generator=g, dtype=torch.float64)
    if correlated:
        X = torch.randn(d, d, generator=g, dtype=torch.float64) @ X + 0.5
    H = X @ X.T / n
    W = torch.randn(rows, d, generator=g, dtype=torch.float64)
    return W, H, X


def test_keep_count_and_mask_sizes():
    assert B.keep_count(100, 0.93) == 7 and B.keep_count(10, 0.99) == 1 and B.keep_count(10, 0.0) == 10
    with pytest.raises(ValueError):
        B.keep_count(10, 1.0)
    scores = torch.arange(24.0).reshape(4, 6)
    m = B.mask_from_scores(scores, 0.5, "layer")
    assert int(m.sum()) == 12 and bool(m[2:].all()) and not bool(m[:2].any())  # the 12 largest
    r = B.mask_from_scores(scores, 0.5, "row")
    assert r.sum(dim=1).tolist() == [3, 3, 3, 3] and bool(r[:, 3:].all())
    f = B.mask_from_scores(scores, 0.8, "layer", free_cols=1)  # last column always kept
    assert bool(f[:, -1].all()) and int(f[:, :-1].sum()) == B.keep_count(20, 0.8)


def test_magnitude_masks_layer_and_global():
    weights = {"a": torch.tensor([[3.0, -1.0], [0.5, -4.0]]), "b": torch.tensor([0.1, 2.0, -0.2, 0.3])}
    layer = B.magnitude_masks(weights, 0.5, "layer")
    assert layer["a"].tolist() == [[True, False], [False, True]] and layer["b"].tolist() == [False, True, False, True]
    glob = B.magnitude_masks(weights, 0.5, "global")  # the 4 largest of 8: 4, 3, 2, 1
    assert glob["a"].tolist() == [[True, True], [False, True]] and glob["b"].tolist() == [False, True, False, False]
    per = B.magnitude_masks(weights, {"a": 0.75, "b": 0.25}, "layer")
    assert int(per["a"].sum()) == 1 and int(per["b"].sum()) == 3


def test_obd_equals_the_obs_cost_with_a_diagonal_hessian():
    W, H, _ = _problem()
    D = torch.diag(torch.diagonal(H))
    lq = W**2 / (2 * torch.diagonal(torch.linalg.inv(D)))  # L-OBS's L_q = w^2 / (2 [H^-1]_qq)
    torch.testing.assert_close(B.obd_saliency(W, D), lq, rtol=1e-12, atol=0)
    torch.testing.assert_close(B.obd_saliency(W, H), lq, rtol=1e-12, atol=0)  # OBD reads only diag(H)
    # ...and with a non-diagonal H the OBS cost differs from OBD's saliency
    lq_full = W**2 / (2 * torch.diagonal(torch.linalg.inv(H)))
    assert not torch.allclose(lq_full, B.obd_saliency(W, H))
    # OBD's saliency is the exact objective of removing one weight without compensation
    for r, q in [(0, 0), (3, 5)]:
        V = W.clone()
        V[r, q] = 0
        assert B.layer_objective(W, V, H) == pytest.approx(float(B.obd_saliency(W, H)[r, q]), rel=1e-12)


def test_wanda_equals_magnitude_when_input_norms_are_equal():
    W, _, _ = _problem()
    d = W.shape[1]
    # equal diagonal (equal input norms), arbitrary off-diagonal: Wanda reads only the norms
    A = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    H = A @ A.T
    H = H / torch.sqrt(torch.outer(torch.diagonal(H), torch.diagonal(H))) * 2.5  # correlation matrix * 2.5
    for group, s in itertools.product(("row", "layer"), (0.3, 0.5, 0.8)):
        wanda = B.mask_from_scores(B.wanda_scores(W, H), s, group)
        magnitude = B.mask_from_scores(W.abs(), s, group)
        assert torch.equal(wanda, magnitude), (group, s)
    # unequal norms change the choice: scale one input up and its weights survive
    H2 = H.clone()
    H2[0, :] *= 100
    H2[:, 0] *= 100
    wanda = B.mask_from_scores(B.wanda_scores(W, H2), 0.8, "row")
    assert bool(wanda[:, 0].all()) and not torch.equal(wanda, B.mask_from_scores(W.abs(), 0.8, "row"))
    # Wanda's score is ||X_j||_2 / sqrt(n) times |w|, with H = X X^T / n
    _, H3, X = _problem(seed=4)
    n = X.shape[1]
    torch.testing.assert_close(B.wanda_scores(W, H3), W.abs() * X.norm(dim=1) / n**0.5)


def test_hard_threshold_keeps_the_k_largest():
    W = torch.tensor([[0.1, -5.0, 0.3, 7.0], [2.0, -0.2, 0.0, 1.0]])
    out = B.hard_threshold(W, 0.5)
    assert out.tolist() == [[0.0, -5.0, 0.0, 7.0], [2.0, 0.0, 0.0, 1.0]]
    assert B.hard_threshold(W, 0.5, "row").tolist() == [[0.0, -5.0, 0.0, 7.0], [2.0, 0.0, 0.0, 1.0]]
    withbias = B.hard_threshold(W, 0.9, free_cols=1)
    assert withbias[:, -1].tolist() == [7.0, 1.0] and int((withbias[:, :-1] != 0).sum()) == 1


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("group", ["layer", "row"])
def test_layerwise_iht_is_never_worse_than_magnitude(seed, group):
    W, H, _ = _problem(rows=8, d=12, seed=seed)
    for s in (0.5, 0.75, 0.9):
        res = B.layerwise_iht(W, H, s, iters=300, group=group)
        magnitude = B.hard_threshold(W, s, group)
        f_mag = B.layer_objective(W, magnitude, H)
        assert res.history[0] == pytest.approx(f_mag, rel=1e-12)  # starts at magnitude pruning
        # monotone: every iterate at most the previous one (up to rounding)
        assert all(b <= a * (1 + 1e-12) + 1e-15 for a, b in zip(res.history, res.history[1:]))
        assert B.layer_objective(W, res.weight, H) == pytest.approx(res.history[-1], rel=1e-12)
        assert res.history[-1] <= f_mag * (1 + 1e-12)
        # the constraint holds: as many kept as magnitude keeps, and zeros exactly off the mask
        assert int(res.mask.sum()) == int(B.mask_from_scores(W.abs(), s, group).sum())
        assert bool((res.weight[~res.mask] == 0).all())
        if group == "row":
            assert len(set(res.mask.sum(dim=1).tolist())) == 1


def test_layerwise_iht_beats_magnitude_on_correlated_inputs_and_refit_is_optimal_on_its_support():
    W, H, _ = _problem(rows=10, d=16, seed=7)
    res = B.layerwise_iht(W, H, 0.75, iters=500)
    f_mag = B.layer_objective(W, B.hard_threshold(W, 0.75), H)
    assert res.history[-1] < 0.9 * f_mag  # a real improvement, not just "not worse"
    ref = B.layerwise_iht(W, H, 0.75, iters=500, refit=True)
    assert ref.refitted and ref.history[-1] <= ref.history[-2] * (1 + 1e-12)
    # optimal on the support: the gradient (V - W) H vanishes on the kept entries
    grad = (ref.weight - W) @ H
    assert float(grad[ref.mask].abs().max()) < 1e-9 * float(H.abs().max() * W.abs().max())
    assert bool((ref.weight[~ref.mask] == 0).all())


def test_layerwise_iht_moves_a_free_bias_column():
    W, H, _ = _problem(rows=5, d=10, seed=2)  # last column plays the bias (all-ones input would be typical)
    res = B.layerwise_iht(W, H, 0.8, iters=200, free_cols=1)
    assert bool(res.mask[:, -1].all()) and int(res.mask[:, :-1].sum()) == B.keep_count(5 * 9, 0.8)
    assert not torch.allclose(res.weight[:, -1], W[:, -1])  # compensating through the free column


def test_refit_on_support_matches_brute_force_least_squares():
    W, H, X = _problem(rows=3, d=7, seed=5)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) > 0.4
    V = B.refit_on_support(W, H, mask)
    n = X.shape[1]
    for r in range(3):
        keep = torch.nonzero(mask[r]).flatten()
        # min_v ||v X_K - w X||^2 over the kept inputs K
        sol = torch.linalg.lstsq(X[keep].T, (W[r] @ X).unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(V[r, keep], sol, rtol=1e-8, atol=1e-10)
        assert bool((V[r, ~mask[r]] == 0).all())
    assert n > 7  # overdetermined, so the least-squares optimum is unique


def test_iterative_schedule():
    sched = B.iterative_schedule(0.93, 3)
    assert sched[-1] == 0.93 and sched == sorted(sched)
    assert [round(1 - s, 4) for s in sched] == [round(0.07 ** (i / 3), 4) for i in (1, 2, 3)]
    assert B.iterative_schedule(0.5, 1) == [0.5]
    with pytest.raises(ValueError):
        B.iterative_schedule(0.9, 0)


def test_refit_with_damping_handles_a_dead_input():
    W, H, _ = _problem(rows=4, d=6, seed=8)
    H[2, :] = 0
    H[:, 2] = 0  # an input that is always 0: H is singular
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 0] = False
    with pytest.raises(RuntimeError):  # torch.linalg.LinAlgError: singular
        B.refit_on_support(W, H, mask)
    V = B.refit_on_support(W, H, mask, damp=0.01)
    assert bool(torch.isfinite(V).all()) and bool((V[:, 0] == 0).all())
    assert B.layer_objective(W, V, H) <= B.layer_objective(W, W * mask, H)  # better than not compensating
    res = B.layerwise_iht(W, H, 0.5, iters=50, refit=True, refit_damp=0.01)
    assert res.history[-1] <= res.history[-2] * (1 + 1e-9) + 1e-12


def test_paper_mnist_retraining_holds_masks_and_counts_steps():
    pm = load_benchmark("paper_mnist")

    g = torch.Generator().manual_seed(0)
    splits = MNISTSplits(
        torch.randn(64, 1, 28, 28, generator=g),
        torch.randint(0, 10, (64,), generator=g),
        torch.randn(32, 1, 28, 28, generator=g),
        torch.randint(0, 10, (32,), generator=g),
        "random",
    )
    net = lenet300_100()
    masks = {name: torch.rand(m.weight.shape, generator=g) > 0.9 for name, m in pm.prunable_layers(net)}
    with torch.no_grad():
        for name, m in pm.prunable_layers(net):
            m.weight.mul_(masks[name])
    before = {name: m.weight.detach().clone() for name, m in pm.prunable_layers(net)}
    acc = pm.train_steps(net, masks, 5, pm.Batches(splits, 16, 0), 1e-2, splits, checkpoints=[2, 5, 9])
    assert sorted(acc) == [2, 5] and all(0.0 <= a <= 1.0 for a in acc.values())
    for name, m in pm.prunable_layers(net):
        assert bool((m.weight[~masks[name]] == 0).all())  # pruned weights stayed exactly 0
        assert not torch.equal(m.weight[masks[name]], before[name][masks[name]])  # kept ones trained
    assert pm.weight_masks(net)["1"].sum() <= masks["1"].sum()
    # steps to within delta of dense: one-shot counts as 0 retraining steps, earlier rounds are added
    assert pm.steps_within(0.98, 0.975, {50: 0.97}, 0, 0.005) == 0
    assert pm.steps_within(0.98, 0.90, {50: 0.97, 100: 0.9795}, 500, 0.001) == 600
    assert pm.steps_within(0.98, 0.90, {50: 0.97}, 0, 0.001) is None


def test_sparsegpt_sweep_with_a_diagonal_hessian_is_obd_without_compensation():
    """Independent inputs: no error feedback between columns, and one block ranks by w^2 H_qq layer-wide (OBD)."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(6, 12, generator=g, dtype=torch.float64)
    H = torch.diag(torch.rand(12, generator=g, dtype=torch.float64) + 0.5)
    V, keep = B.sparsegpt_sweep(W, H, 0.5, blocksize=128, percdamp=0.0)
    expect = B.mask_from_scores(B.obd_saliency(W, H), 0.5, "layer")
    assert torch.equal(keep, expect)
    assert torch.allclose(V, W * expect, rtol=0, atol=1e-12)


def test_sparsegpt_sweep_nm_matches_the_library_fast_solver_without_refit():
    """The 2:4 mask and the compensated weights of the plain sweep are the library's ``fast`` without its refit."""
    from lightning_lobs import SolverOptions
    from lightning_lobs.solvers import solve_layer

    W, H, _ = _problem(rows=5, d=16, n=80, seed=4)
    V, keep = B.sparsegpt_sweep(W, H, nm=(2, 4), percdamp=0.01)
    res = solve_layer(
        W, H, None, "fast", pattern="2:4", solver=SolverOptions(refit=False, damp=0.01, dtype=torch.float64)
    )
    assert torch.equal(keep, res.mask)
    cond = float(torch.linalg.cond(H))
    assert torch.allclose(
        V, res.weight.double(), rtol=0, atol=100 * cond * torch.finfo(torch.float64).eps * W.abs().max()
    )
    # Unstructured: exactly the quota per block, and far better than magnitude on correlated inputs.
    V, keep = B.sparsegpt_sweep(W, H, 0.5, blocksize=8)
    assert int((~keep).sum()) == 2 * int(5 * 8 * 0.5)
    assert bool((V[~keep] == 0).all())
    mag = B.mask_from_scores(W.abs(), 0.5, "layer")
    assert B.layer_objective(W, V, H) < B.layer_objective(W, W * mag, H)
