"""Helpers shared by the test modules (not a test module)."""

from __future__ import annotations

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
