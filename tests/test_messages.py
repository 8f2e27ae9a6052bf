"""Messages that say what happened: bools refused as numbers, dtype strings, mapping precedence, unreachable
targets, prior masks, BatchNorm re-estimation errors, and ``exact`` at any input scale."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_lobs import CalibrationOptions, GlobalAllocation, MaskSet, PruneOptions, SolverOptions, prune_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def _batches(n: int = 4, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> list:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(32, 12, generator=g, dtype=dtype) * scale,) for _ in range(n)]


def _sparsity(model: nn.Module, name: str) -> float:
    w = model.get_submodule(name).weight
    return float((w == 0).sum()) / w.numel()


# --------------------------------------------------------------------------- bools are not numbers

NUMERIC = [
    (SolverOptions, "damp"),
    (SolverOptions, "block_size"),
    (SolverOptions, "lazy_steps"),
    (SolverOptions, "max_memory_bytes"),
    (SolverOptions, "max_damp_tries"),
    (SolverOptions, "min_kept_per_row"),
    (CalibrationOptions, "max_chunk_elements"),
    (CalibrationOptions, "position_stride"),
    (CalibrationOptions, "memory_budget_bytes"),
    (GlobalAllocation, "max_layer_sparsity"),
    (GlobalAllocation, "levels"),
    (GlobalAllocation, "curve_rows"),
]


@pytest.mark.parametrize("cls, name", NUMERIC)
def test_bools_are_refused_where_numbers_are_meant(cls, name):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name} must be .*got True"):
        cls(**{name: True})


def test_numbers_are_refused_where_a_bool_is_meant():
    with pytest.raises(ValueError, match=r"SolverOptions\.refit must be True, False or None .*got 1"):
        SolverOptions(refit=1)


def test_bools_are_refused_in_grids_sparsities_and_calibration_batches():
    with pytest.raises(ValueError, match=r"GlobalAllocation\.grid must be a sequence of sparsities"):
        GlobalAllocation(grid=(0.5, True))
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\).*got True"):
        PruneOptions(sparsity=True, prune_head=True)
    from lightning_lobs import LOBSPruning

    for kwargs, match in (
        (dict(calibration_batches=True), r"calibration_batches must be an int >= 1, got True"),
        (dict(progress_after=True), r"progress_after must be a number of seconds >= 0, got True"),
        (dict(prune_epoch=True), r"prune_epoch must be a whole epoch number"),
        (dict(solver={"damp": True}), r"SolverOptions\.damp must be .*got True"),
    ):
        with pytest.raises(ValueError, match=match):
            LOBSPruning(**kwargs, prune_head=True)


# --------------------------------------------------------------------------- dtypes spelled as strings (YAML)


def test_dtype_strings_from_yaml_are_read_as_dtypes():
    assert SolverOptions(dtype="torch.float64").dtype is torch.float64
    assert SolverOptions(dtype="float32").dtype is torch.float32
    assert CalibrationOptions(hessian_dtype="torch.float32").hessian_dtype is torch.float32
    assert PruneOptions(solver={"dtype": "torch.float64"}, prune_head=True).solver.dtype is torch.float64
    with pytest.raises(
        ValueError,
        match=r"SolverOptions\.dtype must be torch\.float32 or torch\.float64, got the string 'torch\.float16'",
    ):
        SolverOptions(dtype="torch.float16")
    with pytest.raises(ValueError, match=r"hessian_dtype must be .*got torch\.bfloat16 of type dtype"):
        CalibrationOptions(hessian_dtype=torch.bfloat16)


# --------------------------------------------------------------------------- sparsity 0 and mapping precedence


def test_zero_sparsity_says_it_prunes_nothing():
    model = _mlp()
    with pytest.raises(ValueError, match=r"sparsity 0 prunes nothing.*sparsity in \(0, 1\)"):
        prune_model(model, _batches(), sparsity=0.0, prune_head=True)
    with pytest.raises(ValueError, match=r"sparsity 0 prunes nothing"):
        prune_model(model, _batches(), sparsity={"*": 0.0}, prune_head=True)


def test_exactly_named_layer_beats_an_earlier_wildcard():
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every pattern sets some layer: no warning
        report = prune_model(model, _batches(), sparsity={"*": 0.5, "2": 0.75}, method="fast", prune_head=True)
    assert report.layers["2"].target_sparsity == 0.75
    assert _sparsity(model, "2") == pytest.approx(0.75, abs=1 / 128)
    assert _sparsity(model, "0") == pytest.approx(0.5, abs=1 / 192)


def test_pattern_that_sets_no_layer_is_named_once():
    model = _mlp()
    with pytest.warns(
        UserWarning, match=r"pattern\(s\) that set no layer: '\[02\]' \(its layers 0, 2 take 0\.5"
    ) as rec:
        prune_model(model, _batches(), sparsity={"*": 0.5, "[02]": 0.75}, method="fast", prune_head=True)
    assert sum("set no layer" in str(w.message) for w in rec) == 1
    assert _sparsity(model, "0") == pytest.approx(0.5, abs=1 / 192)


# --------------------------------------------------------------------------- prior masks


def test_prior_masks_sparser_than_asked_warn_with_each_layer():
    model = _mlp()
    first = prune_model(model, _batches(), sparsity=0.8, method="fast", allocation="uniform", prune_head=True)
    masks = first.masks
    with pytest.warns(
        UserWarning,
        match=r"remove 0\.79\d* of the selected weights, more than the asked sparsity 0\.5: "
        r"'0' at 0\.80\d* \(asked 0\.5\); '2' at 0\.79\d* \(asked 0\.5\); '4' at 0\.79\d* .*without masks=",
    ):
        report = prune_model(model, _batches(), sparsity=0.5, method="fast", masks=masks, prune_head=True)
    assert report.sparsity == pytest.approx(first.sparsity)  # the report says what the model holds
    with pytest.warns(
        UserWarning, match=r"^1 layer\(s\) already sparser than asked: '2' at 0\.79\d* \(asked 0\.6\)\. "
    ):
        report = prune_model(
            model, _batches(), sparsity={"0": 0.9, "2": 0.6}, method="fast", masks=masks, prune_head=True
        )
    assert report.layers["2"].target_sparsity == 0.6
    assert report.layers["2"].sparsity == pytest.approx(first.layers["2"].sparsity)
    assert report.layers["0"].sparsity == pytest.approx(0.9, abs=1 / 192)


def test_prior_mask_of_the_wrong_shape_is_named_before_any_work():
    model = _mlp()
    masks = MaskSet()
    masks.set("2", torch.ones(16, 8, dtype=torch.bool))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'2': mask \(16, 8\), weight \(8, 16\).*MaskSet\.from_model"):
        prune_model(model, _batches(), sparsity=0.5, masks=masks, prune_head=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- BatchNorm re-estimation errors


class Picky(Exception):
    """A user exception whose constructor takes other arguments than a message."""

    def __init__(self, code: int, where: str) -> None:
        super().__init__(code, where)
        self.code, self.where = code, where


def _bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("error", [Picky(7, "fw"), RuntimeError("CUDA out of memory (pretend)")])
def test_user_exception_during_batchnorm_reestimation_propagates_unchanged(error):
    model = _bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}

    def forward(m, batch):
        calls["n"] += 1
        if (
            not torch.is_grad_enabled()
            and all(bn.training for bn in m.modules() if isinstance(bn, nn.BatchNorm1d))
            and not m.training
        ):
            raise error  # only during the re-estimation: BatchNorm in train mode, the rest in eval
        return m(batch[0])

    with pytest.raises(type(error)) as info:
        prune_model(model, _batches(), sparsity=0.5, forward_fn=forward, prune_head=True)
    assert info.value is error and info.value.args == error.args
    assert "more than one sample" not in str(info.value)  # no BatchNorm advice for someone else's error
    assert any("BatchNorm re-estimation" in n for n in getattr(info.value, "__notes__", []))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_batch_of_one_names_the_batchnorm_and_the_fix():
    model = _bn_model()
    with pytest.raises(
        ValueError, match=r"'1' got one value per channel \(input shape \(1, 8\)\).*recalibrate_bn=False"
    ):
        prune_model(model, [(torch.randn(1, 12),) for _ in range(3)], sparsity=0.5, prune_head=True)


# --------------------------------------------------------------------------- exact at any input scale


@pytest.mark.parametrize("solver_dtype", [torch.float32, torch.float64])
def test_exact_masks_do_not_depend_on_the_input_scale(solver_dtype):
    """With the same weights, inputs times s give H_xx times s^2 and a cross term times s; the constant
    (bias) input does not scale, yet the greedy OBS sequence is the same at every s."""
    masks = []
    for scale in (1e-20, 1.0, 1e23):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(12, 8)).double()
        report = prune_model(
            model,
            _batches(scale=scale, dtype=torch.float64),
            sparsity=0.5,
            method="exact",
            allocation="uniform",
            solver=SolverOptions(dtype=solver_dtype),
            prune_head=True,
        )
        masks.append(report.masks["0"])
        assert report.layers["0"].sparsity == 0.5
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[2], masks[1])
