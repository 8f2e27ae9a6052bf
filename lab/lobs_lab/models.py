"""The demo nets and their Lightning modules: the paper's LeNets, a ResNet for MNIST, a byte-level GPT-2."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lobs_lab.metrics import accuracy

#: Han et al. (2015), Table 2: fraction of weights kept per layer of LeNet-300-100 (fc1, fc2, fc3).
LENET300_KEEP_PROFILE = (0.08, 0.09, 0.26)
#: Han et al. (2015), Table 3: fraction of weights kept per layer of LeNet-5 (conv1, conv2, fc1, fc2).
LENET5_KEEP_PROFILE = (0.66, 0.12, 0.08, 0.19)


def lenet300_100() -> nn.Sequential:
    """LeNet-300-100: ``Flatten, Linear(784, 300), ReLU, Linear(300, 100), ReLU, Linear(100, 10)``.

    Prunable layers are ``1``, ``3``, ``5`` (``net.1`` ... inside :class:`MNISTClassifier`).
    """
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def lenet5(conv_relu: bool = False) -> nn.Sequential:
    """LeNet-5 as in Caffe's ``lenet_train_test.prototxt`` (the net of Han et al. 2015 and L-OBS).

    ``Conv2d(1, 20, 5), MaxPool2d(2), Conv2d(20, 50, 5), MaxPool2d(2), Flatten, Linear(800, 500),
    ReLU, Linear(500, 10)``: 431,080 parameters, 430,500 of them weights. Caffe's net has no
    nonlinearity after the convolutions; ``conv_relu=True`` adds a ReLU after each pooling.
    A plain ``nn.Sequential`` chain, so the error bound's chain analysis applies. Prunable layers
    without ``conv_relu``: ``0``, ``2``, ``5``, ``7``; with it: ``0``, ``3``, ``7``, ``9``.
    """
    layers: list = [nn.Conv2d(1, 20, 5), nn.MaxPool2d(2)]
    if conv_relu:
        layers.append(nn.ReLU())
    layers += [nn.Conv2d(20, 50, 5), nn.MaxPool2d(2)]
    if conv_relu:
        layers.append(nn.ReLU())
    layers += [nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10)]
    return nn.Sequential(*layers)


class MNISTClassifier(pl.LightningModule):
    """Cross-entropy classifier around any ``nn.Module`` (the pruned layers are ``net.<name>``).

    Logs ``train/loss`` and ``train/acc`` per step/epoch, ``val/acc`` and ``test/acc`` per epoch
    (torchmetrics multiclass accuracy). :meth:`evaluate` gives accuracy without a Trainer.

    Args:
        net: the network; its output is 10 logits.
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (SGD uses momentum 0.9).
        weight_decay: L2 weight decay passed to the optimizer.
        num_classes: number of classes (10 for MNIST).
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
        weight_decay: float = 0.0,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}.")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
        from torchmetrics.classification import MulticlassAccuracy

        self.net = net
        self.lr = float(lr)
        self.optimizer_name = optimizer
        self.weight_decay = float(weight_decay)
        self.save_hyperparameters(ignore=["net"])
        self.loss_fn = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)

    def evaluate(self, loader: Iterable) -> float:
        """Top-1 accuracy on ``loader`` (eval mode, no grad, modes restored); no Trainer needed."""
        return accuracy(self, loader)


# --------------------------------------------------------------------------- ResNet for MNIST


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm, ReLU, and a shortcut for a change of shape: subsampled and zero-padded (ResNet's
    option A, no parameters), or with ``project=True`` a strided 1x1 conv + BatchNorm (option B)."""

    def __init__(self, cin: int, cout: int, stride: int, project: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short: nn.Module | None = None
        if project and (stride != 1 or cin != cout):
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.stride = stride
        self.pad = 0 if project else cout - cin

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.short is not None:
            return F.relu(out + self.short(x))
        short = x[:, :, :: self.stride, :: self.stride] if self.stride != 1 else x
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + short)


class ResNet(nn.Module):
    """ResNet-(6n+2) for 1x28x28 inputs, widths ``w, 2w, 4w``."""

    def __init__(self, width: int = 8, blocks: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if (b == 0 and stage > 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


class ResNetClassifier(MNISTClassifier):
    """``MNISTClassifier`` with SGD (nesterov) and, for dense training, a one-cycle schedule over ``total_steps``."""

    def __init__(self, net: nn.Module, lr: float, weight_decay: float = 5e-4, total_steps: int | None = None) -> None:
        super().__init__(net, lr=lr, optimizer="sgd", weight_decay=weight_decay)
        self.total_steps = total_steps

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=self.weight_decay
        )
        if not self.total_steps:
            return opt
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=self.total_steps, pct_start=0.25)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# --------------------------------------------------------------------------- GPT-2 on bytes


def make_gpt2(layers: int, width: int, heads: int, context: int) -> nn.Module:
    """A randomly initialised ``GPT2LMHeadModel`` with a 256-byte vocabulary, no dropout, tied embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=256,
        n_positions=context,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=10,
        eos_token_id=10,
    )
    return GPT2LMHeadModel(cfg)


class ByteLM(pl.LightningModule):
    """Next-byte prediction; ``forward(ids)`` returns the logits, batches are ``(B, T + 1)`` windows."""

    def __init__(
        self, model: nn.Module, lr: float, warmup: int = 0, total_steps: int | None = None, weight_decay: float = 0.01
    ) -> None:
        super().__init__()
        self.model = model
        self.lr, self.warmup, self.total_steps, self.weight_decay = lr, warmup, total_steps, weight_decay

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids).logits

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        logits = self(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        self.log("train/loss", loss, on_step=True, prog_bar=False)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.95), weight_decay=self.weight_decay)
        if not self.total_steps:
            return opt
        total, warm = self.total_steps, max(1, self.warmup)

        def factor(step: int) -> float:  # linear warmup, cosine to 10% of the peak
            if step < warm:
                return (step + 1) / warm
            t = min(1.0, (step - warm) / max(1, total - warm))
            return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
