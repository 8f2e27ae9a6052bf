"""Tests for lightning_lobs.export: the compressed sparse file, its round trip, and sparse inference."""

from __future__ import annotations

import copy
import inspect
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_lobs
from lightning_lobs import LOBSPruning, MaskSet, load_sparse, save_sparse, to_sparse_inference
from lightning_lobs.export import (
    CSRLinear,
    SemiStructuredLinear,
    _read,
    is_two_four,
    plan_sparse_inference,
    read_sparse,
)

# --------------------------------------------------------------------------- models


def lenet300() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


def mlp() -> nn.Module:  # tests/test_masks.py's MLP
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def conv_bn() -> nn.Module:
    """Conv net with BatchNorm (float running stats, int64 num_batches_tracked), as in the callback tests."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 24),
        nn.BatchNorm1d(24),
        nn.ReLU(),
        nn.Linear(24, 3),
    )
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 8, 8))  # nontrivial running statistics
    return model.eval()


class Buffers(nn.Module):
    """Every kind of state_dict entry that is not a float weight."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(40, 30)
        self.register_buffer("flags", torch.rand(50) < 0.05)
        self.register_buffer("counts", torch.where(torch.rand(7, 9) < 0.1, torch.randint(-5, 5, (7, 9)), 0))
        self.register_buffer("step", torch.tensor(12345, dtype=torch.int64))
        self.register_buffer("scalar", torch.tensor(-0.0))
        self.register_buffer("empty", torch.empty(0, 3))
        self.register_buffer("bytes_", torch.randint(0, 255, (33,), dtype=torch.uint8))
        self.register_buffer("cplx", torch.randn(4, dtype=torch.complex64))
        self.register_buffer("halfbuf", torch.randn(10).half())


def resnet18() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    return model.eval()


def prunable(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def random_masks(model: nn.Module, sparsity: float, seed: int = 0) -> MaskSet:
    gen = torch.Generator().manual_seed(seed)
    masks = MaskSet()
    for name in prunable(model):
        weight = model.get_submodule(name).weight
        masks.set(name, torch.rand(weight.shape, generator=gen) >= sparsity)
    masks.apply(model)
    return masks


def bits(t: torch.Tensor, zero_sign: bool = True) -> torch.Tensor:
    """The raw bytes of a tensor, so NaN payloads compare exactly; ``zero_sign=False`` maps -0.0 to +0.0
    (the one difference a sparse encoding may make: zeros load as +0.0)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if not zero_sign and t.is_floating_point():
        t = t.masked_fill(t == 0, 0.0)
    return t.view(torch.uint8)


def entry_bytes(tensors: dict[str, torch.Tensor], key: str) -> int:
    """Bytes of one state_dict entry in a sparse file: its tensor, or its ``<key>:<part>`` tensors."""
    return sum(t.numel() * t.element_size() for n, t in tensors.items() if n == key or n.startswith(f"{key}:"))


def assert_state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
        assert torch.equal(bits(sa[key], zero_sign=False), bits(sb[key], zero_sign=False)), f"{key} differs"
        if sa[key].is_complex() or not (sa[key].is_floating_point() and torch.isnan(sa[key]).any()):
            assert torch.equal(sa[key], sb[key]), key


def fresh_like(model: nn.Module) -> nn.Module:
    """Same architecture, every value different (so a load that skipped an entry is caught)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for t in other.state_dict().values():
            if t.numel() == 0:
                continue
            if t.dtype == torch.bool:
                t.logical_not_()
            elif t.is_floating_point() or t.is_complex():
                t.copy_(torch.randn_like(t) + 7)
            else:
                t.add_(3)
    return other


# --------------------------------------------------------------------------- round trip


MODELS = {
    "mlp": mlp,
    "conv_bn": conv_bn,
    "lenet300": lenet300,
    "lenet5": lenet5,
    "buffers": Buffers,
    "resnet18": resnet18,
}


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("with_masks", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_bit_exact(name, sparsity, with_masks, tmp_path):
    torch.manual_seed(0)
    model = MODELS[name]()
    masks = random_masks(model, sparsity) if sparsity else None
    path = tmp_path / "model.lobs"
    info = save_sparse(model, path, masks=masks if with_masks else None)
    other = fresh_like(model)
    loaded = load_sparse(other, path)
    assert_state_equal(model, other)
    assert loaded.file_bytes == info.file_bytes == path.stat().st_size
    assert loaded.path == info.path == str(path)
    assert loaded.encodings == info.encodings
    plain = read_sparse(path)
    assert list(plain) == list(model.state_dict())
    assert all(torch.equal(bits(plain[k], False), bits(v, False)) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_round_trip_other_dtypes(dtype, tmp_path):
    torch.manual_seed(1)
    model = conv_bn()
    masks = random_masks(model, 0.9)
    model.to(dtype)
    save_sparse(model, tmp_path / "m.lobs", masks=masks)
    other = fresh_like(model)
    load_sparse(other, tmp_path / "m.lobs")
    assert_state_equal(model, other)
    assert all(v.dtype == dtype for k, v in other.state_dict().items() if "num_batches" not in k)


def test_negative_zero_nan_payloads_and_wide_columns(tmp_path):
    """NaN payloads and subnormals come back bit for bit; -0.0 is a zero (not stored, loads as +0.0);
    column indices > 32767 survive int16."""
    model = nn.Module()
    wide = torch.zeros(3, 40_000)
    cols = torch.tensor([0, 1, 32_767, 32_768, 39_999])
    wide[1, cols] = torch.tensor([1.0, -2.0, 3.0, -0.0, 5.0])
    odd = torch.zeros(64)
    odd[3] = -0.0
    odd_int = odd.view(torch.int32)
    odd_int[10] = 0x7FC0_1234  # a NaN with a payload
    odd_int[11] = 0x0000_0001  # the smallest subnormal
    model.register_buffer("wide", wide)
    model.register_buffer("odd", odd)
    model.register_buffer("huge", torch.zeros(2, 70_000).index_fill_(1, torch.tensor([5, 69_999]), 1.5))
    save_sparse(model, tmp_path / "x.lobs")
    meta, tensors = _read(str(tmp_path / "x.lobs"))
    entries = {e["key"]: e for e in meta["entries"]}
    assert entries["wide"]["encoding"] == "csr"
    assert tensors["wide:col"].dtype == torch.int16 and tensors["huge:col"].dtype == torch.int32
    other = nn.Module()
    for key in ("wide", "odd", "huge"):
        other.register_buffer(key, torch.ones_like(getattr(model, key)))
    load_sparse(other, tmp_path / "x.lobs")
    for key in ("wide", "odd", "huge"):
        assert torch.equal(bits(getattr(other, key), False), bits(getattr(model, key), False)), key
    assert other.odd.view(torch.int32)[10] == 0x7FC0_1234 and other.odd.view(torch.int32)[11] == 1
    assert other.odd[3] == 0 and other.wide[1, 32_768] == 0
    assert tensors["wide:values"].numel() == 4  # 4 values stored: -0.0 is not one of them


def test_weights_pruned_by_multiplication(tmp_path):
    """w * mask leaves -0.0 where w < 0: those are pruned, with or without masks, and the file stays small."""
    torch.manual_seed(0)
    model = lenet300()
    masks = random_masks(model, 0.9)
    with torch.no_grad():
        for name in prunable(model):
            w = model.get_submodule(name).weight
            w.copy_(torch.randn_like(w) * masks[name])
    assert any(torch.signbit(model[1].weight[~masks["1"]]))
    for m in (None, masks):
        info = save_sparse(model, tmp_path / "m.lobs", masks=m)
        assert info.file_ratio <= 0.20 and info.kept_weights == sum(int(x.sum()) for x in masks.masks.values())
        other = fresh_like(model)
        load_sparse(other, tmp_path / "m.lobs")
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_load_onto_other_device_dtype_kept(tmp_path):
    model = lenet300()
    random_masks(model, 0.9)
    save_sparse(model, tmp_path / "m.lobs")
    other = fresh_like(model)
    load_sparse(other, str(tmp_path / "m.lobs"))  # str path as well as PathLike
    assert_state_equal(model, other)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), other(x))


# --------------------------------------------------------------------------- encodings and size


def test_encoding_chosen_by_bytes(tmp_path):
    model = nn.Module()
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(64, 64, generator=gen)
    half = torch.where(torch.rand(64, 64, generator=gen) < 0.5, dense, 0.0)
    sparse = torch.where(torch.rand(64, 64, generator=gen) < 0.02, dense, 0.0)
    for key, t in {"dense": dense, "halfway": half, "sparse": sparse, "zeros": torch.zeros(64, 64)}.items():
        model.register_buffer(key, t)
    info = save_sparse(model, tmp_path / "m.lobs")
    assert info.encodings == {"dense": "dense", "halfway": "bitmask", "sparse": "csr", "zeros": "csr"}
    # each choice is the smallest: bytes of the payload = the formulas (4 B values, 2 B columns, 4 B row pointers)
    _, tensors = _read(str(tmp_path / "m.lobs"))
    nnz_sparse = int((sparse != 0).sum())
    sizes = {key: entry_bytes(tensors, key) for key in info.encodings}
    assert sizes["dense"] == 64 * 64 * 4
    assert sizes["halfway"] == 64 * 64 // 8 + int((half != 0).sum()) * 4
    assert sizes["sparse"] == 65 * 4 + nnz_sparse * (2 + 4)
    assert sizes["zeros"] == 65 * 4


def test_masks_force_structure(tmp_path):
    """With masks the structure is the mask: kept zeros are stored, and even a dense mask is kept."""
    model = mlp()
    masks = random_masks(model, 0.5)
    with torch.no_grad():
        model[0].weight[masks["0"]] = 0.0  # every kept weight of layer 0 happens to be 0
        masks.set("2", torch.ones(8, 16, dtype=torch.bool))  # layer 2: nothing pruned
        model[2].weight.copy_(torch.randn(8, 16))
    info = save_sparse(model, tmp_path / "m.lobs", masks=masks)
    assert info.encodings["0.weight"] != "dense" and info.encodings["2.weight"] == "bitmask"
    _, tensors = _read(str(tmp_path / "m.lobs"))
    assert tensors["0.weight:values"].numel() == int(masks["0"].sum())
    kept = sum(int(masks[n].sum()) for n in ("0", "2", "4"))
    total = sum(masks[n].numel() for n in ("0", "2", "4"))
    assert info.kept_weights == kept and info.cr == pytest.approx(kept / total)
    # without masks the kept zeros are not kept
    assert save_sparse(model, tmp_path / "n.lobs").kept_weights < kept
    other = fresh_like(model)
    load_sparse(other, tmp_path / "m.lobs")
    assert_state_equal(model, other)


def test_mask_errors(tmp_path):
    model = mlp()
    masks = random_masks(model, 0.5)
    with torch.no_grad():
        model[0].weight[~masks["0"]] = 1.0
    with pytest.raises(ValueError, match=r"'0.weight' has \d+ nonzero entries where its mask is False"):
        save_sparse(model, tmp_path / "m.lobs", masks=masks)
    with pytest.raises(KeyError, match="'nope'"):
        save_sparse(mlp(), tmp_path / "m.lobs", masks={"nope": torch.ones(3, 3, dtype=torch.bool)})
    assert not (tmp_path / "m.lobs").exists()


@pytest.mark.parametrize("make", [lenet300, lenet5])
@pytest.mark.parametrize(("sparsity", "target"), [(0.9, 0.20), (0.95, 0.12)])
def test_size_targets(make, sparsity, target, tmp_path):
    """The file is at most 20% (90% sparsity) and 12% (95%) of torch.save(model.state_dict())'s bytes."""
    torch.manual_seed(0)
    model = make()
    masks = random_masks(model, sparsity)
    info = save_sparse(model, tmp_path / "m.lobs", masks=masks)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert info.dense_bytes == buf.getbuffer().nbytes
    assert info.file_bytes == (tmp_path / "m.lobs").stat().st_size
    assert info.file_ratio == pytest.approx(info.file_bytes / info.dense_bytes)
    assert info.file_ratio <= target, info.summary()
    kept = sum(int(m.sum()) for m in masks.masks.values())
    total = sum(m.numel() for m in masks.masks.values())
    assert info.cr == pytest.approx(kept / total) and abs(info.cr - (1 - sparsity)) < 0.01
    assert f"{100 * info.cr:.2f}%" in info.summary() and f"{info.file_ratio:.3f}x" in info.summary()


# --------------------------------------------------------------------------- refusals


def test_refuses_another_architecture(tmp_path):
    model = lenet300()
    random_masks(model, 0.9)
    path = tmp_path / "m.lobs"
    save_sparse(model, path)

    wider = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 100), nn.ReLU(), nn.Linear(100, 10)
    )
    before = copy.deepcopy(wider.state_dict())
    with pytest.raises(ValueError, match=r"'1.weight' has shape \(300, 784\) in the file, \(200, 784\) in the model"):
        load_sparse(wider, path)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())  # nothing loaded

    deeper = nn.Sequential(*lenet300(), nn.ReLU(), nn.Linear(10, 10))
    with pytest.raises(ValueError, match=r"the model has '7.weight', the file does not"):
        load_sparse(deeper, path)
    shallower = nn.Sequential(*list(lenet300())[:4])
    with pytest.raises(ValueError, match=r"the file has '5.weight', the model does not"):
        load_sparse(shallower, path)
    with pytest.raises(ValueError, match=r"'1.weight' is torch.float32 in the file, torch.float64 in the model"):
        load_sparse(lenet300().double(), path)
    with pytest.raises(ValueError, match="saved from a Sequential"):
        load_sparse(lenet5(), path)


def test_refuses_foreign_and_corrupted_files(tmp_path):
    model = mlp()
    random_masks(model, 0.9)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="plain.pt' is not a valid lightning-lobs sparse file"):
        load_sparse(mlp(), tmp_path / "plain.pt")
    path = tmp_path / "m.lobs"
    save_sparse(model, path)
    blob = bytearray(path.read_bytes())
    flipped = bytearray(blob)
    flipped[-3] ^= 0x10
    (tmp_path / "flip.lobs").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted"):
        load_sparse(mlp(), tmp_path / "flip.lobs")
    (tmp_path / "cut.lobs").write_bytes(bytes(blob[:-8]))
    with pytest.raises(ValueError, match="truncated"):
        load_sparse(mlp(), tmp_path / "cut.lobs")


def test_refuses_non_tensor_state():
    class Extra(nn.Linear):
        def get_extra_state(self):
            return {"note": 1}

        def set_extra_state(self, state):
            pass

    with pytest.raises(TypeError, match="'_extra_state'.*not a tensor"):
        save_sparse(Extra(3, 3), "unused.lobs")


# --------------------------------------------------------------------------- export_sparse (moved from masks)


def test_export_sparse_csr_int32_and_top_level():
    assert lightning_lobs.export_sparse is lightning_lobs.export.export_sparse
    model = lenet5()
    masks = random_masks(model, 0.9)
    out = lightning_lobs.export_sparse(model, masks)
    for name in prunable(model):
        sparse = out[f"{name}.weight"]
        assert sparse.crow_indices().dtype == torch.int32 and sparse.col_indices().dtype == torch.int32
        weight = model.get_submodule(name).weight.detach()
        assert torch.equal(sparse.to_dense(), weight.reshape(weight.shape[0], -1))
        assert sparse._nnz() == int(masks[name].sum())


# --------------------------------------------------------------------------- Lightning


def test_after_fit_with_lobs_pruning(tmp_path):
    """The documented post-fit call, and LOBSPruning(save_sparse=...) where the callback has that option."""
    pl = pytest.importorskip("pytorch_lightning")
    from torch.utils.data import DataLoader, TensorDataset

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

        def train_dataloader(self):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(256, 32, generator=gen)
            return DataLoader(TensorDataset(x, (x[:, :4]).argmax(1)), batch_size=32)

    kwargs = {}
    has_option = "save_sparse" in inspect.signature(LOBSPruning).parameters
    if has_option:
        kwargs["save_sparse"] = str(tmp_path / "callback.lobs")
    lobs = LOBSPruning(sparsity=0.9, prune_epoch=1, calibration_batches=2, **kwargs, prune_head=True)
    model = Lit()
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[lobs],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model)
    info = save_sparse(model, tmp_path / "after.lobs", masks=lobs.masks)
    kept = sum(int(m.sum()) for m in lobs.masks.masks.values())
    assert info.kept_weights == kept and info.cr == pytest.approx(0.1, abs=0.01)
    model.eval()
    paths = [tmp_path / "after.lobs"] + ([tmp_path / "callback.lobs"] if has_option else [])
    for path in paths:
        other = Lit()
        load_sparse(other, path)
        other.eval()
        assert_state_equal(model, other)
        x = torch.randn(8, 32)
        assert torch.equal(model(x), other(x))
    if not has_option:
        pytest.skip("LOBSPruning has no save_sparse option in this checkout; the post-fit call was tested")


# --------------------------------------------------------------------------- sparse inference


EPS32 = torch.finfo(torch.float32).eps


def abs_net(model: nn.Module) -> nn.Module:
    """The model with |W| and |b|: on |x| it bounds every term of every sum (a ReLU chain)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.abs_()
    return out


def rounding_bound(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """First-order bound on |y_a - y_b| for two float32 evaluations of a ReLU chain of Linear layers that sum
    in different orders: each sum of K terms errs by at most K * eps * (sum of |terms|), the downstream
    |W| chain carries it to the output, and two evaluations double it."""
    k_total = sum(m.in_features + 1 for m in model.modules() if isinstance(m, (nn.Linear, CSRLinear)))
    with torch.no_grad():
        return 2 * k_total * EPS32 * abs_net(model)(x.abs())


def pruned_lenet300(sparsity: float = 0.93) -> nn.Module:
    torch.manual_seed(0)
    model = lenet300().eval()
    random_masks(model, sparsity)
    return model


@pytest.mark.parametrize("batch", [1, 5, 256])
def test_to_sparse_inference_csr_equals_dense(batch):
    model = pruned_lenet300()
    before = copy.deepcopy(model.state_dict())
    sparse = to_sparse_inference(model, batch_size=batch, mode="sparse")
    assert [type(m) for m in sparse] == [nn.Flatten, CSRLinear, nn.ReLU, CSRLinear, nn.ReLU, CSRLinear]
    # a copy: the original keeps its dense trainable layers and values
    assert all(type(model[i]) is nn.Linear for i in (1, 3, 5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(batch, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        got = sparse(x)
        ref64 = copy.deepcopy(model).double()(x.double())
    bound = rounding_bound(model, x.flatten(1))
    assert torch.all((got - ref).abs() <= bound)
    assert torch.all((got.double() - ref64).abs() <= bound)
    # the bound is tight enough to see an error of 1e-3 in one logit (outputs are ~0.05-0.1 here)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken[5].bias[0] += 1e-3
    assert not torch.all((to_sparse_inference(broken, mode="sparse")(x) - ref).abs() <= bound)


def test_csr_linear_shapes_bias_and_dtype():
    torch.manual_seed(0)
    for bias in (True, False):
        for dtype in (torch.float32, torch.float64):
            lin = nn.Linear(48, 20, bias=bias).to(dtype)
            with torch.no_grad():
                lin.weight[torch.rand(20, 48) < 0.9] = 0
            layer = CSRLinear.from_linear(lin)
            x = torch.randn(2, 3, 48, dtype=dtype)
            with torch.no_grad():
                y, ref = layer(x), lin(x)
            assert y.shape == (2, 3, 20) and y.dtype == dtype
            eps = torch.finfo(dtype).eps
            terms = x.abs() @ lin.weight.abs().t() + (lin.bias.abs() if bias else 0)
            assert torch.all((y - ref).abs() <= 2 * 49 * eps * terms)


def test_to_sparse_inference_modes_and_rules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        model[0].weight[torch.rand(64, 64) < 0.95] = 0
        model[2].weight[torch.rand(64, 64) < 0.3] = 0  # below min_sparsity: stays dense in every mode
    plan = plan_sparse_inference(model, mode="sparse")
    assert [plan[n].kernel for n in ("0", "2", "4")] == ["csr", "dense", "dense"]
    assert "min_sparsity" in plan["2"].reason
    assert plan["0"].sparsity == pytest.approx(1 - int(model[0].weight.count_nonzero()) / 64**2)
    assert all(p.kernel == "dense" for p in plan_sparse_inference(model, mode="dense").values())
    assert "csr" in plan_sparse_inference(model, mode="sparse", min_sparsity=0.2)["2"].kernel

    same = to_sparse_inference(model, mode="sparse", inplace=True)
    assert same is model and isinstance(model[0], CSRLinear) and type(model[2]) is nn.Linear
    with pytest.raises(ValueError, match="mode"):
        plan_sparse_inference(model, mode="fastest")
    with pytest.raises(ValueError, match="batch_size"):
        plan_sparse_inference(model, batch_size=0)


def test_auto_mode_measures_and_keeps_outputs():
    """Whatever the measurement picks, the outputs are the dense model's within rounding."""
    model = pruned_lenet300(0.95)
    plan = plan_sparse_inference(model, batch_size=64, repeats=3, warmup=1)
    for p in plan.values():
        assert p.dense_ms is not None and p.dense_ms > 0 and set(p.sparse_ms) == {"csr"}
        assert p.kernel in ("dense", "csr") and p.reason
        faster = p.dense_ms / p.sparse_ms["csr"] >= 1.1
        assert (p.kernel == "csr") == faster
    sparse = to_sparse_inference(model, plan=plan)
    kernels = {n: type(m) for n, m in sparse.named_children()}
    assert all((kernels[n] is CSRLinear) == (p.kernel == "csr") for n, p in plan.items())
    x = torch.randn(64, 784)
    with torch.no_grad():
        assert torch.all((sparse(x) - model(x)).abs() <= rounding_bound(model, x))


def test_linear_subclasses_left_alone():
    """MultiheadAttention reads out_proj.weight directly; swapping it would break the module."""
    mha = nn.MultiheadAttention(16, 2)
    with torch.no_grad():
        mha.out_proj.weight.zero_()
    plan = plan_sparse_inference(mha, mode="sparse")
    assert set(plan) == {"", "out_proj"} and all(p.kernel == "dense" for p in plan.values())
    assert "unsupported type NonDynamicallyQuantizableLinear" in plan["out_proj"].reason
    assert "unsupported type MultiheadAttention" in plan[""].reason
    with pytest.warns(UserWarning, match=r"swapped 0 of 2 layers; kept dense: .*out_proj \(unsupported type"):
        same = to_sparse_inference(mha, mode="sparse")
    assert type(same.out_proj) is type(mha.out_proj)


def test_two_four_rule():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3], [1, 1, 0, 0, 1, 0, 1, 0]])
    assert is_two_four(w)
    w[0, 1] = 5
    assert not is_two_four(w)
    assert not is_two_four(torch.zeros(2, 6))
    # on CPU the 2:4 kernel is never a candidate; a 50% sparse 2:4 layer gets CSR only with min_sparsity <= 0.5
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.view(32, 16, 4)[..., 2:] = 0
    plan = plan_sparse_inference(nn.Sequential(lin), mode="sparse")["0"]
    assert plan.kernel == "csr" and plan.sparsity == 0.5


def _cuda_two_four_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU in this session: the 2:4 semi-structured path is untested here"
    if torch.cuda.get_device_capability() < (8, 0):
        return "2:4 semi-structured kernels need compute capability 8.0+"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_two_four_reason() is not None, reason=str(_cuda_two_four_reason()))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_on_cuda(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64)).to("cuda", dtype).eval()
    with torch.no_grad():
        for i in (0, 2):
            w = model[i].weight
            keep = w.abs().view(w.shape[0], -1, 4).topk(2, dim=-1).indices
            mask = torch.zeros_like(w, dtype=torch.bool).view(w.shape[0], -1, 4).scatter_(-1, keep, True)
            w.mul_(mask.view_as(w))
    plan = plan_sparse_inference(model, mode="sparse")
    assert all(p.kernel == "semi_structured" for p in plan.values())
    sparse = to_sparse_inference(model, plan=plan)
    assert isinstance(sparse[0], SemiStructuredLinear)
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        got = sparse(x).double()
        ref64 = copy.deepcopy(model).double()(x.double())
        terms = abs_net(copy.deepcopy(model).double())(x.double().abs())
    eps = torch.finfo(dtype).eps
    # half-precision outputs: rounding of each layer's output (eps) dominates float32 accumulation
    assert torch.all((got - ref64).abs() <= 4 * eps * terms + 2 * 257 * EPS32 * terms)
    assert math.isfinite(float(got.abs().max()))


# --------------------------------------------------------------------------- the masks come back with a load


class WithAttention(nn.Module):
    """A Linear, a conv and an attention (whose masks live on the Parameter ``attn.in_proj_weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 2, batch_first=True)
        self.conv = nn.Conv1d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64, 64)


@pytest.mark.parametrize("sparsity", [0.5, 0.99])  # bitmask, then CSR encodings of the masked weights
def test_load_sparse_returns_the_masks_saved_with_the_file(sparsity, tmp_path):
    """``load_sparse`` gives back exactly the masks given to ``save_sparse`` (kept zeros included, so they are not
    ``weight != 0``), named as the MaskSet named them, and they hold the pruned weights through retraining."""
    torch.manual_seed(0)
    model = WithAttention()
    gen = torch.Generator().manual_seed(1)
    masks = MaskSet()
    for name in ("attn.in_proj_weight", "attn.out_proj", "conv", "fc"):
        weight = lightning_lobs.masks.resolve_weight(model, name)
        masks.set(name, torch.rand(weight.shape, generator=gen) >= sparsity)
        with torch.no_grad():
            weight[masks[name] & (torch.rand(weight.shape, generator=gen) < 0.2)] = 0.0  # kept weights that are 0
    masks.apply(model)
    saved = save_sparse(model, tmp_path / "m.lobs", masks=masks)
    assert set(saved.masks) == set(masks.masks)
    assert {saved.encodings[k] for k in ("attn.in_proj_weight", "conv.weight", "fc.weight")} == (
        {"bitmask"} if sparsity == 0.5 else {"csr"}
    )

    other = fresh_like(model)
    info = load_sparse(other, tmp_path / "m.lobs")
    assert_state_equal(model, other)
    assert set(info.masks) == set(masks.masks)
    for name, mask in masks.masks.items():
        assert info.masks[name].dtype == torch.bool and torch.equal(info.masks[name], mask), name
    kept_zero = (lightning_lobs.masks.resolve_weight(other, "fc") == 0) & info.masks["fc"]
    assert bool(kept_zero.any())  # the mask is the file's, not the weights' zeros

    held = info.mask_set()
    opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    held.attach(other, opt)
    x = torch.randn(2, 5, 64)
    for _ in range(3):
        opt.zero_grad()
        y, _ = other.attn(x, x, x)
        (other.fc(other.conv(y.transpose(1, 2)).transpose(1, 2)) ** 2).sum().backward()
        opt.step()
    for name, mask in masks.masks.items():
        weight = lightning_lobs.masks.resolve_weight(other, name)
        assert bool((weight[~mask] == 0).all()) and bool((weight[mask] != 0).any()), name


def test_load_sparse_of_a_file_without_masks_gives_none_and_names_are_relative_to_the_model(tmp_path):
    """A file saved without masks gives ``info.masks == {}``; one saved from a wrapper loads into the inner model with
    the inner model's names."""
    torch.manual_seed(0)
    inner = mlp()
    save_sparse(inner, tmp_path / "a.lobs")
    assert load_sparse(fresh_like(inner), tmp_path / "a.lobs").masks == {}

    wrapper = nn.Module()
    wrapper.model = inner
    masks = random_masks(inner, 0.6)
    save_sparse(wrapper, tmp_path / "b.lobs", masks={f"model.{n}": m for n, m in masks.masks.items()})
    info = load_sparse(fresh_like(inner), tmp_path / "b.lobs")  # the "model." prefix is found
    assert set(info.masks) == set(masks.masks) == {"0", "2", "4"}
    assert all(torch.equal(info.masks[n], masks[n]) for n in masks.masks)
    assert set(load_sparse(fresh_like(wrapper), tmp_path / "b.lobs").masks) == {"model.0", "model.2", "model.4"}
