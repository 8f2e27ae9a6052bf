"""Shared data and independent float64 references of the solver tests (tests/test_solvers*.py).

Every reference here is written independently of the solver code: least-squares fits go
through ``torch.linalg.lstsq`` on the calibration inputs ``X~`` themselves, and
``lobs``/``fast`` are re-implemented as plain Python loops from the algorithm descriptions.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lightning_lobs.solvers import SolverOptions, solve_layer

F64 = torch.float64
#: The references below implement the algorithms without the per-row minimum (tested on its own in test_solvers_core.py).
OPT64 = SolverOptions(damp=0.0, dtype=F64, min_kept_per_row=0)
#: The literal lobs / SparseGPT algorithms, without the final least-squares refit of the kept weights.
LIT64 = replace(OPT64, refit=False)
EPS = torch.finfo(F64).eps
#: Safety factor on the forward-error estimate cond(H) * eps * D (see :func:`solve_tol`): the results
#: compared below go through a few chained factorisations and updates, each adding its own rounding.
TOL_FACTOR = 100.0


# --------------------------------------------------------------------------- data helpers


def make_inputs(
    n: int,
    d: int,
    *,
    seed: int,
    bias: bool = False,
    kind: str = "iid",
    dead: tuple[int, ...] = (),
) -> torch.Tensor:
    """Calibration inputs X~ (n, d [+1]) in float64; a trailing ones column when ``bias``.

    kind: "iid" (standard normal), "corr" (X = Z @ A plus a mean offset: correlated,
    non-centred inputs) or "pm1" (+-1 entries, so that H has exactly representable values).
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "iid":
        X = torch.randn(n, d, generator=g, dtype=F64)
    elif kind == "corr":
        Z = torch.randn(n, d, generator=g, dtype=F64)
        A = torch.randn(d, d, generator=g, dtype=F64) + 1.5 * torch.ones(d, d, dtype=F64)
        X = Z @ A + torch.randn(d, generator=g, dtype=F64)
    elif kind == "pm1":
        X = torch.randint(0, 2, (n, d), generator=g).to(F64) * 2 - 1
    else:  # pragma: no cover - test helper misuse
        raise AssertionError(kind)
    if dead:
        X[:, list(dead)] = 0.0
    if bias:
        X = torch.cat([X, torch.ones(n, 1, dtype=F64)], dim=1)
    return X


def hess(X: torch.Tensor) -> torch.Tensor:
    return X.T @ X / X.shape[0]


def make_weight(rows: int, D: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(rows, D, generator=g, dtype=F64)


def run(
    Wt: torch.Tensor,
    H: torch.Tensor,
    sparsity=None,
    method: str = "exact",
    *,
    bias: bool = False,
    pattern=None,
    options: SolverOptions = OPT64,
):
    """solve_layer on an augmented weight [W | b]; returns (result, augmented W^, augmented mask)."""
    if bias:
        res = solve_layer(
            Wt[:, :-1],
            H,
            sparsity,
            method,
            bias=Wt[:, -1],
            pattern=pattern,
            solver=options,
        )
        full = torch.cat([res.weight, res.bias.unsqueeze(1)], dim=1)
        mask = torch.cat([res.mask, torch.ones(Wt.shape[0], 1, dtype=torch.bool)], dim=1)
    else:
        res = solve_layer(Wt, H, sparsity, method, pattern=pattern, solver=options)
        full, mask = res.weight, res.mask
    return res, full, mask


def ls_fit(Wt: torch.Tensor, X: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise argmin ||(w^ - w) X~^T||^2 with w^ = 0 off the mask, via lstsq on the kept columns."""
    out = torch.zeros_like(Wt)
    for r in range(Wt.shape[0]):
        K = mask[r].nonzero().flatten()
        if K.numel() == 0:
            continue
        y = X @ Wt[r]
        out[r, K] = torch.linalg.lstsq(X[:, K], y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return out


def ls_err(Wt: torch.Tensor, What: torch.Tensor, X: torch.Tensor) -> float:
    """1/(2n) ||(W^ - W) X~^T||_F^2."""
    return float(((What - Wt) @ X.T).pow(2).sum() / (2 * X.shape[0]))


def subset_cost(Wt_row: torch.Tensor, X: torch.Tensor, pruned: frozenset) -> float:
    """Smallest 1/(2n)||(w^ - w) X~^T||^2 over w^ with w^_q = 0 for q in ``pruned``."""
    D = X.shape[1]
    K = [c for c in range(D) if c not in pruned]
    y = X @ Wt_row
    if not K:
        return float(y.pow(2).sum() / (2 * X.shape[0]))
    sol = torch.linalg.lstsq(X[:, K], y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return float((X[:, K] @ sol - y).pow(2).sum() / (2 * X.shape[0]))


def condition(H: torch.Tensor, damp: float = 0.0) -> float:
    """Largest 2-norm condition number over the groups of H as the solvers see it: dead inputs'
    zero diagonals set to 1 and ``damp * mean(diag)`` added (:func:`damped_hessian`'s rule)."""
    out = 1.0
    for h in H.reshape(-1, H.shape[-1], H.shape[-1]).double():
        h = h.clone()
        diag = torch.diagonal(h)
        diag[diag <= 0] = 1.0
        diag += damp * diag.mean()
        ev = torch.linalg.eigvalsh(h)
        out = max(out, float(ev[-1] / ev[0]))
    return out


def solve_tol(H: torch.Tensor, damp: float = 0.0) -> float:
    """Relative tolerance for two float64 routes to the same solve with H.

    A backward-stable solve has relative forward error about cond(H) * eps * D (Higham, ch. 7);
    how close two routes land depends on the BLAS build and thread count, so bare tolerances
    such as 1e-10 fail on some machines while this one follows the problem.
    """
    return TOL_FACTOR * condition(H, damp) * EPS * H.shape[-1]


def assert_close(a, b, H=None, *, damp=0.0, scale=None, rtol=None, atol=None, msg=""):
    """``a == b`` to a tolerance derived from H (relative ``solve_tol(H)``, absolute that times
    ``scale``: by default the largest magnitude compared; give the inputs' magnitude where the
    expected value is 0), or to explicit ``rtol``/``atol`` (float32 results, exact identities)."""
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    if rtol is None or atol is None:
        if H is None:
            raise TypeError("assert_close needs H (a tolerance derived from the problem) or explicit rtol and atol")
        r = solve_tol(H, damp)
        if scale is None:
            scale = max(
                float(a.abs().max()) if a.numel() else 0.0,
                float(b.abs().max()) if b.numel() else 0.0,
            )
        rtol = r if rtol is None else rtol
        atol = r * scale if atol is None else atol
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=msg or None)


def pruned_count(mask: torch.Tensor) -> int:
    return int((~mask).sum())


# --------------------------------------------------------------------------- independent references


def ref_damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I (no dead inputs in the data this is used with)."""
    return H + damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)


def lobs_reference(Wt, H, k=None, frozen=0, damp=0.0, pattern=None):
    """The L-OBS rule as written in the module docstring, one weight at a time.

    H may be (D, D) or (groups, D, D) (rows split into contiguous groups).
    """
    rows, D = Wt.shape
    Hs = H if H.dim() == 3 else H.unsqueeze(0)
    per = rows // Hs.shape[0]
    Hinvs = [torch.linalg.inv(ref_damped(h, damp)) for h in Hs]
    dp = D - frozen
    L = {}
    for r in range(rows):
        Hinv = Hinvs[r // per]
        for q in range(dp):
            L[(r, q)] = float(Wt[r, q] ** 2 / (2 * Hinv[q, q]))
    if pattern is None:
        chosen = sorted(L, key=L.get)[:k]
    else:
        n, m = pattern
        chosen = []
        for r in range(rows):
            for g0 in range(0, dp, m):
                grp = sorted(range(g0, g0 + m), key=lambda q: L[(r, q)])
                chosen += [(r, q) for q in grp[: m - n]]
    W = Wt.clone()
    for r, q in sorted(chosen, key=L.get):  # ascending L_q, layer-wide
        Hinv = Hinvs[r // per]
        W[r] -= (W[r, q] / Hinv[q, q]) * Hinv[q]
    mask = torch.ones(rows, D, dtype=torch.bool)
    for r, q in chosen:
        mask[r, q] = False
    return W * mask, mask


def fast_update_reference(Wt, H, mask, damp=0.0):
    """SparseGPT's column-by-column update for a given mask, no blocking, plain loops."""
    rows, D = Wt.shape
    U = torch.linalg.cholesky(torch.linalg.inv(ref_damped(H, damp)), upper=True)
    W = Wt.clone()
    for i in range(D):
        for r in range(rows):
            if not mask[r, i]:
                err = W[r, i] / U[i, i]
                W[r, i:] -= err * U[i, i:]
    return W * mask


def fast_reference(Wt, H, sparsity, block, frozen=0, damp=0.0, pattern=None):
    """SparseGPT including its mask choice: unstructured masks are chosen per column block
    from the current (already compensated) weights by w^2 / U_ii^2, with the cumulative
    layer-wide quota round(s * rows * columns_so_far); N:M masks per group of M columns
    when the group's first column is reached. Updates are applied immediately (no lazy
    batching)."""
    rows, D = Wt.shape
    dp = D - frozen
    U = torch.linalg.cholesky(torch.linalg.inv(ref_damped(H, damp)), upper=True)
    W = Wt.clone()
    mask = torch.ones(rows, D, dtype=torch.bool)

    def quota(cols):
        return int(round(sparsity * rows * min(cols, dp)))

    for i1 in range(0, D, block):
        i2 = min(i1 + block, D)
        if pattern is None and min(i2, dp) > i1:
            cand = [(float(W[r, c] ** 2 / U[c, c] ** 2), r, c) for r in range(rows) for c in range(i1, min(i2, dp))]
            for _, r, c in sorted(cand)[: quota(i2) - quota(i1)]:
                mask[r, c] = False
        for i in range(i1, i2):
            if pattern is not None and i < dp and i % pattern[1] == 0:
                n, m = pattern
                for r in range(rows):
                    grp = sorted(
                        range(i, i + m),
                        key=lambda c: float(W[r, c] ** 2 / U[c, c] ** 2),
                    )
                    for c in grp[: m - n]:
                        mask[r, c] = False
            for r in range(rows):
                if not mask[r, i]:
                    err = W[r, i] / U[i, i]
                    W[r, i:] -= err * U[i, i:]
    return W * mask, mask


def grouped_data(groups, per, d, seed, bias):
    """Inputs of ``groups`` Hessian groups (alternately correlated and iid), their ``(groups, D, D)`` H, a weight."""
    Xs = [make_inputs(40, d, seed=seed + g, bias=bias, kind="corr" if g % 2 else "iid") for g in range(groups)]
    H3 = torch.stack([hess(X) for X in Xs])
    Wt = make_weight(groups * per, Xs[0].shape[1], seed)
    return Xs, H3, Wt
