"""The block-by-block pipeline (``sequential=True``): against a brute-force loop, its passes, its layers, its blocks.

The reference (:func:`_reference_prune`) is written without the engine: for each block it runs the WHOLE partly
pruned model on every batch, stores the inputs of the block's layers, builds each H in float64 from them, calls
``solve_layer`` and writes the weights. The pipeline must give the same masks and the same weights up to rounding.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref

import pytest
import torch
from torch import nn

import lightning_lobs.engine.calibrate as calibrate_mod
import lightning_lobs.engine.report as report_mod
import lightning_lobs.engine.run as run_mod
import lightning_lobs.engine.sequential as sequential_mod
from lightning_lobs import MaskSet, PruneOptions, prune_model
from lightning_lobs.attention import feeding, projections
from lightning_lobs.blocks import find_blocks
from lightning_lobs.config import SolverOptions
from lightning_lobs.distributed import RankInfo
from lightning_lobs.engine.commit import param_state
from lightning_lobs.engine.forward import eval_no_grad
from lightning_lobs.engine.report import measure
from lightning_lobs.layers import is_prunable, set_weight_matrix, weight_matrix
from lightning_lobs.solvers import solve_layer

transformers = pytest.importorskip("transformers")

S64 = SolverOptions(dtype=torch.float64)


def _gpt2(n_layer: int = 3, seed: int = 0) -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=4, vocab_size=61, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def _tokens(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 61, (2, 12), generator=g) for _ in range(n)]


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).logits


class _Encoder(nn.Module):
    """A prefix layer (the input projection), an ``nn.TransformerEncoder`` and a suffix layer (the head)."""

    def __init__(self, d: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(6, d)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=24, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.inp(x)))


class _StagedCNN(nn.Module):
    """A stem conv, two stages of conv blocks (as a torchvision ResNet's ``layer1``, ``layer2``), a classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1))
        self.layer2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer2(self.layer1(torch.relu(self.stem(x))))
        return self.fc(h.mean(dim=(2, 3)))


def _reference_prune(model, batches, forward, groups, sparsity, method):
    """Brute force: for each group of layers (in order), run the whole model, keep the layers' inputs, build each
    H = X~ X~^T / n in float64, solve it with ``solve_layer`` and write the weights. Returns the masks."""
    masks = {}
    modules = dict(model.named_modules())
    for group in groups:
        inputs = {n: [] for n in group}
        hooks = [
            modules[n].register_forward_pre_hook(
                lambda m, a, n=n, inputs=inputs: inputs[n].append(a[0].detach().double())
            )
            for n in group
        ]
        with torch.no_grad():
            for b in batches:
                forward(model, b)
        for h in hooks:
            h.remove()
        for n in group:
            m = modules[n]
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[n]])
            W = weight_matrix(m).double()
            if m.bias is not None:  # the constant input of the bias is the last column
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
            H = x.T @ x / x.shape[0]
            if m.bias is None:
                res = solve_layer(W, H, sparsity, method, solver=S64)
                set_weight_matrix(m, res.weight.to(W.dtype))
            else:
                res = solve_layer(W[:, :-1], H, sparsity, method, bias=W[:, -1], solver=S64)
                set_weight_matrix(m, torch.cat([res.weight, res.bias[:, None]], dim=1).to(W.dtype))
            masks[n] = res.mask
    return masks


def _block_layers(model, blocks):
    names = [n for n, m in model.named_modules() if is_prunable(m)]
    return [[n for n in names if n.startswith(b + ".")] for b in blocks]


@pytest.mark.parametrize("unit", ["block", "layer"])
@pytest.mark.parametrize("method", ["fast", "lobs"])
def test_matches_brute_force_reference(unit, method):
    """Same masks and, up to rounding, the same weights as the hand-written loop, for both units."""
    batches = _tokens()
    model, ref = _gpt2(), _gpt2()
    blocks = [f"transformer.h.{i}" for i in range(3)]
    groups = _block_layers(ref, blocks)
    if unit == "layer":
        groups = [[n] for g in groups for n in g]
    ref_masks = _reference_prune(ref, batches, _logits, groups, 0.5, method)
    report = prune_model(
        model,
        batches,
        0.5,
        method,
        allocation="uniform",
        sequential=True,
        sequential_unit=unit,
        solver=S64,
        forward_fn=_logits,
        recalibrate_bn=False,
    )
    assert list(report.layers) == [n for g in groups for n in g]
    pruned, reference = dict(model.named_modules()), dict(ref.named_modules())
    for n in report.layers:
        got, want = weight_matrix(pruned[n]).double(), weight_matrix(reference[n]).double()
        weights = got[:, :-1] if pruned[n].bias is not None else got
        assert torch.equal(weights != 0, ref_masks[n]), n
        # float32 weights: one rounding of the written weight, grown through the blocks before (each layer's H
        # differs by float32 rounding of its inputs, which OBS amplifies by at most cond(H)); 3 blocks x 4 layers.
        tol = 1e3 * torch.finfo(torch.float32).eps * float(want.abs().max())
        assert float((got - want).abs().max()) <= tol, n


def test_one_pass_before_the_first_block(monkeypatch):
    """Inside the pipeline the embedding runs once per batch to catch the first block's inputs, plus once for the
    chain check; the only other forwards through it are the tails that measure the model's output (dense and
    pruned, blocks skipped). Each block runs 3 times per batch: calibration, dense and pruned stream."""
    batches, n = _tokens(4), 4
    model = _gpt2()
    calls = {"wte": 0, "h0": 0, "tail": 0, "active": False}

    def counter(key):
        def count(*args):
            calls[key] += calls["active"]

        return count

    model.transformer.wte.register_forward_pre_hook(counter("wte"))
    model.transformer.h[0].attn.c_attn.register_forward_pre_hook(counter("h0"))  # runs only when the block does
    inner, tail = run_mod.run_sequential, sequential_mod.run_tail

    def wrapped(ctx, plan):
        calls["active"] = True
        try:
            return inner(ctx, plan)
        finally:
            calls["active"] = False

    monkeypatch.setattr(run_mod, "run_sequential", wrapped)
    monkeypatch.setattr(sequential_mod, "run_tail", lambda *a: counter("tail")() or tail(*a))
    prune_model(model, batches, 0.5, "fast", allocation="uniform", sequential=True, forward_fn=_logits)
    # The tails run in pieces of samples: the first batch's first sample alone (it sizes the pieces), then the rest.
    assert calls["tail"] == 2 * (n + 1)
    assert calls["wte"] == 1 + n + calls["tail"]
    assert calls["h0"] == 1 + 3 * n
    # a global allocation's costs walk the dense blocks first: one more catch, one more run of each block (its
    # outputs on the calibration run feed the next block)
    calls.update(wte=0, h0=0, tail=0)
    prune_model(model, batches, 0.5, "fast", allocation="global", sequential=True, forward_fn=_logits)
    assert calls["wte"] == 1 + 2 * n + 2 * (n + 1) and calls["h0"] == 1 + 4 * n


def _selected(model_fn, batches, forward, **kwargs):
    out = {}
    for sequential in (False, True):
        report = prune_model(model_fn(), batches, 0.5, "fast", sequential=sequential, forward_fn=forward, **kwargs)
        out[sequential] = report
    return out


@pytest.mark.parametrize("kind", ["gpt2", "encoder", "cnn"])
def test_prunes_the_layers_one_pass_prunes(kind):
    """Prefix, block and suffix layers: exactly the one-pass selection, and the report matches the model."""
    g = torch.Generator().manual_seed(0)
    if kind == "gpt2":
        model_fn, batches, forward = _gpt2, _tokens(), _logits
    elif kind == "encoder":
        model_fn, forward = _Encoder, None
        batches = [torch.randn(4, 5, 6, generator=g) for _ in range(3)]
    else:
        model_fn, forward = _StagedCNN, None
        batches = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layers left dense (embeddings, a tied head)
        reports = _selected(model_fn, batches, forward, prune_head=True, allocation="uniform")
    assert list(reports[True].layers) and set(reports[True].layers) == set(reports[False].layers)
    assert reports[True].sequential
    for r in reports[True].layers.values():
        assert r.sparsity == pytest.approx(0.5, abs=0.05)
    if kind != "gpt2":  # the prefix and the suffix are solved first and last
        names = list(reports[True].layers)
        assert names[0] in ("inp", "stem") and names[-1] in ("head", "fc")


def test_block_discovery():
    """HF decoder layers, nn.TransformerEncoder layers, torchvision ResNet stages; none in a plain MLP."""
    gpt2 = _gpt2(n_layer=2)
    layers = [n for n, m in gpt2.named_modules() if is_prunable(m)]
    assert find_blocks(gpt2, layers) == ["transformer.h.0", "transformer.h.1"]
    enc = _Encoder(layers=3)
    layers = [n for n, m in enc.named_modules() if is_prunable(m)]
    assert find_blocks(enc, layers) == [f"encoder.layers.{i}" for i in range(3)]
    torchvision = pytest.importorskip("torchvision")
    resnet = torchvision.models.resnet18(num_classes=10)
    layers = [n for n, m in resnet.named_modules() if is_prunable(m)]
    assert find_blocks(resnet, layers) == ["layer1", "layer2", "layer3", "layer4"]
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert find_blocks(mlp, ["0", "2", "4"]) == []


def test_resnet18_block_pipeline_runs_on_a_small_input():
    """torchvision's resnet18 at 16 x 16: stem, four stages and the classifier, pruned block by block."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 16, 16, generator=g)]
    names = ["conv1", "layer1.0.conv1", "layer4.1.conv2"]
    report = prune_model(
        model, batches, {n: 0.5 for n in names}, "fast", sequential=True, recalibrate_bn=False, prune_head=True
    )
    assert list(report.layers) == names
    for n in names:
        assert report.layers[n].sparsity == pytest.approx(0.5, abs=0.01)


def test_user_named_blocks_and_their_errors():
    """blocks=[...] names the boundaries; a wrong name or a non-chain is a clear error before any solve."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]
    report = prune_model(_StagedCNN(), batches, 0.5, "fast", sequential=True, blocks=["layer1", "layer2"])
    assert set(report.layers) == {"stem", "layer1.0", "layer1.2", "layer2.0", "layer2.2"}
    with pytest.raises(ValueError, match=r"blocks names 'layer3'.*did you mean"):
        prune_model(_StagedCNN(), batches, 0.5, "fast", sequential=True, blocks=["layer1", "layer3"])
    with pytest.raises(ValueError, match="do not form a chain"):
        prune_model(_StagedCNN(), batches, 0.5, "fast", sequential=True, blocks=["layer2", "layer1.0"])
    with pytest.raises(ValueError, match="only apply with sequential=True"):
        PruneOptions(blocks=["layer1"])


def test_model_without_blocks_falls_back_per_layer(caplog):
    """No blocks: the per-layer path (one forward per layer), said once in the log."""
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    batches = [torch.randn(16, 4, generator=torch.Generator().manual_seed(0))]
    calls = []
    mlp[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    with caplog.at_level("WARNING", logger="lightning_lobs.pruner"):
        report = prune_model(mlp, batches, 0.5, "fast", sequential=True, prune_head=True, allocation="uniform")
    assert [r.message.count("no repeated blocks") for r in caplog.records] == [1]
    assert list(report.layers) == ["0", "2", "4"]
    # plan's forward, the execution order, one calibration per layer, the report's dense and pruned forwards (in two
    # pieces: the first sample alone, which sizes the pieces, then the rest)
    assert len(calls) == 1 + 1 + 3 + 2 * 2


@pytest.mark.parametrize("unit", ["block", "layer"])
def test_only_one_blocks_hessians_alive(monkeypatch, unit):
    """The peak number of normalised Hessians alive at once is one block's layers (one layer with unit='layer')."""
    alive: list[weakref.ref] = []
    peak = [0]
    inner = calibrate_mod.normalise

    def counting(hessian):
        out = inner(hessian)
        alive.append(weakref.ref(out[0]))
        peak[0] = max(peak[0], sum(r() is not None for r in alive))
        return out

    monkeypatch.setattr(calibrate_mod, "normalise", counting)
    # GPT-2's block holds 4 layers (c_attn, c_proj, c_fc, c_proj). A global allocation's dense costs walk calibrates
    # a whole block whatever the unit, while engine.allocate's loop still holds the previous layer's H: one more
    # (4 if that loop ever drops it first).
    for allocation, expected in (("uniform", {4 if unit == "block" else 1}), ("global", {4, 5})):
        peak[0] = 0
        prune_model(
            _gpt2(),
            _tokens(),
            0.5,
            "fast",
            allocation=allocation,
            sequential=True,
            sequential_unit=unit,
            forward_fn=_logits,
        )
        assert peak[0] in expected, allocation


def test_failure_mid_pipeline_restores_everything(monkeypatch):
    model = _gpt2()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    masks = MaskSet()
    inner = sequential_mod.solve_owned

    def failing(ctx, layer, *args):
        if layer.name.startswith("transformer.h.1."):
            raise RuntimeError("injected failure in block 1")
        return inner(ctx, layer, *args)

    monkeypatch.setattr(sequential_mod, "solve_owned", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        prune_model(model, _tokens(), 0.5, "fast", sequential=True, forward_fn=_logits, masks=masks)
    for k, v in model.state_dict().items():
        assert torch.equal(v, dense[k]), k
    assert masks.masks == {}


def test_nm_pattern_and_earlier_masks():
    """2:4 in block mode; a second unstructured step keeps the first step's zeros."""
    model = _gpt2()
    report = prune_model(model, _tokens(), 0.5, "fast", pattern="2:4", sequential=True, forward_fn=_logits)
    for n in report.layers:
        w = model.get_submodule(n).weight.detach()
        groups = w.T.reshape(w.shape[1], -1, 4)  # HF Conv1D keeps (in, out): the groups of 4 run along the inputs
        assert bool(((groups != 0).sum(-1) == 2).all()), n
    model = _gpt2()
    first = prune_model(model, _tokens(), 0.3, "fast", sequential=True, forward_fn=_logits, allocation="uniform")
    zeros = {n: model.get_submodule(n).weight.detach() == 0 for n in first.layers}
    second = prune_model(model, _tokens(), 0.6, "fast", sequential=True, forward_fn=_logits, masks=first.masks)
    for n in second.layers:
        w = model.get_submodule(n).weight.detach()
        assert bool(w[zeros[n]].eq(0).all()), n
    assert second.sparsity == pytest.approx(0.6, abs=0.01)
    assert math.isfinite(second.model_output_error)


@pytest.mark.parametrize("kind", ["gpt2", "encoder", "cnn"])
@pytest.mark.parametrize("unit", ["block", "layer"])
def test_output_errors_measured_inside_are_the_models(kind, unit, monkeypatch):
    """The errors the walk measures as it goes equal the report's full measure (a dense and a pruned forward of the
    whole model per batch) run afterwards on the pruned model against the dense weights; the prune itself never
    runs that measure."""
    monkeypatch.setattr(report_mod, "measure", lambda *a, **k: pytest.fail("measured by extra full forwards"))
    # Both sides on whole batches, the same float32 operations (a layer run on a piece of a batch rounds otherwise;
    # the pieces against a direct float64 computation: tests/test_memory_pipeline.py).
    whole = type("Whole", (), {"pieces": lambda self, batch: None})
    monkeypatch.setattr(report_mod, "PieceRows", whole)
    monkeypatch.setattr(sequential_mod, "PieceRows", whole)
    g = torch.Generator().manual_seed(0)
    if kind == "gpt2":
        model, batches, forward = _gpt2(), _tokens(), _logits
    elif kind == "encoder":
        model, batches, forward = _Encoder(), [torch.randn(4, 5, 6, generator=g) for _ in range(3)], None
    else:
        model, batches, forward = _StagedCNN(), [torch.randn(4, 3, 8, 8, generator=g) for _ in range(3)], None
    dense = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layers left dense
        report = prune_model(
            model, batches, 0.5, "fast", sequential=True, sequential_unit=unit, forward_fn=forward, prune_head=True
        )
    named = {**dict(model.named_modules()), **projections(model)}
    named_dense = {**dict(dense.named_modules()), **projections(dense)}
    modules = {n: named[n] for n in report.layers}

    snapshot = param_state({n: named_dense[n] for n in report.layers})
    run = (lambda b: forward(model, b)) if forward else model
    with eval_no_grad(model), feeding(model, modules):
        errors, last, model_error, _ = measure(model, batches, modules, snapshot, {}, run, RankInfo())
    # The same float32 operations on the same inputs: only the float64 sums of squared errors differ in order.
    rel = 1e3 * torch.finfo(torch.float64).eps
    for n in report.layers:
        assert report.layers[n].output_error == pytest.approx(errors[n], rel=rel), n
    assert report.output_error == pytest.approx(last, rel=rel)
    assert report.model_output_error == pytest.approx(model_error, rel=rel)
    assert math.isfinite(report.model_output_error)


def test_batchnorm_reestimated_after_the_walk_is_measured_afterwards(monkeypatch):
    """With BatchNorm statistics re-estimated after pruning, errors measured inside the walk would be stale: the
    report measures them on the final model instead."""
    calls = []
    inner = report_mod.measure
    monkeypatch.setattr(report_mod, "measure", lambda *a, **k: calls.append(1) or inner(*a, **k))
    model = _StagedCNN()
    model.layer1.insert(1, nn.BatchNorm2d(6))
    batches = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    report = prune_model(model, batches, 0.5, "fast", sequential=True)
    assert calls == [1] and math.isfinite(report.model_output_error)


def test_block_options_are_checked_on_construction():
    with pytest.raises(ValueError, match=r"sequential_unit must be one of \('block', 'layer'\), got 'row'"):
        PruneOptions(sequential=True, sequential_unit="row")
    with pytest.raises(ValueError, match="blocks must be a non-empty list of module names"):
        PruneOptions(sequential=True, blocks=[1])
    with pytest.raises(ValueError, match="blocks must be a non-empty list of module names"):
        PruneOptions(sequential=True, blocks=[])
    assert PruneOptions(sequential=True, blocks="encoder").blocks == ("encoder",)
    assert PruneOptions(sequential=True, blocks=["a", "b"]).blocks == ("a", "b")
    assert PruneOptions().sequential_unit == "block" and PruneOptions().blocks is None


def _llama(layers: int = 2) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_llama_blocks_get_their_rotary_embeddings_and_masks(caplog):
    """A Llama decoder layer takes position embeddings and a mask as keywords: caught once at the first block and
    given to every block, the result is the brute-force loop's (each layer's inputs from the whole model)."""
    batches = _tokens()
    model, ref = _llama(), _llama()
    blocks = ["model.layers.0", "model.layers.1"]
    assert find_blocks(model, [n for n, m in model.named_modules() if is_prunable(m)]) == blocks
    groups = _block_layers(ref, blocks)
    ref_masks = _reference_prune(ref, batches, _logits, groups, 0.5, "fast")
    with caplog.at_level("WARNING", logger="lightning_lobs.pruner"):
        report = prune_model(
            model, batches, 0.5, "fast", allocation="uniform", sequential=True, solver=S64, forward_fn=_logits
        )
    assert not caplog.records  # no fall back
    assert sorted(report.layers) == sorted(n for g in groups for n in g)
    pruned, reference = dict(model.named_modules()), dict(ref.named_modules())
    for n in report.layers:
        got, want = pruned[n].weight.detach().double(), reference[n].weight.detach().double()
        assert torch.equal(got != 0, ref_masks[n]), n
        tol = 1e3 * torch.finfo(torch.float32).eps * float(want.abs().max())  # as in the GPT-2 reference test
        assert float((got - want).abs().max()) <= tol, n


def test_callback_takes_the_block_options_and_prunes_as_prune_model_does(tmp_path):
    """LOBSPruning(sequential=True, sequential_unit=..., blocks=...) reaches the engine: the same masks as prune_model."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lobs import LOBSPruning

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _StagedCNN()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, _):
            return self(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: the weights stay the pruned ones

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]
    options = dict(sequential=True, sequential_unit="layer", blocks=["layer1", "layer2"], allocation="uniform")
    torch.manual_seed(5)
    lit = Lit()
    reference = copy.deepcopy(lit.net)
    expected = prune_model(reference, batches, 0.5, "fast", **options)
    # the callback prunes the LightningModule: its blocks are named from there
    options["blocks"] = ["net.layer1", "net.layer2"]
    callback = LOBSPruning(
        0.5, prune_epoch=0, method="fast", calibration_dataloader=batches, log_table=False, **options
    )
    assert callback.options[0].sequential_unit == "layer" and callback.options[0].blocks == ("net.layer1", "net.layer2")
    data = DataLoader(TensorDataset(torch.cat(batches)), batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(lit, data)
    assert set(callback.masks) == {f"net.{n}" for n in expected.layers}
    for n in expected.layers:
        assert torch.equal(callback.masks[f"net.{n}"], expected.masks[n]), n
    with pytest.raises(ValueError, match="sequential_unit must be one of"):
        LOBSPruning(0.5, prune_epoch=0, sequential=True, sequential_unit="row")
