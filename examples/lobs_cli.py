"""LightningCLI with L-OBS pruning configured from YAML.

    python examples/lobs_cli.py fit --config examples/lobs_cli.yaml
    python examples/lobs_cli.py fit --config examples/lobs_cli.yaml --print_config     # the full, re-runnable config
    python examples/lobs_cli.py fit --config examples/lobs_cli.yaml \
        --trainer.callbacks.init_args.sparsity='[0.5, 0.8, 0.9]' --trainer.callbacks.init_args.prune_epoch='[2, 4, 6]'

``--trainer.callbacks.init_args.*`` sets the *last* callback of the list (jsonargparse's rule), which is
why ``LOBSPruning`` comes last in ``lobs_cli.yaml``; to change an earlier one, edit the YAML or give a
second ``--config`` with the whole ``trainer.callbacks`` list.

The model is a small MLP on a synthetic 10-class problem so the example runs anywhere in seconds;
swap in your own LightningModule/DataModule. Works with `lightning` or `pytorch_lightning`.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:  # the unified package first; the CLI and callbacks must all come from one namespace
    import lightning.pytorch as L
    from lightning.pytorch.cli import LightningCLI
except ImportError:  # pragma: no cover - only pytorch_lightning installed
    import pytorch_lightning as L
    from pytorch_lightning.cli import LightningCLI


class SyntheticData(L.LightningDataModule):
    """Gaussian inputs labelled by a fixed random linear map (learnable, so pruning has something to keep)."""

    def __init__(
        self,
        n_train: int = 4096,
        n_val: int = 1024,
        dim: int = 64,
        classes: int = 10,
        batch_size: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        proj = torch.randn(dim, classes, generator=g)
        x = torch.randn(n_train + n_val, dim, generator=g)
        y = (x @ proj).argmax(1)
        self.train_set = TensorDataset(x[:n_train], y[:n_train])
        self.val_set = TensorDataset(x[n_train:], y[n_train:])
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class MLP(L.LightningModule):
    """An MLP classifier; ``hidden`` sets the layer widths."""

    def __init__(self, dim: int = 64, hidden: list[int] = [256, 128], classes: int = 10, lr: float = 1e-3) -> None:  # noqa: B006 - a CLI default
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(dim, width), nn.ReLU()]
            dim = width
        self.net = nn.Sequential(*layers, nn.Linear(dim, classes))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=True)
        self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=stage != "train")
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args`` instead of ``sys.argv[1:]`` when given)."""
    return LightningCLI(MLP, SyntheticData, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main(sys.argv[1:] or None)
