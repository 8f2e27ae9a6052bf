"""Scale: memory budget checks, bounded conv calibration, and residual networks with BatchNorm (ResNet-18)."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lobs import CalibrationOptions, LOBSPruning, SolverOptions, prune_model
from lightning_lobs import hessian as hessian_mod
from lightning_lobs.engine.plan import CHUNK_FLOOR_ROWS
from lightning_lobs.hessian import HessianCollector
from lightning_lobs.layers import unfold_input
from lightning_lobs.resources import LayerMemory, check_budget, layer_memory

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"),
]

F64, F32 = torch.float64, torch.float32
GIB = 1 << 30


def _memory(name: str, layer: nn.Module, method: str, hessian_dtype, dtype, cap: int, refit=None) -> LayerMemory:
    """``layer_memory`` with the solver options it reads."""
    return layer_memory(
        name, layer, method, hessian_dtype, SolverOptions(dtype=dtype, max_memory_bytes=cap, refit=refit)
    )


def _state(model: nn.Module):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- memory estimates and budget


def test_layer_memory_grows_with_d_squared():
    sizes = (64, 128, 256, 512)
    mems = [_memory("l", nn.Linear(d, 16), "exact", F64, F32, GIB) for d in sizes]
    for d, m in zip(sizes, mems):
        assert m.hessian_bytes == (d + 1) ** 2 * 8  # one float64 (d+1)^2 Hessian (bias column)
    for small, big in zip(mems, mems[1:]):
        assert 3.9 < big.hessian_bytes / small.hessian_bytes < 4.1
        assert 3.9 < big.solve_bytes / small.solve_bytes < 4.1  # rows fixed: d x d workspaces dominate
    # Precision and groups enter as they should.
    assert _memory("l", nn.Linear(128, 16), "exact", F32, F32, GIB).hessian_bytes == 129**2 * 4
    assert _memory("l", nn.Linear(128, 16, bias=False), "fast", F64, F32, GIB).hessian_bytes == 128**2 * 8
    conv = nn.Conv2d(8, 8, 3, groups=4)  # 4 Hessians of side 2*9 + 1
    assert _memory("c", conv, "fast", F64, F32, GIB).hessian_bytes == 4 * 19**2 * 8
    # Workspaces in the solve dtype double with it; the float64 copy of H for the layer error does not.
    h64 = 4 * 19**2 * 8
    s64 = _memory("c", conv, "fast", F64, F64, GIB).solve_bytes
    s32 = _memory("c", conv, "fast", F64, F32, GIB).solve_bytes
    assert s64 - h64 == 2 * (s32 - h64)


def test_exact_needs_more_memory_than_fast_on_wide_layers():
    for d, rows in ((256, 64), (1024, 256), (4096, 512)):
        layer = nn.Linear(d, rows)
        exact = _memory("w", layer, "exact", F64, F32, GIB)
        fast = _memory("w", layer, "fast", F64, F32, GIB, refit=False)
        assert exact.hessian_bytes == fast.hessian_bytes
        assert exact.solve_bytes > fast.solve_bytes, (d, exact, fast)  # its chunk of d x d inverses on top
        # the refit of fast's mask costs extra, but stays below exact's per-row inverses
        refitting = _memory("w", layer, "fast", F64, F32, GIB)
        assert fast.solve_bytes < refitting.solve_bytes < exact.solve_bytes, (d, refitting, exact)
    # The per-row H^-1 copies of exact are bounded by SolverOptions.max_memory_bytes.
    layer = nn.Linear(1024, 4096)
    small_cap = _memory("w", layer, "exact", F64, F32, 64 << 20).solve_bytes
    assert small_cap < _memory("w", layer, "exact", F64, F32, GIB).solve_bytes
    assert small_cap < 8 * (64 << 20)


def test_check_budget_sequential_holds_one_hessian():
    est = {
        n: LayerMemory(n, hessian_bytes=h, solve_bytes=s)
        for n, h, s in (("a", 100, 30), ("b", 300, 10), ("c", 200, 50))
    }
    dense = check_budget(est, 10**6, sequential=False, device=torch.device("cpu"))
    seq = check_budget(est, 10**6, sequential=True, device=torch.device("cpu"))
    assert dense == {"budget": 10**6, "peak": 600 + 50}  # every Hessian + the biggest solve
    assert seq == {"budget": 10**6, "peak": 300 + 50}  # the biggest Hessian + the biggest solve
    check_budget(est, 650, sequential=False, device=torch.device("cpu"))  # exactly fits
    with pytest.raises(MemoryError, match="'b'"):
        check_budget(est, 649, sequential=False, device=torch.device("cpu"))
    assert check_budget({}, 10, sequential=False, device=torch.device("cpu"))["peak"] == 0


def test_check_budget_block_pipeline_holds_one_blocks_hessians():
    est = {
        n: LayerMemory(n, hessian_bytes=h, solve_bytes=s)
        for n, h, s in (("h.0.a", 100, 30), ("h.0.b", 300, 10), ("h.1.a", 200, 50), ("head", 350, 5))
    }
    cpu = torch.device("cpu")
    groups = [["h.0.a", "h.0.b"], ["h.1.a"]]
    # the biggest block holds 100 + 300: more than the biggest single Hessian (350, the head outside the blocks)
    assert check_budget(est, 10**6, True, cpu, groups)["peak"] == 400 + 50
    assert check_budget(est, 10**6, True, cpu)["peak"] == 350 + 50  # one at a time (sequential_unit="layer")
    with pytest.raises(MemoryError, match="one block's Hessians at a time"):
        check_budget(est, 449, True, cpu, groups)


def test_block_pipeline_memory_check_counts_a_whole_block():
    """prune_model(sequential=True) refuses a budget that one layer's Hessian fits but one block's does not."""
    from types import SimpleNamespace

    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_lobs import PruneOptions
    from lightning_lobs.engine.plan import pipeline_groups

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=50)
    model = GPT2LMHeadModel(config).eval()
    batches = [torch.randint(0, 50, (2, 8))]
    block = [f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    mem = {n: _memory(n, model.get_submodule(n), "fast", "mixed", F32, GIB) for n in block}
    one_block = sum(m.hessian_bytes for m in mem.values())
    biggest = max(m.hessian_bytes for m in mem.values())
    solve = max(m.solve_bytes for m in mem.values())
    budget = (biggest + one_block) // 2 + solve  # one Hessian fits, one block's do not
    calibration = CalibrationOptions(memory_budget_bytes=budget)
    with pytest.raises(MemoryError, match="one block's Hessians"):
        prune_model(model, batches, 0.5, "fast", sequential=True, calibration=calibration)
    report = prune_model(model, batches, 0.5, "fast", sequential=True, sequential_unit="layer", calibration=calibration)
    assert report.sparsity > 0.4
    second = [b.replace(".0.", ".1.") for b in block]
    ctx = SimpleNamespace(model=model, options=PruneOptions(0.5, "fast", sequential=True))
    assert pipeline_groups(ctx, dict.fromkeys(block + second)) == [block, second]
    ctx.options = PruneOptions(0.5, "fast", sequential=True, sequential_unit="layer")
    assert pipeline_groups(ctx, dict.fromkeys(block + second)) == []


def _two_layer_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(small=nn.Linear(8, 16), act=nn.ReLU(), mid=nn.Linear(16, 256), out=nn.Linear(256, 4))
    )


def test_budget_too_small_fails_before_calibration():
    model = _two_layer_model()
    before = _state(model)
    calls = []

    def forward_fn(m, batch):
        calls.append(1)
        return m(batch)

    batches = [torch.randn(16, 8) for _ in range(2)]
    with pytest.raises(MemoryError) as info:
        prune_model(
            model,
            batches,
            0.5,
            "exact",
            calibration=CalibrationOptions(memory_budget_bytes=100_000),
            forward_fn=forward_fn,
            prune_head=True,
        )
    msg = str(info.value)
    assert "'out'" in msg  # the biggest layer (d = 257) is named
    assert "method='fast'" in msg and "exclude=['out']" in msg and "float32" in msg and "sequential=True" in msg
    assert calls == []  # refused before any calibration forward
    _assert_state_equal(before, _state(model))
    assert model.training
    # The same job within a generous budget runs (and calls forward_fn).
    report = prune_model(
        model,
        batches,
        0.5,
        "exact",
        calibration=CalibrationOptions(memory_budget_bytes=1 << 30),
        forward_fn=forward_fn,
        prune_head=True,
    )
    assert calls and report.sparsity == pytest.approx(0.5, abs=0.01)


def test_fast_fits_a_budget_exact_does_not():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(wide=nn.Linear(512, 128)))
    before = _state(model)
    batches = [torch.randn(64, 512) for _ in range(4)]

    def peak(method: str, cap: int, refit=None) -> int:
        est = _memory("wide", model.wide, method, F64, F32, cap, refit)
        return est.hessian_bytes + est.solve_bytes

    floor = CHUNK_FLOOR_ROWS * 513**2 * 4  # exact's and the direct refit's smallest row chunks
    assert peak("fast", GIB, refit=False) < peak("fast", floor, refit=True) < peak("exact", floor)
    # Between what the direct refit needs at its smallest chunks and what exact needs at its own
    budget = CalibrationOptions(memory_budget_bytes=(peak("fast", floor, refit=True) + peak("exact", floor)) // 2)
    assert peak("fast", GIB, refit=True) > budget.memory_budget_bytes  # so the refit's chunks must shrink
    with pytest.raises(MemoryError, match="'wide'"):
        prune_model(model, batches, 0.5, "exact", calibration=budget, prune_head=True)
    _assert_state_equal(before, _state(model))
    # The direct refit of fast's mask fits in smaller row chunks; SparseGPT alone fits as it is
    for refit in (True, False):
        report = prune_model(
            copy.deepcopy(model),
            batches,
            0.5,
            "fast",
            calibration=budget,
            solver=SolverOptions(refit=refit),
            prune_head=True,
        )
        assert report.layers["wide"].method == "fast"
        assert report.layers["wide"].sparsity == pytest.approx(0.5, abs=0.01)


def test_sequential_fits_a_budget_that_dense_calibration_does_not():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))

    est = {n: _memory(n, m, "fast", F64, F32, GIB) for n, m in model().named_children() if isinstance(m, nn.Linear)}
    dense_peak = check_budget(est, 1 << 40, False, torch.device("cpu"))["peak"]
    seq_peak = check_budget(est, 1 << 40, True, torch.device("cpu"))["peak"]
    assert seq_peak < dense_peak
    budget = CalibrationOptions(memory_budget_bytes=(seq_peak + dense_peak) // 2)
    batches = [torch.randn(64, 128) for _ in range(3)]
    m = model()
    with pytest.raises(MemoryError, match="sequential=True"):
        prune_model(m, batches, 0.5, "fast", calibration=budget, prune_head=True)
    report = prune_model(m, batches, 0.5, "fast", calibration=budget, sequential=True, prune_head=True)
    assert report.sequential and len(report.layers) == 3


def test_float32_hessians_halve_the_estimate_and_fit():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(a=nn.Linear(256, 64), r=nn.ReLU(), b=nn.Linear(64, 8)))
    est64 = {n: _memory(n, model.get_submodule(n), "fast", F64, F32, GIB) for n in ("a", "b")}
    est32 = {n: _memory(n, model.get_submodule(n), "fast", F32, F32, GIB) for n in ("a", "b")}
    p64 = check_budget(est64, 1 << 40, False, torch.device("cpu"))["peak"]
    p32 = check_budget(est32, 1 << 40, False, torch.device("cpu"))["peak"]
    assert p32 < p64
    batches = [torch.randn(32, 256) for _ in range(2)]
    budget = (p32 + p64) // 2
    with pytest.raises(MemoryError):
        prune_model(
            model, batches, 0.5, "fast", calibration=CalibrationOptions(memory_budget_bytes=budget), prune_head=True
        )
    report = prune_model(
        model,
        batches,
        0.5,
        "fast",
        calibration=CalibrationOptions(memory_budget_bytes=budget, hessian_dtype=F32),
        prune_head=True,
    )
    assert report.sparsity == pytest.approx(0.5, abs=0.01)


# --------------------------------------------------------------------------- bounded conv calibration


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(F.avg_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2).flatten(1))


def _cnn_batches(n: int = 3):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(8, 3, 16, 16, generator=g) for _ in range(n)]


def test_chunked_conv_calibration_is_bounded_and_gives_the_same_pruning(monkeypatch):
    cap = 2**12
    seen = []
    original = hessian_mod.HessianAccumulator._accumulate

    def spy(self, rows):
        seen.append((self.name, rows.numel()))
        return original(self, rows)

    batches = _cnn_batches()
    ref_model = SmallCNN()
    ref = prune_model(ref_model, batches, 0.6, "exact", prune_head=True)

    monkeypatch.setattr(hessian_mod.HessianAccumulator, "_accumulate", spy)
    model = SmallCNN()
    rep = prune_model(
        model, batches, 0.6, "exact", calibration=CalibrationOptions(max_chunk_elements=cap), prune_head=True
    )
    monkeypatch.undo()
    # Every chunk materialised stayed within the bound, and the convs really were split up.
    assert seen and max(n for _, n in seen) <= cap
    for conv in ("c1", "c2"):
        chunks = [n for name, n in seen if name == conv]
        assert len(chunks) > len(batches) * 8, conv  # more than one chunk per sample
    for n in ("c1", "c2", "fc"):
        assert torch.equal(rep.masks[n], ref.masks[n]), n
        assert rep.layers[n].layer_error == pytest.approx(ref.layers[n].layer_error, rel=1e-4, abs=1e-9)
        assert rep.layers[n].positions == ref.layers[n].positions
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-4, atol=1e-6)


def test_position_stride_subsamples_conv_patches():
    batches = _cnn_batches(2)
    model = SmallCNN()
    mods = {"c1": model.c1, "c2": model.c2}
    with torch.no_grad():
        with HessianCollector(mods) as full:
            for x in batches:
                model(x)
        with HessianCollector(mods, position_stride=2) as strided:
            for x in batches:
                model(x)
    for n, m in mods.items():
        hf, hs = full.hessians()[n], strided.hessians()[n]
        assert strided.accumulators[n].count == full.accumulators[n].count // 2
        assert not torch.allclose(hf, hs)
        assert torch.allclose(hs, hs.transpose(1, 2))
        assert torch.linalg.eigvalsh(hs[0]).min() > -1e-9  # PSD
        if n == "c1":  # exactly the Hessian of every other output position (row-major) of every sample
            rows = torch.cat([unfold_input(m, b.double())[::2] for b in batches])[:, 0]
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
            torch.testing.assert_close(hs[0], rows.T @ rows / rows.shape[0], rtol=1e-10, atol=1e-12)
        # Random inputs: the subsample's statistics are close to the full ones.
        assert (hs - hf).norm() / hf.norm() < 0.2
    # Pruning with strided calibration runs and reports half the positions.
    ref = prune_model(SmallCNN(), batches, 0.6, "exact", prune_head=True)
    rep = prune_model(model, batches, 0.6, "exact", calibration=CalibrationOptions(position_stride=2), prune_head=True)
    assert rep.layers["c1"].positions == ref.layers["c1"].positions / 2 == 128
    assert rep.layers["c2"].positions == ref.layers["c2"].positions / 2 == 32
    assert rep.layers["fc"].positions == ref.layers["fc"].positions == 1
    assert rep.sparsity == pytest.approx(0.6, abs=0.01)
    assert rep.layers["c1"].layer_error != ref.layers["c1"].layer_error
    assert math.isfinite(rep.output_error)


# --------------------------------------------------------------------------- residual networks with BatchNorm


class TinyResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.c2(F.relu(self.c1(h))))  # residual addition: not a chain
        return self.fc(h.mean((2, 3)))


def test_residual_net_bound_is_nan_with_a_reason():
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    rep = prune_model(TinyResidual(), batches, 0.5, "exact", recalibrate_bn=False, prune_head=True)
    assert math.isnan(rep.bound) and math.isnan(rep.bound_spectral)
    assert rep.bound_note.startswith("bound not applicable") and "BatchNorm" not in rep.bound_note
    assert math.isfinite(rep.output_error) and math.isfinite(rep.model_output_error)
    assert rep.sparsity == pytest.approx(0.5, abs=0.01)


# ResNet-18 at full width: about 3 minutes of the suite on 2 shared cores, so out of the default run (-m slow)
@pytest.fixture(scope="module")
def resnet18_pruned():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(3)]
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics first
        model(batches[2])
    dense = copy.deepcopy(model)
    saved = torch.get_num_threads()  # module-scoped: runs before the function-scoped one_thread fixture
    torch.set_num_threads(1)
    try:
        report = prune_model(model, batches, 0.5, "fast", calibration_batches=2, allocation="uniform", prune_head=True)
    finally:
        torch.set_num_threads(saved)
    return dense, model, report, batches[:2]


@pytest.mark.slow
def test_resnet18_prunes_every_conv_and_fc(resnet18_pruned):
    dense, model, report, _ = resnet18_pruned
    expected = [n for n, m in dense.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(expected) == 21 and "fc" in expected and "layer2.0.downsample.0" in expected
    assert list(report.layers) == expected  # in execution order, every one of them
    for n in expected:
        layer = report.layers[n]
        assert layer.method == "fast"
        assert layer.sparsity == pytest.approx(0.5, abs=0.01), n
        w = model.get_submodule(n).weight
        assert torch.all(w[~report.masks[n]] == 0), n
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01), n
        assert math.isfinite(layer.layer_error) and layer.layer_error >= 0
        assert math.isfinite(layer.output_error)
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    assert math.isnan(report.bound) and math.isnan(report.bound_spectral)
    assert "bound not applicable" in report.bound_note
    assert math.isfinite(report.output_error) and report.output_error > 0
    assert math.isfinite(report.model_output_error)
    assert model.training  # modes restored


@pytest.mark.slow
def test_resnet18_batchnorm_reestimated_on_the_pruned_net(resnet18_pruned):
    dense, model, _, batches = resnet18_pruned
    # Changed from the dense statistics...
    assert not torch.allclose(model.bn1.running_mean, dense.bn1.running_mean)
    assert not torch.allclose(model.layer4[1].bn2.running_var, dense.layer4[1].bn2.running_var)
    # ...to the exact average over the calibration batches of the pruned conv1's batch statistics.
    with torch.no_grad():
        outs = [model.conv1(x) for x in batches]
    means = torch.stack([o.mean((0, 2, 3)) for o in outs])
    variances = torch.stack([o.transpose(0, 1).flatten(1).var(1, unbiased=True) for o in outs])
    torch.testing.assert_close(model.bn1.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_var, variances.mean(0), rtol=1e-5, atol=1e-6)
    assert int(model.bn1.num_batches_tracked) == len(batches)
    assert model.bn1.momentum == dense.bn1.momentum  # momentum restored after the cumulative average
    # Every BatchNorm: what a fresh re-estimation on the pruned weights gives.
    again = copy.deepcopy(model)
    bns = [m for m in again.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    again.train()
    with torch.no_grad():
        for x in batches:
            again(x)
    for (name, a), b in zip(((n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)), bns):
        torch.testing.assert_close(
            a.running_mean, b.running_mean, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
        torch.testing.assert_close(
            a.running_var, b.running_var, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


class LitResNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        import torchvision

        torch.manual_seed(0)
        self.net = torchvision.models.resnet18(num_classes=4)
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 4, (32,), generator=g))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=8, shuffle=True)


@pytest.mark.slow
def test_lobs_pruning_callback_on_resnet18():
    pytest.importorskip("torchvision")
    module = LitResNet()
    # The 4608-wide layer4 convs dominate the solve time and are covered by the prune_model test above.
    cb = LOBSPruning(
        0.5,
        prune_epoch=1,
        method="fast",
        calibration_batches=2,
        exclude=["net.layer4.*"],
        log_table=False,
        allocation="uniform",
        prune_head=True,
    )
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    report = cb.last_report
    assert cb.pruned_epochs == [1]
    names = [
        n
        for n, m in module.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not n.startswith("net.layer4.")
    ]
    assert set(report.layers) == set(names) and len(names) == 16
    for n in names:
        w = module.get_submodule(n).weight
        assert torch.all(w[~cb.masks[n]] == 0), n  # held through the retraining epoch
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01), n
    assert all(
        (module.get_submodule(n).weight != 0).all()
        for n, m in module.named_modules()
        if n.startswith("net.layer4.") and isinstance(m, nn.Conv2d)
    )
    assert math.isnan(report.bound) and math.isfinite(report.output_error)
    assert trainer.callback_metrics["lobs/sparsity"].item() == pytest.approx(0.5, abs=0.01)


def test_cpu_budget_reads_mem_available_not_free_pages(tmp_path):
    # MemAvailable counts the page cache the kernel can drop; the free pages alone refused models that fit.
    from lightning_lobs import resources

    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemFree:          150000 kB\nMemAvailable:    8300000 kB\n")
    assert resources.mem_available(str(info)) == 8_300_000 * 1024
    info.write_text("MemTotal:       24000000 kB\n")  # an old kernel without the field
    assert resources.mem_available(str(info)) is None
    assert resources.mem_available(str(tmp_path / "missing")) is None
    real = resources.mem_available()
    if real is not None:  # on Linux the CPU budget is MemAvailable itself
        got = resources.available_memory(torch.device("cpu"))
        assert got is not None and abs(got - real) <= 0.05 * real + 64 * 2**20  # the two reads are moments apart
