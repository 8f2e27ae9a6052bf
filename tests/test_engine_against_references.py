"""Engine results checked against independent computations: behaviour a single-point change to the engine would otherwise break unnoticed.

Each compares with an independent computation (never with the report's own targets): the conv
layers' ``d_term`` and positions, the restore of BatchNorm statistics after a failure that
follows their re-estimation, the output error of a BatchNorm model, and ``auto``'s choice.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lobs import prune_model
from lightning_lobs.engine import AUTO_EXACT_MAX_COST


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, stride=2),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 5),
    )


def _images(n: int = 32, seed: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8, generator=g)), batch_size=8)


def test_conv_d_term_uses_output_positions_per_sample():
    """d^l = sqrt(2 dE P_l) with P_l the conv's output positions per sample (4x4 = 16 and 2x2 = 4 here)."""
    model = _cnn()
    loader = _images()
    report = prune_model(model, loader, 0.5, "exact", allocation="uniform", recalibrate_bn=False, prune_head=True)
    outs = {}
    hooks = [model[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o.shape)) for i in (0, 3)]
    with torch.no_grad():
        model(next(iter(loader))[0])
    for h in hooks:
        h.remove()
    for idx, name in ((0, "0"), (3, "3")):
        positions = math.prod(outs[idx][2:])
        lr = report.layers[name]
        assert lr.positions == positions
        assert lr.d_term == pytest.approx(math.sqrt(2 * lr.layer_error * positions), rel=1e-12)
    assert report.layers["6"].positions == 1


def test_batchnorm_restored_after_a_failure_that_follows_its_re_estimation():
    model = _cnn()
    model.train()
    with torch.no_grad():
        for (x,) in _images(seed=3):  # non-trivial running statistics
            model(x)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    batches = list(_images())

    def forward(m, batch):
        calls["n"] += 1
        if calls["n"] > 2 * len(batches):  # calibration, BN re-estimation pass, then the measurement fails
            raise RuntimeError("measurement failed")
        return m(batch[0])

    with pytest.raises(RuntimeError, match="measurement failed"):
        prune_model(model, batches, 0.5, "fast", forward_fn=forward, prune_head=True)
    # the measurement's first piece fails, then the whole batch it falls back to (a forward_fn that cannot run on a
    # piece of a batch), which fails again and propagates
    assert calls["n"] == 2 * len(batches) + 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training


def test_output_error_of_a_batchnorm_model_matches_an_independent_measurement():
    model = _cnn()
    model.train()
    with torch.no_grad():
        for (x,) in _images(seed=3):
            model(x)
    model.eval()
    dense = _cnn()
    dense.load_state_dict(model.state_dict())
    dense.eval()
    loader = _images()
    report = prune_model(model, loader, 0.6, "exact", prune_head=True)  # BN re-estimated after the prune
    sq = n = 0.0
    with torch.no_grad():
        for (x,) in loader:
            diff = (model(x) - dense(x)).double().flatten(1)
            sq += float(diff.pow(2).sum())
            n += x.shape[0]
    assert report.model_output_error == pytest.approx(math.sqrt(sq / n), rel=1e-5)
    assert report.output_error == pytest.approx(math.sqrt(sq / n), rel=1e-5)  # the last pruned layer is the output
    assert report.model_output_error > 0


def test_auto_picks_exact_below_the_threshold_and_fast_above():
    # rows * d^3 <= AUTO_EXACT_MAX_COST -> exact: 40 rows and d = 33 (with bias); a 300 x 2049 layer costs 2.6e12 -> fast
    model = nn.Sequential(nn.Linear(32, 40), nn.ReLU(), nn.Linear(40, 2048), nn.ReLU(), nn.Linear(2048, 300))
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 32, generator=g)), batch_size=32)
    report = prune_model(model, loader, 0.5, "auto", allocation="uniform", recalibrate_bn=False, prune_head=True)
    for name, lr in report.layers.items():
        rows, d = lr.shape[0], lr.shape[1] + 1
        expected = "exact" if rows * d**3 <= AUTO_EXACT_MAX_COST else "fast"
        assert lr.method == expected, name
    assert [report.layers[n].method for n in ("0", "2", "4")] == ["exact", "exact", "fast"]


def test_uniform_allocation_prunes_each_layer_to_the_target_count():
    """Independent of the report: every layer holds round(s * numel) zeros (and its masks' zeros are those)."""
    model = _cnn()
    report = prune_model(model, _images(), 0.6, "fast", allocation="uniform", prune_head=True)
    for name in ("0", "3", "6"):
        w = model.get_submodule(name).weight
        assert int((w == 0).sum()) == round(0.6 * w.numel()), name
        assert torch.equal(w == 0, ~report.masks[name]), name
