"""Tests for lightning_lobs.bounds (L-OBS error bound)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lobs.bounds import (
    GELU_LIPSCHITZ,
    MISH_LIPSCHITZ,
    SELU_LIPSCHITZ,
    SILU_LIPSCHITZ,
    ChainInfo,
    ChainLink,
    LayerTerm,
    RMSAccumulator,
    analyze_chain,
    conv_overlap,
    error_bound,
    layer_error,
    make_layer_term,
    operator_norm,
    positions_per_sample,
    rms_error,
    spectral_norm,
)


# --------------------------------------------------------------------------- helpers
def _matrix(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach().reshape(module.weight.shape[0], -1)
    if module.bias is not None:
        w = torch.cat([w, module.bias.detach().reshape(-1, 1)], dim=1)
    return w.clone()


def _set_matrix(module: nn.Module, mat: torch.Tensor) -> None:
    k = module.weight[0].numel()
    with torch.no_grad():
        module.weight.copy_(mat[:, :k].reshape(module.weight.shape))
        if module.bias is not None:
            module.bias.copy_(mat[:, k])


def _rows(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Rows (n, groups, d~) the layer multiplies (bias-augmented) and positions per sample."""
    if isinstance(module, nn.Linear):
        r = x.reshape(-1, 1, module.in_features)
        positions = r.shape[0] // x.shape[0]
    else:
        assert isinstance(module, nn.Conv2d) and module.padding_mode == "zeros"
        u = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        positions = u.shape[-1]
        r = u.transpose(1, 2).reshape(-1, module.groups, u.shape[1] // module.groups)
    if module.bias is not None:
        r = torch.cat([r, torch.ones(*r.shape[:2], 1, dtype=r.dtype)], dim=2)
    return r, positions


def _hessian(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    r, positions = _rows(module, x.double())
    H = torch.einsum("ngi,ngj->gij", r, r) / r.shape[0]
    return H, positions


def _capture(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[dict, dict, torch.Tensor]:
    inputs, outputs, handles = {}, {}, []
    for name in names:
        mod = model.get_submodule(name)

        def hook(m, args, out, name=name):
            inputs[name] = args[0].detach()
            outputs[name] = out.detach()

        handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        y = model(x)
    for h in handles:
        h.remove()
    return inputs, outputs, y


def _prune(
    model: nn.Module, names: list[str], gen: torch.Generator, keep: float = 0.2, noise: float = 0.05
) -> nn.Module:
    pruned = copy.deepcopy(model)
    for name in names:
        mod = pruned.get_submodule(name)
        W = _matrix(mod)
        mask = (torch.rand(W.shape, generator=gen, dtype=W.dtype) < keep).to(W.dtype)
        W_new = W * mask + noise * W.std() * torch.randn(W.shape, generator=gen, dtype=W.dtype)
        _set_matrix(mod, W_new)
    return pruned


def _power_norm(fn, shape, iters: int = 300, seed: int = 0) -> float:
    """Lower estimate of the operator norm of the linear map ``fn`` (power iteration on A^T A)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    v /= v.norm()
    for _ in range(iters):
        x = v.clone().requires_grad_(True)
        y = fn(x)
        (g,) = torch.autograd.grad(y, x, grad_outputs=y.detach())
        v = g / g.norm()
    return float(fn(v).detach().norm())  # ||A v|| with ||v|| = 1 never exceeds the true norm


def _check_bound(
    model: nn.Module, names: list[str], x: torch.Tensor, seed: int, sequential: bool = False, example_input=None
) -> tuple[float, float, float]:
    model = model.double().eval()
    x = x.double()
    gen = torch.Generator().manual_seed(seed)
    pruned = _prune(model, names, gen)
    chain = analyze_chain(model, names, example_input)
    assert chain.is_chain, chain.reason
    dense_in, dense_out, _ = _capture(model, names, x)
    pruned_in, pruned_out, _ = _capture(pruned, names, x)
    terms = []
    for name in names:
        mod = model.get_submodule(name)
        H, P = _hessian(mod, pruned_in[name] if sequential else dense_in[name])
        assert P == positions_per_sample(mod, dense_out[name].shape)
        terms.append(
            make_layer_term(name, mod, _matrix(mod), _matrix(pruned.get_submodule(name)), H, P, sequential=sequential)
        )
    bound_f, bound_s = error_bound(terms, chain)
    last = chain.links[-1].name
    measured = rms_error(dense_out[last], pruned_out[last])
    assert measured > 0
    assert measured <= bound_s * (1 + 1e-9), (measured, bound_s)
    assert bound_s <= bound_f * (1 + 1e-12)
    return measured, bound_s, bound_f


# --------------------------------------------------------------------------- models
class LeNetFunctional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), kernel_size=2, stride=2)
        x = torch.flatten(x, 1)
        x = x.view(x.size(0), -1)
        x = self.fc1(x).relu()
        return self.fc2(x)


def lenet_sequential() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = h + F.relu(self.b(h))
        return self.c(h)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = F.relu(h)
        return self.b(h)


class UnknownOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.exp(self.a(x)))


class Parallel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        return self.a(x) + self.b(x)


class InplaceSideBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        h.mul_(2.0)  # result unused: fx keeps `h` pointing at the layer output
        return self.b(h)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        return self.b(F.relu(self.a(F.relu(self.a(x)))))


class ScaledMLP(nn.Module):
    """Chain with non-unit op factors: sigmoid (1/4), scaling by 3, an unpruned layer, GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 20)
        self.mid = nn.Linear(20, 20)  # not pruned
        self.fc2 = nn.Linear(20, 16)
        self.fc3 = nn.Linear(16, 5)
        self.drop = nn.Dropout(0.3)

    def forward(self, x, scale: float = 3.0):
        h = torch.sigmoid(self.fc1(x)) * scale
        h = self.drop(F.gelu(self.mid(h)))
        h = self.fc2(h) / 2
        return self.fc3(F.leaky_relu(h, 0.1))


# --------------------------------------------------------------------------- layer_error
def test_layer_error_matches_direct_formula():
    gen = torch.Generator().manual_seed(0)
    n, d, out = 64, 7, 5
    X = torch.cat([torch.randn(n, d - 1, generator=gen, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64)], 1)
    H = X.T @ X / n
    W = torch.randn(out, d, generator=gen, dtype=torch.float64)
    W_new = W * (torch.rand(out, d, generator=gen) > 0.5) + 0.1 * torch.randn(
        out, d, generator=gen, dtype=torch.float64
    )
    direct = float(((W_new - W) @ X.T).pow(2).sum()) / (2 * n)
    assert layer_error(W, W_new, H) == pytest.approx(direct, rel=1e-12)
    assert layer_error(W.float(), W_new.float(), H.float()) == pytest.approx(direct, rel=1e-5)
    assert layer_error(W, W, H) == 0.0


def test_layer_error_grouped():
    gen = torch.Generator().manual_seed(1)
    g, n, d, rows_per = 3, 40, 6, 4
    X = torch.randn(g, n, d, generator=gen, dtype=torch.float64)
    H = X.transpose(1, 2) @ X / n
    W = torch.randn(g * rows_per, d, generator=gen, dtype=torch.float64)
    W_new = W + torch.randn(W.shape, generator=gen, dtype=torch.float64)
    direct = sum(float(((W_new - W)[j * rows_per : (j + 1) * rows_per] @ X[j].T).pow(2).sum()) for j in range(g)) / (
        2 * n
    )
    assert layer_error(W, W_new, H) == pytest.approx(direct, rel=1e-12)
    # conv-shaped weights (out, C/g, kh, kw) are flattened like weight.reshape(out, -1)
    assert layer_error(W.reshape(-1, 6, 1, 1), W_new.reshape(-1, 6, 1, 1), H) == pytest.approx(direct, rel=1e-12)
    with pytest.raises(ValueError):
        layer_error(W[:-1], W_new[:-1], H)  # 11 rows cannot be split in 3 groups


def test_layer_error_matches_conv_output_error():
    """d = sqrt(2 dE P) is exactly the per-sample RMS error of a single pruned conv layer."""
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2).double()
    x = torch.randn(5, 4, 11, 11, dtype=torch.float64)
    H, P = _hessian(conv, x)
    pruned = copy.deepcopy(conv)
    W = _matrix(conv)
    _set_matrix(pruned, W * (torch.rand(W.shape) > 0.7) + 0.01)
    term = make_layer_term("c", conv, W, _matrix(pruned), H, P)
    with torch.no_grad():
        measured = rms_error(conv(x), pruned(x))
    assert term.d == pytest.approx(measured, rel=1e-9)
    chain = ChainInfo(links=(ChainLink("c", 1.0),), is_chain=True, reason="")
    assert error_bound([term], chain)[1] == pytest.approx(measured, rel=1e-9)


# --------------------------------------------------------------------------- operator norms
def test_operator_norm_linear():
    torch.manual_seed(3)
    lin = nn.Linear(9, 7)
    W = lin.weight.detach()
    spec = operator_norm(lin, W)
    assert spec == pytest.approx(float(torch.linalg.matrix_norm(W.double(), ord=2)), rel=1e-12)
    # the bias column is dropped
    assert operator_norm(lin, _matrix(lin)) == pytest.approx(spec, rel=1e-12)
    fro = operator_norm(lin, _matrix(lin), kind="frobenius")
    assert fro == pytest.approx(float(W.double().norm()), rel=1e-12)
    assert fro >= spec
    with pytest.raises(ValueError):
        operator_norm(lin, W, kind="nuclear")
    with pytest.raises(ValueError):
        operator_norm(lin, W[:, :5])
    with pytest.raises(TypeError):
        operator_norm(nn.ConvTranspose2d(2, 2, 3), torch.zeros(2, 18))


@pytest.mark.parametrize(
    "cfg",
    [
        dict(cin=3, cout=5, k=3, stride=1, dilation=1, padding=1, groups=1, size=9),
        dict(cin=3, cout=5, k=3, stride=2, dilation=1, padding=0, groups=1, size=11),
        dict(cin=2, cout=4, k=3, stride=1, dilation=2, padding=2, groups=1, size=10),
        dict(cin=2, cout=4, k=3, stride=2, dilation=2, padding=1, groups=1, size=12),
        dict(cin=4, cout=6, k=(3, 2), stride=(2, 1), dilation=(1, 2), padding=0, groups=2, size=10),
        dict(cin=4, cout=4, k=5, stride=3, dilation=1, padding=2, groups=4, size=13),
    ],
)
def test_operator_norm_conv_is_upper_bound(cfg):
    torch.manual_seed(4)
    conv = nn.Conv2d(
        cfg["cin"],
        cfg["cout"],
        cfg["k"],
        stride=cfg["stride"],
        dilation=cfg["dilation"],
        padding=cfg["padding"],
        groups=cfg["groups"],
    ).double()
    w = conv.weight.detach()

    def A(x):
        return F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    true_est = _power_norm(A, (1, cfg["cin"], cfg["size"], cfg["size"]))
    spec = operator_norm(conv, _matrix(conv))
    fro = operator_norm(conv, _matrix(conv), "frobenius")
    assert true_est <= spec * (1 + 1e-9)
    assert spec <= fro * (1 + 1e-12)
    assert spec < 10 * true_est  # not absurdly loose


@pytest.mark.parametrize("cls,dims", [(nn.Conv1d, 1), (nn.Conv3d, 3)])
def test_operator_norm_conv1d_conv3d(cls, dims):
    torch.manual_seed(5)
    conv = cls(2, 3, 3, stride=2, dilation=2, padding=1, bias=False).double()
    fn = {1: F.conv1d, 3: F.conv3d}[dims]

    def A(x):
        return fn(x, conv.weight.detach(), None, conv.stride, conv.padding, conv.dilation)

    est = _power_norm(A, (1, 2) + (9,) * dims, iters=150)
    assert est <= operator_norm(conv, conv.weight) * (1 + 1e-9)


def test_conv_overlap_brute_force():
    """conv_overlap equals the max number of output positions that read one input element."""
    for k in range(1, 6):
        for s in range(1, 5):
            for dl in range(1, 5):
                length = 60
                span = (k - 1) * dl + 1
                counts = [0] * length
                for o in range((length - span) // s + 1):
                    for t in range(k):
                        counts[o * s + t * dl] += 1
                assert max(counts) == conv_overlap([k], [s], [dl]), (k, s, dl)
    assert conv_overlap([3, 3], [2, 2], [2, 2]) == 9
    assert conv_overlap([3, 3], [2, 2]) == 4


def test_dilation_worst_case_needs_gcd_factor():
    """All-ones 3x3 filter, stride 2, dilation 2: every tap of a window hits the stride lattice.

    The naive factor sqrt(prod ceil(k/s)) = 2 would give 6 < true norm (~9); ours gives 9.
    """
    conv = nn.Conv2d(1, 1, 3, stride=2, dilation=2, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)

    def A(x):
        return F.conv2d(x, conv.weight, None, 2, 0, 2)

    est = _power_norm(A, (1, 1, 61, 61), iters=400)
    naive = float(torch.linalg.matrix_norm(conv.weight.detach().reshape(1, -1), ord=2)) * 2.0
    assert est > naive
    assert est <= operator_norm(conv, conv.weight) * (1 + 1e-9)
    assert operator_norm(conv, conv.weight) == pytest.approx(9.0)


def test_operator_norm_padding_modes_upper_bound():
    torch.manual_seed(6)
    for mode in ("circular", "reflect", "replicate"):
        conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode, bias=False).double()

        def A(x, conv=conv):
            return conv(x)

        est = _power_norm(A, (1, 2, 4, 4), iters=200)
        assert est <= operator_norm(conv, conv.weight) * (1 + 1e-9), mode


def test_grouped_conv_spectral_is_max_over_groups():
    torch.manual_seed(7)
    conv = nn.Conv2d(4, 6, 1, groups=2, bias=False).double()
    W = conv.weight.detach().reshape(6, 2)
    expected = max(float(torch.linalg.matrix_norm(W[:3], ord=2)), float(torch.linalg.matrix_norm(W[3:], ord=2)))
    assert operator_norm(conv, conv.weight) == pytest.approx(expected, rel=1e-12)
    assert operator_norm(conv, conv.weight, "frobenius") == pytest.approx(float(W.norm()), rel=1e-12)


def test_positions_per_sample():
    assert positions_per_sample(nn.Linear(3, 4), (7, 4)) == 1
    assert positions_per_sample(nn.Linear(3, 4), (7, 5, 4)) == 5
    assert positions_per_sample(nn.Conv2d(3, 4, 3), (7, 4, 6, 5)) == 30


# --------------------------------------------------------------------------- Lipschitz table
def test_activation_lipschitz_constants():
    x = torch.linspace(-12, 12, 200001, dtype=torch.float64, requires_grad=True)
    cases = [
        (GELU_LIPSCHITZ, F.gelu),
        (GELU_LIPSCHITZ, lambda t: F.gelu(t, approximate="tanh")),
        (SILU_LIPSCHITZ, F.silu),
        (MISH_LIPSCHITZ, F.mish),
        (SELU_LIPSCHITZ, F.selu),
    ]
    for const, fn in cases:
        (g,) = torch.autograd.grad(fn(x).sum(), x)
        slope = float(g.abs().max())
        assert slope <= const <= slope + 0.01


def test_pooling_and_norm_factors():
    torch.manual_seed(8)
    bn = nn.BatchNorm2d(4)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(-2.0, 2.0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(4, 4, 1),
        nn.AvgPool2d(3, stride=2),
        nn.Conv2d(4, 4, 1),
        bn,
        nn.Tanh(),
        nn.Conv2d(4, 4, 1),
        nn.Sigmoid(),
        nn.Conv2d(4, 4, 1),
    )
    chain = analyze_chain(model, ["0", "2", "4", "7", "9"])
    assert chain.is_chain, chain.reason
    factors = [link.op_factor for link in chain.links]
    bn_factor = float((bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)).max())
    assert factors == pytest.approx([1.0, 2.0, math.sqrt(4 / 9), bn_factor, 0.25])

    # the factors really are Lipschitz constants
    avg = nn.AvgPool2d(3, stride=2)
    assert _power_norm(avg, (1, 1, 15, 15)) <= math.sqrt(4 / 9) * (1 + 1e-9)
    mp = nn.MaxPool2d(3, stride=2)
    for _ in range(20):
        a, b = torch.randn(2, 1, 2, 9, 9, dtype=torch.float64)
        assert (mp(a) - mp(b)).norm() <= 2.0 * (a - b).norm()


def test_adaptive_pool_factor_with_example_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d((3, 2)), nn.Flatten(), nn.Linear(24, 5))
    no_shape = analyze_chain(model, ["0", "4"])
    assert not no_shape.is_chain and "example_input" in no_shape.reason
    chain = analyze_chain(model, ["0", "4"], torch.randn(2, 3, 9, 8))
    assert chain.is_chain, chain.reason
    pool = nn.AdaptiveAvgPool2d((3, 2))
    est = _power_norm(pool, (1, 1, 7, 6))
    assert est <= chain.links[1].op_factor * (1 + 1e-9)
    assert chain.links[1].op_factor == pytest.approx(est, rel=1e-6)  # exact for the separable map
    assert model.training  # the training flags are restored after shape propagation
    # global pooling needs no shapes
    gap = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert analyze_chain(gap, ["0", "3"]).links[1].op_factor == 1.0


# --------------------------------------------------------------------------- analyze_chain
def test_analyze_chain_mlp_sequential():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))
    chain = analyze_chain(model, ["0", "2", "4"])
    assert chain.is_chain and chain.reason == ""
    assert chain.links == (ChainLink("0", 1.0), ChainLink("2", 1.0), ChainLink("4", 1.0))
    # a subset of the layers; the ops between 0 and 4 include the unpruned layer 2
    sub = analyze_chain(model, ["4", "0"])
    assert [link.name for link in sub.links] == ["0", "4"]  # data-path order
    w2 = model[2].weight.detach().double()
    assert sub.links[1].op_factor == pytest.approx(float(torch.linalg.matrix_norm(w2, ord=2)))


def test_analyze_chain_lenet_sequential_and_functional():
    seq = analyze_chain(lenet_sequential(), ["0", "3", "7", "9"])
    assert seq.is_chain, seq.reason
    assert [link.op_factor for link in seq.links] == [1.0, 1.0, 1.0, 1.0]
    fun = analyze_chain(LeNetFunctional(), ["conv1", "conv2", "fc1", "fc2"])
    assert fun.is_chain, fun.reason
    assert [link.name for link in fun.links] == ["conv1", "conv2", "fc1", "fc2"]
    assert [link.op_factor for link in fun.links] == [1.0, 1.0, 1.0, 1.0]


def test_analyze_chain_lightning_module():
    pl = pytest.importorskip("pytorch_lightning")

    class LitLeNet(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = LeNetFunctional()

        def forward(self, x):
            return self.net(x)

    chain = analyze_chain(LitLeNet(), ["net.conv1", "net.conv2", "net.fc1", "net.fc2"])
    assert chain.is_chain, chain.reason


@pytest.mark.parametrize(
    "model,names,needle",
    [
        (Residual(), ["a", "b", "c"], "combines 2 tensors"),
        (DataDependent(), ["a", "b"], "trace"),
        (UnknownOp(), ["a", "b"], "exp"),
        (Parallel(), ["a", "b"], "not on the data path"),
        (InplaceSideBranch(), ["a", "b"], "in-place"),
        (Shared(), ["a", "b"], "called 2 times"),
        (nn.Sequential(nn.Linear(4, 4), nn.Softmax(-1), nn.Linear(4, 4)), ["0", "2"], "Softmax"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU()), ["0", "1"], "not a Linear/ConvNd"),
        (nn.Sequential(nn.Linear(4, 4)), ["5"], "not a submodule"),
    ],
)
def test_analyze_chain_rejects(model, names, needle):
    chain = analyze_chain(model, names)
    assert not chain.is_chain
    assert chain.links == ()
    assert needle in chain.reason, chain.reason
    nan_f, nan_s = error_bound([], chain)
    assert math.isnan(nan_f) and math.isnan(nan_s)


def test_ops_after_last_layer_are_ignored():
    # the residual add and softmax come after the last pruned layer
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x):
            h = self.b(F.relu(self.a(x)))
            return torch.softmax(h + x, dim=-1)

    chain = analyze_chain(Head(), ["a", "b"])
    assert chain.is_chain, chain.reason


def test_error_bound_recursion_and_validation():
    chain = ChainInfo(links=(ChainLink("a", 1.0), ChainLink("b", 0.5), ChainLink("c", 2.0)), is_chain=True, reason="")
    terms = [LayerTerm("c", 0.3, 4.0, 2.0), LayerTerm("a", 1.0, 3.0, 1.5), LayerTerm("b", 0.2, 2.0, 1.0)]
    fro, spec = error_bound(terms, chain)
    assert fro == pytest.approx(4.0 * 2.0 * (2.0 * 0.5 * 1.0 + 0.2) + 0.3)
    assert spec == pytest.approx(2.0 * 2.0 * (1.0 * 0.5 * 1.0 + 0.2) + 0.3)
    with pytest.raises(ValueError):
        error_bound(terms[:2], chain)
    with pytest.raises(ValueError):
        error_bound(terms + [LayerTerm("z", 0.0, 0.0, 0.0)], chain)


# --------------------------------------------------------------------------- the bound holds
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sequential", [False, True])
def test_bound_holds_mlp(seed, sequential):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 6)
    )
    x = torch.randn(64, 12)
    measured, spec, fro = _check_bound(model, ["0", "2", "4", "6"], x, seed, sequential)
    assert spec < fro


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sequential", [False, True])
def test_bound_holds_lenet(seed, sequential):
    torch.manual_seed(seed)
    x = torch.randn(16, 1, 28, 28)
    _check_bound(lenet_sequential(), ["0", "3", "7", "9"], x, seed, sequential)
    _check_bound(LeNetFunctional(), ["conv1", "conv2", "fc1", "fc2"], x, seed, sequential)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sequential", [False, True])
def test_bound_holds_cnn_with_factors(seed, sequential):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(8)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.3, 2.0)
    bn.weight.data.uniform_(-1.5, 1.5)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        bn,
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(8, 8, 3, stride=2, dilation=2, padding=2, groups=2),
        nn.ELU(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 6, 1),
        nn.Sigmoid(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 5),
    )
    x = torch.randn(12, 3, 17, 17)
    names = ["0", "4", "7", "11"]
    chain = analyze_chain(model.double(), names, x.double())
    assert [link.op_factor > 0 for link in chain.links] == [True] * 4
    _check_bound(model, names, x, seed, sequential, example_input=x.double())


@pytest.mark.parametrize("seed", [0, 1])
def test_bound_holds_with_scaled_ops(seed):
    torch.manual_seed(seed)
    model = ScaledMLP()
    chain = analyze_chain(model, ["fc1", "fc2", "fc3"])
    assert chain.is_chain, chain.reason
    mid = float(torch.linalg.matrix_norm(model.mid.weight.detach().double(), ord=2))
    assert chain.links[1].op_factor == pytest.approx(0.25 * 3.0 * mid * GELU_LIPSCHITZ)
    assert chain.links[2].op_factor == pytest.approx(0.5)
    x = torch.randn(48, 12)
    for sequential in (False, True):
        _check_bound(model, ["fc1", "fc2", "fc3"], x, seed, sequential)


# --------------------------------------------------------------------------- measured error
def test_rms_error_and_accumulator():
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(10, 3, 4, generator=gen)
    b = torch.randn(10, 3, 4, generator=gen)
    expected = math.sqrt(float((a.double() - b.double()).reshape(10, -1).pow(2).sum(1).mean()))
    assert rms_error(a, b) == pytest.approx(expected, rel=1e-12)
    acc = RMSAccumulator()
    assert math.isnan(acc.value())
    for lo, hi in [(0, 3), (3, 4), (4, 10)]:
        acc.add(a[lo:hi], b[lo:hi])
    assert acc.count == 10
    assert acc.value() == pytest.approx(expected, rel=1e-12)
    acc.reset()
    assert acc.count == 0
    with pytest.raises(ValueError):
        rms_error(a, b[:5])


def test_rms_error_of_a_scalar_output_is_one_sample():
    # A model that returns a 0-d tensor (its loss, say) used to crash here; it is one sample of one value.
    a, b = torch.tensor(1.5), torch.tensor(-0.5)
    assert rms_error(a, b) == pytest.approx(2.0, rel=1e-15)
    acc = RMSAccumulator()
    acc.add(a, b)
    acc.add(torch.tensor(0.0), torch.tensor(1.0))
    assert acc.count == 2
    assert acc.value() == pytest.approx(math.sqrt((4.0 + 1.0) / 2), rel=1e-15)


def test_spectral_norm_matches_svd():
    g = torch.Generator().manual_seed(11)
    for shape in ((7, 30), (30, 7), (12, 12), (3, 5, 9), (2, 9, 4)):
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(spectral_norm(W), torch.linalg.matrix_norm(W, ord=2), rtol=1e-12, atol=0)
    low = torch.randn(20, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 40, generator=g, dtype=torch.float64)
    assert float(spectral_norm(low)) == pytest.approx(float(torch.linalg.matrix_norm(low, ord=2)), rel=1e-12)
    assert float(spectral_norm(torch.zeros(4, 6))) == 0.0
    assert spectral_norm(torch.randn(5, 8, generator=g)).dtype == torch.float64  # float32 input, float64 result
