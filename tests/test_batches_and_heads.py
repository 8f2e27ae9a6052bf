"""HF batches fed as HF feeds them (``model(**batch)``), and output heads left dense by default."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_lobs import prune_model

transformers = pytest.importorskip("transformers")

VOCAB = 64


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _gpt2(tie: bool = False) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, tie_word_embeddings=tie)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _t5() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        d_model=32,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        vocab_size=VOCAB,
        decoder_start_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(cfg).eval()


def _padded_batches(n: int = 2) -> list:
    """Left-padded token batches (as tokenizers pad for generation): rows of 10, 7, 5 and 3 real tokens."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (4, 10), generator=g)
        mask = torch.ones(4, 10, dtype=torch.long)
        for row, pad in enumerate((0, 3, 5, 7)):
            mask[row, :pad] = 0
            ids[row, :pad] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _masks(report) -> dict:
    return {n: report.masks[n].clone() for n in report.masks}


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("decoder", ["labels", "decoder_input_ids"])
def test_t5_prunes_with_the_default_forward_on_hf_batches(decoder):
    g = torch.Generator().manual_seed(2)
    batches = [
        transformers.BatchEncoding(
            {
                "input_ids": torch.randint(2, VOCAB, (4, 8), generator=g),
                "attention_mask": torch.ones(4, 8, dtype=torch.long),
                decoder: torch.randint(2, VOCAB, (4, 5), generator=g),
            }
        )
        for _ in range(2)
    ]
    model = _t5()
    report = _quiet(prune_model, model, batches, 0.5, "fast", allocation="uniform")
    assert any(n.startswith("decoder.") for n in report.layers)  # the decoder ran, so its layers were calibrated
    assert any(n.startswith("encoder.") for n in report.layers)
    for name, layer in report.layers.items():
        assert layer.sparsity == pytest.approx(0.5, abs=0.05), name


def test_padded_gpt2_batch_prunes_as_with_its_attention_mask():
    batches = _padded_batches()
    base = _gpt2()
    forwards = {
        "default": None,
        "with_mask": lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]),
        "ids_only": lambda m, b: m(b["input_ids"]),
    }
    masks = {}
    for key, fwd in forwards.items():
        masks[key] = _masks(
            _quiet(prune_model, copy.deepcopy(base), batches, 0.5, "fast", allocation="uniform", forward_fn=fwd)
        )
    assert masks["default"].keys() == masks["with_mask"].keys() == masks["ids_only"].keys()
    assert all(torch.equal(masks["default"][n], masks["with_mask"][n]) for n in masks["default"])
    # Dropping the mask changes what the padded positions see, hence the Hessians and the masks.
    assert any(not torch.equal(masks["default"][n], masks["ids_only"][n]) for n in masks["default"])


class _Tokens(nn.Module):
    """A plain token model whose forward names input_ids and attention_mask (not a dataset's idx)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 16)
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return self.out(torch.relu(self.fc(h)))


def test_keys_the_forward_does_not_name_are_dropped_the_named_ones_passed():
    batches = [dict(b, idx=torch.arange(4)) for b in _padded_batches()]
    explicit = lambda m, b: m(b["input_ids"], attention_mask=b["attention_mask"])  # noqa: E731
    ref = _masks(_quiet(prune_model, _Tokens(), batches, 0.5, "fast", prune_head=True, forward_fn=explicit))
    got = _masks(_quiet(prune_model, _Tokens(), batches, 0.5, "fast", prune_head=True))
    assert got.keys() == ref.keys() == {"fc", "out"}
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    unmasked = _masks(
        _quiet(prune_model, _Tokens(), batches, 0.5, "fast", prune_head=True, forward_fn=lambda m, b: m(b["input_ids"]))
    )
    assert any(not torch.equal(got[n], unmasked[n]) for n in ref)  # the mask matters here


def test_a_failing_default_forward_names_forward_fn_and_leaves_the_model_alone():
    model = _t5()
    before = copy.deepcopy(model.state_dict())
    batches = [{"input_ids": torch.randint(2, VOCAB, (2, 6))}]  # an encoder-decoder needs decoder inputs or labels
    with pytest.raises(ValueError, match=r"model\(input_ids=\.\.\.\).*forward_fn=lambda model, batch: model\(") as info:
        _quiet(prune_model, model, batches, 0.5, "fast")
    assert str(info.value).startswith("You must specify exactly one of input_ids")  # HF's own message first
    assert "forward_fn" not in str(info.value) and info.value.__cause__ is None  # HF's exception itself, a note added
    assert any("forward_fn=lambda model, batch" in note for note in info.value.__notes__)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_exception_whose_constructor_takes_other_arguments_propagates_unchanged():
    class ShapeError(Exception):
        def __init__(self, got: int, want: int) -> None:
            super().__init__(f"got {got}, want {want}")
            self.got, self.want = got, want

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            raise ShapeError(3, 4)

    with pytest.raises(ShapeError) as info:
        _quiet(prune_model, Model(), [torch.randn(2, 4)], 0.5, "fast")
    assert (info.value.got, info.value.want) == (3, 4) and info.value.args == ("got 3, want 4",)
    assert any("default forward_fn" in note for note in info.value.__notes__)


def test_a_forward_taking_only_kwargs_gets_the_whole_batch_through_lobs_pruning():
    """The callback calls the LightningModule's forward under the same rule as prune_model."""
    pl = pytest.importorskip("pytorch_lightning")
    from lightning_helpers import make_trainer
    from lightning_lobs import LOBSPruning

    batches = _padded_batches()

    class LitGPT(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = _gpt2()

        def forward(self, **batch):
            return self.gpt(**batch)

        def training_step(self, batch, batch_idx):
            return self(**batch, labels=batch["input_ids"]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(batches, batch_size=None)  # the dicts as they are

    module = LitGPT()
    reference = _quiet(
        prune_model,
        copy.deepcopy(module.gpt),
        batches,
        0.5,
        "fast",
        allocation="uniform",
        forward_fn=lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]),
    )
    cb = LOBSPruning(
        sparsity=0.5, prune_epoch=0, method="fast", allocation="uniform", calibration_batches=2, log_table=False
    )
    _quiet(make_trainer(pl, 1, [cb], limit_train_batches=1).fit, module)
    got = _masks(cb.last_report)
    assert got.keys() == {f"gpt.{n}" for n in reference.masks}
    assert all(torch.equal(got[f"gpt.{n}"], reference.masks[n]) for n in reference.masks)


# --------------------------------------------------------------------------- output heads


def _head_left_dense(model: nn.Module, batches: list, head: str, **kwargs) -> None:
    """``head`` is left dense (weights untouched) and named in ``skipped``; ``prune_head=True`` prunes it."""
    dense = copy.deepcopy(model)
    report = _quiet(prune_model, model, batches, 0.5, "fast", allocation="uniform", **kwargs)
    assert head not in report.layers and report.layers
    assert "output head" in report.skipped[head] and "prune_head=True" in report.skipped[head]
    assert torch.equal(model.get_submodule(head).weight, dense.get_submodule(head).weight)
    with pytest.warns(UserWarning, match=rf"'{head}': output head"):
        prune_model(copy.deepcopy(dense), batches, 0.5, "fast", allocation="uniform", **kwargs)
    full = _quiet(prune_model, dense, batches, 0.5, "fast", allocation="uniform", prune_head=True, **kwargs)
    assert head not in full.skipped and full.layers[head].sparsity == pytest.approx(0.5, abs=0.05)


def test_untied_gpt2_lm_head_left_dense_by_default():
    _head_left_dense(_gpt2(tie=False), _padded_batches(), "lm_head")


def test_llama_lm_head_left_dense_by_default():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
    )
    _head_left_dense(transformers.LlamaForCausalLM(cfg).eval(), _padded_batches(), "lm_head")


class _LogProbs(nn.Module):
    """An HF model in a wrapper that transforms its logits: its head is found by get_output_embeddings()."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt = _gpt2(tie=False)

    def forward(self, input_ids, attention_mask):
        return self.gpt(input_ids=input_ids, attention_mask=attention_mask).logits.log_softmax(-1)


def test_an_hf_head_inside_a_wrapper_transforming_its_logits_left_dense_by_default():
    _head_left_dense(_LogProbs(), _padded_batches(), "gpt.lm_head")


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def test_mlp_classifier_last_layer_left_dense_by_default():
    batches = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    _head_left_dense(_classifier(), batches, "4")


def test_a_sparsity_mapping_naming_the_head_exactly_prunes_it_a_wildcard_does_not():
    batches = [torch.randn(32, 8, generator=torch.Generator().manual_seed(0))]
    named = _quiet(prune_model, _classifier(), batches, {"0": 0.5, "4": 0.5}, "fast")
    assert set(named.layers) == {"0", "4"}
    wild = _quiet(prune_model, _classifier(), batches, {"*": 0.5}, "fast")
    assert set(wild.layers) == {"0", "2"} and "output head" in wild.skipped["4"]


def test_a_model_whose_only_layer_is_its_head_says_prune_head():
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="no layer selected.*prune_head=True"):
        _quiet(prune_model, model, [torch.randn(16, 8)], 0.5, "fast")


def test_lobs_pruning_leaves_the_head_dense_unless_prune_head():
    pl = pytest.importorskip("pytorch_lightning")
    from lightning_helpers import lit_mlp, make_trainer
    from lightning_lobs import LOBSPruning

    reports = {}
    for flag in (False, True):
        cb = LOBSPruning(
            sparsity=0.5, prune_epoch=0, method="fast", calibration_batches=2, log_table=False, prune_head=flag
        )
        _quiet(make_trainer(pl, 1, [cb], limit_train_batches=1).fit, lit_mlp(pl))
        reports[flag] = cb.last_report
    assert "net.4" not in reports[False].layers and "output head" in reports[False].skipped["net.4"]
    assert "net.4" in reports[True].layers and "net.4" not in reports[True].skipped
