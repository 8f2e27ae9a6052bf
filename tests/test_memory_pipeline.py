"""Issue 19 (peak memory): the default pipeline walks a model's blocks on the dense network, one block's Hessians at
a time, with the one-pass pipeline's results; the undo copy is the plan's; the model-output comparison runs in
pieces of samples, with the errors a direct float64 computation gives.

References: the one-pass pipeline itself (forced by making the chain probe fail), and a direct computation of the
model output's RMS error from a dense copy and the pruned model.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lightning_lobs.engine.run as run_mod
import lightning_lobs.engine.sequential as sequential_mod
from lightning_lobs import prune_model
from lightning_lobs.engine.forward import PieceRows, batch_rows, first_sample, slice_batch

transformers = pytest.importorskip("transformers")


def _gpt2(n_layer: int = 3, seed: int = 0) -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=4, vocab_size=61, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def _tokens(n: int = 3, rows: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 61, (rows, 12), generator=g) for _ in range(n)]


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).logits


def _prune_both(monkeypatch, **kwargs):
    """The same prune by the block walk (the default now) and by the one-pass pipeline (the probe made to fail)."""
    walked, one_pass = _gpt2(), _gpt2()
    batches = _tokens()
    seen: list[list[str]] = []
    calibrate = sequential_mod.calibrate

    def spy(ctx, plan, names, **kw):
        seen.append(list(names))
        return calibrate(ctx, plan, names, **kw)

    monkeypatch.setattr(sequential_mod, "calibrate", spy)
    r_walk = prune_model(walked, batches, 0.5, forward_fn=_logits, **kwargs)
    monkeypatch.undo()
    monkeypatch.setattr(run_mod, "find_chain", lambda ctx, plan: "forced one pass")
    r_one = prune_model(one_pass, batches, 0.5, forward_fn=_logits, **kwargs)
    return (walked, r_walk), (one_pass, r_one), seen


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"method": "exact"}, {"method": "fast", "allocation": "uniform"}],
    ids=["auto-global", "exact-global-traces", "fast-uniform"],
)
def test_default_walk_gives_the_one_pass_results(monkeypatch, kwargs):
    """Same Hessians (the blocks run on the dense network's inputs, the same float32 operations), so the same
    masks, targets and weights; only one block's layers are ever calibrated together."""
    (walked, r_walk), (one_pass, r_one), seen = _prune_both(monkeypatch, **kwargs)
    assert list(r_walk.layers) == list(r_one.layers)
    assert seen and max(len(s) for s in seen) <= 4  # a GPT-2 block has 4 prunable layers
    p_walk, p_one = dict(walked.named_parameters()), dict(one_pass.named_parameters())
    for n, p in p_one.items():
        scale = float(p.detach().abs().max()) or 1.0
        # identical inputs to identical solves: equal up to a few float32 roundings of the weights' magnitude
        assert torch.allclose(p_walk[n], p, rtol=0, atol=16 * torch.finfo(p.dtype).eps * scale), n
        assert torch.equal(p_walk[n] == 0, p == 0), n
    for n in r_one.layers:
        assert r_walk.layers[n].target_sparsity == r_one.layers[n].target_sparsity
        assert r_walk.layers[n].layer_error == pytest.approx(r_one.layers[n].layer_error, rel=1e-6)
        # measured inside the walk (dense and pruned streams) against the report's whole forwards afterwards
        assert r_walk.layers[n].output_error == pytest.approx(r_one.layers[n].output_error, rel=1e-4)
    assert r_walk.model_output_error == pytest.approx(r_one.model_output_error, rel=1e-4)


def test_default_without_blocks_keeps_one_pass(monkeypatch):
    """A model without blocks (an MLP) is calibrated in one pass over the batches, every layer together."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    called = []
    calibrate = run_mod.calibrate
    monkeypatch.setattr(
        run_mod,
        "calibrate",
        lambda ctx, plan, names, **kw: called.append(list(names)) or calibrate(ctx, plan, names, **kw),
    )
    prune_model(model, [torch.randn(32, 8) for _ in range(2)], 0.5, prune_head=True)
    assert called == [["0", "2", "4"]]


def _direct_model_error(dense: nn.Module, pruned: nn.Module, batches: list[torch.Tensor]) -> float:
    """RMS over samples of ||pruned logits - dense logits||, whole batches at once, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            diff = _logits(pruned, b).double() - _logits(dense, b).double()
            total += float(diff.reshape(diff.shape[0], -1).square().sum())
            count += diff.shape[0]
    return math.sqrt(total / count)


@pytest.mark.parametrize("sequential", [False, True])
def test_model_output_error_in_pieces_equals_direct(monkeypatch, sequential):
    """The tail compared in pieces (pieces of one sample here: a tiny limit) gives the direct whole-batch error up
    to float32 rounding of the logits (relative eps32 * |logits| / |difference|, with margin)."""
    monkeypatch.setattr("lightning_lobs.engine.forward.OUTPUT_PIECE_BYTES", 1)
    monkeypatch.setattr(sequential_mod, "PieceRows", lambda: PieceRows(limit=1))
    model = _gpt2()
    dense = copy.deepcopy(model)
    batches = _tokens()
    report = prune_model(model, batches, 0.5, "fast", allocation="uniform", forward_fn=_logits, sequential=sequential)
    direct = _direct_model_error(dense, model, batches)
    with torch.no_grad():
        size = max(float(_logits(dense, b).abs().max()) for b in batches)
    rel = 1e3 * torch.finfo(torch.float32).eps * size / direct
    assert report.model_output_error == pytest.approx(direct, rel=rel)


def test_measure_in_pieces_equals_direct(monkeypatch):
    """The report's measuring (a model without blocks: one pass, then whole forwards) in pieces of one sample."""
    monkeypatch.setattr("lightning_lobs.engine.report.PieceRows", lambda: PieceRows(limit=1))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    dense = copy.deepcopy(model)
    batches = [torch.randn(6, 8) for _ in range(3)]
    report = prune_model(model, batches, 0.5, prune_head=True)
    with torch.no_grad():
        total = sum(float((model(b).double() - dense(b).double()).square().sum()) for b in batches)
        size = max(float(dense(b).abs().max()) for b in batches)
    direct = math.sqrt(total / 18)
    rel = 1e3 * torch.finfo(torch.float32).eps * size / direct
    assert report.model_output_error == pytest.approx(direct, rel=rel)


def test_slicing_helpers():
    batch = {"input_ids": torch.arange(12).reshape(4, 3), "mask": torch.ones(4, 3), "name": "x"}
    assert batch_rows(batch) == 4
    part = slice_batch(batch, slice(1, 3))
    assert torch.equal(part["input_ids"], batch["input_ids"][1:3]) and part["name"] == "x"
    assert first_sample(batch)["mask"].shape == (1, 3)
    assert batch_rows({"a": torch.ones(4, 2), "b": torch.ones(3)}) is None  # lengths differ: not cut
    assert batch_rows(torch.tensor(1.0)) is None
    rows = PieceRows(limit=8 * 4 * 2)  # two rows of 8 float32
    cuts = rows.pieces(torch.ones(7, 8))
    first = next(cuts)
    rows.learn(torch.ones(1, 8), 1)
    assert [first, *cuts] == [slice(0, 1), slice(1, 3), slice(3, 5), slice(5, 7)]


@pytest.mark.parametrize("where", ["second block's solve", "report"])
@pytest.mark.parametrize("sequential", [False, True])
def test_failure_after_blocks_were_written_restores_the_model(monkeypatch, where, sequential):
    """The undo copy is the plan's matrices: a failure after some blocks were written (inside the walk, or in the
    report after the commit) puts every weight and bias back bit for bit."""
    model = _gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = [0]
    if where == "report":
        import lightning_lobs.engine.report as report_mod

        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(report_mod, "bound", broken)
    else:
        solve_owned = sequential_mod.solve_owned

        def failing(ctx, layer, *args):
            calls[0] += 1
            if calls[0] == 5:  # the first layer of the second block: the first block is written by now
                raise RuntimeError("boom")
            return solve_owned(ctx, layer, *args)

        monkeypatch.setattr(sequential_mod, "solve_owned", failing)
    with pytest.raises(RuntimeError, match="boom"):
        prune_model(model, _tokens(), 0.5, "fast", allocation="uniform", forward_fn=_logits, sequential=sequential)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_a_forward_fn_that_needs_whole_batches_is_run_on_them():
    """A forward_fn closing over a tensor of the batch's size gives a whole batch's output on a piece: the
    comparison sees that on the first piece and runs whole batches, with the direct error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    dense = copy.deepcopy(model)
    extra = torch.randn(6, 4)
    batches = [torch.randn(6, 8) for _ in range(3)]
    seen = []

    def forward(m, x):
        seen.append(len(x))
        return m(x) + extra

    report = prune_model(model, batches, 0.5, prune_head=True, forward_fn=forward)
    assert 1 in seen  # the first piece was tried
    with torch.no_grad():
        total = sum(float((forward(model, b).double() - forward(dense, b).double()).square().sum()) for b in batches)
        size = max(float(forward(dense, b).abs().max()) for b in batches)
    direct = math.sqrt(total / 18)
    assert report.model_output_error == pytest.approx(direct, rel=1e3 * torch.finfo(torch.float32).eps * size / direct)


class _BlockWithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.unused = nn.Linear(16, 16)  # never called by forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.a(x)) + x


class _NetWithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(_BlockWithUnused() for _ in range(3))
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


@pytest.mark.parametrize("sequential", [False, True])
def test_never_called_layers_in_blocks_are_left_dense_with_a_warning(monkeypatch, sequential):
    """The block walks with a global allocation warn and skip a layer the forward never calls, as the one-pass
    pipeline does (they used to raise); the default walk still gives the one-pass results."""
    torch.manual_seed(0)
    walked = _NetWithUnused()
    one_pass = copy.deepcopy(walked)
    batches = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with pytest.warns(UserWarning, match="never called"):
        report = prune_model(walked, batches, 0.5, sequential=sequential)
    unused = {f"blocks.{i}.unused" for i in range(3)}
    assert not unused & set(report.layers) and {f"blocks.{i}.a" for i in range(3)} <= set(report.layers)
    for name in unused:
        assert torch.equal(walked.get_submodule(name).weight, one_pass.get_submodule(name).weight)
    if sequential:
        return
    monkeypatch.setattr(run_mod, "find_chain", lambda ctx, plan: "forced one pass")
    with pytest.warns(UserWarning, match="never called"):
        want = prune_model(one_pass, batches, 0.5)
    assert list(report.layers) == list(want.layers)
    for n in want.layers:
        assert report.layers[n].target_sparsity == want.layers[n].target_sparsity, n
        assert torch.equal(walked.get_submodule(n).weight == 0, one_pass.get_submodule(n).weight == 0), n
