"""Smoke runs of the deep examples (examples/resnet_mnist.py, examples/gpt2_stdlib.py) in their ``--quick`` mode,
checked for sane outputs, plus the N:M baseline rule they use (lobs_lab.baselines) and the stdlib corpus split.

The ResNet run needs the full MNIST at ``../shared/data/mnist`` (skipped without it); the GPT-2 run reads the
interpreter's own ``Lib/``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from lobs_lab import harness
from lobs_lab import prune_retrain as deep_common
from lobs_lab import text as text_data
from lobs_lab.baselines import nm_mask_from_scores

from script_loader import load_example

ROOT = Path(__file__).resolve().parents[1]

MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
OBS = set(deep_common.OBS_METHODS)


def _check_rows(rows: list, expected_methods: set, layer_count: int) -> None:
    """What every row of both examples must satisfy."""
    assert {r["method"] for r in rows} == expected_methods
    for r in rows:
        where = f"{r['method']} {r['pattern'] or r['sparsity']}"
        assert len(r["pruned_layers"]) == layer_count, where
        # The sparsity the prune reports is what the model holds.
        assert r["oneshot_zeros"] == pytest.approx(r["report_sparsity"], abs=1e-12), where
        if r["pattern"] == "2:4":
            assert r["oneshot_zeros"] == 0.5, where
        else:
            assert abs(r["oneshot_zeros"] - r["sparsity"]) < 0.01, where
        assert r["masks_held"], where
        if r["retrained"] is not None:
            # Retraining moved the weights but not the zeros.
            assert r["retrained_zeros"] == pytest.approx(r["oneshot_zeros"], abs=1e-12), where
        if r["method"] in OBS:
            assert r["methods_used"], where


@pytest.mark.examples
@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="full MNIST not at ../shared/data/mnist")
def test_resnet_mnist_quick(tmp_path: Path) -> None:
    resnet_mnist = load_example("resnet_mnist")

    res = resnet_mnist.main(["--quick", "--data-dir", str(MNIST_DIR), "--out", str(tmp_path / "r")])
    assert (tmp_path / "r.json").is_file() and (tmp_path / "r.png").is_file()
    assert res["num_train"] == 2048 and res["num_test"] == 1000
    assert "stem" not in " ".join(res["net"]["pruned_layers"])
    rows = res["rows"]
    _check_rows(rows, OBS | set(deep_common.BASELINES), len(res["net"]["pruned_layers"]))
    for r in rows:
        assert 0.0 <= r["oneshot"]["acc"] <= 1.0
        assert r["retrained"] is not None and 0.0 <= r["retrained"]["acc"] <= 1.0  # quick retrains every point
    # Small convs: auto chooses exact everywhere, so its masks are exact's.
    auto = [r for r in rows if r["method"] == "auto"]
    assert all(r["methods_used"] == ["exact"] for r in auto)
    # A residual net is not a chain: no bound number, a note instead, and a measured output error.
    for r in rows:
        if r["method"] in OBS:
            assert math.isnan(r["bound"]) and r["bound_note"] and math.isfinite(r["output_error"])


@pytest.mark.examples
def test_gpt2_stdlib_quick(tmp_path: Path) -> None:
    gpt2_stdlib = load_example("gpt2_stdlib")

    res = gpt2_stdlib.main(["--quick", "--out", str(tmp_path / "g")])
    assert (tmp_path / "g.json").is_file() and (tmp_path / "g.png").is_file()
    assert res["corpus"]["python_version"] and len(res["corpus"]["file_list_sha256"]) == 64
    assert res["val_curve"] and all(math.isfinite(c[1]) for c in res["val_curve"])
    dense = res["dense_test"]
    assert math.isfinite(dense["ppl"]) and 1.0 < dense["ppl"] < 256.0  # trained a little: below uniform bytes
    assert dense["bpb"] == pytest.approx(math.log2(dense["ppl"]))
    names = res["net"]["pruned_layers"]
    assert len(names) == 4 * res["net"]["layers"] and not any("lm_head" in n for n in names)
    _check_rows(res["rows"], {"exact", "fast", "lobs"} | set(deep_common.BASELINES), len(names))
    for r in res["rows"]:
        for key in ("oneshot", "retrained"):
            assert math.isfinite(r[key]["ppl"]) and r[key]["ppl"] > 1.0
        if r["method"] in OBS:
            assert "model.lm_head" in r["skipped"]  # tied to wte: left dense, said so


def test_nm_mask_from_scores_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 12, generator=gen)
    mask = nm_mask_from_scores(scores, 2, 4)
    assert mask.shape == scores.shape and int(mask.sum()) == 5 * 6
    for r, g in itertools.product(range(5), range(3)):
        group = scores[r, 4 * g : 4 * g + 4]
        best = max(itertools.combinations(range(4), 2), key=lambda c: float(group[list(c)].sum()))
        assert sorted(torch.nonzero(mask[r, 4 * g : 4 * g + 4]).flatten().tolist()) == sorted(best)
    # Free trailing columns (a bias) are kept and not grouped.
    with_bias = nm_mask_from_scores(torch.rand(3, 9, generator=gen), 1, 4, free_cols=1)
    assert with_bias[:, -1].all() and int(with_bias[:, :8].sum()) == 3 * 2
    with pytest.raises(ValueError):
        nm_mask_from_scores(torch.rand(2, 6), 2, 4)


def test_conv_rows_view_groups_input_channels() -> None:
    """The baselines' conv N:M groups run along input channels, as the library's do, and the view round-trips."""
    conv = torch.nn.Conv2d(8, 3, 3)
    w = torch.randn_like(conv.weight)
    rows = deep_common.rows_view(conv, w)
    assert rows.shape == (3, 72)
    assert torch.equal(rows[1, :8], w[1, :, 0, 0])  # first group of 4 = channels 0-3 at kernel position (0, 0)
    assert torch.equal(deep_common.from_rows(conv, rows, w.shape), w)


def test_stdlib_split_is_per_file_and_fixed() -> None:
    a = text_data.split_of(Path("json/decoder.py"))
    assert a == text_data.split_of(Path("json/decoder.py")) and a in text_data.SPLIT_NAMES
    files = text_data.stdlib_files()
    assert files == sorted(files, key=lambda p: p.as_posix()) and not any("site-packages" in p.parts for p in files)
    counts = {k: sum(text_data.split_of(p) == k for p in files) for k in text_data.SPLIT_NAMES}
    assert counts["train"] > 10 * counts["test"] > 0 and counts["validation"] > 0


def test_dense_cache_trains_once_and_retrains_when_a_setting_changes(tmp_path: Path) -> None:
    path = str(tmp_path / "dense.pt")
    calls = []

    def train_into(module: torch.nn.Module, value: float):
        def train():
            calls.append(value)
            with torch.no_grad():
                module.weight.fill_(value)
            return {"seconds": value}

        return train

    a = torch.nn.Linear(3, 2)
    info = harness.train_or_load(path, {"lr": 1.0}, a, train_into(a, 1.0))
    assert info == {"seconds": 1.0, "dense_source": "trained in this run"} and calls == [1.0]
    b = torch.nn.Linear(3, 2)
    info = harness.train_or_load(path, {"lr": 1.0}, b, train_into(b, 9.0))
    assert calls == [1.0] and info["dense_source"].startswith("loaded from") and info["seconds"] == 1.0
    assert torch.equal(b.weight, a.weight) and torch.equal(b.bias, a.bias)
    c = torch.nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="other settings"):
        info = harness.train_or_load(path, {"lr": 2.0}, c, train_into(c, 2.0))
    assert calls == [1.0, 2.0] and info["dense_source"] == "trained in this run" and bool((c.weight == 2.0).all())
    assert harness.train_or_load(None, {"lr": 1.0}, c, train_into(c, 3.0))["dense_source"] == "trained in this run"
