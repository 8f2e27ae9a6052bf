"""Helpers shared by the test modules (not a test module)."""

from __future__ import annotations

import torch
from torch import nn


def hook_counts(model: nn.Module) -> dict:
    """Hooks still registered: ``{module name: count}`` (all forward/backward kinds) and ``{param name: count}``."""
    out = {}
    for name, m in model.named_modules():
        n = (
            len(m._forward_pre_hooks)
            + len(m._forward_hooks)
            + len(m._backward_hooks)
            + len(getattr(m, "_backward_pre_hooks", {}))
            + len(getattr(m, "_forward_pre_hooks_with_kwargs", {}))
            + len(getattr(m, "_forward_hooks_with_kwargs", {}))
        )
        if n:
            out[name] = n
    for name, p in model.named_parameters():
        if p._backward_hooks:
            out[name] = len(p._backward_hooks)
    return out


# The small MLP (32 -> 24 -> 16 -> 4) and conv net (3x8x8 inputs) of the prune_model tests, seeded.
def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))


def make_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 4),
    )
