"""Re-estimating BatchNorm running statistics after pruning.

Pruning shifts the distribution of every later layer's input, so the running means and
variances learned on the dense network no longer match; the L-OBS paper's code
re-estimated them on training batches, and so do we (``recalibrate_bn=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_modules(model: nn.Module) -> list[_BatchNorm]:
    """BatchNorm modules of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every BatchNorm buffer (running mean/var, batch count), by qualified name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            for key, buf in m.named_buffers(recurse=False):
                if buf is not None:
                    out[f"{name}.{key}"] = buf.detach().clone()
    return out


def load_batchnorm_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Write buffers saved by :func:`batchnorm_state` back in place."""
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for key, value in state.items():
            buffers[key].copy_(value)


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], run: Callable[[Any], Any]) -> int:
    """Reset and re-estimate BatchNorm running statistics as exact averages over ``batches``.

    Only BatchNorm modules are put in train mode (dropout and the rest stay in eval), no
    gradients are computed, and modes and momenta are restored afterwards. ``run(batch)``
    performs one forward pass. A BatchNorm that the passes never call (an unused branch)
    keeps its statistics. Returns the number of BatchNorm modules updated. A batch that gives a
    BatchNorm one value per channel is refused with a ``ValueError`` naming it; an exception
    raised by ``run`` (the user's code) propagates unchanged.
    """
    bns = batchnorm_modules(model)
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    saved = {bn: {k: b.detach().clone() for k, b in bn.named_buffers(recurse=False) if b is not None} for bn in bns}
    calls = {bn: 0 for bn in bns}
    names = {m: n for n, m in model.named_modules()}

    def count(mod: _BatchNorm, args: tuple) -> None:
        calls[mod] += 1
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.numel() == x.shape[1]:
            # torch's own error would not say which BatchNorm, or that the re-estimation is what needs more samples
            raise ValueError(
                f"BatchNorm re-estimation after pruning (recalibrate_bn=True): '{names.get(mod, '?')}' got one value "
                f"per channel (input shape {tuple(x.shape)}), and a BatchNorm in training mode needs more. Use "
                "calibration batches of more than one sample, or pass recalibrate_bn=False to keep the dense "
                "statistics."
            )

    handles = [bn.register_forward_pre_hook(count) for bn in bns]
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: every batch weighs the same
            bn.train()
        with torch.no_grad():
            for batch in batches:
                run(batch)
    finally:
        for h in handles:
            h.remove()
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    with torch.no_grad():
        for bn in bns:
            if calls[bn] == 0:  # reset above but never re-estimated: put its statistics back
                for k, value in saved[bn].items():
                    getattr(bn, k).copy_(value)
    return sum(1 for bn in bns if calls[bn])
