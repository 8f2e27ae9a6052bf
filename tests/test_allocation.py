"""Tests for lightning_lobs.allocation: the global allocation's options, its split, its floors and its costs.

References are brute force: the split is checked against exhaustive enumeration of every
combination of grid levels, and the error curves against single-level ``solve_layer`` runs.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lobs.allocation as alloc_mod
import lightning_lobs.engine.allocate as engine_allocate
from lightning_lobs import CalibrationOptions, GlobalAllocation, MaskSet, SolverOptions, prune_model
from lightning_lobs.allocation import allocate_global, split_budget
from lightning_lobs.config import resolve_allocation
from lightning_lobs.solvers import RowFloor, error_curve, output_energy, solve_layer

F64 = torch.float64
S64 = SolverOptions(dtype=F64)
# float64 products too: the references below build H in float64 (the default 'mixed' rounds it to ~1e-8)
C64 = CalibrationOptions(hessian_dtype=F64)


def solve_tol(H: torch.Tensor, damp: float = 0.01) -> float:
    """Relative tolerance for two float64 routes to one solve: 100 * cond(damped H) * eps * D
    (as in tests/test_solvers.py; BLAS builds and thread counts round differently)."""
    h = H.double().clone()
    diag = torch.diagonal(h)
    diag[diag <= 0] = 1.0
    diag += damp * diag.mean()
    ev = torch.linalg.eigvalsh(h)
    return 100.0 * float(ev[-1] / ev[0]) * torch.finfo(F64).eps * H.shape[-1]


# --------------------------------------------------------------------------- options


def test_resolve_allocation():
    assert resolve_allocation("global") == GlobalAllocation()
    cfg = GlobalAllocation(max_layer_sparsity=0.9, costs="one-pass")
    assert resolve_allocation(cfg) is cfg
    assert resolve_allocation("uniform") is None
    for bad in ("layerwise", None, 1, GlobalAllocation):
        with pytest.raises(ValueError, match="allocation must be 'global', 'uniform' or a GlobalAllocation"):
            resolve_allocation(bad)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"max_layer_sparsity": 0.0}, "max_layer_sparsity"),
        ({"max_layer_sparsity": 1.5}, "max_layer_sparsity"),
        ({"max_layer_sparsity": True}, "max_layer_sparsity"),
        ({"allow_dead_rows": 1}, "allow_dead_rows"),
        ({"costs": "pooled"}, "costs"),
        ({"levels": 1}, "levels"),
        ({"curve_rows": 0}, "curve_rows"),
        ({"grid": (0.5, 1.0)}, "grid"),
        ({"grid": (0.5, 0.995)}, "grid"),
        ({"grid": ()}, "grid"),
        ({"grid": "abc"}, "grid"),
    ],
)
def test_global_allocation_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"GlobalAllocation.{field}"):
        GlobalAllocation(**kwargs)


def test_default_grid_is_log_density_and_ends_at_the_cap():
    g = GlobalAllocation().sparsity_grid()
    assert len(g) == 24 and g[0] == 0.0 and g[-1] == pytest.approx(0.99)
    dens = [1 - s for s in g]
    ratios = [dens[i + 1] / dens[i] for i in range(len(dens) - 1)]
    assert max(ratios) - min(ratios) < 1e-9  # evenly spaced in log density
    assert GlobalAllocation(grid=(0.9, 0.5)).sparsity_grid() == (0.0, 0.5, 0.9)


# --------------------------------------------------------------------------- the split: brute force


def _brute(counts, errors, budget):
    best = None
    for combo in itertools.product(*[range(len(c)) for c in counts]):
        if sum(counts[l][k] for l, k in enumerate(combo)) >= budget:
            v = sum(errors[l][k] for l, k in enumerate(combo))
            if best is None or v < best:
                best = v
    return best


@pytest.mark.parametrize("seed", range(4))
def test_split_budget_equals_exhaustive_search(seed):
    g = torch.Generator().manual_seed(seed)
    checked = 0
    for _ in range(60):
        L = int(torch.randint(1, 5, (1,), generator=g))
        counts, errors = [], []
        for _l in range(L):
            c = sorted(set(torch.randint(0, 40, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()))
            e = torch.rand(len(c), generator=g, dtype=F64)
            if seed % 2:  # monotone curves, as real error curves are
                e = e.sort().values
            counts.append(c)
            errors.append(e.tolist())
        budget = int(torch.randint(0, sum(max(c) for c in counts) + 1, (1,), generator=g))
        got = split_budget(counts, errors, budget)
        assert sum(counts[l][k] for l, k in enumerate(got)) >= budget
        assert sum(errors[l][k] for l, k in enumerate(got)) == pytest.approx(
            _brute(counts, errors, budget), rel=1e-12, abs=1e-15
        )
        checked += 1
    assert checked == 60


def test_split_budget_infeasible_and_bucketed():
    with pytest.raises(ValueError, match="removes 10"):
        split_budget([[0, 3], [0, 4]], [[0.0, 1.0], [0.0, 1.0]], 10)
    with pytest.raises(ValueError, match="same length"):
        split_budget([[0, 3]], [[0.0, 1.0], [0.0]], 1)
    # above the resolution the totals are bucketed, but the budget is still met
    g = torch.Generator().manual_seed(5)
    counts = [sorted(set(torch.randint(0, 10_000, (6,), generator=g).tolist())) for _ in range(4)]
    errors = [sorted(torch.rand(len(c), generator=g).tolist()) for c in counts]
    budget = 15_000
    got = split_budget(counts, errors, budget, resolution=64)
    assert sum(counts[l][k] for l, k in enumerate(got)) >= budget
    exact = split_budget(counts, errors, budget)
    assert sum(errors[l][k] for l, k in enumerate(got)) <= _brute(counts, errors, budget - budget // 64 * 4) + 2.0
    assert sum(errors[l][k] for l, k in enumerate(exact)) == pytest.approx(_brute(counts, errors, budget), rel=1e-12)


def test_removals_over_the_budget_go_back_along_the_steepest_segment():
    """Non-convex curves: the grid split (236 + 305 = 541) overshoots the budget of 346 by 195. Handed back along
    the steepest segment (the second layer's, 108.4 error over 305 weights) and then exchanged, the split ends at
    [322, 24] (summed error about 68.6); handed to the flattest first it ends near [18, 328] (about 113, 1.65x)."""
    counts = [[0, 236, 322], [0, 305, 328]]
    errors = [[0.0, 60.0, 60.07], [0.0, 108.4, 108.5]]
    chosen = split_budget(counts, errors, 346)  # as allocate_layers calls them
    assert [counts[l][k] for l, k in enumerate(chosen)] == [236, 305]
    assert alloc_mod._refine(counts, errors, chosen, 346) == [322, 24]
    # the same layers in the other order: the steepest segment decides, not the position
    assert alloc_mod._refine(counts[::-1], errors[::-1], chosen[::-1], 346) == [24, 322]


def _interp(c, e, x):
    """A layer's error at ``x`` removals, linear between its measured levels (as the hand-back and exchanges take it)."""
    return float(np.interp(x, c, e))


def _random_curves(g, convex):
    L = int(torch.randint(2, 5, (1,), generator=g))
    counts, errors = [], []
    for _ in range(L):  # few weights and levels, so that kinks and ties between layers are common
        c = [0] + sorted(
            set(torch.randint(1, 13, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist())
        )
        steps = torch.rand(len(c) - 1, generator=g, dtype=F64)
        if convex:  # slopes that grow along the curve
            slopes = steps.sort().values
            e = [0.0] + torch.cumsum(slopes * torch.tensor(np.diff(c), dtype=F64), 0).tolist()
        else:  # increasing but with any slopes
            e = [0.0] + torch.cumsum(steps, 0).tolist()
        counts.append(c)
        errors.append(e)
    budget = int(torch.randint(1, sum(c[-1] for c in counts) + 1, (1,), generator=g))
    return counts, errors, budget


@pytest.mark.parametrize("seed", range(3))
def test_final_split_meets_the_budget_exactly_and_never_loses_to_the_grid_split(seed):
    """Any increasing curves: exactly ``budget`` removals, each layer within its measured range, a summed
    (interpolated) error at most the grid split's, and no single exchange between two layers left that lowers it."""
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(30):
        counts, errors, budget = _random_curves(g, convex=False)
        chosen = split_budget(counts, errors, budget)
        cur = alloc_mod._refine(counts, errors, chosen, budget)
        assert sum(cur) == budget, (counts, budget, cur)
        assert all(0 <= x <= c[-1] for x, c in zip(cur, counts))
        total = sum(_interp(c, e, x) for c, e, x in zip(counts, errors, cur))
        grid = sum(errors[l][k] for l, k in enumerate(chosen))
        tol = 64 * torch.finfo(F64).eps * max(1.0, grid)
        assert total <= grid + tol
        for a in range(len(cur)):  # moving one removal from a to b may not help (curves are linear per unit)
            for b in range(len(cur)):
                if a != b and cur[a] > 0 and cur[b] < counts[b][-1]:
                    moved = list(cur)
                    moved[a] -= 1
                    moved[b] += 1
                    assert sum(_interp(c, e, x) for c, e, x in zip(counts, errors, moved)) >= total - tol


def test_final_split_never_goes_below_a_layers_lowest_level():
    """A layer's lowest level is what earlier masks already removed: with nothing left to hand back, the split
    stays there, over the budget, rather than returning removals that are not there."""
    counts = [[5, 10], [3, 8]]
    errors = [[0.0, 1.0], [0.0, 2.0]]
    assert alloc_mod._refine(counts, errors, [0, 0], 4) == [5, 3]
    assert alloc_mod._refine(counts, errors, [1, 0], 9) == [6, 3]


def test_an_excess_of_one_weight_is_handed_back_too():
    counts = [[0, 4], [0, 4]]
    errors = [[0.0, 1.0], [0.0, 2.0]]
    chosen = split_budget(counts, errors, 7)
    assert [counts[l][k] for l, k in enumerate(chosen)] == [4, 4]  # the grid overshoots by one
    assert alloc_mod._refine(counts, errors, chosen, 7) == [4, 3]  # from the steeper layer


def test_row_minimum_keeps_each_rows_costliest_weights_that_are_still_there():
    """Every output row keeps ``min_kept_per_row`` weights: its costliest ones get an infinite cost. With earlier
    masks, only weights still kept count (a row's costliest weight may be one that is already gone). The allocation
    pins them with RowFloor, given keep-masks inverted to the pruned-before masks RowFloor takes."""
    inf = math.inf
    costs = torch.tensor([[1.0, 5.0, 3.0], [4.0, 2.0, 6.0]], dtype=F64)
    assert RowFloor(0).pin(costs, None).tolist() == costs.tolist()
    assert RowFloor(1).pin(costs, None).tolist() == [[1.0, inf, 3.0], [4.0, 2.0, inf]]
    assert RowFloor(2).pin(costs, None).tolist() == [[1.0, inf, inf], [inf, 2.0, inf]]
    kept = torch.tensor([[True, False, True], [True, True, False]])
    assert RowFloor(1).pin(costs, ~kept).tolist() == [[1.0, 5.0, inf], [inf, 2.0, 6.0]]
    assert RowFloor(5).pin(costs, ~kept).tolist() == [[inf, 5.0, inf], [inf, inf, 6.0]]


@pytest.mark.parametrize("seed", range(3))
def test_final_split_on_convex_curves_is_the_exact_optimum(seed):
    """Convex curves: the exchanges reach the best integer split of the interpolated curves (brute force)."""
    g = torch.Generator().manual_seed(200 + seed)
    for _ in range(25):
        counts, errors, budget = _random_curves(g, convex=True)
        cur = alloc_mod._refine(counts, errors, split_budget(counts, errors, budget), budget)
        best = {0: 0.0}  # every integer split, layer by layer: the least summed error for each total
        for c, e in zip(counts, errors):
            nxt: dict[int, float] = {}
            for t, v in best.items():
                for x in range(c[-1] + 1):
                    nxt[t + x] = min(nxt.get(t + x, math.inf), v + _interp(c, e, x))
            best = nxt
        total = sum(_interp(c, e, x) for c, e, x in zip(counts, errors, cur))
        assert total == pytest.approx(best[budget], rel=64 * torch.finfo(F64).eps, abs=64 * torch.finfo(F64).eps)


# --------------------------------------------------------------------------- small models


class _MLP(nn.Module):
    def __init__(self, sizes: list[int], seed: int, bias_last: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fcs = nn.ModuleList(
            nn.Linear(a, b, bias=(i < len(sizes) - 2) or bias_last)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, fc in enumerate(self.fcs):
            x = fc(x)
            if i < len(self.fcs) - 1:
                x = torch.relu(x)
        return x


def _loader(x: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x), batch_size=128)


def _inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each Linear's input with a ones column when it has a bias (float64), from the dense model."""
    got: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, n=n: got.__setitem__(n, a[0].detach().double()))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    mods = dict(model.named_modules())
    return {
        n: torch.cat([v, torch.ones(v.shape[0], 1, dtype=F64)], 1) if mods[n].bias is not None else v
        for n, v in got.items()
    }


def _targets(rep) -> dict[str, int]:
    return {n: round(r.target_sparsity * math.prod(r.shape)) for n, r in rep.layers.items()}


# --------------------------------------------------------------------------- end to end: curve split vs brute force


def test_error_curve_equals_single_level_solves():
    """The batched sweep over levels gives, level by level, SparseGPT's own error (no refit) over its energy."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(200, 12, generator=g, dtype=F64) @ torch.randn(12, 12, generator=g, dtype=F64)
    X = torch.cat([X, torch.ones(200, 1, dtype=F64)], 1)
    H = X.T @ X / 200
    W = torch.randn(9, 13, generator=g, dtype=F64)
    prior = torch.rand(9, 12, generator=g) > 0.15
    levels = [0.2, 0.4, 0.55, 0.7, 0.85]
    opts = SolverOptions(dtype=F64, refit=False, block_size=5)
    for pm in (None, prior):
        curve = error_curve(W[:, :-1], H, levels, bias=W[:, -1], solver=opts, prior_mask=pm, sample_rows=9)
        energy = output_energy(W[:, :-1], H, bias=W[:, -1])
        c_max = float(curve.max())
        for s, c in zip(levels, curve.tolist()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = solve_layer(W[:, :-1], H, s, "fast", bias=W[:, -1], solver=opts, prior_mask=pm)
            assert c == pytest.approx(res.error / energy, rel=solve_tol(H, 0.01), abs=solve_tol(H, 0.01) * c_max)
    # a row sample: the sampled rows' relative error, same rule
    sub = error_curve(W[:, :-1], H, levels, bias=W[:, -1], solver=opts, sample_rows=3)
    rows = [0, 4, 8]
    e3 = output_energy(W[rows, :-1], H, bias=W[rows, -1])
    for s, c in zip(levels, sub.tolist()):
        res = solve_layer(W[rows, :-1], H, s, "fast", bias=W[rows, -1], solver=opts)
        assert c == pytest.approx(res.error / e3, rel=solve_tol(H), abs=solve_tol(H) * float(sub.max()))


@pytest.mark.parametrize("method", ["fast", "lobs"])
def test_curve_allocation_is_the_best_split_over_the_grid(method, monkeypatch):
    """Brute force: every combination of grid levels, errors from single-level SparseGPT solves.

    The allocator's grid split must be the exhaustive optimum; the final counts (after the
    interpolated refinement) must meet the budget exactly and cost no more, interpolated."""
    seen = []
    real_split = alloc_mod.split_budget

    def spy(counts, errors, budget, *a):
        out = real_split(counts, errors, budget, *a)
        seen.append((counts, errors, budget, out))
        return out

    monkeypatch.setattr(alloc_mod, "split_budget", spy)
    model = _MLP([10, 24, 16, 6], seed=2)
    x = torch.randn(600, 10, generator=torch.Generator().manual_seed(4))
    grid = (0.25, 0.5, 0.75)
    cfg = GlobalAllocation(grid=grid, max_layer_sparsity=0.8, curve_rows=1000)
    acts = _inputs(model, x)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = list(mods)
    counts, errors, tols = [], [], []
    for n in names:
        m = mods[n]
        N = m.weight.numel()
        lv = sorted({0, *(round(g * N) for g in grid), math.floor(0.8 * N + 1e-9)})
        H = acts[n].T @ acts[n] / acts[n].shape[0]
        w, b = m.weight.detach().double(), (None if m.bias is None else m.bias.detach().double())
        e0 = output_energy(w, H, bias=b)
        errs = []
        for c in lv:
            res = solve_layer(w, H, c / N, "fast", bias=b, solver=SolverOptions(dtype=F64, refit=False))
            errs.append(res.error / e0)
        counts.append(lv)
        errors.append(errs)
        tols.append(solve_tol(H))
    checked = 0
    for combo in itertools.product(*[range(len(c)) for c in counts]):
        budget = sum(counts[l][k] for l, k in enumerate(combo))
        total = sum(m.weight.numel() for m in mods.values())
        s = budget / total
        if not (0.3 <= s <= 0.75) or round(s * total) != budget:
            continue
        best = min(
            (sum(errors[l][k] for l, k in enumerate(c2)), c2)
            for c2 in itertools.product(*[range(len(c)) for c in counts])
            if sum(counts[l][k] for l, k in enumerate(c2)) >= budget
        )
        m2 = _MLP([10, 24, 16, 6], seed=2)
        seen.clear()
        rep = prune_model(m2, _loader(x), s, method, allocation=cfg, solver=S64, calibration=C64, prune_head=True)
        ((c_seen, e_seen, b_seen, split),) = seen
        assert b_seen == budget and [list(c) for c in c_seen] == counts
        for l in range(len(names)):  # the measured curves are the single-level solves' errors
            assert e_seen[l] == pytest.approx(errors[l], rel=tols[l], abs=tols[l] * max(errors[l]))
        assert sum(errors[l][k] for l, k in enumerate(split)) == pytest.approx(best[0], rel=1e-12)
        got = _targets(rep)
        assert sum(got.values()) == budget

        def interp(l: int, c: int) -> float:  # the curve, linear between its measured levels
            return float(np.interp(c, counts[l], errors[l]))

        assert sum(interp(l, got[n]) for l, n in enumerate(names)) <= best[0] * (1 + 1e-12)
        checked += 1
        if checked == 5:
            break
    assert checked == 5


def test_exact_and_curve_layers_mix_in_one_model(monkeypatch):
    """``auto`` with a lowered threshold mixes methods: exact layers' trace curves and a fast layer's
    measured curve share one split that removes exactly the budget."""
    import lightning_lobs.engine.plan as plan_mod

    # rows * d^3: fcs.0 = 24 * 11^3 = 31,944, fcs.1 = 16 * 25^3 = 250,000, fcs.2 = 6 * 17^3 = 29,478
    monkeypatch.setattr(plan_mod, "AUTO_EXACT_MAX_COST", 1e5)
    model = _MLP([10, 24, 16, 6], seed=2)
    x = torch.randn(600, 10, generator=torch.Generator().manual_seed(4))
    rep = prune_model(model, _loader(x), 0.6, "auto", solver=S64, prune_head=True)
    assert [rep.layers[n].method for n in ("fcs.0", "fcs.1", "fcs.2")] == ["exact", "fast", "exact"]
    total = sum(math.prod(r.shape) for r in rep.layers.values())
    assert sum(_targets(rep).values()) == round(0.6 * total)
    assert len({round(r.target_sparsity, 3) for r in rep.layers.values()}) == 3


# --------------------------------------------------------------------------- redundancy: one-pass over-prunes


class _Redundant(nn.Module):
    """8 distinct inputs, each repeated 8 times (plus a little noise) into layer ``red``; ``ind`` sees
    independent inputs. Every copy of a repeated input looks free to the one-pass ``L_q``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.red = nn.Linear(64, 32)
        self.ind = nn.Linear(16, 32)
        self.head = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base, other = x[:, :8], x[:, 8:24]
        rep = base.repeat(1, 8) + 1e-3 * x[:, 24:88]
        h = torch.cat([torch.relu(self.red(rep)), torch.relu(self.ind(other))], 1)
        return self.head(h)


def _rel_errors(rep) -> float:
    return sum(r.layer_error for r in rep.layers.values())


@pytest.mark.parametrize("method", ["fast", "lobs"])
def test_one_pass_over_prunes_the_redundant_layer_and_curves_do_not(method):
    x = torch.randn(1024, 88, generator=torch.Generator().manual_seed(8))
    one = prune_model(
        _Redundant(),
        _loader(x),
        0.85,
        method,
        allocation=GlobalAllocation(costs="one-pass"),
        solver=S64,
        prune_head=True,
    )
    cur = prune_model(_Redundant(), _loader(x), 0.85, method, solver=S64, prune_head=True)
    ref = prune_model(
        _Redundant(), _loader(x), 0.85, "exact", solver=S64, prune_head=True
    )  # greedy-trace costs see the copies
    red = {k: r.layers["red"].target_sparsity for k, r in (("one", one), ("cur", cur), ("exact", ref))}
    # one-pass takes nearly the whole redundant layer, well past the exact split; the curves do not
    assert red["one"] > 0.97 and red["one"] > red["exact"] + 0.03, red
    assert red["cur"] <= red["exact"] + 0.005, red
    # and the curve split's layers lose less of their outputs, summed relative to each layer's energy
    model = _Redundant()
    acts = _inputs(model, x[:256])
    mods = dict(model.named_modules())

    def rel(rep) -> float:
        out = 0.0
        for n, r in rep.layers.items():
            A = acts[n]
            H = A.T @ A / A.shape[0]
            out += r.layer_error / output_energy(
                mods[n].weight.detach().double(), H, bias=mods[n].bias.detach().double()
            )
        return out

    assert rel(cur) < rel(one), (rel(cur), rel(one))


# --------------------------------------------------------------------------- normalisation by output energy


class _Scaled(nn.Module):
    """Linear(12, 20) + ReLU + Linear(20, 10, bias=False) + ReLU + Linear(10, 4): scaling the first layer by c and the
    second by 1/c computes the same function (ReLU is positively homogeneous)."""

    def __init__(self, c: float) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.a = nn.Linear(12, 20)
        self.b = nn.Linear(20, 10, bias=False)
        self.c = nn.Linear(10, 4)
        with torch.no_grad():
            self.a.weight.mul_(c)
            self.a.bias.mul_(c)
            self.b.weight.div_(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize(
    "method,costs", [("fast", "curve"), ("lobs", "curve"), ("fast", "one-pass"), ("exact", "curve")]
)
def test_allocation_is_invariant_to_rescaling_between_layers(method, costs, monkeypatch):
    """Relative costs make the split independent of how the output scale is shared between layers;
    without the output-energy normalisation, the 100x larger layer would be spared."""
    x = torch.randn(800, 12, generator=torch.Generator().manual_seed(12))
    cfg = GlobalAllocation(costs=costs)
    base = _targets(prune_model(_Scaled(1.0), _loader(x), 0.5, method, allocation=cfg, solver=S64, prune_head=True))
    big = _targets(prune_model(_Scaled(100.0), _loader(x), 0.5, method, allocation=cfg, solver=S64, prune_head=True))
    assert all(abs(base[n] - big[n]) <= 1 for n in base), (base, big)
    # The same check with the normalisation removed sees a different split: the test can fail.
    if costs == "curve" and method != "exact":
        real = engine_allocate.error_curve

        def absolute(weight, hessian, sparsities, *, bias=None, **kw):
            return real(weight, hessian, sparsities, bias=bias, **kw) * output_energy(
                weight.double(), hessian, bias=None if bias is None else bias.double()
            )

        monkeypatch.setattr(engine_allocate, "error_curve", absolute)
    else:
        monkeypatch.setattr(engine_allocate, "output_energy", lambda *a, **k: 1.0)
    b2 = _targets(prune_model(_Scaled(1.0), _loader(x), 0.5, method, allocation=cfg, solver=S64, prune_head=True))
    g2 = _targets(prune_model(_Scaled(100.0), _loader(x), 0.5, method, allocation=cfg, solver=S64, prune_head=True))
    assert g2["a"] < b2["a"] - 20, (b2, g2)  # unnormalised, the scaled-up layer looks expensive and is spared


# --------------------------------------------------------------------------- floors


class _Lopsided(nn.Module):
    """Only the first input of ``dup`` is ever non-zero, so its other 31 weights per row cost
    nothing to remove (dead inputs) and every row is carried by one weight; rows 8-15 of ``dup``
    are 1000x smaller than rows 0-7, so emptying them costs little of the layer's output energy too."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.dup = nn.Linear(32, 16)
        self.live = nn.Linear(32, 16)
        with torch.no_grad():
            self.dup.weight[8:].mul_(1e-3)
            self.dup.bias[8:].mul_(1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dup(torch.cat([x[:, :1], torch.zeros_like(x[:, 1:])], 1)) + self.live(x)


@pytest.mark.parametrize(
    "method,costs", [("exact", "curve"), ("fast", "curve"), ("lobs", "curve"), ("lobs", "one-pass")]
)
def test_layer_cap_and_no_dead_rows(method, costs):
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(14))
    model = _Lopsided()
    rep = prune_model(
        model,
        _loader(x),
        0.6,
        method,
        allocation=GlobalAllocation(max_layer_sparsity=0.9, costs=costs),
        solver=S64,
        prune_head=True,
    )
    assert rep.layers["dup"].target_sparsity == pytest.approx(0.9, abs=1 / 512)  # it wants more: the cap binds
    for m in (model.dup, model.live):
        assert bool(((m.weight != 0).sum(1) >= 1).all())
    # without the cap it goes down to the last weight of every row, but no further
    model = _Lopsided()
    rep = prune_model(
        model,
        _loader(x),
        0.6,
        method,
        allocation=GlobalAllocation(max_layer_sparsity=1.0, costs=costs),
        solver=S64,
        prune_head=True,
    )
    assert rep.layers["dup"].target_sparsity == pytest.approx(1 - 16 / (16 * 32))
    assert bool(((model.dup.weight != 0).sum(1) == 1).all())


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_dead_rows_only_when_asked(method):
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(14))
    with pytest.raises(ValueError, match="allow_dead_rows"):
        prune_model(_Lopsided(), _loader(x), 0.6, method, solver=SolverOptions(min_kept_per_row=0), prune_head=True)
    model = _Lopsided()
    cfg = GlobalAllocation(max_layer_sparsity=1.0, allow_dead_rows=True)
    rep = prune_model(
        model,
        _loader(x),
        0.75,
        method,
        allocation=cfg,
        solver=SolverOptions(dtype=F64, min_kept_per_row=0),
        prune_head=True,
    )
    assert rep.layers["dup"].sparsity > 1 - 16 / (16 * 32)  # beyond one weight per row
    assert bool(((model.dup.weight != 0).sum(1) == 0).any())


def test_unreachable_sparsity_names_the_options():
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(14))
    with pytest.raises(ValueError, match="max_layer_sparsity=0.7.*min_kept_per_row"):
        prune_model(
            _Lopsided(), _loader(x), 0.8, "fast", allocation=GlobalAllocation(max_layer_sparsity=0.7), prune_head=True
        )


def test_sequential_curves_come_from_the_dense_network():
    x = torch.randn(600, 10, generator=torch.Generator().manual_seed(4))
    plain = prune_model(_MLP([10, 24, 16, 6], seed=2), _loader(x), 0.6, "fast", solver=S64, prune_head=True)
    seq = prune_model(
        _MLP([10, 24, 16, 6], seed=2), _loader(x), 0.6, "fast", solver=S64, sequential=True, prune_head=True
    )
    assert _targets(seq) == _targets(plain)
    assert len(set(_targets(plain).values())) > 1


@pytest.mark.parametrize("method", ["fast", "lobs", "exact"])
def test_second_step_keeps_earlier_masks_and_meets_the_budget(method):
    """Iterative pruning: the curves start at each layer's earlier removals, which stay removed."""
    x = torch.randn(600, 10, generator=torch.Generator().manual_seed(4))
    model = _MLP([10, 24, 16, 6], seed=2)
    masks = MaskSet()
    first = prune_model(model, _loader(x), 0.5, method, masks=masks, solver=S64, prune_head=True)
    zero1 = {n: (m.weight == 0).clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    second = prune_model(model, _loader(x), 0.8, method, masks=masks, solver=S64, prune_head=True)
    total = sum(z.numel() for z in zero1.values())
    assert sum(_targets(second).values()) == round(0.8 * total)
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert bool(((m.weight == 0) | ~zero1[n]).all()), n  # every earlier zero is still zero
            assert second.layers[n].target_sparsity >= first.layers[n].target_sparsity
            assert bool(((m.weight != 0).sum(1) >= 1).all())


# --------------------------------------------------------------------------- allocate_global: pooled per-weight costs


def test_allocate_global_is_the_cheapest_pooled_set():
    g = torch.Generator().manual_seed(67)
    costs = {
        "a": torch.rand(4, 5, generator=g),
        "b": torch.rand(3, 2, generator=g) * 0.3,
        "c": torch.rand(10, generator=g) * 3,
    }
    N = sum(c.numel() for c in costs.values())
    for s in (0.0, 0.2, 0.5, 0.77, 0.9):
        got = allocate_global(costs, s)
        k = round(s * N)
        # brute force: every layer keeps its most expensive weight; the k cheapest of the rest go
        pool = sorted((float(v), n) for n, c in costs.items() for v in c.reshape(-1).sort().values[:-1])
        for n, c in costs.items():
            expect = sum(1 for _, m in pool[:k] if m == n)
            assert round(got[n] * c.numel()) == expect, (s, n)
        assert sum(round(got[n] * c.numel()) for n, c in costs.items()) == k


def test_allocate_global_forced_first_and_never_a_whole_layer():
    costs = {"a": torch.zeros(2, 3), "b": torch.ones(4, 4)}
    got = allocate_global(costs, 0.4)  # 9 of 22: a would lose all 6, keeps 1; b takes the rest
    assert round(got["a"] * 6) == 5 and round(got["b"] * 16) == 4
    keep_b = torch.ones(4, 4, dtype=torch.bool)
    keep_b[0] = False  # 4 already pruned in b
    got = allocate_global(costs, 0.3, {"b": keep_b})
    assert round(got["b"] * 16) >= 4 and round(got["a"] * 6) + round(got["b"] * 16) == round(0.3 * 22)
    with pytest.raises(ValueError, match="sparsity"):
        allocate_global(costs, 1.0)
    with pytest.raises(ValueError, match="costs"):
        allocate_global({"a": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(ValueError, match="empty"):
        allocate_global({}, 0.5)


def test_allocate_global_old_path_warns_naming_the_new_one():
    import lightning_lobs.solvers as solvers

    with pytest.warns(DeprecationWarning, match="lightning_lobs.allocation.allocate_global"):
        old = solvers.allocate_global
    assert old is allocate_global
