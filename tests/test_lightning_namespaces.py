"""lightning-lobs with only one Lightning package installed, or none: each case in a fresh interpreter
where the other package cannot be imported (a meta-path finder refuses it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCK = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
        return None
sys.meta_path.insert(0, Block())
import importlib.util
_orig = importlib.util.find_spec
def find_spec(name, package=None):
    if name.split(".")[0] in BLOCKED:
        return None
    return _orig(name, package)
importlib.util.find_spec = find_spec
"""

FIT = """
import torch, warnings
warnings.filterwarnings("ignore")
from torch.utils.data import DataLoader, TensorDataset
import {ns} as ns
from lightning_lobs import LOBSPruning
import lightning_lobs._lightning as compat

class M(ns.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    def forward(self, x):
        return self.net(x)
    def training_step(self, batch, i):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 2, (64,), generator=g)), batch_size=32)

cb = LOBSPruning(sparsity=0.5, prune_epoch=1, calibration_batches=2, log_table=False, allocation="uniform")
assert isinstance(cb, ns.Callback)
assert [b.__module__.split(".")[0] for b in compat.CALLBACK_BASES] == [{root!r}], compat.CALLBACK_BASES
m = M()
ns.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
           enable_model_summary=False, accelerator="cpu").fit(m)
assert cb.pruned_epochs == [1]
assert int((m.net[0].weight == 0).sum()) == 64
print("OK")
"""


def run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300
    )


def test_only_the_unified_package_installed():
    """``pip install lightning`` alone (no ``pytorch_lightning``, no standalone ``lightning_fabric``): the
    class is a ``lightning.pytorch`` Callback and a fit prunes. (Only ``pytorch_lightning`` is the
    in-process case of every other test, with the other base class added.)"""
    pytest.importorskip("lightning.pytorch")
    code = BLOCK.format(blocked=["pytorch_lightning", "lightning_fabric"])
    out = run(code + textwrap.dedent(FIT.format(ns="lightning.pytorch", root="lightning")))
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_neither_installed_names_both_install_commands():
    out = run(
        BLOCK.format(blocked=["lightning", "pytorch_lightning", "lightning_fabric"])
        + "from lightning_lobs import LOBSPruning\n"
    )
    assert out.returncode != 0
    assert "ImportError" in out.stderr
    assert "pip install lightning" in out.stderr and "pip install pytorch-lightning" in out.stderr


def test_prune_model_works_without_lightning_and_the_import_does_not_load_it():
    """The callback is the only part that needs Lightning: ``import lightning_lobs`` does not import it, so
    ``prune_model`` runs with neither package installed (and a user with Lightning pays for its import only
    when using ``LOBSPruning``)."""
    code = BLOCK.format(blocked=["lightning", "pytorch_lightning", "lightning_fabric"]) + textwrap.dedent("""
        import sys, torch
        import lightning_lobs
        assert not any(m.split(".")[0] in ("lightning", "pytorch_lightning") for m in sys.modules)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        report = lightning_lobs.prune_model(net, [torch.randn(32, 8) for _ in range(2)], 0.5, "exact")
        assert abs(report.sparsity - 0.5) < 0.02, report.sparsity
        print("OK")
    """)
    out = run(code)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
