"""What the examples and benchmarks measure: accuracy, sparsity of the pruned layers, language-model loss."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LN2 = math.log(2.0)


def prunable_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            yield name, module


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the weights (not biases) of all Linear/Conv layers of ``model``."""
    zeros = total = 0
    for _, module in prunable_layers(model):
        w = module.weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


def zero_fraction(model: nn.Module, names: Iterable[str]) -> float:
    """Fraction of exact zeros over the weights of the layers ``names``."""
    modules = dict(model.named_modules())
    zeros = total = 0
    for n in names:
        w = modules[n].weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else math.nan


def masks_held(model: nn.Module, masks: Mapping[str, Tensor]) -> bool:
    """Every masked-out weight of ``model`` is exactly 0."""
    modules = dict(model.named_modules())
    return all(bool((modules[n].weight.detach()[~m.to(torch.bool)] == 0).all()) for n, m in masks.items())


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, device: torch.device | None = None) -> float:
    """Top-1 accuracy of ``model`` over ``(x, y)`` batches, in eval mode; the model's modes are restored."""
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    correct = total = 0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += int(y.numel())
    finally:
        for m, mode in modes.items():
            m.training = mode
    if total == 0:
        raise ValueError("accuracy(): the loader yielded no samples.")
    return correct / total


@torch.no_grad()
def correct_count(model: nn.Module, x: Tensor, y: Tensor, batch: int | None = None) -> int:
    """Top-1 hits on in-memory tensors, ``batch`` images per forward (None: all at once).

    Leaves the model in eval mode: the benchmarks that call it prune the evaluated model next, and BatchNorm must
    not update its statistics on the calibration batches. The batch size is the caller's, because a forward's
    float rounding (and so, rarely, an argmax) depends on it and recorded results must repeat.
    """
    model.eval()
    step = len(y) if batch is None else batch
    return sum(int((model(x[i : i + step]).argmax(1) == y[i : i + step]).sum()) for i in range(0, len(y), step))


def tensor_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int | None = None) -> float:
    """Top-1 accuracy on in-memory tensors: :func:`correct_count` over the number of samples."""
    return correct_count(model, x, y, batch) / len(y)


@torch.no_grad()
def lm_metrics(module: nn.Module, windows: Tensor, batch: int = 32) -> dict[str, float]:
    """Mean next-byte NLL (nats) over all predicted positions of ``windows``, perplexity and bits per byte."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, windows.shape[0], batch):
            w = windows[i : i + batch]
            logits = module(w[:, :-1])
            total += float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), w[:, 1:].reshape(-1), reduction="sum")
            )
            count += w[:, 1:].numel()
    finally:
        for m, mode in modes.items():
            m.training = mode
    nll = total / count
    return {"nll": nll, "ppl": math.exp(nll), "bpb": nll / LN2, "tokens": count}
