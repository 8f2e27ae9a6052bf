"""Spreading one overall sparsity over the layers (global allocation).

The pruner calls :func:`allocate_layers` once, before the solves: every layer's removal
costs, relative to its output energy, are pooled and each layer's target sparsity is set
so that the requested fraction of all selected weights goes where the pooled costs are
smallest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .distributed import RankInfo, broadcast_tensors, fail_together
from .hessian import has_bias
from .masks import MaskSet
from .solvers import GreedyTrace, SolverOptions, allocate_global, greedy_trace, obs_scores, output_energy

if TYPE_CHECKING:  # the pruner imports this module
    from .pruner import _Layer

__all__ = ["allocate_layers"]


def _layer_costs(layer: "_Layer", hessian: Tensor, solver: SolverOptions, prior: Optional[Tensor]) -> Tuple[Tensor, Optional[GreedyTrace]]:
    """Per-weight removal costs of a layer relative to its output energy (and the greedy trace, for ``exact``).

    ``exact`` layers use their greedy OBS sequence (each removal's loss given the earlier ones),
    which sees through redundant inputs; ``lobs``/``fast`` layers the one-pass ``L_q`` (cheaper,
    but it counts every copy of a duplicated input as free).
    """
    W = layer.dense.to(torch.float64)
    bias_col = has_bias(layer.module)
    weight, bias = (W[:, :-1], W[:, -1]) if bias_col else (W, None)
    H = hessian.to(W.device)
    energy = output_energy(weight, H, bias=bias)
    trace = None
    if layer.method == "exact":
        w = weight.to(solver.dtype)
        trace = greedy_trace(w, H, bias=None if bias is None else bias.to(solver.dtype), options=solver, prior_mask=prior)
        scores = trace.removal_costs()
    else:
        scores = obs_scores(weight, H, bias=bias, options=solver)
    scores = scores.reshape(weight.shape[0], -1)
    if not energy > 0:  # an all-zero layer: nothing to lose, nothing to compare against
        return torch.zeros_like(scores), trace
    return scores / energy, trace


def allocate_layers(
    layers: Mapping[str, "_Layer"],
    order: Sequence[str],
    sparsity: float,
    hessian_of: Callable[[str], Tensor],
    solver: SolverOptions,
    masks: MaskSet,
    owners: Mapping[str, int],
    rank: RankInfo,
    device: torch.device,
    keep_traces: bool,
) -> None:
    """Set every layer's target from the pooled relative removal costs (in place).

    Each rank computes the costs of the layers it owns (keeping ``exact`` traces for their
    solves when ``keep_traces``); the costs are then broadcast so every rank allocates alike.
    ``hessian_of`` may run a collective (sequential calibration): every rank calls it per layer.
    """
    costs: Dict[str, Tensor] = {}
    for n in order:
        layer = layers[n]
        H = hessian_of(n)
        with fail_together(rank, device, f"the removal costs of layer '{n}'"):
            if owners[n] == rank.rank:
                prior = masks.get(n)
                prior2 = None if prior is None else prior.reshape(layer.dense.shape[0], -1).to(layer.dense.device)
                costs[n], trace = _layer_costs(layer, H, solver, prior2)
                if keep_traces:
                    layer.trace = trace
            else:
                costs[n] = torch.zeros(layer.dense.shape[0], layer.module.weight[0].numel(), dtype=torch.float64)
    if rank.active:
        for n in order:
            costs[n] = broadcast_tensors([costs[n].to(device)], owners[n], rank)[0].cpu()
    prior_masks = {n: masks.get(n).reshape(costs[n].shape) for n in order if masks.get(n) is not None}
    targets = allocate_global({n: costs[n] for n in order}, sparsity, prior_masks or None)
    for n in order:
        layers[n].target = targets[n]
