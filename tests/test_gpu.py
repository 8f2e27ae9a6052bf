"""CUDA: pruning on the GPU gives the CPU's result, and masks hold through optimizer steps there.

Every check takes a ``device`` and runs on the CPU in every suite run (so the checks themselves
are exercised and cannot rot); the CUDA parameters are skipped, with that reason, without a GPU.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lobs import MaskSet, SolverOptions, prune_model

# `-m gpu` selects the CUDA cases; the "cpu" ones are their float64 references and stay in the default run
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU here)")]
DEVICES = ("cpu", pytest.param("cuda", marks=needs_cuda))

METHODS = ("exact", "lobs", "fast", "auto")
F64_SOLVE = SolverOptions(dtype=torch.float64)


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))


def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12 * 4 * 4, 5),
    )


MODELS = {"mlp": (make_mlp, (20,)), "cnn": (make_cnn, (3, 8, 8))}


def make_batches(shape, n: int = 4, batch: int = 16, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(batch, *shape, generator=g).to(dtype), torch.randint(0, 5, (batch,), generator=g))
        for _ in range(n)
    ]


@contextmanager
def no_tf32():
    """Full float32/float64 precision on the GPU (no TF32 matmuls/convolutions)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _prune_on(device, kind: str, method: str, dtype=torch.float64, solver=F64_SOLVE):
    factory, shape = MODELS[kind]
    model = factory().to(device=device, dtype=dtype)
    batches = [(x.to(dtype), y) for x, y in make_batches(shape)]
    report = prune_model(
        model, batches, 0.6, method, solver=solver, prune_head=True
    )  # batches are moved to the model's device
    return model, report


def _check_matches_cpu(device, kind: str, method: str) -> None:
    """Float64 model and solver: the device result equals the CPU one up to rounding."""
    device = torch.device(device)
    with no_tf32():
        model, report = _prune_on(device, kind, method)
    ref_model, ref = _prune_on("cpu", kind, method)
    assert all(p.device.type == device.type for p in model.parameters())
    assert list(report.layers) == list(ref.layers)
    for n in ref.layers:
        assert report.masks[n].device.type in ("cpu", device.type)
        assert torch.equal(report.masks[n].cpu(), ref.masks[n]), f"{kind}/{method}/{n}: masks differ from CPU"
        assert report.layers[n].method == ref.layers[n].method
        assert report.layers[n].sparsity == ref.layers[n].sparsity
        assert report.layers[n].layer_error == pytest.approx(ref.layers[n].layer_error, rel=1e-6, abs=1e-12)
        assert report.layers[n].output_error == pytest.approx(ref.layers[n].output_error, rel=1e-6, abs=1e-12)
        w = model.get_submodule(n).weight
        assert torch.all(w[~report.masks[n].to(w.device)] == 0)
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k].cpu(), v, rtol=1e-7, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}")
    assert report.sparsity == ref.sparsity
    assert (math.isnan(report.bound) and math.isnan(ref.bound)) or report.bound == pytest.approx(ref.bound, rel=1e-6)
    assert report.output_error == pytest.approx(ref.output_error, rel=1e-6, abs=1e-12)


def _check_float32_close_to_cpu(device, kind: str, method: str) -> None:
    """Default float32 model and solver: runs on the device, sparsity and errors close to the CPU run."""
    device = torch.device(device)
    model, report = _prune_on(device, kind, method, dtype=torch.float32, solver=None)
    _, ref = _prune_on("cpu", kind, method, dtype=torch.float32, solver=None)
    assert report.sparsity == pytest.approx(ref.sparsity, abs=1e-3)
    for n in ref.layers:
        agree = (report.masks[n].cpu() == ref.masks[n]).float().mean().item()
        assert agree > 0.97, (n, agree)  # near-ties may flip in float32
        assert report.layers[n].layer_error == pytest.approx(ref.layers[n].layer_error, rel=0.1, abs=1e-6)
    assert math.isfinite(report.output_error)
    assert report.output_error == pytest.approx(ref.output_error, rel=0.1, abs=1e-4)


def _check_masks_hold_through_steps(device, kind: str, optimizer: str) -> None:
    device = torch.device(device)
    model, report = _prune_on(device, kind, "fast", dtype=torch.float32, solver=None)
    masks: MaskSet = report.masks
    if optimizer == "adam":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    masks.attach(model, [opt])
    before = {n: model.get_submodule(n).weight.detach().clone() for n in masks}
    model.train()
    try:
        for x, y in make_batches(MODELS[kind][1], n=5, dtype=torch.float32):
            opt.zero_grad()
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
            for n in masks:
                g = model.get_submodule(n).weight.grad
                assert g.device.type == device.type
                assert torch.all(g[~masks[n].to(device)] == 0), n
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    finally:
        masks.detach()
    for n in masks:
        w = model.get_submodule(n).weight
        assert w.device.type == device.type
        assert torch.all(w[~masks[n].to(device)] == 0), n
        assert not torch.equal(w, before[n]), f"{n} did not train"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_prune_matches_cpu_float64(device, kind, method):
    _check_matches_cpu(device, kind, method)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ("exact", "fast"))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_prune_float32_close_to_cpu(device, kind, method):
    _check_float32_close_to_cpu(device, kind, method)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ("adam", "sgd"))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_masks_hold_through_optimizer_steps(device, kind, optimizer):
    _check_masks_hold_through_steps(device, kind, optimizer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU here)")
def test_cuda_lobs_pruning_callback():
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lobs import LOBSPruning

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_cnn()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

        def train_dataloader(self):
            x = torch.cat([b[0] for b in make_batches((3, 8, 8), dtype=torch.float32)])
            y = torch.cat([b[1] for b in make_batches((3, 8, 8), dtype=torch.float32)])
            return DataLoader(TensorDataset(x, y), batch_size=16)

    module = Lit()
    cb = LOBSPruning(0.6, prune_epoch=1, calibration_batches=2, log_table=False, prune_head=True)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cuda",
        devices=1,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    assert cb.last_report is not None and cb.last_report.sparsity == pytest.approx(0.6, abs=0.01)
    for n in cb.masks:
        w = module.get_submodule(n).weight
        assert w.device.type == "cuda"
        assert torch.all(w[~cb.masks[n].to(w.device)] == 0), n
