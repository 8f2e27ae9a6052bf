"""nn.MultiheadAttention pruned like any other layer: q/k/v blocks and out_proj against their own inputs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lobs import MaskSet, prune_model
from lightning_lobs.attention import attention_output
from lightning_lobs.solvers import SolverOptions, solve_layer

F64 = SolverOptions(dtype=torch.float64)
EPS = torch.finfo(torch.float64).eps


def _inputs(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict:
    """query/key/value and the masks of one call, as keyword arguments."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


def _reference_attention(mha: nn.MultiheadAttention, query, key, value, key_padding_mask=None, attn_mask=None):
    """The input of out_proj written out by hand (batch first): heads, scaled scores, masks, softmax."""
    if not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    e, h = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]

    def split(t, n):
        return t.reshape(b, n, h, e // h).transpose(1, 2)

    scores = split(q, lq) @ split(k, lk).transpose(-1, -2) / math.sqrt(e // h)
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ split(v, lk)
    return out.transpose(1, 2).reshape(b, lq, e)


def _rows_hessian(x: torch.Tensor, bias: bool) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
    if bias:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    return rows.t() @ rows / rows.shape[0]


def _tol(w: torch.Tensor, d: int) -> float:
    """Rounding of a float64 solve of a well-conditioned d-column system (the inputs are random normals)."""
    return 1e3 * d * EPS * max(1.0, float(w.abs().max()))


def _mha(batch_first: bool, bias: bool, kdim=None, seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    return nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first, kdim=kdim, vdim=kdim).double().eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", [False, True])
def test_recomputed_attention_output_equals_the_fused_forward(batch_first, masks):
    """out_proj applied to the recomputed attention output is the module's own output, masks honoured."""
    mha = _mha(batch_first, True, kdim=6)
    g = torch.Generator().manual_seed(1)
    b, lq, lk = 3, 5, 4

    def shape(n, d):
        return (b, n, d) if batch_first else (n, b, d)

    q = torch.randn(*shape(lq, 8), generator=g, dtype=torch.float64)
    kv = torch.randn(*shape(lk, 6), generator=g, dtype=torch.float64)
    kwargs = {}
    if masks:
        kwargs["key_padding_mask"] = torch.tensor([[False] * 4, [False, False, True, True], [False, True, False, True]])
        kwargs["attn_mask"] = torch.triu(torch.ones(lq, lk, dtype=torch.bool), diagonal=2)
    with torch.no_grad():
        fused = mha(q, kv, kv, **kwargs)[0]
        pre = attention_output(mha, (q, kv, kv), kwargs)
        by_hand = _reference_attention(mha, q, kv, kv, kwargs.get("key_padding_mask"), kwargs.get("attn_mask"))
        pre_bf = pre if batch_first else pre.transpose(0, 1)
        tol = 10 * 8 * EPS * float(fused.abs().max() + 1)
        assert torch.allclose(mha.out_proj(pre), fused, rtol=0, atol=tol)
        assert torch.allclose(pre_bf, by_hand, rtol=0, atol=tol)


class _Block(nn.Module):
    """One attention call with a residual, as transformers use it."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn = mha

    def forward(self, batch):
        q, kv = batch
        return self.attn(q, kv, kv, need_weights=False)[0] + q


@pytest.mark.parametrize(
    "batch_first,bias,kdim", [(True, True, None), (False, True, None), (True, False, None), (False, True, 6)]
)
def test_projection_blocks_and_out_proj_match_the_float64_reference_solve(batch_first, bias, kdim):
    """Each block is solved against the Hessian of its own input (q: the query, k/v: the key/value)."""
    mha = _mha(batch_first, bias, kdim)
    model = _Block(mha)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    kd = kdim or 8

    def shape(n, d):
        return (4, n, d) if batch_first else (n, 4, d)

    batches = [
        (
            torch.randn(*shape(5, 8), generator=g, dtype=torch.float64),
            torch.randn(*shape(7, kd), generator=g, dtype=torch.float64),
        )
        for _ in range(3)
    ]
    if kdim is None:  # self-attention: key = value = query
        batches = [(q, q) for q, _ in batches]
    report = prune_model(
        model,
        batches,
        0.5,
        "exact",
        allocation="uniform",
        solver=F64,
        forward_fn=lambda m, b: m(b),
        recalibrate_bn=False,
    )
    assert list(report.layers) == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"]

    ref = _mha(batch_first, bias, kdim)
    ref.load_state_dict({k[len("attn.") :]: v for k, v in dense.items()})
    qs = torch.cat([(q if batch_first else q.transpose(0, 1)).reshape(-1, 8) for q, _ in batches])
    kvs = torch.cat([(kv if batch_first else kv.transpose(0, 1)).reshape(-1, kd) for _, kv in batches])
    with torch.no_grad():
        pre = torch.cat([_reference_attention(ref, q, kv, kv).reshape(-1, 8) for q, kv in batches])
    if ref._qkv_same_embed_dim:
        weights = dict(zip("qkv", ref.in_proj_weight.detach().chunk(3)))
        pruned = dict(zip("qkv", mha.in_proj_weight.detach().chunk(3)))
    else:
        weights = {b: getattr(ref, f"{b}_proj_weight").detach() for b in "qkv"}
        pruned = {b: getattr(mha, f"{b}_proj_weight").detach() for b in "qkv"}
    biases = dict(zip("qkv", ref.in_proj_bias.detach().chunk(3))) if bias else {}
    inputs = {"q": qs, "k": kvs, "v": kvs}
    for b in "qkv":
        expect = solve_layer(weights[b], _rows_hessian(inputs[b], bias), 0.5, "exact", bias=biases.get(b), solver=F64)
        assert torch.equal(pruned[b] != 0, expect.mask), b
        assert torch.allclose(pruned[b], expect.weight, rtol=0, atol=_tol(expect.weight, weights[b].shape[1])), b
        if bias:
            got = mha.in_proj_bias.detach().chunk(3)["qkv".index(b)]
            assert torch.allclose(got, expect.bias, rtol=0, atol=_tol(expect.bias, weights[b].shape[1])), b
    out_b = ref.out_proj.bias.detach() if bias else None
    expect = solve_layer(ref.out_proj.weight.detach(), _rows_hessian(pre, bias), 0.5, "exact", bias=out_b, solver=F64)
    assert torch.equal(mha.out_proj.weight != 0, expect.mask)
    assert torch.allclose(mha.out_proj.weight.detach(), expect.weight, rtol=0, atol=_tol(expect.weight, 8))


def test_cross_attention_in_a_decoder_takes_key_and_value_from_the_memory_with_masks_passed_through():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    dec = nn.TransformerDecoder(layer, 1).double()
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(3, 5, 8, generator=g, dtype=torch.float64), torch.randn(3, 7, 8, generator=g, dtype=torch.float64))
        for _ in range(2)
    ]
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    pad = torch.tensor([[False] * 7, [False] * 5 + [True] * 2, [False] * 6 + [True]])

    def run(m, b):
        return m(b[0], b[1], tgt_mask=tgt_mask, memory_key_padding_mask=pad)

    cross = dec.layers[0].multihead_attn
    seen = []
    handle = cross.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(_inputs(mod, args, kwargs)), with_kwargs=True
    )
    dense = {k: v.clone() for k, v in cross.state_dict().items()}
    with torch.no_grad():
        dec.eval()
        for b in batches:
            run(dec, b)
    handle.remove()
    assert all(torch.equal(s["key"], b[1]) for s, b in zip(seen, batches))  # the memory, as the claim needs

    report = prune_model(dec, batches, 0.5, "exact", allocation="uniform", solver=F64, forward_fn=run)
    assert {
        f"layers.0.{a}.{p}" for a in ("self_attn", "multihead_attn") for p in ("q_proj", "k_proj", "v_proj", "out_proj")
    } <= set(report.layers)
    ref = nn.MultiheadAttention(8, 2, batch_first=True).double()
    ref.load_state_dict(dense)
    wq, wk, wv = ref.in_proj_weight.detach().chunk(3)
    bq, bk, bv = ref.in_proj_bias.detach().chunk(3)
    got = dict(zip("qkv", cross.in_proj_weight.detach().chunk(3)))
    queries = torch.cat([s["query"].reshape(-1, 8) for s in seen])
    memory = torch.cat([s["key"].reshape(-1, 8) for s in seen])
    for b, w, bb, x in (("q", wq, bq, queries), ("k", wk, bk, memory), ("v", wv, bv, memory)):
        expect = solve_layer(w, _rows_hessian(x, True), 0.5, "exact", bias=bb, solver=F64)
        assert torch.equal(got[b] != 0, expect.mask), b
        assert torch.allclose(got[b], expect.weight, rtol=0, atol=_tol(expect.weight, 8)), b
    with torch.no_grad():  # out_proj: the attention output with the memory padding mask applied
        pre = torch.cat(
            [
                _reference_attention(
                    ref, s["query"], s["key"], s["value"], key_padding_mask=s["key_padding_mask"]
                ).reshape(-1, 8)
                for s in seen
            ]
        )
    expect = solve_layer(
        ref.out_proj.weight.detach(),
        _rows_hessian(pre, True),
        0.5,
        "exact",
        bias=ref.out_proj.bias.detach(),
        solver=F64,
    )
    assert torch.equal(cross.out_proj.weight != 0, expect.mask)
    assert torch.allclose(cross.out_proj.weight.detach(), expect.weight, rtol=0, atol=_tol(expect.weight, 8))


def _encoder(seed: int = 0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _prunable_weights(model: nn.Module) -> list:
    """Every Linear and conv weight and every attention projection weight, each once."""
    out = {}
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            out[id(m.weight)] = m.weight
        if isinstance(m, nn.MultiheadAttention):
            for p in (m.in_proj_weight, m.q_proj_weight, m.k_proj_weight, m.v_proj_weight):
                if p is not None:
                    out[id(p)] = p
    return list(out.values())


def _sparsity(weights) -> float:
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _rounding(model: nn.Module, layers) -> float:
    """Per-layer targets round to whole weights per block: at most one weight per layer and row block off."""
    return sum(r.shape[0] for r in layers.values()) / sum(w.numel() for w in _prunable_weights(model))


def test_transformer_encoder_reaches_the_asked_sparsity_and_the_report_equals_the_zeros():
    model = _encoder()
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(4, 6, 16, generator=g) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped: no warning at all
        report = prune_model(model, batches, 0.7, "fast", allocation="uniform")
    weights = _prunable_weights(model)
    assert abs(_sparsity(weights) - 0.7) <= _rounding(model, report.layers)
    # model_sparsity counts every weight of >= 2 dims: here exactly the weights above
    assert report.model_sparsity == _sparsity(weights)
    assert report.skipped == {}
    for i in range(2):
        mha = model.layers[i].self_attn
        key = f"layers.{i}.self_attn.in_proj_weight"
        assert torch.equal(report.masks[key], mha.in_proj_weight != 0)
        for j, b in enumerate("qkv"):
            block = mha.in_proj_weight[j * 16 : (j + 1) * 16]
            assert report.layers[f"layers.{i}.self_attn.{b}_proj"].sparsity == float((block == 0).sum()) / block.numel()
    assert MaskSet.from_model(model).masks.keys() == report.masks.masks.keys()


def test_small_torchvision_vit_reaches_the_asked_sparsity_over_every_linear_conv_and_attention_weight():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = tv.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the class token and position embedding: left dense, listed
        report = prune_model(vit, batches, 0.7, "fast", allocation="uniform", prune_head=True)  # every Linear
    assert set(report.skipped) == {"", "encoder"}  # the modules holding class_token and pos_embedding
    assert sum(n.endswith("_proj") and "attention" in n for n in report.layers) == 2 * 4
    weights = _prunable_weights(vit)
    assert abs(_sparsity(weights) - 0.7) <= _rounding(vit, report.layers)


def test_masks_hold_on_in_proj_weight_through_adamw_steps():
    model = _encoder()
    g = torch.Generator().manual_seed(6)
    batches = [torch.randn(4, 6, 16, generator=g) for _ in range(2)]
    masks = MaskSet()
    prune_model(model, batches, 0.6, "fast", allocation="uniform", masks=masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    masks.attach(model, opt)
    model.train()
    weight = model.layers[0].self_attn.in_proj_weight
    keep = masks["layers.0.self_attn.in_proj_weight"]
    assert torch.equal(keep, weight != 0) and abs(float((~keep).float().mean()) - 0.6) <= 3 * 16 / keep.numel()
    before = weight.detach().clone()
    for x in batches * 3:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        assert bool((weight.grad[~keep] == 0).all())
        opt.step()
    masks.detach()
    assert bool((weight[~keep] == 0).all()) and not torch.equal(weight[keep], before[keep])


def test_naming_an_attention_module_names_its_projections_and_excluding_it_leaves_all_of_it_dense():
    model = _encoder()
    batches = [torch.randn(2, 3, 16)]
    with pytest.raises(ValueError, match=r"'layers.0.self_attn'.*'layers.0.self_attn.q_proj'.*'layers.0.self_attn.\*'"):
        prune_model(model, batches, {"layers.0.self_attn": 0.5})
    before = model.layers[0].self_attn.state_dict()
    report = prune_model(model, batches, 0.5, "fast", exclude=["layers.0.self_attn"])
    assert not any(n.startswith("layers.0.self_attn") for n in report.layers)
    assert all(torch.equal(v, model.layers[0].self_attn.state_dict()[k]) for k, v in before.items())
    assert "layers.1.self_attn.q_proj" in report.layers


def test_a_failure_mid_prune_leaves_the_attention_weights_as_they_were(monkeypatch):
    import lightning_lobs.engine.report as report_mod

    model = _encoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = MaskSet()

    def fail(*args, **kwargs):
        raise RuntimeError("measure failed")

    # the bound, after the commit (the encoder's layers are walked block by block: their errors measured inside)
    monkeypatch.setattr(report_mod, "bound", fail)
    with pytest.raises(RuntimeError, match="measure failed"):
        prune_model(model, [torch.randn(2, 3, 16)], 0.5, "fast", masks=masks)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(masks) == 0


def test_lobs_pruning_callback_keeps_attention_zeros_through_adamw_training():
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lobs import LOBSPruning

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.enc = _encoder()

        def forward(self, x):
            return self.enc(x)

        def training_step(self, batch, batch_idx):
            return self(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

    g = torch.Generator().manual_seed(7)
    loader = DataLoader(TensorDataset(torch.randn(16, 6, 16, generator=g)), batch_size=4)
    module = Lit()
    lobs = LOBSPruning(
        sparsity=0.6, prune_epoch=1, method="fast", allocation="uniform", calibration_batches=2, log_table=False
    )
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[lobs],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, loader)
    key = "enc.layers.0.self_attn.in_proj_weight"
    assert key in lobs.masks
    weight = module.enc.layers[0].self_attn.in_proj_weight.detach()
    assert bool((weight[~lobs.masks[key]] == 0).all())
    assert abs(float((weight == 0).float().mean()) - 0.6) <= 3 * 16 / weight.numel()  # one weight per row at most


def test_nn_transformer_prunes_every_attention_and_feed_forward_of_both_stacks():
    torch.manual_seed(0)
    model = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)
    g = torch.Generator().manual_seed(8)
    batches = [(torch.randn(2, 5, 16, generator=g), torch.randn(2, 4, 16, generator=g)) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = prune_model(model, batches, 0.7, "fast", allocation="uniform", forward_fn=lambda m, b: m(b[0], b[1]))
    attn = [
        f"{s}.layers.0.{a}.{p}"
        for s, a in (("encoder", "self_attn"), ("decoder", "self_attn"), ("decoder", "multihead_attn"))
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")
    ]
    assert set(attn) <= set(report.layers) and len(report.layers) == len(attn) + 4  # + two feed-forward pairs
    assert abs(_sparsity(_prunable_weights(model)) - 0.7) <= _rounding(model, report.layers)


def test_sparse_file_of_a_pruned_transformer_holds_the_attention_masks(tmp_path):
    """save_sparse takes masks named after a Parameter (in_proj_weight): the file loads equal and counts each once."""
    from lightning_lobs import load_sparse, save_sparse

    model = _encoder()
    g = torch.Generator().manual_seed(4)
    report = prune_model(
        model, [torch.randn(4, 6, 16, generator=g) for _ in range(2)], 0.7, "fast", allocation="uniform"
    )
    info = save_sparse(model, tmp_path / "enc.lobs", masks=report.masks)
    weights = _prunable_weights(model)
    assert info.total_weights == sum(w.numel() for w in weights)
    assert info.kept_weights == sum(int((w != 0).sum()) for w in weights)
    assert info.encodings["layers.0.self_attn.in_proj_weight"] != "dense"
    fresh = _encoder(seed=1)
    load_sparse(fresh, tmp_path / "enc.lobs")
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


class _BiasKV(nn.Module):
    """Two attentions with ``add_bias_kv`` and one without, then a Linear; the head is ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
        self.b = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
        self.c = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        x = self.a(x, x, x)[0]
        x = self.b(x, x, x)[0]
        return self.fc(self.c(x, x, x)[0])


def test_bias_k_and_bias_v_are_left_dense_and_listed_in_the_skip_warning_and_report():
    """``add_bias_kv``'s learned key and value are attention Parameters no projection holds: they stay as they were and
    are named in the one skip warning and in ``report.skipped``, as every other dense weight is; an excluded
    attention's are not (the user asked), nor those of an attention without them."""
    torch.manual_seed(0)
    model = _BiasKV()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("bias_k", "bias_v"))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune_model(model, [torch.randn(2, 5, 8)], 0.5, "fast", exclude=["b"])
    listed = {"a.bias_k", "a.bias_v"}
    assert listed <= set(report.skipped) and not {n for n in report.skipped if n.startswith(("b.", "c."))}
    assert "add_bias_kv" in report.skipped["a.bias_k"] and "key" in report.skipped["a.bias_k"]
    skip_warnings = [str(w.message) for w in caught if "left dense" in str(w.message)]
    assert len(skip_warnings) == 1 and all(f"'{n}'" in skip_warnings[0] for n in listed)
    assert "a.q_proj" in report.layers and "c.q_proj" in report.layers
    assert all(torch.equal(p, model.get_parameter(n)) for n, p in before.items())
