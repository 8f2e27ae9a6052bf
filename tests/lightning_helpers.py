"""A tiny LightningModule and Trainer for either Lightning namespace (not a test module).

``NAMESPACES`` lists the installed ones; tests parametrize over them with the ``ns`` fixture
(tests/conftest.py provides it to every test module) so every Trainer flow runs under ``lightning.pytorch`` and
``pytorch_lightning``. Helper callbacks derive from ``CALLBACK_BASES`` (both namespaces' Callback).
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import namespaces
from lightning_lobs._lightning import CALLBACK_BASES

NAMESPACES = namespaces.NAMESPACES
ns = namespaces.ns  # still importable from here, for test modules written before conftest provided it

LAYERS = ("net.0", "net.2", "net.4")


def make_data(n: int = 512, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    proj = torch.randn(32, 4, generator=g)
    y = (x @ proj).argmax(1)
    return TensorDataset(x, y)


@cache
def lit_mlp_class(ns_name: str) -> type:
    """``LitMLP`` subclassing ``<ns>.LightningModule`` (one class per namespace)."""
    ns = importlib.import_module(ns_name)

    class LitMLP(ns.LightningModule):
        def __init__(
            self, optimizer: str = "adam", bn: bool = False, seed: int = 0, n: int = 512, batch_size: int = 64
        ) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.optimizer_name = optimizer
            if bn:
                self.net = nn.Sequential(
                    nn.Linear(32, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4)
                )
            else:
                self.net = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))
            self.data = make_data(n)
            self.val_data = make_data(128, seed=9)
            self.batch_size = batch_size
            self.steps = 0

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            self.steps += 1
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            if self.optimizer_name == "adam":
                return torch.optim.Adam(self.parameters(), lr=1e-2, weight_decay=1e-2)
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)

        def train_dataloader(self):
            return DataLoader(
                self.data, batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(1)
            )

        def val_dataloader(self):
            return DataLoader(self.val_data, batch_size=64)

        def test_dataloader(self):
            return DataLoader(self.val_data, batch_size=64)

    LitMLP.__qualname__ = LitMLP.__name__ = f"LitMLP_{ns_name.replace('.', '_')}"
    return LitMLP


def lit_mlp(ns: Any = "pytorch_lightning", **kwargs: Any):
    """A ``LitMLP`` of namespace ``ns`` (a module or its name)."""
    return lit_mlp_class(ns if isinstance(ns, str) else ns.__name__)(**kwargs)


def make_trainer(ns: Any, max_epochs: int, callbacks, tmp_path=None, **kwargs: Any):
    """A quiet CPU Trainer of namespace ``ns``: no logger, checkpointing, progress bar or summary unless asked."""
    if isinstance(ns, str):
        ns = importlib.import_module(ns)
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("enable_progress_bar", False)
    kwargs.setdefault("enable_model_summary", False)
    kwargs.setdefault("num_sanity_val_steps", 0)
    kwargs.setdefault("limit_val_batches", 0)  # no validation loop unless a test monitors val_loss
    return ns.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=callbacks,
        default_root_dir=str(tmp_path) if tmp_path is not None else None,
        **kwargs,
    )


class BothCallback(*CALLBACK_BASES):  # type: ignore[misc]
    """Base for test callbacks usable in either namespace's Trainer."""


def zeros(model: nn.Module, name: str) -> int:
    return int((model.get_submodule(name).weight == 0).sum())


def numel(model: nn.Module, name: str) -> int:
    return model.get_submodule(name).weight.numel()
