"""A pruned Hugging Face model taken home with ``save_pretrained``: ``from_pretrained`` gives back every zero.

transformers 5 writes safetensors only (``model.safetensors``); the file is also read back with safetensors
itself, so the zeros are on disk, not restored by something else on load.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_lobs import prune_model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*weight-bearing module\\(s\\) not pruned.*"
)  # embeddings: dense by design


def _tiny_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_save_pretrained_of_a_pruned_gpt2_keeps_every_zero(tmp_path):
    model = _tiny_gpt2()
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    report = prune_model(
        model,
        DataLoader(TensorDataset(ids), batch_size=4),
        sparsity=0.5,
        method="exact",
        allocation="uniform",
        forward_fn=lambda m, batch: m(input_ids=batch[0]).logits,
    )
    assert len(report.layers) == 8  # the Conv1D layers of both blocks

    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()

    before, after = model.state_dict(), loaded.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key] == 0, value == 0), key  # the same zeros, no more, no fewer
        assert torch.equal(after[key], value), key  # float32 written and read bit for bit
    on_disk = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    for name in report.layers:
        weight = on_disk[f"{name}.weight"]
        assert torch.equal(weight == 0, before[f"{name}.weight"] == 0), name
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=1.0 / weight.shape[1]), name
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids[:2]).logits, model(input_ids=ids[:2]).logits)
