"""The layer adapter (lightning_lobs.layers): every layer type's geometry, its matrix round trip, and its verdicts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_lobs import attention
from lightning_lobs.config import NMPattern
from lightning_lobs.layers import (
    MASKABLE_TYPES,
    channel_last_perm,
    describe_layer,
    from_rows,
    is_conv,
    is_hf_conv1d,
    is_linear_like,
    is_maskable,
    is_prunable,
    matrix_cols,
    pattern_problem,
    set_weight_matrix,
    solve_cost,
    to_rows,
    unfold_input,
    weight_cols,
    weight_matrix,
    weight_refusal,
    why_not_prunable,
)


def _hf_conv1d(nx: int, nf: int) -> nn.Module:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    layer = pytorch_utils.Conv1D(nf, nx)  # (out features, in features); weight stored (in, out)
    nn.init.normal_(layer.bias)
    return layer


# (module, rows, weight_cols, groups, kernel)
CASES = {
    "linear": (lambda: nn.Linear(7, 5), 5, 7, 1, ()),
    "linear_no_bias": (lambda: nn.Linear(7, 5, bias=False), 5, 7, 1, ()),
    "conv1d": (lambda: nn.Conv1d(3, 4, 5), 4, 15, 1, (5,)),
    "conv2d": (lambda: nn.Conv2d(3, 6, (2, 3), bias=False), 6, 18, 1, (2, 3)),
    "conv3d": (lambda: nn.Conv3d(2, 3, (1, 2, 2)), 3, 8, 1, (1, 2, 2)),
    "grouped_conv2d": (lambda: nn.Conv2d(6, 4, 3, groups=2), 4, 27, 2, (3, 3)),
    "depthwise_conv1d": (lambda: nn.Conv1d(4, 8, 3, groups=4, bias=False), 8, 3, 4, (3,)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_describe_layer_torch_types(case: str) -> None:
    make, rows, cols, groups, kernel = CASES[case]
    module = make()
    shape = describe_layer(module)
    assert (shape.rows, shape.weight_cols, shape.groups, shape.kernel) == (rows, cols, groups, kernel)
    assert shape.bias == (module.bias is not None)
    assert shape.matrix_cols == cols + (module.bias is not None)
    assert weight_cols(module) == cols and matrix_cols(module) == shape.matrix_cols
    # the geometry agrees with what the layer computes: unfolded rows times the matrix give its output
    x = torch.randn(2, module.in_channels if is_conv(module) else module.in_features, *([6] * len(kernel)))
    if not kernel:
        x = x.reshape(2, -1)
    y = module(x)
    rows_in = unfold_input(module, x)  # (n, groups, weight_cols)
    W = weight_matrix(module)
    per_group = W.shape[0] // groups
    outs = []
    for g in range(groups):
        block = W[g * per_group : (g + 1) * per_group]
        out = rows_in[:, g] @ block[:, :cols].T
        if shape.bias:
            out = out + block[:, cols]
        outs.append(out)
    expected = y.movedim(1, -1).reshape(-1, rows) if kernel else y
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, rtol=1e-5, atol=1e-5)


def test_hf_conv1d_is_a_transposed_linear() -> None:
    layer = _hf_conv1d(nx=6, nf=4)
    assert layer.weight.shape == (6, 4)
    assert is_hf_conv1d(layer) and is_linear_like(layer) and is_prunable(layer)
    assert not is_maskable(layer)  # not in the default mask set: see the layers module docstring
    shape = describe_layer(layer)
    assert (shape.rows, shape.weight_cols, shape.groups, shape.kernel, shape.bias) == (4, 6, 1, (), True)
    W = weight_matrix(layer)
    torch.testing.assert_close(W[:, :6], layer.weight.detach().t())
    torch.testing.assert_close(W[:, 6], layer.bias.detach())
    x = torch.randn(3, 6)
    torch.testing.assert_close(unfold_input(layer, x)[:, 0] @ W[:, :6].T + W[:, 6], layer(x))
    assert channel_last_perm(layer) is None


def test_hf_lookalike_without_a_matrix_weight_is_not_hf_conv1d() -> None:
    Conv1D = type("Conv1D", (nn.Module,), {"__module__": "transformers.pytorch_utils"})
    fake = Conv1D()
    assert not is_hf_conv1d(fake)  # no weight
    fake.weight = nn.Parameter(torch.zeros(3))
    assert not is_hf_conv1d(fake)  # not 2-d
    fake.weight = nn.Parameter(torch.zeros(3, 2))
    assert is_hf_conv1d(fake)
    Other = type("Conv1D", (nn.Module,), {"__module__": "mylib"})
    other = Other()
    other.weight = nn.Parameter(torch.zeros(3, 2))
    assert not is_hf_conv1d(other)  # recognised by the transformers module, not by the name alone


@pytest.mark.parametrize("case", sorted(CASES) + ["hf_conv1d", "hf_conv1d_no_bias"])
def test_matrix_round_trip_is_bit_identical(case: str) -> None:
    if case.startswith("hf_conv1d"):
        module = _hf_conv1d(5, 3)
        if case.endswith("no_bias"):
            module.bias = None
    else:
        torch.manual_seed(1)
        module = CASES[case][0]()
    weight, bias = module.weight.detach().clone(), None if module.bias is None else module.bias.detach().clone()
    W = weight_matrix(module)
    assert W.shape == (describe_layer(module).rows, matrix_cols(module))
    with torch.no_grad():
        module.weight.zero_()
        if bias is not None:
            module.bias.zero_()
    set_weight_matrix(module, W)
    assert torch.equal(module.weight, weight)
    if bias is not None:
        assert torch.equal(module.bias, bias)
    mask = torch.rand_like(weight) > 0.5
    assert torch.equal(from_rows(module, to_rows(module, mask)), mask)
    assert to_rows(module, mask).shape == (W.shape[0], weight_cols(module))


def test_set_weight_matrix_refuses_a_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"expected a matrix of shape \(5, 8\) for Linear"):
        set_weight_matrix(nn.Linear(7, 5), torch.zeros(5, 7))


def test_weight_matrix_is_a_copy() -> None:
    layer = nn.Linear(3, 2, bias=False)
    W = weight_matrix(layer)
    W.zero_()
    assert layer.weight.abs().sum() > 0


def test_conv_transpose_is_maskable_but_not_prunable() -> None:
    for layer in (nn.ConvTranspose1d(3, 4, 3), nn.ConvTranspose2d(3, 4, 3), nn.ConvTranspose3d(2, 2, 2)):
        assert is_maskable(layer) and not is_prunable(layer) and not is_conv(layer)
        assert "ConvTranspose" in why_not_prunable(layer)
        with pytest.raises(TypeError, match="unsupported layer type ConvTranspose"):
            describe_layer(layer)
    assert MASKABLE_TYPES == (nn.Linear, nn.modules.conv._ConvNd)


def test_other_modules_are_neither() -> None:
    for module in (nn.Embedding(4, 3), nn.LayerNorm(3), nn.ReLU(), nn.Bilinear(2, 2, 2)):
        assert not is_prunable(module) and not is_maskable(module)
        assert why_not_prunable(module) == (
            f"{type(module).__name__} layers are not supported (only nn.Linear, nn.Conv1d/2d/3d and transformers Conv1D)"
        )


def test_attention_stand_ins_are_linear_layers() -> None:
    mha = nn.MultiheadAttention(8, 2)
    model = nn.Sequential(mha)
    projections = attention.projections(model)
    assert sorted(projections) == ["0.k_proj", "0.q_proj", "0.v_proj"]
    for name, proj in projections.items():
        shape = describe_layer(proj)
        assert (shape.rows, shape.weight_cols, shape.bias, shape.groups) == (8, 8, True, 1)
        assert why_not_prunable(proj, name) is None  # its weight is a view of in_proj_weight on purpose
        assert weight_refusal(proj, name) is None
        assert is_maskable(proj)
    assert describe_layer(mha.out_proj).matrix_cols == 9
    assert not is_prunable(mha) and not is_maskable(mha)
    # a solve written into a stand-in lands in the attention's Parameter
    q = projections["0.q_proj"]
    W = weight_matrix(q)
    set_weight_matrix(q, torch.zeros_like(W))
    assert mha.in_proj_weight[:8].abs().sum() == 0 and mha.in_proj_weight[8:].abs().sum() > 0
    assert mha.in_proj_bias[:8].abs().sum() == 0


def test_channel_last_perm_groups_channels_innermost() -> None:
    conv = nn.Conv2d(4, 2, (1, 3), bias=False)
    perm = channel_last_perm(conv)
    assert perm.tolist() == [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]
    W = weight_matrix(conv)
    # after the permutation, each run of 4 columns is one kernel position's 4 input channels
    assert torch.equal(W[:, perm].reshape(2, 3, 4), conv.weight.detach().squeeze(2).permute(0, 2, 1))
    grouped = nn.Conv1d(8, 4, 2, groups=2)  # 4 channels per group
    assert channel_last_perm(grouped).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert channel_last_perm(nn.Conv2d(4, 2, 1)) is None
    assert channel_last_perm(nn.Linear(4, 2)) is None


def test_pattern_problem_counts_input_channels() -> None:
    p24 = NMPattern(2, 4)
    assert pattern_problem(nn.Linear(8, 3), p24) == ""
    assert pattern_problem(nn.Linear(6, 3), p24) == "its 6 input channels are not a multiple of 4"
    # a conv's pattern runs along its input channels per group, not along its 3x3 * C columns
    assert pattern_problem(nn.Conv2d(4, 2, 3), p24) == ""
    assert pattern_problem(nn.Conv2d(6, 2, 3), p24) == "its 6 input channels are not a multiple of 4"
    assert pattern_problem(nn.Conv2d(8, 4, 3, groups=2), p24) == ""
    assert pattern_problem(nn.Conv2d(12, 6, 3, groups=2), p24) == "its 6 input channels are not a multiple of 4"
    assert pattern_problem(_hf_conv1d(nx=10, nf=4), p24) == "its 10 input channels are not a multiple of 4"


def test_solve_cost() -> None:
    linear = nn.Linear(9, 4)  # d = 10 with the bias column
    assert solve_cost(linear, "exact") == 4 * 10**3
    assert solve_cost(linear, "fast") == 10**3 + 4 * 10**2
    conv = nn.Conv2d(4, 6, 3, groups=2, bias=False)  # d = 2 * 9 = 18 per group
    assert solve_cost(conv, "exact") == 6 * 18**3
    assert solve_cost(conv, "lobs") == 2 * 18**3 + 6 * 18**2


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_why_not_prunable_names_the_computed_weight_and_the_fix() -> None:
    layer = nn.Linear(4, 3)
    assert why_not_prunable(layer, "fc") is None

    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    parametrize.register_parametrization(layer, "weight", Double())
    why = why_not_prunable(layer, "fc")
    assert why == weight_refusal(layer, "fc")
    assert "parametrization (Double)" in why and "remove_parametrizations(model.fc, 'weight')" in why

    normed = torch.nn.utils.weight_norm(nn.Linear(4, 3))
    assert "old-style WeightNorm hook" in why_not_prunable(normed, "fc")

    plain = nn.Linear(4, 3)
    del plain.weight
    plain.weight = torch.zeros(3, 4)  # a plain tensor some outer code recomputes
    assert "code outside the module" in why_not_prunable(plain, "fc")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_why_not_prunable_tied_and_empty() -> None:
    layer = nn.Linear(4, 3)
    assert "shared with head.weight (tied weights)" in why_not_prunable(layer, "fc", tied_to=["head.weight"])
    assert weight_refusal(layer, "fc") is None  # tied is a warning, not a refusal
    assert why_not_prunable(nn.Linear(0, 3, bias=False)) == "its weight is empty"
    assert why_not_prunable(nn.Linear(4, 0)) == "its weight is empty"


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_describe_layer_of_an_empty_conv_matches_its_weight() -> None:
    conv = nn.Conv2d(4, 0, 3)
    shape = describe_layer(conv)
    assert (shape.rows, shape.weight_cols) == (0, 36)
    assert shape.channels == 4 and math.prod(shape.kernel) == 9


def test_unfold_input_checks_the_input() -> None:
    with pytest.raises(ValueError, match="expects last dim 4"):
        unfold_input(nn.Linear(4, 2), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="expects 3 input channels"):
        unfold_input(nn.Conv1d(3, 2, 2), torch.zeros(1, 2, 5))
    conv = nn.Conv1d(1, 1, 3, padding=1, padding_mode="circular", bias=False)
    x = torch.arange(4.0).reshape(1, 1, 4)
    rows = unfold_input(conv, x)[:, 0]
    assert rows.tolist() == [[3, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 0]]
    torch.testing.assert_close((rows @ conv.weight.detach().reshape(3)).reshape(1, 1, 4), conv(x))
    same = nn.Conv2d(1, 1, (2, 3), padding="same", padding_mode="reflect", bias=False)
    x2 = torch.randn(1, 1, 4, 5)
    y = (unfold_input(same, x2)[:, 0] @ same.weight.detach().reshape(6)).reshape(1, 1, 4, 5)
    torch.testing.assert_close(y, same(x2))
