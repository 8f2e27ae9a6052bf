"""Tests for lightning_lobs.hessian (CPU, float64 references)."""

from __future__ import annotations

import itertools
import math
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lobs.config import CalibrationOptions
from lightning_lobs.hessian import MIXED_CHUNK_ROWS, HessianAccumulator, HessianCollector
from lightning_lobs.layers import (
    PRUNABLE_TYPES,
    has_bias,
    is_prunable,
    num_groups,
    set_weight_matrix,
    unfold_input,
    weight_matrix,
)

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _augment(rows: torch.Tensor, bias: bool) -> torch.Tensor:
    """(n, d) -> (n, d+1) with a ones column when bias."""
    if not bias:
        return rows
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)


def _brute_force_conv_rows(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patches (n, G, Cg*prod(k)) by explicit Python loops over output positions."""
    nd = len(conv.kernel_size)
    if x.dim() == nd + 1:
        x = x.unsqueeze(0)
    # PyTorch's own padding spec for the layer (independent of the code under test).
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, list(conv._reversed_padding_repeated_twice), mode=mode)
    with torch.no_grad():
        out_spatial = conv(x).shape[2:]
    g = conv.groups
    cg = conv.in_channels // g
    rows = []
    for b in range(x.shape[0]):
        for pos in itertools.product(*[range(o) for o in out_spatial]):
            per_group = []
            for j in range(g):
                idx = [b, slice(j * cg, (j + 1) * cg)]
                for o, k, s, dl in zip(pos, conv.kernel_size, conv.stride, conv.dilation):
                    idx.append(slice(o * s, o * s + (k - 1) * dl + 1, dl))
                patch = xp[tuple(idx)]
                assert patch.shape[1:] == tuple(conv.kernel_size)
                per_group.append(patch.reshape(-1))
            rows.append(torch.stack(per_group))
    return torch.stack(rows)


def _hessian_from_rows(rows: torch.Tensor, bias: bool) -> torch.Tensor:
    """(n, G, dw) rows -> (G, d, d) reference Hessian."""
    hs = []
    for j in range(rows.shape[1]):
        xa = _augment(rows[:, j].double(), bias)
        hs.append(xa.T @ xa / xa.shape[0])
    return torch.stack(hs)


# --------------------------------------------------------------------------- #
# Layer helpers
# --------------------------------------------------------------------------- #
def test_supported_types():
    assert PRUNABLE_TYPES == (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    assert is_prunable(nn.Linear(2, 3))
    assert is_prunable(nn.Conv2d(2, 3, 3))
    assert not is_prunable(nn.ConvTranspose2d(2, 3, 3))
    assert not is_prunable(nn.ReLU())
    with pytest.raises(TypeError):
        HessianAccumulator(nn.ConvTranspose1d(2, 2, 3))
    with pytest.raises(TypeError):
        HessianCollector({"bad": nn.BatchNorm1d(3)})
    assert num_groups(nn.Linear(2, 3)) == 1
    assert num_groups(nn.Conv2d(4, 6, 3, groups=2)) == 2
    assert has_bias(nn.Linear(2, 3)) and not has_bias(nn.Linear(2, 3, bias=False))


@pytest.mark.parametrize(
    "module",
    [
        nn.Linear(5, 3),
        nn.Linear(5, 3, bias=False),
        nn.Conv1d(4, 6, 3, groups=2),
        nn.Conv2d(3, 4, (2, 3), bias=False),
        nn.Conv3d(2, 4, (1, 2, 3), groups=2),
    ],
)
def test_weight_matrix_round_trip(module):
    torch.manual_seed(0)
    w0 = module.weight.detach().clone()
    mat = weight_matrix(module)
    dw = w0[0].numel()
    assert mat.shape == (w0.shape[0], dw + (1 if has_bias(module) else 0))
    assert torch.equal(mat[:, :dw], w0.reshape(w0.shape[0], -1))
    if has_bias(module):
        assert torch.equal(mat[:, -1], module.bias.detach())
    # It is a copy, not a view.
    mat.add_(1.0)
    assert torch.equal(module.weight.detach(), w0)
    new = torch.randn_like(mat, dtype=torch.float64)
    wid = module.weight.data_ptr()
    set_weight_matrix(module, new)
    assert module.weight.data_ptr() == wid and module.weight.dtype == torch.float32
    torch.testing.assert_close(weight_matrix(module).double(), new, rtol=0, atol=1e-6)
    assert module.weight.grad is None
    with pytest.raises(ValueError):
        set_weight_matrix(module, torch.zeros(mat.shape[0], mat.shape[1] + 1))


# --------------------------------------------------------------------------- #
# Linear
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("bias", [True, False])
def test_linear_hessian_matches_direct(bias):
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=bias)
    x = torch.randn(3, 5, 6)
    acc = HessianAccumulator(lin)
    acc.add(x)
    xa = _augment(x.reshape(-1, 6).double(), bias)
    ref = xa.T @ xa / xa.shape[0]
    assert acc.count == 15
    assert acc.d == (7 if bias else 6) and acc.groups == 1
    h = acc.hessian()
    assert h.shape == (1, acc.d, acc.d) and h.dtype == torch.float64
    torch.testing.assert_close(h[0], ref, rtol=1e-12, atol=1e-12)
    # unfold rows reproduce the linear output
    rows = unfold_input(lin, x)
    assert rows.shape == (15, 1, 6)
    lin64 = lin.double()
    out = rows[:, 0].double() @ lin64.weight.T + (lin64.bias if bias else 0)
    torch.testing.assert_close(out, lin64(x.double()).reshape(-1, 4))


# --------------------------------------------------------------------------- #
# Convolutions
# --------------------------------------------------------------------------- #
# (nd, c_in, c_out, kernel, stride, padding, dilation, groups, padding_mode, bias, spatial, batch)
CONV_CASES = [
    (1, 3, 4, 3, 1, 0, 1, 1, "zeros", True, (9,), 2),
    (1, 4, 6, 3, 2, 2, 2, 2, "zeros", False, (11,), 2),
    (1, 3, 3, 4, 1, "same", 1, 3, "zeros", True, (8,), 2),  # depthwise, even kernel 'same'
    (1, 2, 4, 3, 1, 1, 1, 1, "circular", True, (7,), 1),
    (1, 2, 2, 3, 1, "valid", 1, 1, "reflect", True, (6,), 2),
    (2, 3, 4, (2, 3), 1, 0, 1, 1, "zeros", True, (5, 6), 2),
    (2, 4, 4, 3, (2, 1), (1, 2), (1, 2), 2, "zeros", True, (7, 8), 2),
    (2, 4, 4, 3, 1, "same", 2, 4, "zeros", False, (6, 5), 1),  # depthwise, dilated 'same'
    (2, 2, 3, (3, 2), 1, "same", 1, 1, "zeros", True, (5, 5), 2),  # asymmetric 'same'
    (2, 3, 4, 3, 2, 1, 1, 1, "reflect", True, (6, 7), 2),
    (2, 2, 4, 3, 1, 1, 1, 2, "replicate", False, (5, 4), 2),
    (2, 2, 2, 3, (1, 2), (2, 1), 1, 1, "circular", True, (5, 6), 1),
    (2, 3, 6, 1, 2, 0, 1, 3, "zeros", True, (5, 5), 2),  # 1x1, stride > kernel
    (3, 2, 4, (1, 2, 3), 1, 0, 1, 2, "zeros", True, (3, 4, 5), 2),
    (3, 2, 2, 2, (1, 2, 1), 1, (2, 1, 1), 1, "reflect", True, (4, 4, 3), 1),
    (3, 2, 3, 3, 1, "same", 1, 1, "replicate", False, (3, 3, 4), 1),
]


def _make_conv(case):
    nd, cin, cout, k, s, p, dl, g, mode, bias, spatial, batch = case
    torch.manual_seed(hash(str(case)) % 1000)
    conv = CONV[nd](cin, cout, k, stride=s, padding=p, dilation=dl, groups=g, padding_mode=mode, bias=bias)
    x = torch.randn(batch, cin, *spatial)
    return conv, x


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}d-k{c[3]}-s{c[4]}-p{c[5]}-d{c[6]}-g{c[7]}-{c[8]}")
def test_conv_unfold_reproduces_output_and_hessian(case):
    conv, x = _make_conv(case)
    conv64 = conv.double()
    x64 = x.double()
    g = conv.groups
    rows = unfold_input(conv64, x64)
    dw = conv.in_channels // g * math.prod(conv.kernel_size)
    with torch.no_grad():
        y = conv64(x64)
    n = y.shape[0] * math.prod(y.shape[2:])
    assert rows.shape == (n, g, dw)
    # rows @ W^T (+ b) per group reproduces the real conv output
    w = conv64.weight.detach().reshape(g, conv.out_channels // g, dw)
    out = torch.einsum("ngd,god->ngo", rows, w).reshape(n, conv.out_channels)
    if conv.bias is not None:
        out = out + conv64.bias.detach()
    ref_out = y.movedim(1, -1).reshape(n, conv.out_channels)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)

    # brute-force patches and Hessian
    brute = _brute_force_conv_rows(conv64, x64)
    torch.testing.assert_close(rows, brute, rtol=0, atol=0)
    acc = HessianAccumulator(conv64)
    acc.add(x64)
    assert acc.count == n
    assert acc.groups == g and acc.d == dw + (1 if conv.bias is not None else 0)
    ref_h = _hessian_from_rows(brute, conv.bias is not None)
    torch.testing.assert_close(acc.hessian(), ref_h, rtol=1e-12, atol=1e-12)

    # tiny chunks (over samples and over positions) give the same Hessian
    for cap in (1, 13, dw * 5):
        acc_c = HessianAccumulator(conv64, max_chunk_elements=cap)
        acc_c.add(x64)
        assert acc_c.count == n
        torch.testing.assert_close(acc_c.hessian(), ref_h, rtol=1e-12, atol=1e-12)


def test_conv_unbatched_input():
    torch.manual_seed(1)
    for nd, spatial in ((1, (7,)), (2, (5, 6)), (3, (3, 4, 4))):
        conv = CONV[nd](3, 4, 2, padding=1, padding_mode="reflect").double()
        x = torch.randn(3, *spatial, dtype=torch.float64)
        rows = unfold_input(conv, x)
        torch.testing.assert_close(rows, unfold_input(conv, x.unsqueeze(0)))
        with torch.no_grad():
            y = conv(x)  # (C_out, spatial...)
        out = rows[:, 0] @ conv.weight.detach().reshape(4, -1).T + conv.bias.detach()
        torch.testing.assert_close(out, y.reshape(4, -1).T)
        acc = HessianAccumulator(conv)
        acc.add(x)
        acc_b = HessianAccumulator(conv)
        acc_b.add(x.unsqueeze(0))
        assert acc.count == acc_b.count == rows.shape[0]
        torch.testing.assert_close(acc.hessian(), acc_b.hessian(), rtol=0, atol=0)


# --------------------------------------------------------------------------- #
# Chunking / position stride / dtype
# --------------------------------------------------------------------------- #
def test_chunking_matches_unchunked_large_batch():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 8, 3, stride=1, padding=1, groups=2)
    x = torch.randn(6, 4, 12, 10)
    big = HessianAccumulator(conv, max_chunk_elements=2**40)
    big.add(x)
    for cap in (1, 17, 500, 4 * 9 * 12 * 10 * 2 + 5):
        small = HessianAccumulator(conv, max_chunk_elements=cap)
        small.add(x)
        assert small.count == big.count == 6 * 12 * 10
        torch.testing.assert_close(small.hessian(), big.hessian(), rtol=1e-12, atol=1e-13)
    lin = nn.Linear(7, 3)
    xl = torch.randn(4, 9, 7)
    a, b = HessianAccumulator(lin, max_chunk_elements=1), HessianAccumulator(lin, max_chunk_elements=10**9)
    a.add(xl)
    b.add(xl)
    assert a.count == b.count == 36
    torch.testing.assert_close(a.hessian(), b.hessian(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("ps", [2, 3, 7])
def test_position_stride(ps):
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 4, 3, padding=1, groups=2, bias=True).double()
    x = torch.randn(3, 2, 5, 7, dtype=torch.float64)
    rows = unfold_input(conv, x)  # (3*35, 2, 9)
    kept = rows.reshape(3, 35, 2, 9)[:, ::ps].reshape(-1, 2, 9)
    ref = _hessian_from_rows(kept, True)
    for cap in (1, 20, 10**9):
        acc = HessianAccumulator(conv, position_stride=ps, max_chunk_elements=cap)
        acc.add(x)
        assert acc.count == kept.shape[0]
        torch.testing.assert_close(acc.hessian(), ref, rtol=1e-12, atol=1e-12)


def test_float32_accumulation_and_memory():
    torch.manual_seed(4)
    conv = nn.Conv1d(3, 5, 3, padding=1)
    x = torch.randn(4, 3, 16)
    a64 = HessianAccumulator(conv)
    a32 = HessianAccumulator(conv, dtype=torch.float32)
    a64.add(x)
    a32.add(x)
    assert a32.sum.dtype == torch.float32 and a32.hessian().dtype == torch.float32
    torch.testing.assert_close(a32.hessian().double(), a64.hessian(), rtol=1e-5, atol=1e-5)
    assert a64.memory_bytes() == 1 * 10 * 10 * 8
    assert a32.memory_bytes() == 1 * 10 * 10 * 4
    h = a64.hessian()
    assert torch.equal(h, h.transpose(1, 2))
    with pytest.raises(ValueError):
        HessianAccumulator(conv, dtype=torch.float16)


U32 = torch.finfo(torch.float32).eps / 2  # unit roundoff of float32
U64 = torch.finfo(torch.float64).eps / 2


def _gamma(k: int, u: float) -> float:
    """Higham's gamma_k = k u / (1 - k u): |fl(sum of k products) - exact| <= gamma_k * sum |products|, any order."""
    return k * u / (1 - k * u)


def _rounding_bounds(rows: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float64 brute-force H, |X~|^T |X~| / n, n) for float32 rows ``(n, d)``: H's reference and its entries' scale."""
    xa = _augment(rows.double(), bias)
    n = xa.shape[0]
    return xa.T @ xa / n, xa.abs().T @ xa.abs() / n, n


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_mixed_and_float32_within_their_rounding_bounds(threads, bias):
    """float32: one float32 sum of all n products, error <= gamma_(n+1) of the entries' scale. "mixed": float32
    sums of at most MIXED_CHUNK_ROWS products, then a float64 sum: <= gamma_(R+1) (float32) + gamma_n (float64),
    whatever n. Inputs with a positive mean make every product one-signed, where rounding errors add up most."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(11)
        n, d = 16 * MIXED_CHUNK_ROWS + 123, 12
        x = torch.rand(n, d, generator=g) + 0.5
        lin = nn.Linear(d, 3, bias=bias)
        ref, scale, count = _rounding_bounds(x, bias)
        sizes = [700, 5 * MIXED_CHUNK_ROWS + 1, n]  # batch boundaries inside and across the mixed chunks
        got = {}
        for dtype in ("mixed", torch.float32, torch.float64):
            acc = HessianAccumulator(lin, dtype=dtype)
            start = 0
            for stop in sizes:
                acc.add(x[start:stop])
                start = stop
            assert acc.count == n
            got[dtype] = acc.hessian()[0]
        assert got["mixed"].dtype == torch.float64 and got[torch.float32].dtype == torch.float32
        R = MIXED_CHUNK_ROWS
        # the final division by n and the symmetrisation add a few roundings of the result itself
        bound_mixed = (_gamma(R + 1, U32) + _gamma(count, U64) + 4 * U64) * scale
        bound_32 = (_gamma(count + 1, U32) + 4 * U32) * scale
        err_mixed = (got["mixed"] - ref).abs()
        err_32 = (got[torch.float32].double() - ref).abs()
        assert bool((err_mixed <= bound_mixed).all()), float((err_mixed / bound_mixed).max())
        assert bool((err_32 <= bound_32).all()), float((err_32 / bound_32).max())
        assert float(bound_mixed.max()) < float(bound_32.max()) / 10  # the mixed bound does not grow with n
        torch.testing.assert_close(got[torch.float64], ref, rtol=1e-12, atol=0)
    finally:
        torch.set_num_threads(saved)


def test_mixed_sum_stays_exact_across_partials_where_float32_stagnates():
    """One row of 4096 (square 2^24), then single-row batches of ones: a float32 running sum stays at 2^24
    (2^24 + 1 rounds back to it) and loses them all. "mixed" can lose only the ones that share the big square's
    float32 partial sum (fewer than MIXED_CHUNK_ROWS); every later partial is exact and joins a float64 sum."""
    lin = nn.Linear(1, 1, bias=False)
    ones = 3 * MIXED_CHUNK_ROWS + 5
    accs = {dtype: HessianAccumulator(lin, dtype=dtype) for dtype in ("mixed", torch.float32, torch.float64)}
    for acc in accs.values():
        acc.add(torch.tensor([[4096.0]]))
        for _ in range(ones):
            acc.add(torch.ones(1, 1))
    exact = 2.0**24 + ones
    assert float(accs[torch.float64].sum) == exact
    assert float(accs[torch.float32].sum) == 2.0**24  # every one of the ones was lost
    assert exact - (MIXED_CHUNK_ROWS - 1) <= float(accs["mixed"].sum) <= exact
    assert accs["mixed"].count == ones + 1


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[6], CONV_CASES[13]], ids=["1d-g2", "2d-g2", "3d-g2"])
def test_mixed_conv_matches_brute_force_rows(case):
    """Grouped convolutions, with and without bias, chunked: "mixed" against the explicit patches in float64."""
    conv, x = _make_conv(case)
    rows = _brute_force_conv_rows(conv, x)  # (n, G, dw), float32
    n = rows.shape[0]
    for cap in (7, 10**9):
        acc = HessianAccumulator(conv, dtype="mixed", max_chunk_elements=cap)
        acc.add(x)
        assert acc.count == n and acc.sum.dtype == torch.float64
        h = acc.hessian()
        for j in range(rows.shape[1]):
            ref, scale, _ = _rounding_bounds(rows[:, j], conv.bias is not None)
            bound = (_gamma(min(n, MIXED_CHUNK_ROWS) + 1, U32) + _gamma(n, U64) + 4 * U64) * scale
            assert bool(((h[j] - ref).abs() <= bound).all())


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_products_in_full_float32_under_tf32(device):
    """With ``set_float32_matmul_precision("high")`` (TF32 on CUDA: 10-bit products, errors ~1e-3 of the scale),
    "mixed" still multiplies in full float32, within the float32 bound, and leaves the setting as it found it."""
    g = torch.Generator().manual_seed(13)
    x = torch.rand(3 * MIXED_CHUNK_ROWS, 64, generator=g) + 0.5
    ref, scale, n = _rounding_bounds(x, True)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        acc = HessianAccumulator(nn.Linear(64, 2).to(device), dtype="mixed")
        acc.add(x.to(device))
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(saved)
    bound = (_gamma(MIXED_CHUNK_ROWS + 1, U32) + _gamma(n, U64) + 4 * U64) * scale
    assert bool(((acc.hessian()[0].cpu() - ref).abs() <= bound).all())


def test_mixed_pending_partial_is_counted_read_and_dropped():
    """A partial float32 sum is pending after a small batch: memory counts it, reading ``sum``/``hessian()``/
    ``state_dict()`` flushes it into the float64 sum, ``reset``/``load_state_dict`` drop it."""
    g = torch.Generator().manual_seed(14)
    x = torch.rand(300, 6, generator=g) + 0.5
    lin = nn.Linear(6, 2)
    acc = HessianAccumulator(lin, dtype="mixed")
    acc.add(x[:100])
    assert acc.count == 100 and acc.memory_bytes() == 7 * 7 * (8 + 4)
    state = acc.state_dict()  # flushes
    assert acc.memory_bytes() == 7 * 7 * 8 and state["count"] == 100
    ref, scale, _ = _rounding_bounds(x[:100], True)
    bound = (_gamma(MIXED_CHUNK_ROWS + 1, U32) + 4 * U64) * scale * 100
    assert bool(((state["sum"][0] - ref * 100).abs() <= bound).all())
    acc.add(x[100:])
    other = HessianAccumulator(lin, dtype="mixed")
    other.add(x[:50])
    other.load_state_dict(state)  # the 50 pending rows go with the old state
    other.add(x[100:])
    assert other.count == acc.count == 300
    torch.testing.assert_close(other.hessian(), acc.hessian(), rtol=0, atol=0)
    acc.add(x[:10])
    acc.reset()
    assert acc.count == 0 and acc.memory_bytes() == 7 * 7 * 8 and float(acc.sum.abs().sum()) == 0.0


def test_mixed_keeps_float64_inputs_in_float64():
    g = torch.Generator().manual_seed(12)
    lin = nn.Linear(5, 2).double()
    x = torch.randn(3000, 5, generator=g, dtype=torch.float64) + 1.0
    acc = HessianAccumulator(lin, dtype="mixed")
    acc.add(x)
    ref, _, _ = _rounding_bounds(x, True)
    torch.testing.assert_close(acc.hessian()[0], ref, rtol=1e-12, atol=0)  # float32 products would miss by ~1e-7
    assert "dtype=mixed" in repr(acc) and acc.memory_bytes() == 6 * 6 * 8


def test_memory_estimate_counts_the_mixed_sum_and_its_partial():
    from lightning_lobs import SolverOptions
    from lightning_lobs.resources import layer_memory

    est = {
        dt: layer_memory("l", nn.Linear(128, 16), "fast", dt, SolverOptions()).hessian_bytes
        for dt in ("mixed", torch.float64, torch.float32)
    }
    assert est == {"mixed": 129**2 * 12, torch.float64: 129**2 * 8, torch.float32: 129**2 * 4}


def test_calibration_options_hessian_dtype():
    assert CalibrationOptions().hessian_dtype == "mixed"
    assert CalibrationOptions(hessian_dtype=" mixed").hessian_dtype == "mixed"
    assert CalibrationOptions(hessian_dtype="torch.float64").hessian_dtype is torch.float64
    assert CalibrationOptions(hessian_dtype=torch.float32).hessian_dtype is torch.float32
    with pytest.raises(ValueError, match="hessian_dtype.*'mixed'"):
        CalibrationOptions(hessian_dtype="half")
    with pytest.raises(ValueError, match="float64, torch.float32 or 'mixed'"):
        HessianAccumulator(nn.Linear(2, 2), dtype="Mixed")


def test_hessian_without_rows_raises():
    acc = HessianAccumulator(nn.Linear(3, 2), name="head")
    with pytest.raises(RuntimeError, match="no calibration rows reached layer.*head"):
        acc.hessian()


# --------------------------------------------------------------------------- #
# Streaming, state, distributed
# --------------------------------------------------------------------------- #
def test_multiple_batches_equal_one_big_batch():
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    xs = [torch.randn(b, 3, 9, 8) for b in (1, 3, 2)]
    acc = HessianAccumulator(conv)
    for x in xs:
        acc.add(x)
    one = HessianAccumulator(conv)
    one.add(torch.cat(xs))
    assert acc.count == one.count
    torch.testing.assert_close(acc.hessian(), one.hessian(), rtol=1e-12, atol=1e-13)


def test_state_dict_round_trip():
    torch.manual_seed(6)
    lin = nn.Linear(4, 2)
    acc = HessianAccumulator(lin)
    acc.add(torch.randn(10, 4))
    state = acc.state_dict()
    other = HessianAccumulator(lin)
    other.load_state_dict(state)
    assert other.count == acc.count == 10
    torch.testing.assert_close(other.hessian(), acc.hessian(), rtol=0, atol=0)
    # the state is a copy
    acc.add(torch.randn(3, 4))
    assert state["count"] == 10 and other.count == 10
    # continue accumulating after loading equals one accumulator seeing everything
    x2 = torch.randn(5, 4)
    other.add(x2)
    ref = HessianAccumulator(lin)
    ref.load_state_dict(state)
    ref.add(x2)
    torch.testing.assert_close(other.sum, ref.sum)
    with pytest.raises(ValueError):
        HessianAccumulator(nn.Linear(5, 2)).load_state_dict(state)


def test_reduce_is_noop_without_distributed():
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())
    acc = HessianAccumulator(nn.Linear(3, 2))
    acc.add(torch.randn(4, 3))
    before = acc.sum.clone()
    acc.reduce()
    assert acc.count == 4
    assert torch.equal(acc.sum, before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, result_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        lin = nn.Linear(3, 2)
        xs = [torch.randn(4 + r, 3) for r in range(world)]
        acc = HessianAccumulator(lin)
        acc.add(xs[rank])
        acc.reduce()
        if rank == 0:
            torch.save({"sum": acc.sum, "count": acc.count, "xs": xs, "lin": lin.state_dict()}, result_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="gloo")
def test_reduce_sums_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    path = str(tmp_path / "res.pt")
    mp.spawn(_dist_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    res = torch.load(path)
    lin = nn.Linear(3, 2)
    lin.load_state_dict(res["lin"])
    ref = HessianAccumulator(lin)
    ref.add(torch.cat(res["xs"]))
    assert res["count"] == ref.count == 9
    torch.testing.assert_close(res["sum"], ref.sum, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- #
# Collector
# --------------------------------------------------------------------------- #
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(3 * 4 * 4, 2, bias=False)

    def forward(self, x):
        h = torch.relu(self.conv(x))  # (B, 3, 4, 4)
        h = self.shared(h)  # over the last dim
        h = self.shared(torch.tanh(h))  # weight sharing: called twice
        return self.head(h.flatten(1))


def test_collector_matches_manual_and_accumulates_shared_calls():
    torch.manual_seed(7)
    net = _Net()
    mods = {"conv": net.conv, "shared": net.shared, "head": net.head}
    x = torch.randn(5, 2, 4, 4)
    with HessianCollector(mods) as col:
        with torch.no_grad():
            net(x)
    assert all(not m._forward_pre_hooks for m in mods.values())
    hs = col.hessians()
    assert set(hs) == set(mods)
    with torch.no_grad():
        c = torch.relu(net.conv(x))
        s1 = net.shared(c)
        s_in2 = torch.tanh(s1)
        s2 = net.shared(s_in2)
    ref_conv = HessianAccumulator(net.conv)
    ref_conv.add(x)
    torch.testing.assert_close(hs["conv"], ref_conv.hessian(), rtol=1e-12, atol=1e-12)
    shared_rows = torch.cat([c.reshape(-1, 4), s_in2.reshape(-1, 4)]).double()
    xa = _augment(shared_rows, True)
    torch.testing.assert_close(hs["shared"][0], xa.T @ xa / xa.shape[0], rtol=1e-10, atol=1e-10)
    assert col.accumulators["shared"].count == 2 * 5 * 3 * 4
    hr = s2.flatten(1).double()
    torch.testing.assert_close(hs["head"][0], hr.T @ hr / 5, rtol=1e-10, atol=1e-10)
    assert col.accumulators["head"].d == 48


def test_collector_does_not_break_backward():
    torch.manual_seed(8)
    lin = nn.Linear(3, 1)
    x = torch.randn(4, 3, requires_grad=True)
    with HessianCollector({"lin": lin}) as col:
        lin(x).sum().backward()
    assert lin.weight.grad is not None and x.grad is not None
    assert col.accumulators["lin"].count == 4
    assert not col.accumulators["lin"].sum.requires_grad


def test_collector_removes_hooks_on_exception():
    lin = nn.Linear(3, 2)
    col = HessianCollector({"lin": lin})
    with pytest.raises(KeyError):
        with col:
            assert len(lin._forward_pre_hooks) == 1
            lin(torch.randn(2, 3))
            raise KeyError("boom")
    assert len(lin._forward_pre_hooks) == 0
    assert col.accumulators["lin"].count == 2
    # no accumulation after exit; remove() is idempotent
    lin(torch.randn(2, 3))
    assert col.accumulators["lin"].count == 2
    col.remove()
    col.remove()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises_with_layer_name(bad):
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    x = torch.randn(4, 3)
    x[1, 2] = bad
    with pytest.raises(ValueError) as info:
        with HessianCollector({"encoder.0": net[0]}) as col:
            net(x)
    msg = str(info.value)
    assert "encoder.0" in msg and "NaN" in msg and "inf" in msg and "calibration" in msg
    assert col.accumulators["encoder.0"].count == 0
    assert len(net[0]._forward_pre_hooks) == 0


def test_collector_keyword_input_and_reentry():
    lin = nn.Linear(2, 2)
    col = HessianCollector({"lin": lin})
    with col:
        lin(input=torch.randn(3, 2))
    with col:
        lin(torch.randn(2, 2))
    assert col.accumulators["lin"].count == 5
    assert len(lin._forward_pre_hooks) == 0
    assert col.memory_bytes() == 3 * 3 * 8


@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_mixed_falls_back_to_float64_products_where_float32_would_overflow_or_underflow(scale):
    # Inputs of 1e20 square to 1e40 (beyond float32), of 1e-20 to 1e-40 (below its normal range): "mixed" multiplies
    # such a layer's rows in float64 from the first such batch on, and its H equals the float64 path's. (Tiny inputs
    # matter only when all of a layer's inputs are tiny: beside ordinary ones their products are below float64's eps.)
    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(12, 4).float()
    ordinary = torch.randn(64, 12, generator=g) * (1.0 if scale > 1 else scale)
    big = torch.randn(64, 12, generator=g) * scale
    ref = HessianAccumulator(layer, dtype=torch.float64)
    mixed = HessianAccumulator(layer, dtype="mixed")
    for acc in (ref, mixed):
        acc.add(ordinary)
        acc.add(big)
    assert mixed.mixed_fallback and not ref.mixed_fallback
    h_ref, h_mix = ref.hessian(), mixed.hessian()
    assert torch.isfinite(h_mix).all()
    # the ordinary batch went through float32 products (rounding ~ eps32 of its entries); the big one is float64 exact
    tol = 64 * torch.finfo(torch.float32).eps * float(ordinary.double().pow(2).sum(0).max()) / 128
    torch.testing.assert_close(h_mix, h_ref, rtol=1e-12, atol=tol)
    mixed.reset()
    assert not mixed.mixed_fallback
    mixed.add(torch.randn(64, 12, generator=g))
    assert not mixed.mixed_fallback


def test_mixed_products_stay_float32_under_cpu_autocast():
    # bf16-mixed training runs the forward under autocast: the float32 products must not become bfloat16.
    g = torch.Generator().manual_seed(5)
    layer = nn.Linear(6, 3)
    x = torch.randn(40, 6, generator=g)
    ref = HessianAccumulator(layer, dtype=torch.float64)
    ref.add(x)
    acc = HessianAccumulator(layer, dtype="mixed")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        acc.add(x)
        acc.add(x)
    ref.add(x)
    h = acc.hessian()
    assert h.dtype == torch.float64
    torch.testing.assert_close(
        h, ref.hessian(), rtol=0, atol=64 * torch.finfo(torch.float32).eps * float(x.pow(2).sum(0).max()) / 40
    )
