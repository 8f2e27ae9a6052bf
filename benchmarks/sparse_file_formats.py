"""The sparse file before and after the move to safetensors: bytes, save and load time, side by side.

    OMP_NUM_THREADS=1 python benchmarks/sparse_file_formats.py [--old-rev 8a178fe] [--repeats 7]

The old writer/reader (format version 1, ``b"LOBSSPRS"``) is ``lightning_lobs/export.py`` at ``--old-rev``,
read with ``git show`` and imported beside the current one. Both save and load the same models, taking turns
call by call (median of ``--repeats``): a LeNet-300-100-shaped MLP and a VGG-16 fc7-shaped ``Linear(4096,
4096)``, at 90% with random masks (bitmask encoding) and at 95% (CSR for the large layers). One thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

from lightning_lobs import MaskSet  # noqa: E402 - after ROOT, as the old-version loader below reads it
from lightning_lobs import export as new  # noqa: E402


def old_module(rev: str):
    source = subprocess.run(
        ["git", "show", f"{rev}:lightning_lobs/export.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "export_v1.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("lightning_lobs._export_v1", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # its `from .masks import ...` resolves inside lightning_lobs
    return module


def model_at(make, sparsity: float) -> tuple[nn.Module, MaskSet]:
    torch.manual_seed(0)
    model = make()
    masks = MaskSet()
    gen = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            masks.set(name, torch.rand(module.weight.shape, generator=gen) >= sparsity)
    masks.apply(model)
    return model, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-rev", default="8a178fe")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    old = old_module(args.old_rev)
    tmp = Path(tempfile.mkdtemp(prefix="formats-"))
    models = {
        "LeNet-300-100": lambda: nn.Sequential(
            nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
        ),
        "fc7 4096x4096": lambda: nn.Sequential(nn.Linear(4096, 4096)),
    }
    print("| model | sparsity | v1 bytes | v2 (safetensors) bytes | v1 save / load ms | v2 save / load ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, make in models.items():
        for sparsity in (0.90, 0.95):
            model, masks = model_at(make, sparsity)
            target = make()
            times: dict[str, list[float]] = {k: [] for k in ("old_save", "old_load", "new_save", "new_load")}
            sizes = {}
            for _ in range(args.repeats):
                for tag, module in (("old", old), ("new", new)):
                    path = tmp / f"{tag}.lobs"
                    t0 = time.perf_counter()
                    info = module.save_sparse(model, path, masks=masks)
                    times[f"{tag}_save"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    module.load_sparse(target, path)
                    times[f"{tag}_load"].append(time.perf_counter() - t0)
                    assert all(
                        torch.equal(a, b) for a, b in zip(model.state_dict().values(), target.state_dict().values())
                    )
                    sizes[tag] = info.file_bytes
            med = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}
            print(
                f"| {label} | {sparsity:.0%} | {sizes['old']:,} | {sizes['new']:,} | "
                f"{med['old_save']:.1f} / {med['old_load']:.1f} | {med['new_save']:.1f} / {med['new_load']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
