"""Tests for lightning_lobs.masks: mask storage, enforcement hooks, serialization, export."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lobs.export import export_sparse
from lightning_lobs.masks import MaskSet, model_sparsity

MLP_NAMES = ("0", "2", "4")
CONV_NAMES = ("0", "2", "5")


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def make_conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
    )


def mlp_batch(gen: torch.Generator, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 20, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def conv_batch(gen: torch.Generator, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


NETS: dict[str, tuple[Callable[[], nn.Module], tuple[str, ...], Callable]] = {
    "mlp": (make_mlp, MLP_NAMES, mlp_batch),
    "conv": (make_conv, CONV_NAMES, conv_batch),
}

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
}


def random_masks(model: nn.Module, names: tuple[str, ...], seed: int = 0) -> MaskSet:
    gen = torch.Generator().manual_seed(seed)
    masks = MaskSet()
    for name in names:
        weight = model.get_submodule(name).weight
        masks.set(name, torch.rand(weight.shape, generator=gen) < 0.5)
    return masks


def assert_pruned_zero(model: nn.Module, masks: MaskSet) -> None:
    for name in masks:
        weight = model.get_submodule(name).weight
        pruned = weight.detach()[~masks[name]]
        assert pruned.numel() > 0
        assert (pruned == 0).all(), f"{name}: {int((pruned != 0).sum())} pruned weights are nonzero"


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch_fn: Callable, gen: torch.Generator) -> None:
    x, y = batch_fn(gen)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("net", list(NETS))
def test_pruned_weights_stay_exactly_zero(net: str, opt_name: str) -> None:
    torch.manual_seed(0)
    make, names, batch_fn = NETS[net]
    model = make()
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    gen = torch.Generator().manual_seed(1)

    # Dense warm-up so momentum / Adam statistics are nonzero everywhere.
    for _ in range(3):
        train_step(model, opt, batch_fn, gen)
    masks = random_masks(model, names)
    state_before = {
        name: {k: v.clone() for k, v in opt.state[model.get_submodule(name).weight].items() if v.dim() > 0}
        for name in names
    }
    for name in names:
        assert any((v[~masks[name]] != 0).any() for v in state_before[name].values())

    masks.attach(model, [opt])
    assert masks.attached
    assert_pruned_zero(model, masks)
    # (3) optimizer state at pruned positions is zeroed, kept positions untouched.
    for name in names:
        for key, value in opt.state[model.get_submodule(name).weight].items():
            if value.dim() == 0:
                continue
            assert (value[~masks[name]] == 0).all(), key
            assert torch.equal(value[masks[name]], state_before[name][key][masks[name]]), key

    accumulate = 2
    for step in range(20):
        prev = {n: model.get_submodule(n).weight.detach().clone() for n in names}
        for _ in range(accumulate):
            x, y = batch_fn(gen)
            (F.cross_entropy(model(x), y) / accumulate).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        opt.step()
        opt.zero_grad()
        assert_pruned_zero(model, masks)
        for n in names:
            kept_now = model.get_submodule(n).weight.detach()[masks[n]]
            assert (kept_now != prev[n][masks[n]]).any(), f"step {step}: kept weights of {n} did not change"
    masks.detach()
    assert not masks.attached


def test_step_hook_catches_state_loaded_after_attach() -> None:
    """Optimizer state restored after attach (e.g. checkpoint resume) is neutralised by the step hook."""
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        train_step(model, opt, mlp_batch, gen)
    dense_state = copy.deepcopy(opt.state_dict())

    masks = random_masks(model, MLP_NAMES)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    masks.attach(model, [opt2])
    opt2.load_state_dict(dense_state)  # momentum is nonzero at pruned positions again
    for _ in range(3):
        train_step(model, opt2, mlp_batch, gen)
        assert_pruned_zero(model, masks)


def test_gradients_masked_before_clipping() -> None:
    torch.manual_seed(0)
    model = make_mlp()
    masks = random_masks(model, MLP_NAMES)
    masks.attach(model, [])
    gen = torch.Generator().manual_seed(0)
    x, y = mlp_batch(gen)
    F.cross_entropy(model(x), y).backward()
    for name in MLP_NAMES:
        grad = model.get_submodule(name).weight.grad
        assert (grad[~masks[name]] == 0).all()
        assert (grad[masks[name]] != 0).any()
    # The clipping norm equals the norm over kept gradient entries (plus biases) only.
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
    torch.testing.assert_close(total, expected)


def test_existing_grad_masked_on_attach() -> None:
    torch.manual_seed(0)
    model = make_mlp()
    x, y = mlp_batch(torch.Generator().manual_seed(0))
    F.cross_entropy(model(x), y).backward()  # partial accumulation before attach
    masks = random_masks(model, MLP_NAMES)
    masks.attach(model, [])
    for name in MLP_NAMES:
        assert (model.get_submodule(name).weight.grad[~masks[name]] == 0).all()


def test_weight_frozen_at_attach_gets_its_gradient_masked_after_unfreezing() -> None:
    """A frozen weight cannot take a gradient hook yet: its first forward after being unfrozen registers it (once),
    so the pruned positions' gradients are zero from that backward on; detach removes the pending hook too."""
    torch.manual_seed(0)
    model = make_mlp()
    masks = random_masks(model, MLP_NAMES)
    frozen = model.get_submodule("0").weight
    frozen.requires_grad_(False)
    masks.attach(model, [])
    assert masks.num_hooks == len(MLP_NAMES)  # two gradient hooks and one forward pre-hook
    assert (frozen.detach()[~masks["0"]] == 0).all()  # the masks apply to a frozen weight as well
    gen = torch.Generator().manual_seed(0)
    x, y = mlp_batch(gen)
    F.cross_entropy(model(x), y).backward()  # still frozen: the pre-hook waits
    assert frozen.grad is None and masks.num_hooks == len(MLP_NAMES)
    frozen.requires_grad_(True)
    for _ in range(2):  # the first forward after unfreezing swaps the pre-hook for a gradient hook, once
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert masks.num_hooks == len(MLP_NAMES)
        assert len(frozen._backward_hooks or {}) == 1
        assert (frozen.grad[~masks["0"]] == 0).all() and (frozen.grad[masks["0"]] != 0).any()
    masks.detach()
    assert masks.num_hooks == 0 and len(frozen._backward_hooks or {}) == 0

    pending = make_mlp()
    pending.get_submodule("0").weight.requires_grad_(False)
    masks.attach(pending, [])
    masks.detach()  # the forward pre-hook goes as well: unfreezing later registers nothing
    pending.get_submodule("0").weight.requires_grad_(True)
    pending(x).sum().backward()
    assert len(pending.get_submodule("0").weight._backward_hooks or {}) == 0


def test_optimizer_state_zeroed_for_every_masked_weight_even_when_one_has_none() -> None:
    """A weight the optimizer has not stepped yet (no state) does not stop the others' state being masked."""
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.get_submodule("0").weight.requires_grad_(False)  # no gradient, so no momentum buffer for it
    train_step(model, opt, mlp_batch, torch.Generator().manual_seed(0))
    model.get_submodule("0").weight.requires_grad_(True)
    assert not opt.state.get(model.get_submodule("0").weight)
    masks = random_masks(model, MLP_NAMES)
    masks.attach(model, [opt])
    for name in ("2", "4"):
        buf = opt.state[model.get_submodule(name).weight]["momentum_buffer"]
        assert (buf[~masks[name]] == 0).all() and (buf[masks[name]] != 0).any(), name


def test_attach_takes_one_optimizer_as_well_as_a_list() -> None:
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    masks = random_masks(model, MLP_NAMES)
    masks.attach(model, opt)
    assert masks.num_hooks == len(MLP_NAMES) + 1 and len(opt._optimizer_step_post_hooks) == 1
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        train_step(model, opt, mlp_batch, gen)
        assert_pruned_zero(model, masks)


def test_detach_removes_hooks_and_model_trains_freely() -> None:
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    masks = random_masks(model, MLP_NAMES)
    weights = [model.get_submodule(n).weight for n in MLP_NAMES]
    masks.attach(model, [opt])
    assert masks.num_hooks == len(MLP_NAMES) + 1
    assert all(len(w._backward_hooks or {}) == 1 for w in weights)
    assert len(opt._optimizer_step_post_hooks) == 1

    masks.detach()
    masks.detach()  # idempotent
    assert not masks.attached and masks.num_hooks == 0
    assert all(len(w._backward_hooks or {}) == 0 for w in weights)
    assert len(opt._optimizer_step_post_hooks) == 0

    gen = torch.Generator().manual_seed(0)
    x, y = mlp_batch(gen)
    F.cross_entropy(model(x), y).backward()
    for name, w in zip(MLP_NAMES, weights):
        assert (w.grad[~masks[name]] != 0).any()
    opt.step()
    for name, w in zip(MLP_NAMES, weights):
        assert (w.detach()[~masks[name]] != 0).any(), f"{name}: pruned weights did not move after detach"


def test_attach_twice_does_not_double_register() -> None:
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masks = random_masks(model, MLP_NAMES)
    weights = [model.get_submodule(n).weight for n in MLP_NAMES]
    masks.attach(model, [opt])
    masks.attach(model, [opt, opt])
    assert masks.num_hooks == len(MLP_NAMES) + 1
    assert all(len(w._backward_hooks) == 1 for w in weights)
    assert len(opt._optimizer_step_post_hooks) == 1

    # Re-attach with a new optimizer (e.g. after checkpoint resume): the old one is released.
    opt2 = torch.optim.Adam(model.parameters(), lr=1e-2)
    masks.detach()
    masks.attach(model, [opt2])
    assert len(opt._optimizer_step_post_hooks) == 0
    assert len(opt2._optimizer_step_post_hooks) == 1
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        train_step(model, opt2, mlp_batch, gen)
        assert_pruned_zero(model, masks)


def test_update_while_attached_enforces_new_masks() -> None:
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    train_step(model, opt, mlp_batch, gen)
    masks = random_masks(model, ("0",))
    masks.attach(model, [opt])
    new = random_masks(model, ("0", "2"), seed=5)
    combined = {"0": new["0"] & masks["0"], "2": new["2"]}
    masks.update(combined)  # replace semantics: caller passes the final mask
    assert torch.equal(masks["0"], combined["0"])
    assert masks.num_hooks == 2 + 1
    assert_pruned_zero(model, masks)
    assert (opt.state[model[2].weight]["exp_avg"][~masks["2"]] == 0).all()
    for _ in range(3):
        train_step(model, opt, mlp_batch, gen)
        assert_pruned_zero(model, masks)


def test_state_dict_keys_unchanged_by_attach() -> None:
    model = make_conv()
    keys = list(model.state_dict())
    params = [n for n, _ in model.named_parameters()]
    masks = random_masks(model, CONV_NAMES)
    masks.attach(model, [torch.optim.SGD(model.parameters(), lr=0.1)])
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == params
    assert type(model[0]) is nn.Conv2d
    fresh = make_conv()
    fresh.load_state_dict(model.state_dict())  # strict load into the original architecture
    assert_pruned_zero(fresh, masks)


def test_state_dict_and_save_load_round_trip(tmp_path) -> None:
    model = make_conv()
    masks = random_masks(model, CONV_NAMES)
    state = masks.state_dict()
    assert set(state) == set(CONV_NAMES)
    assert all(t.dtype == torch.bool and t.device.type == "cpu" for t in state.values())
    state["0"][0] = ~state["0"][0]  # a copy: mutating it must not touch the MaskSet
    assert not torch.equal(state["0"], masks["0"])

    other = MaskSet()
    other.load_state_dict(masks.state_dict())
    assert list(other) == list(masks)
    assert all(torch.equal(other[n], masks[n]) for n in masks)

    path = tmp_path / "masks.pt"
    masks.save(path)
    loaded = MaskSet.load(path)
    assert len(loaded) == len(masks)
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    assert loaded.sparsity() == masks.sparsity()

    clone = copy.deepcopy(masks)
    assert not clone.attached and all(torch.equal(clone[n], masks[n]) for n in masks)


def test_apply_errors_are_informative() -> None:
    model = make_mlp()
    masks = MaskSet()
    masks.set("nope", torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(KeyError, match="nope"):
        masks.apply(model)
    with pytest.raises(KeyError, match="nope"):
        masks.attach(model, [])
    assert not masks.attached

    masks = MaskSet()
    masks.set("1", torch.ones(3, dtype=torch.bool))  # ReLU has no weight
    with pytest.raises(KeyError, match="no 'weight'"):
        masks.apply(model)

    masks = MaskSet()
    masks.set("0", torch.ones(20, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"'0'.*\(20, 16\).*\(16, 20\)"):
        masks.apply(model)


def test_apply_and_sparsity() -> None:
    model = make_mlp()
    masks = random_masks(model, MLP_NAMES)
    masks.apply(model)
    assert_pruned_zero(model, masks)
    sp = masks.sparsity()
    for name in MLP_NAMES:
        expected = 1.0 - masks[name].float().mean().item()
        assert sp[name] == pytest.approx(expected)
        assert 0.3 < sp[name] < 0.7
    assert model_sparsity(model, MLP_NAMES) == pytest.approx(sp)
    pruned = sum(int((~masks[n]).sum()) for n in MLP_NAMES)
    total = sum(masks[n].numel() for n in MLP_NAMES)
    assert masks.total_sparsity() == pytest.approx(pruned / total)
    assert MaskSet().total_sparsity() == 0.0
    assert "0" in masks and len(masks) == 3 and masks.get("missing") is None


def test_set_copies_and_converts() -> None:
    mask = torch.tensor([[1, 0], [0, 2]])
    masks = MaskSet()
    masks.set("a", mask)
    assert masks["a"].dtype == torch.bool
    assert masks["a"].tolist() == [[True, False], [False, True]]
    b = torch.ones(2, 2, dtype=torch.bool)
    masks.set("b", b)
    b[0, 0] = False
    assert masks["b"].all()


def test_from_model_recovers_masks() -> None:
    model = make_conv()
    masks = random_masks(model, CONV_NAMES)
    masks.apply(model)
    recovered = MaskSet.from_model(model)
    assert sorted(recovered) == sorted(CONV_NAMES)
    assert all(torch.equal(recovered[n], masks[n]) for n in CONV_NAMES)
    only = MaskSet.from_model(model, ["2"])
    assert list(only) == ["2"]


@pytest.mark.parametrize("layout", ["csr", "coo"])
def test_export_sparse(layout: str) -> None:
    model = make_conv()
    masks = random_masks(model, CONV_NAMES)
    masks.apply(model)
    exported = export_sparse(model, masks, layout=layout)
    assert set(exported) == {f"{n}.weight" for n in CONV_NAMES}
    for name in CONV_NAMES:
        weight = model.get_submodule(name).weight.detach()
        sparse = exported[f"{name}.weight"]
        assert sparse.layout == (torch.sparse_csr if layout == "csr" else torch.sparse_coo)
        assert sparse.shape == (weight.shape[0], weight[0].numel())
        assert sparse._nnz() == int(masks[name].sum())
        assert torch.equal(sparse.to_dense(), (weight * masks[name]).reshape(weight.shape[0], -1))
    with pytest.raises(ValueError, match="layout"):
        export_sparse(model, masks, layout="bsr")


def test_lightning_training_keeps_pruned_weights_zero() -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from torch.utils.data import DataLoader, TensorDataset

    class TinyModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp()

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.Adam(self.parameters(), lr=1e-2, weight_decay=1e-2)

    class MaskCallback(pl.Callback):
        def __init__(self, masks: MaskSet) -> None:
            self.masks = masks
            self.checked = 0

        def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            self.masks.attach(pl_module, trainer.optimizers)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            assert_pruned_zero(pl_module, self.masks)
            self.checked += 1

        def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            self.masks.detach()

    torch.manual_seed(0)
    module = TinyModule()
    names = tuple(f"net.{n}" for n in MLP_NAMES)
    masks = random_masks(module, names)
    before = {n: module.get_submodule(n).weight.detach().clone() for n in names}
    gen = torch.Generator().manual_seed(0)
    x, y = mlp_batch(gen, n=64)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    callback = MaskCallback(masks)
    trainer = pl.Trainer(
        max_epochs=2,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[callback],
    )
    trainer.fit(module, loader)
    assert callback.checked == 16
    assert trainer.global_step == 8
    assert not masks.attached
    assert_pruned_zero(module, masks)
    for n in names:
        kept = masks[n]
        assert (module.get_submodule(n).weight.detach()[kept] != before[n][kept]).all()
