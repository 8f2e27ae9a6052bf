"""Baseline pruning rules the L-OBS paper compares against, as small pure tensor functions.

Not part of the library: ``benchmarks/paper_mnist.py`` and the deep examples run them, ``tests/test_baselines.py``
checks them.
Only ``torch`` is needed. Conventions, shared with ``lightning_lobs.solvers``:

* a layer is a weight matrix ``W`` of shape ``(rows, d)`` (a conv weight flattened to ``(out, in * k * k)``),
  optionally with trailing *free* columns (a bias appended as the last column) that are never pruned;
* its Hessian is ``H = (1/n) sum_x x~ x~^T`` over the layer's (bias-augmented) inputs, ``(d, d)``;
* the layer-wise objective of L-OBS is ``dE(V) = 1/2 sum_rows (v - w) H (v - w)^T``
  (:func:`layer_objective`), half the mean squared change of the layer's output;
* a mask is a bool tensor of ``W``'s shape, True = kept; ``sparsity`` is the fraction of the prunable
  (non-free) entries removed, and every function keeps exactly ``round((1 - sparsity) * prunable)`` of them
  (per row for ``group="row"``).

Rules:

* magnitude (LWC's pruning step, Han et al. 2015; Lightning ``ModelPruning("l1_unstructured")``): ``|w|``.
* OBD (LeCun et al. 1990) on the layer-wise objective: saliency ``w_q^2 H_qq / 2``, the OBS cost
  ``L_q = w_q^2 / (2 [H^-1]_qq)`` with H replaced by its diagonal; no compensation of the kept weights.
  Note that its ranking equals Wanda's when both compare over the whole layer (the score is Wanda's squared
  over 2), so the two differ only by Wanda's per-row comparison group.
* Wanda (Sun et al. 2023): ``|w_ij| * ||X_j||_2``; with ``H = X X^T / n``, ``||X_j|| = sqrt(n H_jj)``, so
  ``|w_ij| sqrt(H_jj)`` ranks the same. Compared per output row by default, as in the paper.
* IHT's projection (Jin et al. 2016, :func:`hard_threshold`): keep the ``k`` largest ``|w|``; the
  retraining rounds between projections (mask free) live in the benchmark script.
* a plain SparseGPT sweep (Frantar & Alistarh 2023, :func:`sparsegpt_sweep`): the algorithm of the paper's
  Algorithm 1 as its reference implementation runs it (dead inputs zeroed, 1% damping, the upper Cholesky factor
  of ``H^-1``, each block of ``blocksize`` columns choosing its mask over the whole block at the layer's sparsity,
  or per N:M group as it reaches it, column-by-column error feedback inside the block, one matmul for the columns
  after it). No protected minimum per row, no refit: the reference against which the library's ``fast`` is timed.
* layer-wise IHT on the L-OBS objective (:func:`layerwise_iht`): projected gradient descent
  ``V <- P_k(V - (V - W) H / L)``, ``L = lambda_max(H)``, from ``P_k(W)`` (magnitude); with step ``1/L``
  every iterate's objective is at most the previous one's (the projection minimises the quadratic upper
  bound over k-sparse matrices, and the previous iterate is one of them), so it never ends worse than
  magnitude pruning at the same ``k``. Optionally the kept weights are then refitted to the least-squares
  optimum on the final support (:func:`refit_on_support`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Group = Literal["layer", "row"]

__all__ = [
    "IHTResult",
    "hard_threshold",
    "iterative_schedule",
    "keep_count",
    "layer_objective",
    "layerwise_iht",
    "magnitude_masks",
    "mask_from_scores",
    "nm_mask_from_scores",
    "obd_saliency",
    "refit_on_support",
    "sparsegpt_sweep",
    "wanda_scores",
]


def keep_count(n: int, sparsity: float) -> int:
    """How many of ``n`` prunable entries ``sparsity`` keeps: ``round((1 - sparsity) * n)``, at least 1."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}.")
    return max(1, min(n, int(round((1.0 - sparsity) * n))))


def mask_from_scores(scores: Tensor, sparsity: float, group: Group = "layer", free_cols: int = 0) -> Tensor:
    """Keep-mask of the highest ``scores`` of a ``(rows, d)`` matrix.

    ``group="layer"`` keeps ``keep_count(rows * (d - free_cols), sparsity)`` entries layer-wide, ``"row"`` keeps
    ``keep_count(d - free_cols, sparsity)`` in every row. The ``free_cols`` trailing columns are always kept.
    Ties are broken by ``torch.topk`` (deterministic on CPU).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (rows, d), got shape {tuple(scores.shape)}.")
    rows, d = scores.shape
    dp = d - free_cols
    if dp < 1:
        raise ValueError(f"no prunable columns: d={d}, free_cols={free_cols}.")
    mask = torch.ones(rows, d, dtype=torch.bool, device=scores.device)
    sub = scores[:, :dp].double()
    keep = torch.zeros(rows, dp, dtype=torch.bool, device=scores.device)
    if group == "layer":
        k = keep_count(rows * dp, sparsity)
        flat = keep.view(-1)
        flat[sub.reshape(-1).topk(k).indices] = True
    elif group == "row":
        k = keep_count(dp, sparsity)
        keep.scatter_(1, sub.topk(k, dim=1).indices, True)
    else:
        raise ValueError(f"group must be 'layer' or 'row', got {group!r}.")
    mask[:, :dp] = keep
    return mask


def nm_mask_from_scores(scores: Tensor, n: int, m: int, free_cols: int = 0) -> Tensor:
    """N:M keep-mask of a ``(rows, d)`` score matrix: in every group of ``m`` consecutive prunable columns of a row,
    the ``n`` highest scores are kept (ties by ``torch.topk``); the ``free_cols`` trailing columns are always kept.

    The prunable width ``d - free_cols`` must be a multiple of ``m``. Magnitude 2:4 is ``|W|`` as scores, Wanda 2:4
    is :func:`wanda_scores` (its paper's N:M rule); a conv's columns must first be ordered so that groups run along
    input channels (the library's convention), which is the caller's reshaping.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (rows, d), got shape {tuple(scores.shape)}.")
    if not 0 < n < m:
        raise ValueError(f"need 0 < n < m, got {n}:{m}.")
    rows, d = scores.shape
    dp = d - free_cols
    if dp < m or dp % m:
        raise ValueError(f"{dp} prunable columns are not a positive multiple of m={m}.")
    grouped = scores[:, :dp].double().reshape(rows, dp // m, m)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(2, grouped.topk(n, dim=2).indices, True)
    mask = torch.ones(rows, d, dtype=torch.bool, device=scores.device)
    mask[:, :dp] = keep.reshape(rows, dp)
    return mask


def magnitude_masks(
    weights: Mapping[str, Tensor], sparsity: float | Mapping[str, float], scope: Literal["layer", "global"] = "layer"
) -> dict[str, Tensor]:
    """Magnitude keep-masks for several layers (weights only, any shape).

    ``scope="layer"``: every layer keeps its own top ``1 - sparsity[name]`` by ``|w|`` (a float applies to all).
    ``scope="global"``: one threshold over all layers, ``keep_count(total, sparsity)`` kept in all (needs a float).
    """
    if scope == "global":
        if not isinstance(sparsity, (int, float)):
            raise ValueError("scope='global' needs one float sparsity.")
        flat = torch.cat([w.detach().abs().reshape(-1).double() for w in weights.values()])
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[flat.topk(keep_count(flat.numel(), float(sparsity))).indices] = True
        out, offset = {}, 0
        for name, w in weights.items():
            out[name] = keep[offset : offset + w.numel()].view(w.shape).to(w.device)
            offset += w.numel()
        return out
    if scope != "layer":
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
    out = {}
    for name, w in weights.items():
        s = float(sparsity) if isinstance(sparsity, (int, float)) else float(sparsity[name])
        out[name] = mask_from_scores(w.detach().abs().reshape(w.shape[0], -1), s, "layer").view(w.shape)
    return out


def _check(weight: Tensor, hessian: Tensor) -> None:
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"need W (rows, d) and H (d, d); got {tuple(weight.shape)} and {tuple(hessian.shape)}.")


def obd_saliency(weight: Tensor, hessian: Tensor) -> Tensor:
    """OBD's saliency on the layer-wise objective: ``w_q^2 H_qq / 2`` (float64, ``weight``'s shape)."""
    _check(weight, hessian)
    return 0.5 * weight.double() ** 2 * torch.diagonal(hessian.double()).unsqueeze(0)


def wanda_scores(weight: Tensor, hessian: Tensor) -> Tensor:
    """Wanda's score ``|w_ij| * ||X_j||_2 / sqrt(n) = |w_ij| sqrt(H_jj)`` (float64, ``weight``'s shape)."""
    _check(weight, hessian)
    return weight.double().abs() * torch.diagonal(hessian.double()).clamp_min(0).sqrt().unsqueeze(0)


def hard_threshold(weight: Tensor, sparsity: float, group: Group = "layer", free_cols: int = 0) -> Tensor:
    """IHT's projection onto k-sparse matrices: zero all but the largest ``|w|`` (free columns untouched)."""
    return weight * mask_from_scores(weight.abs(), sparsity, group, free_cols).to(weight.dtype)


def layer_objective(weight: Tensor, new_weight: Tensor, hessian: Tensor) -> float:
    """``1/2 sum_rows (v - w) H (v - w)^T`` in float64 (L-OBS's ``dE``)."""
    _check(weight, hessian)
    delta = new_weight.double() - weight.double()
    return 0.5 * float(((delta @ hessian.double()) * delta).sum())


def refit_on_support(weight: Tensor, hessian: Tensor, mask: Tensor, damp: float = 0.0) -> Tensor:
    """Least-squares optimum of the kept weights for a fixed mask: per row, ``H_KK v_K = (H w)_K``, ``v = 0`` off K.

    ``damp`` adds ``damp * mean(diag H)`` to the diagonal of every ``H_KK`` (0: exact for positive definite H).
    Returns float64.
    """
    _check(weight, hessian)
    H = hessian.double()
    W = weight.double()
    HW = W @ H  # rows of (H w)^T, H symmetric
    out = torch.zeros_like(W)
    extra = damp * float(torch.diagonal(H).mean())
    for r in range(W.shape[0]):
        keep = torch.nonzero(mask[r]).flatten()
        if keep.numel() == 0:
            continue
        A = H[keep][:, keep] + extra * torch.eye(keep.numel(), dtype=H.dtype)
        out[r, keep] = torch.linalg.solve(A, HW[r, keep])
    return out


@dataclass
class IHTResult:
    """Output of :func:`layerwise_iht`: float64 weight, keep-mask, and the objective after every iterate."""

    weight: Tensor
    mask: Tensor
    history: list[float] = field(default_factory=list)
    refitted: bool = False  # whether the least-squares refit on the support was applied


def layerwise_iht(  # nine parameters: the problem (3) and the solver's keyword-only knobs, as in the paper
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    *,
    iters: int = 200,
    group: Group = "layer",
    free_cols: int = 0,
    refit: bool = False,
    refit_damp: float = 0.0,
    tol: float = 0.0,
) -> IHTResult:
    """Projected gradient (IHT) on L-OBS's layer objective under a k-sparsity constraint.

    Minimises ``dE(V) = 1/2 tr((V - W) H (V - W)^T)`` over ``V`` with ``k`` nonzero prunable entries
    (layer-wide or per row, see :func:`mask_from_scores`), free columns unconstrained: ``V0 = P_k(W)``,
    ``V <- P_k(V - (V - W) H / L)`` with ``L = lambda_max(H)``. The objective is non-increasing, so the result
    is never worse than magnitude pruning ``P_k(W)``. Stops after ``iters`` steps, or when an iterate lowers
    the objective by at most ``tol`` times its value and keeps the support. With ``refit`` the kept weights
    are then set to the least-squares optimum on the final support (which can only lower ``dE``); ``refit_damp``
    is :func:`refit_on_support`'s damping, needed when H is singular (inputs that are always 0, such as MNIST's
    border pixels); a damped refit is optimal for the damped H only, so it is kept only if it lowers ``dE``
    (``refitted`` says whether it was).

    Returns:
        :class:`IHTResult`; ``history[0]`` is magnitude pruning's objective, ``history[-1]`` the final one
        (after the refit when ``refit``).
    """
    _check(weight, hessian)
    W = weight.double()
    H = hessian.double()
    lipschitz = float(torch.linalg.eigvalsh(H)[-1])
    if not lipschitz > 0:
        raise ValueError("H has no positive eigenvalue: the layer saw no input.")
    step = 1.0 / lipschitz

    def project(V: Tensor) -> tuple[Tensor, Tensor]:
        mask = mask_from_scores(V.abs(), sparsity, group, free_cols)
        return V * mask, mask

    V, mask = project(W)
    history = [layer_objective(W, V, H)]
    for _ in range(iters):
        V_new, mask_new = project(V - step * ((V - W) @ H))
        f_new = layer_objective(W, V_new, H)
        converged = bool(torch.equal(mask_new, mask)) and history[-1] - f_new <= tol * history[-1]
        V, mask = V_new, mask_new
        history.append(f_new)
        if converged:
            break
    refitted = False
    if refit:
        V_fit = refit_on_support(W, H, mask, damp=refit_damp)
        f_fit = layer_objective(W, V_fit, H)
        # A damped refit is optimal for the damped H only; keep it only where it helps the real objective.
        if f_fit <= history[-1]:
            V, refitted = V_fit, True
        history.append(min(f_fit, history[-1]))
    return IHTResult(weight=V, mask=mask, history=history, refitted=refitted)


def iterative_schedule(target: float, rounds: int) -> list[float]:
    """Sparsities of ``rounds`` pruning rounds reaching ``target``, the kept fraction falling geometrically.

    Round ``i`` (1-based) keeps ``(1 - target) ** (i / rounds)``: e.g. 0.93 in 3 rounds -> 0.588, 0.830, 0.93.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target must be in [0, 1), got {target!r}.")
    out = [1.0 - (1.0 - target) ** (i / rounds) for i in range(1, rounds + 1)]
    out[-1] = target  # exact, whatever the rounding of the power
    return out


def sparsegpt_sweep(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float = 0.0,
    *,
    nm: tuple[int, int] = (0, 0),
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """One SparseGPT sweep over ``weight`` ``(rows, d)`` with ``hessian`` ``(d, d)`` (no bias column).

    Unstructured at ``sparsity`` when ``nm == (0, 0)``, else ``n`` of every ``m`` consecutive inputs kept.
    Works in ``weight``'s dtype. Returns ``(pruned weight, keep-mask)``.
    """
    _check(weight, hessian)
    n, m = nm
    W = weight.clone()
    H = hessian.to(W.dtype).clone()
    d = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, d, blocksize):
        i2 = min(i1 + blocksize, d)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        drop1 = torch.zeros_like(W1, dtype=torch.bool)
        if m == 0:
            scores = W1.square() / U1.diagonal().square()
            k = int(scores.numel() * sparsity)
            if k > 0:
                drop1.view(-1)[scores.view(-1).topk(k, largest=False).indices] = True
        for i in range(i2 - i1):
            if m and i % m == 0:
                scores = W1[:, i : i + m].square() / U1.diagonal()[i : i + m].square()
                drop1[:, i : i + m].scatter_(1, scores.topk(m - n, dim=1, largest=False).indices, True)
            w = W1[:, i]
            err = torch.where(drop1[:, i], w, torch.zeros_like(w)) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W1.masked_fill_(drop1, 0.0)
        W[:, i1:i2] = W1
        keep[:, i1:i2] = ~drop1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W, keep
