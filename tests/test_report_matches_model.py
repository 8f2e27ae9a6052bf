"""What the report says is what the model holds, or a clear refusal.

Which layers are pruned, left dense or refused (parametrized and tied weights, transformers, layers never called),
and the checks made before any work (numbers, costs, batches); each checks the report against the model's
actual zeros (never against the report's own targets).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lobs import PruneOptions, prune_model
from lightning_lobs.attention import prior_mask, projections
from lightning_lobs.config import as_fraction
from lightning_lobs.selection import select_layers

transformers = pytest.importorskip("transformers")


def _zeros(t: torch.Tensor) -> float:
    return float((t.detach() == 0).sum()) / t.numel()


def _check_report_matches_model(model: nn.Module, report) -> None:
    """Per-layer and overall sparsity of the report equal the zeros the model holds."""
    modules = dict(model.named_modules())
    modules.update(projections(model))  # attention's q/k/v blocks, masked on their Parameter
    zeros = total = 0
    for name, layer in report.layers.items():
        w = modules[name].weight
        assert layer.sparsity == pytest.approx(_zeros(w), abs=0.0)
        assert bool((w.detach()[~prior_mask(modules[name], name, report.masks.masks).to(w.device)] == 0).all())
        zeros += int((w.detach() == 0).sum())
        total += w.numel()
    assert report.sparsity == pytest.approx(zeros / total, abs=0.0)
    weights = [p for p in model.parameters() if p.dim() >= 2]
    all_zeros = sum(int((p.detach() == 0).sum()) for p in weights) / sum(p.numel() for p in weights)
    assert report.model_sparsity == pytest.approx(all_zeros, abs=0.0)
    params = list(model.parameters())
    assert report.total_parameters == sum(p.numel() for p in params)
    assert report.nonzero_parameters == sum(int((p.detach() != 0).sum()) for p in params)


def _mlp_loader(n: int = 64, d: int = 12, seed: int = 0, scale: float = 1.0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * scale
    return DataLoader(TensorDataset(x, torch.zeros(n)), batch_size=16)


# --------------------------------------------------------------------------- parametrized and tied weights


@pytest.mark.parametrize(
    "wrap",
    [
        lambda m: torch.nn.utils.parametrizations.weight_norm(m),
        lambda m: torch.nn.utils.parametrizations.spectral_norm(m),
        lambda m: torch.nn.utils.weight_norm(m),  # old-style hook
        lambda m: torch.nn.utils.spectral_norm(m),  # old-style hook
    ],
    ids=["weight_norm", "spectral_norm", "old_weight_norm", "old_spectral_norm"],
)
def test_parametrized_weight_is_refused_naming_layer_and_fix(wrap):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the old-style hooks
        model = nn.Sequential(wrap(nn.Linear(12, 8)), nn.ReLU(), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'0'.*(parametrization|hook).*would not hold.*(remove|exclude)"):
        prune_model(model, _mlp_loader(), sparsity=0.5, prune_head=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    report = prune_model(
        model, _mlp_loader(), sparsity=0.5, exclude=["0"], prune_head=True
    )  # the fix the message names
    assert list(report.layers) == ["2"]
    _check_report_matches_model(model, report)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 12)
        self.b = nn.Linear(12, 12)
        self.b.weight = self.a.weight  # tied
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_tied_weights_are_left_dense_with_one_warning_and_report_is_true():
    torch.manual_seed(0)
    model = _Tied()
    shared = model.a.weight.detach().clone()
    with pytest.warns(
        UserWarning,
        match=r"2 weight-bearing module\(s\) not pruned.*'a'.*shared with b\.weight.*'b'.*shared with a\.weight",
    ):
        report = prune_model(model, _mlp_loader(), sparsity=0.5, prune_head=True)
    assert list(report.layers) == ["head"]
    assert set(report.skipped) == {"a", "b"}
    assert torch.equal(model.a.weight, shared)  # the shared tensor is untouched
    _check_report_matches_model(model, report)


def test_tied_weight_named_explicitly_is_an_error():
    model = _Tied()
    with pytest.raises(ValueError, match=r"module 'a'.*shared with b\.weight.*untie"):
        prune_model(model, _mlp_loader(), sparsity={"a": 0.5}, prune_head=True)


# --------------------------------------------------------------------------- transformers


def _tokens(vocab: int, n: int = 8, length: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return DataLoader(TensorDataset(ids), batch_size=4)


def _gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=64,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def test_gpt2_conv1d_layers_pruned_tied_head_left_dense():
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    embedding = model.transformer.wte.weight.detach().clone()
    fwd = lambda m, batch: m(input_ids=batch[0]).logits  # noqa: E731
    with pytest.warns(
        UserWarning, match=r"not pruned.*'transformer\.wte'.*'lm_head'.*shared with transformer\.wte\.weight"
    ):
        report = prune_model(
            model, _tokens(64), sparsity=0.5, method="exact", allocation="uniform", forward_fn=fwd, prune_head=True
        )
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert sorted(report.layers) == sorted(conv1d) and len(conv1d) == 8
    assert "lm_head" in report.skipped and "transformer.wte" in report.skipped and "transformer.wpe" in report.skipped
    assert torch.equal(model.transformer.wte.weight, embedding)  # the tied embedding is never pruned silently
    for name in conv1d:
        w = dict(model.named_modules())[name].weight  # (in, out): pruned along the transposed layout
        assert _zeros(w) == pytest.approx(0.5, abs=1.0 / w.shape[1])
    _check_report_matches_model(model, report)
    assert report.model_sparsity < report.sparsity  # embeddings are dense, and the report says so
    assert math.isfinite(report.output_error) and report.output_error > 0


def test_gpt2_conv1d_solve_equals_linear_with_transposed_weight():
    """A Conv1D is pruned exactly as an nn.Linear holding W^T would be."""
    torch.manual_seed(1)
    conv = transformers.pytorch_utils.Conv1D(6, 10)
    lin = nn.Linear(10, 6)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    loader = _mlp_loader(d=10)
    r1 = prune_model(conv, loader, sparsity=0.5, method="exact", recalibrate_bn=False, prune_head=True)
    r2 = prune_model(lin, loader, sparsity=0.5, method="exact", recalibrate_bn=False, prune_head=True)
    assert torch.equal(conv.weight.t() == 0, lin.weight == 0)
    tol = 64 * torch.finfo(torch.float32).eps * float(lin.weight.detach().abs().max())
    torch.testing.assert_close(conv.weight.t(), lin.weight, atol=tol, rtol=0)
    assert r1.layers[""].layer_error == pytest.approx(r2.layers[""].layer_error, rel=1e-4)


def test_tiny_bert_linear_layers_pruned_embeddings_and_tied_decoder_left_dense():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForMaskedLM(cfg)
    fwd = lambda m, batch: m(input_ids=batch[0]).logits  # noqa: E731
    with pytest.warns(UserWarning, match="not pruned"):
        report = prune_model(model, _tokens(64), sparsity=0.6, method="fast", forward_fn=fwd, prune_head=True)
    names = set(report.layers)
    assert any(n.endswith("attention.self.query") for n in names)
    assert any(n.endswith("intermediate.dense") for n in names)
    decoder = "cls.predictions.decoder"
    if model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight:
        assert decoder in report.skipped and decoder not in names
    assert "bert.embeddings.word_embeddings" in report.skipped
    _check_report_matches_model(model, report)


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_encoder_with_float_sparsity_prunes_attention_and_feed_forward(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    model = nn.Sequential(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False), nn.Linear(16, 4))
    x = torch.randn(8, 5, 16) if batch_first else torch.randn(5, 8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing to warn about
        report = prune_model(
            model, DataLoader(TensorDataset(x), batch_size=4), sparsity=0.5, method="exact", prune_head=True
        )
    ends = ("q_proj", "k_proj", "v_proj", "out_proj", "linear1", "linear2")
    assert sorted(report.layers) == sorted(
        f"0.layers.{i}.{'self_attn.' if e.endswith('proj') else ''}{e}" for i in range(2) for e in ends
    ) + ["1"]
    assert report.skipped == {}
    _check_report_matches_model(model, report)


# --------------------------------------------------------------------------- cost, batches, messages


def test_explicit_exact_on_a_huge_layer_warns_with_estimate_before_any_work():
    model = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    calls = []

    def forward(m, batch):
        calls.append(1)
        raise RuntimeError("stop: the warning must come before calibration")

    loader = DataLoader(TensorDataset(torch.zeros(2, 4096)), batch_size=2)
    with pytest.warns(UserWarning, match=r"method='exact' will take about \d+ min.*method='auto'"):
        with pytest.raises(RuntimeError, match="stop"):
            prune_model(
                model,
                loader,
                sparsity=0.5,
                method="exact",
                forward_fn=forward,
                calibration=dict(memory_budget_bytes=1 << 40),
                prune_head=True,
            )
    assert len(calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto picks fast there: no warning
        with pytest.raises(RuntimeError, match="stop"):
            prune_model(
                model,
                loader,
                sparsity=0.5,
                method="auto",
                forward_fn=forward,
                calibration=dict(memory_budget_bytes=1 << 40),
                prune_head=True,
            )


def test_empty_calibration_batches_are_left_out_and_counted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(32, 12)
    batches = [(x[:16],), (x[:0],), (x[16:],), (x[:0],)]
    with pytest.warns(UserWarning, match="2 calibration batch"):
        report = prune_model(model, batches, sparsity=0.5, prune_head=True)
    assert report.empty_batches == 2
    assert math.isfinite(report.output_error)
    _check_report_matches_model(model, report)
    with pytest.raises(ValueError, match="all 2 batches were empty"):
        prune_model(nn.Linear(12, 3), [(x[:0],), (x[:0],)], sparsity=0.5, prune_head=True)


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), 0.5])
def test_numpy_and_torch_scalars_are_accepted(value):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    report = prune_model(model, _mlp_loader(), sparsity=value, allocation="uniform", prune_head=True)
    assert report.sparsity == pytest.approx(0.5, abs=0.02)
    assert as_fraction(value, "sparsity") == 0.5


def test_solver_given_as_a_mapping_is_accepted_and_unknown_keys_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 3))
    report = prune_model(model, _mlp_loader(), sparsity=0.5, solver={"damp": 0.1}, prune_head=True)
    assert report.layers["0"].damp >= 0.1
    with pytest.raises(ValueError, match=r"solver has unknown keys \['dampening'\]; SolverOptions takes"):
        prune_model(model, _mlp_loader(), sparsity=0.5, solver={"dampening": 0.1}, prune_head=True)
    with pytest.raises(TypeError, match="solver must be a SolverOptions"):
        prune_model(model, _mlp_loader(), sparsity=0.5, solver=0.1, prune_head=True)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['sparsty'\]; the options are"):
        prune_model(model, _mlp_loader(), sparsty=0.5, prune_head=True)


def test_batchnorm_with_one_sample_batches_names_recalibrate_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(1, 12),) for _ in range(4)]
    with pytest.raises(ValueError, match=r"recalibrate_bn=True.*more than one sample.*recalibrate_bn=False"):
        prune_model(model, batches, sparsity=0.5, prune_head=True)
    for k, v in model.state_dict().items():  # weights and BN statistics restored after a failure past the BN reset
        assert torch.equal(v, before[k]), k
    report = prune_model(model, batches, sparsity=0.5, recalibrate_bn=False, prune_head=True)
    _check_report_matches_model(model, report)


def test_huge_inputs_prune_like_normal_ones():
    """Inputs near 1e20 are finite in float32; their Hessian is normalised, so the solve is the same."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 16, bias=False), nn.ReLU(), nn.Linear(16, 3, bias=False))
    small, big = (
        base,
        type(base)(
            *[type(m)(m.in_features, m.out_features, bias=False) if isinstance(m, nn.Linear) else m for m in base]
        ),
    )
    big.load_state_dict(small.state_dict())
    r1 = prune_model(small, _mlp_loader(scale=1.0), sparsity=0.5, method="exact", allocation="uniform", prune_head=True)
    r2 = prune_model(big, _mlp_loader(scale=1e20), sparsity=0.5, method="exact", allocation="uniform", prune_head=True)
    for name in r1.layers:
        agree = float((r1.masks[name] == r2.masks[name]).float().mean())
        assert agree >= 0.95, name  # scale-free up to rounding of near-ties
        assert math.isfinite(r2.layers[name].layer_error)
    assert r2.layers["0"].layer_error / 1e40 == pytest.approx(r1.layers["0"].layer_error, rel=1e-3)


def test_float32_hessian_overflow_is_named():
    model = nn.Sequential(nn.Linear(12, 3))
    with pytest.raises(
        ValueError, match=r"Hessian of layer '0' overflowed torch\.float32.*hessian_dtype=torch\.float64"
    ):
        prune_model(
            model, _mlp_loader(scale=1e25), sparsity=0.5, calibration=dict(hessian_dtype=torch.float32), prune_head=True
        )


def test_nan_weights_are_named_before_any_work():
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    calls = []
    with pytest.raises(ValueError, match=r"\['0\.weight'\] contain NaN or inf"):
        prune_model(
            model, _mlp_loader(), sparsity=0.5, exclude=["0"], forward_fn=lambda m, b: calls.append(1), prune_head=True
        )
    assert not calls


def test_calibration_does_not_advance_the_global_rng():
    torch.manual_seed(123)
    model = nn.Sequential(nn.Linear(12, 3))
    loader = DataLoader(TensorDataset(torch.randn(64, 12)), batch_size=8, shuffle=True)
    state = torch.get_rng_state()
    prune_model(model, loader, sparsity=0.5, calibration_batches=3, prune_head=True)
    assert torch.equal(torch.get_rng_state(), state)


def test_never_called_layer_is_skipped_under_float_sparsity_but_an_error_when_named():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(12, 3)
            self.spare = nn.Linear(12, 3)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    with pytest.warns(UserWarning, match=r"'spare': never called"):
        report = prune_model(model, _mlp_loader(), sparsity=0.5, prune_head=True)
    assert list(report.layers) == ["used"] and "spare" in report.skipped
    with pytest.raises(RuntimeError, match=r"\['spare'\] were never called"):
        prune_model(Unused(), _mlp_loader(), sparsity={"spare": 0.5, "used": 0.5}, prune_head=True)


def test_select_layers_lists_every_weight_bearing_module_it_leaves_alone():
    model = nn.Sequential(nn.Embedding(10, 12), nn.Linear(12, 12), nn.ConvTranspose1d(3, 3, 2), nn.LayerNorm(12))
    with pytest.warns(UserWarning, match=r"2 weight-bearing module\(s\).*'0': Embedding.*'2': ConvTranspose1d") as rec:
        sel = select_layers(model, 0.5)
    assert len(rec) == 1
    assert list(sel.targets) == ["1"] and set(sel.skipped) == {"0", "2"}  # LayerNorm's 1-D weight is not a matrix


def test_prune_options_is_the_one_option_list():
    opts = PruneOptions(
        sparsity=np.float32(0.25), pattern=(2, 4), exclude="head*", solver={"damp": 0.05}, prune_head=True
    )
    assert opts.sparsity == 0.25 and isinstance(opts.sparsity, float)
    assert opts.pattern == "2:4" and opts.nm.n == 2 and opts.exclude == ("head*",)
    assert opts.solver.damp == 0.05 and opts.allocation_name == "uniform"  # a pattern fixes per-layer sparsities
    with pytest.raises(ValueError, match=r"method must be one of \('auto', 'exact', 'lobs', 'fast', 'admm'\)"):
        PruneOptions(method="obs", prune_head=True)
    with pytest.raises(ValueError, match="sequential must be True or False"):
        PruneOptions(sequential="yes", prune_head=True)


def test_prune_model_progress_reports_every_phase_with_eta():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    events = []
    prune_model(model, _mlp_loader(), sparsity=0.5, progress=events.append, prune_head=True)
    phases = [e.phase for e in events]
    assert phases[:4] == ["calibrate"] * 4  # one per batch
    assert phases.count("solve") == 3
    solves = [e for e in events if e.phase == "solve"]
    assert [e.done for e in solves] == [1, 2, 3] and all(e.total == 3 for e in solves)
    assert [e.layer for e in solves] == ["0", "2", "4"]
    assert solves[-1].eta == pytest.approx(0.0, abs=1e-9) and all(e.eta is not None and e.eta >= 0 for e in solves)
    assert all(b.elapsed >= a.elapsed for a, b in zip(events, events[1:]))
    assert phases[-1] == "measure"
    assert "L-OBS solve 3/3 4" in solves[-1].describe()


def test_prune_model_progress_true_prints_lines(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    prune_model(model, _mlp_loader(), sparsity=0.5, progress=True, prune_head=True)
    err = capsys.readouterr().err
    assert "L-OBS solve 2/2" in err and "L-OBS measure 1/1" in err


@pytest.mark.parametrize("method", ["fast", "exact"])
def test_gpt2_global_allocation_counts_conv1d_columns_right(method):
    """Conv1D's weight is (in, out): the global allocation must count rows x inputs, not weight[0]."""
    model = _gpt2(seed=2)
    fwd = lambda m, batch: m(input_ids=batch[0]).logits  # noqa: E731
    with pytest.warns(UserWarning, match="not pruned"):
        report = prune_model(model, _tokens(64), sparsity=0.6, method=method, forward_fn=fwd, prune_head=True)
    assert report.allocation == "global"
    total = sum(dict(model.named_modules())[n].weight.numel() for n in report.layers)
    zeros = sum(int((dict(model.named_modules())[n].weight == 0).sum()) for n in report.layers)
    assert zeros == round(0.6 * total)
    assert len({round(lr.sparsity, 3) for lr in report.layers.values()}) > 1  # really allocated per layer
    _check_report_matches_model(model, report)


def test_sequential_progress_counts_layers_in_the_solve_phase():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    events = []
    prune_model(model, _mlp_loader(), sparsity=0.5, sequential=True, progress=events.append, prune_head=True)
    assert "calibrate" not in {e.phase for e in events}  # per-layer calibrations are part of allocate and solve
    finished = {}  # the step that finishes each layer (progress inside a layer keeps `done` at the layers before it)
    for e in events:
        if e.phase == "solve" and e.done:
            finished.setdefault(e.done, (e.done, e.total, e.layer))
    assert list(finished.values()) == [(1, 3, "0"), (2, 3, "2"), (3, 3, "4")]
    assert events[-1].phase == "measure"


def test_prune_model_takes_options_whole_or_as_keywords_not_both():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 3))
    report = prune_model(
        model, _mlp_loader(), options=PruneOptions(sparsity=0.5, allocation="uniform", prune_head=True)
    )
    assert report.sparsity == pytest.approx(0.5, abs=0.05)
    for kwargs in (dict(sparsity=0.7), dict(sparsity=0.9), dict(method="fast"), dict(exclude=["0"])):
        with pytest.raises(TypeError, match="give one or the other"):
            prune_model(model, _mlp_loader(), options=PruneOptions(sparsity=0.5, prune_head=True), **kwargs)


def test_only_hooks_that_recompute_the_weight_refuse_a_layer():
    """A forward pre-hook that does not recompute ``weight`` (a user's hook, weight_norm on the bias) leaves the
    layer prunable; weight_norm on the weight refuses it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    model[0].register_forward_pre_hook(lambda module, args: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated, still supported
        torch.nn.utils.weight_norm(model[2], name="bias", dim=0)
        sel = select_layers(model, 0.5, warn=False)
        assert set(sel.targets) == {"0", "2", "4"} and not sel.skipped
        torch.nn.utils.weight_norm(model[4])
        with pytest.raises(
            ValueError,
            match=r"'4'.*recomputed by an old-style WeightNorm hook.*after torch\.nn\.utils\.remove_weight_norm",
        ):
            select_layers(model, 0.5, warn=False)


def test_a_module_used_twice_is_one_layer_not_a_tied_weight():
    """The same Linear registered at two places of the model is one module (hooks see both calls' inputs), not a
    weight shared by two modules: it is pruned, under its first name."""
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(6, 2))
    sel = select_layers(model, 0.5, warn=False)
    assert set(sel.targets) == {"0", "4"} and not sel.skipped


def test_a_plain_layer_named_out_proj_is_one_layer_beside_an_attentions_projections():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out_proj = nn.Linear(8, 8)  # a plain layer that only shares the name

        def forward(self, x):
            return self.out_proj(self.attn(x, x, x, need_weights=False)[0])

    model = nn.Sequential(Block(), nn.Linear(8, 2))
    sel = select_layers(model, 0.5, warn=False)
    attn = [f"0.attn.{p}_proj" for p in ("q", "k", "v", "out")]
    assert sorted(sel.targets) == sorted(attn + ["0.out_proj", "1"]) and not sel.skipped


def test_refusal_names_the_parametrization_and_a_weight_set_from_outside():
    model = nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(6, 4)), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0'.*computed by a parametrization \(_WeightNorm\)"):
        select_layers(model, 0.5, warn=False)
    outside = nn.Linear(6, 4)
    weight = outside.weight.detach().clone()
    del outside.weight
    outside.weight = weight  # a plain tensor attribute that code outside the module sets before each call
    with pytest.raises(ValueError, match=r"'0'.*recomputed by code outside the module.*plain Parameter"):
        select_layers(nn.Sequential(outside, nn.ReLU(), nn.Linear(4, 2)), 0.5, warn=False)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_an_empty_layer_is_skipped_and_a_one_column_layer_is_not():
    model = nn.Sequential(
        nn.Linear(0, 4),
        nn.ReLU(),
        nn.Linear(4, 3, bias=False),
        nn.Linear(3, 1, bias=False),
        nn.Linear(1, 2, bias=False),
    )
    sel = select_layers(model, 0.5, warn=False)
    assert sel.skipped == {"0": "its weight is empty"}
    assert list(sel.targets) == ["2", "3", "4"]  # one input column is still a weight to choose from per row
