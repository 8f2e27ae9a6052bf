"""A real, offline text corpus: the Python standard library's own source files, as byte-level tokens.

The files are the ``*.py`` files under the running interpreter's ``Lib/`` (``sysconfig.get_paths()["stdlib"]``),
``site-packages`` and ``__pycache__`` left out, sorted by their path relative to that folder. Each file goes to
one split by a hash of that relative path (``sha256(path) % 100``: 0-89 train, 90-94 validation, 95-99 test), so
the split is fixed per file and never depends on the order or number of the other files. A split's text is its
files' bytes joined by ``\\n`` in sorted order; tokens are those bytes (vocabulary 256).

The text depends on the Python build, so :class:`StdlibCorpus` records the Python version, the number of files, a
checksum of the file list (``sha256`` over ``"<relative path>\\t<size>\\n"`` lines) and one of the contents.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

SPLIT_NAMES = ("train", "validation", "test")


def stdlib_dir() -> Path:
    """The ``Lib/`` folder of the interpreter running this code."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted relative paths of the stdlib's ``*.py`` files (no ``site-packages``, no ``__pycache__``)."""
    root = stdlib_dir() if root is None else Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        for name in filenames:
            if name.endswith(".py"):
                out.append((Path(dirpath) / name).relative_to(root))
    return sorted(out, key=lambda p: p.as_posix())


def split_of(rel_path: Path) -> str:
    """``train``/``validation``/``test`` from ``sha256(relative posix path) % 100`` (90/5/5)."""
    bucket = int(hashlib.sha256(rel_path.as_posix().encode()).hexdigest(), 16) % 100
    return "train" if bucket < 90 else ("validation" if bucket < 95 else "test")


@dataclass
class StdlibCorpus:
    """Byte tokens of the three splits plus what identifies the text."""

    tokens: dict[str, Tensor] = field(repr=False)  # uint8 1-D per split
    files: dict[str, int]  # files per split
    python_version: str
    root: str
    file_list_sha256: str
    content_sha256: str

    def info(self) -> dict[str, object]:
        """JSON-able description (no tokens)."""
        return {
            "python_version": self.python_version,
            "root": self.root,
            "files": self.files,
            "bytes": {k: int(v.numel()) for k, v in self.tokens.items()},
            "file_list_sha256": self.file_list_sha256,
            "content_sha256": self.content_sha256,
            "split_rule": "sha256(relative path) % 100: 0-89 train, 90-94 validation, 95-99 test",
        }


def load_stdlib_corpus(root: Path | None = None) -> StdlibCorpus:
    """Read every file of :func:`stdlib_files` and build the three splits (a few seconds, ~30 MB)."""
    root = stdlib_dir() if root is None else Path(root)
    rels = stdlib_files(root)
    if not rels:
        raise FileNotFoundError(f"no *.py files under {root}")
    parts: dict[str, list[bytes]] = {k: [] for k in SPLIT_NAMES}
    list_hash, content_hash = hashlib.sha256(), hashlib.sha256()
    for rel in rels:
        data = (root / rel).read_bytes()
        list_hash.update(f"{rel.as_posix()}\t{len(data)}\n".encode())
        content_hash.update(data)
        parts[split_of(rel)].append(data)
    tokens = {k: torch.frombuffer(bytearray(b"\n".join(v)), dtype=torch.uint8) for k, v in parts.items()}
    return StdlibCorpus(
        tokens=tokens,
        files={k: len(v) for k, v in parts.items()},
        python_version=platform.python_version(),
        root=str(root),
        file_list_sha256=list_hash.hexdigest(),
        content_sha256=content_hash.hexdigest(),
    )


def eval_windows(tokens: Tensor, length: int, count: int) -> Tensor:
    """``count`` windows of ``length + 1`` tokens at evenly spaced offsets over the whole split (int64).

    Spread over the split so a small evaluation budget still covers many files; fixed, no randomness.
    """
    span = tokens.numel() - (length + 1)
    if span < 0:
        raise ValueError(f"a split of {tokens.numel()} tokens is shorter than one window of {length + 1}.")
    count = max(1, count)
    starts = torch.linspace(0, span, count).round().long() if count > 1 else torch.zeros(1, dtype=torch.long)
    return torch.stack([tokens[s : s + length + 1] for s in starts.tolist()]).long()


class RandomWindows(Dataset):
    """``num`` windows of ``length + 1`` tokens at random offsets drawn once from a seeded generator."""

    def __init__(self, tokens: Tensor, length: int, num: int, seed: int = 0) -> None:
        self.tokens = tokens
        self.length = length
        gen = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, tokens.numel() - length - 1, (num,), generator=gen)

    def __len__(self) -> int:
        return int(self.starts.numel())

    def __getitem__(self, i: int) -> Tensor:
        s = int(self.starts[i])
        return self.tokens[s : s + self.length + 1].long()


def inputs_only(windows: Tensor) -> Tensor:
    """Drop the last token of each ``(N, T + 1)`` window: the ``(N, T)`` model inputs (calibration batches)."""
    return windows[:, :-1]


def describe_split(corpus: StdlibCorpus) -> tuple[int, int, int]:
    """Bytes of train, validation and test."""
    return tuple(int(corpus.tokens[k].numel()) for k in SPLIT_NAMES)  # type: ignore[return-value]
