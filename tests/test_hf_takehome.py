"""Taking a pruned Hugging Face model home: the callback's sparse file loads into the bare inner model, and
``to_sparse_inference`` runs GPT-2's ``Conv1D`` layers (Linears with transposed weights) on sparse kernels.

A tiny random GPT-2 (no download) wrapped in a LightningModule as ``self.model``, as users write it.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from functools import cache

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_helpers import NAMESPACES, make_trainer
from lightning_lobs import LOBSPruning, load_sparse, save_sparse, to_sparse_inference
from lightning_lobs.export import CSRLinear, plan_sparse_inference
from lightning_lobs.layers import is_hf_conv1d

transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*weight-bearing module\\(s\\) not pruned.*"),  # embeddings: dense by design
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*"),
]

CONV1D = [f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def token_data() -> TensorDataset:
    return TensorDataset(torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0)))


@cache
def lit_gpt2_class(ns_name: str) -> type:
    ns_mod = importlib.import_module(ns_name)

    class LitGPT2(ns_mod.LightningModule):
        def __init__(self, teacher: bool = False) -> None:
            super().__init__()
            self.model = tiny_gpt2().train()
            if teacher:  # a second model of the same architecture: its keys are the model's under 'teacher.'
                self.teacher = tiny_gpt2(seed=1)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids).logits

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            logits = self(ids)
            return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.01)

        def train_dataloader(self):
            return DataLoader(token_data(), batch_size=4)

    return LitGPT2


def pruned_by_callback(ns_mod, tmp_path):
    lit = lit_gpt2_class(ns_mod.__name__)()
    path = tmp_path / "gpt2.lobs"
    lobs = LOBSPruning(
        sparsity=0.5,
        prune_epoch=0,
        method="fast",
        allocation="uniform",
        exclude=["*lm_head"],
        calibration_batches=2,
        forward_fn=lambda m, batch: m(batch[0]),
        log_table=False,
        save_sparse=str(path),
    )
    make_trainer(ns_mod, 1, [lobs]).fit(lit)
    return lit, lobs, path


def test_callback_file_of_a_lightning_module_loads_into_the_bare_hf_model(ns, tmp_path):  # noqa: F811
    lit, lobs, path = pruned_by_callback(ns, tmp_path)
    assert sorted(lobs.masks.masks) == sorted(f"model.{n}" for n in CONV1D)
    pruned = {k: v.clone() for k, v in lit.model.state_dict().items()}
    assert float((pruned[f"{CONV1D[0]}.weight"] == 0).float().mean()) >= 0.45  # the file holds a pruned model

    bare = tiny_gpt2(seed=5)  # other values everywhere
    info = load_sparse(bare, path)
    after = bare.state_dict()
    assert set(after) == set(pruned)
    for key, value in pruned.items():
        assert torch.equal(after[key], value), key
    ids = token_data().tensors[0][:3]
    lit.eval()
    with torch.no_grad():
        assert torch.equal(bare(input_ids=ids).logits, lit(ids))
    assert info.kept_weights < info.total_weights

    # loading into the LightningModule itself keeps working, as does an explicit prefix
    fresh = lit_gpt2_class(ns.__name__)()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    load_sparse(fresh, path)
    assert all(torch.equal(v, lit.state_dict()[k]) for k, v in fresh.state_dict().items())
    again = tiny_gpt2(seed=6)
    load_sparse(again, path, prefix="model")
    assert all(torch.equal(v, pruned[k]) for k, v in again.state_dict().items())


def test_a_file_matching_neither_the_model_nor_a_prefix_is_refused_before_any_write(tmp_path):
    lit = lit_gpt2_class(NAMESPACES[0])()
    path = tmp_path / "lit.lobs"
    save_sparse(lit, path)
    for other in (
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
            )
        ),
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                n_layer=2, n_embd=32, n_head=2, vocab_size=65, n_positions=32, bos_token_id=0, eos_token_id=0
            )
        ),
        nn.Linear(3, 4),
    ):
        before = copy.deepcopy(other.state_dict())
        with pytest.raises(ValueError, match="does not match this"):
            load_sparse(other, path)
        assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    bare = tiny_gpt2(seed=3)
    before = copy.deepcopy(bare.state_dict())
    with pytest.raises(ValueError, match=r"under the prefix 'net\.'.*no key starting with 'net\.'"):
        load_sparse(bare, path, prefix="net")
    with pytest.raises(ValueError, match=r"prefix must be a str"):
        load_sparse(bare, path, prefix=1)  # type: ignore[arg-type]
    assert all(torch.equal(v, before[k]) for k, v in bare.state_dict().items())


def test_a_file_holding_the_model_under_two_prefixes_is_refused_until_one_is_named(tmp_path):
    lit = lit_gpt2_class(NAMESPACES[0])(teacher=True)
    path = tmp_path / "two.lobs"
    save_sparse(lit, path)
    bare = tiny_gpt2(seed=3)
    before = copy.deepcopy(bare.state_dict())
    with pytest.raises(
        ValueError, match=r"under each of 'model\.', 'teacher\.'.*prefix=\.\.\.\) with one of 'model', 'teacher'"
    ):
        load_sparse(bare, path)
    assert all(torch.equal(v, before[k]) for k, v in bare.state_dict().items())
    load_sparse(bare, path, prefix="teacher")
    assert all(torch.equal(v, lit.teacher.state_dict()[k]) for k, v in bare.state_dict().items())

    # the model's keys under one prefix plus entries of something else: named, and loadable with prefix=
    lit.teacher = nn.Linear(2, 2)
    save_sparse(lit, path)
    with pytest.raises(ValueError, match=r"under 'model\.' and 2 other\(s\) \('teacher\.bias'.*prefix='model'"):
        load_sparse(bare, path)
    load_sparse(bare, path, prefix="model")
    assert all(torch.equal(v, lit.model.state_dict()[k]) for k, v in bare.state_dict().items())


# --------------------------------------------------------------------------- sparse inference


def sparse_gpt2() -> transformers.GPT2LMHeadModel:
    """Every Conv1D 80% zeros, except h.1's mlp.c_proj at 30% (too dense for CSR at min_sparsity 0.5);
    random biases."""
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in CONV1D:
            layer = model.get_submodule(name)
            layer.weight[torch.rand(layer.weight.shape, generator=g) < (0.3 if name == CONV1D[-1] else 0.8)] = 0
            layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g))  # GPT-2 starts them at 0
    return model


def assert_layer_outputs_equal(dense: nn.Module, sparse: nn.Module, names: list[str]) -> None:
    """Each swapped layer's output is the dense Conv1D's within float32 rounding of its sums.

    Both compute ``x @ W + b`` in float32, summing ``in + 1`` terms in some order: each differs from the
    exact value by at most ``(in + 1) * eps * (|x| @ |W| + |b|)``, so from each other by twice that.
    """
    eps = torch.finfo(torch.float32).eps
    g = torch.Generator().manual_seed(2)
    for name in names:
        ref_layer, layer = dense.get_submodule(name), sparse.get_submodule(name)
        assert is_hf_conv1d(ref_layer) and isinstance(layer, CSRLinear), name
        w, b = ref_layer.weight, ref_layer.bias
        x = torch.randn(3, 5, w.shape[0], generator=g)
        with torch.no_grad():
            got, ref = layer(x), ref_layer(x)
            terms = x.abs() @ w.abs() + b.abs()
        assert got.shape == ref.shape == (3, 5, w.shape[1]), name
        assert torch.all((got - ref).abs() <= 2 * (w.shape[0] + 1) * eps * terms), name


@pytest.mark.parametrize("mode", ["sparse", "auto"])
def test_to_sparse_inference_swaps_gpt2_conv1d_and_keeps_the_outputs(mode):
    model = sparse_gpt2()
    # auto with min_speedup=0 swaps every timed candidate: the Conv1D goes through timing and the swap
    kwargs = {"mode": "sparse"} if mode == "sparse" else {"mode": "auto", "min_speedup": 0.0, "repeats": 2, "warmup": 0}
    with pytest.warns(UserWarning, match="kept dense"):
        fast = to_sparse_inference(model, **kwargs)
    swapped = CONV1D[:-1]
    assert sorted(n for n, m in fast.named_modules() if isinstance(m, CSRLinear)) == sorted(swapped)
    assert all(is_hf_conv1d(model.get_submodule(n)) for n in CONV1D)  # the original is untouched
    assert_layer_outputs_equal(model, fast, swapped)
    if mode == "auto":
        assert all(fast.sparse_inference_plan[n].dense_ms is not None for n in swapped)


def test_to_sparse_inference_reports_what_it_swapped_and_why_not(caplog):
    model = sparse_gpt2()
    with caplog.at_level("INFO", logger="lightning_lobs.export"), pytest.warns(UserWarning) as record:
        fast = to_sparse_inference(model, mode="sparse")
    plan = fast.sparse_inference_plan
    assert set(plan) == set(CONV1D) | {"lm_head"}
    assert {n for n, p in plan.items() if p.kernel == "csr"} == set(CONV1D[:-1])
    assert plan[CONV1D[-1]].shape == (32, 128) and "min_sparsity 0.5" in plan[CONV1D[-1]].reason
    assert "min_sparsity" in plan["lm_head"].reason  # tied to the embedding: dense
    messages = [str(w.message) for w in record if "to_sparse_inference" in str(w.message)]
    assert len(messages) == 1  # one warning lists every layer kept dense, with its reason
    assert "swapped 7 of 9 layers" in messages[0]
    assert f"{CONV1D[-1]} (sparsity 0.3" in messages[0] and "lm_head (sparsity 0.000" in messages[0]
    assert any("swapped 7 of 9 layers" in r.getMessage() for r in caplog.records)

    conv = nn.Sequential(nn.Conv2d(2, 2, 1))
    with pytest.warns(UserWarning, match=r"kept dense: 0 \(unsupported type Conv2d"):
        to_sparse_inference(conv, mode="sparse")
    # nothing to say when the caller asked for dense
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense = to_sparse_inference(model, mode="dense")
    assert all(p.kernel == "dense" for p in dense.sparse_inference_plan.values())
    assert plan_sparse_inference(model, mode="dense")[CONV1D[0]].shape == (96, 32)
