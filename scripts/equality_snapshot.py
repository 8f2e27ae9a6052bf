#!/usr/bin/env python
"""Before/after equality snapshot of lightning-lobs: every solve and prune, hashed, for a refactor's "same behaviour".

It uses only the public API (``lightning_lobs.__all__``) plus torch/transformers, so the same script runs on the code
before and after a refactor and the two JSON files must be equal.

Subcommands::

    python scripts/equality_snapshot.py write OUT.json             # solves + prunes, about 1 min on 1 thread
    python scripts/equality_snapshot.py examples OUT.json          # the examples' quick runs, about 3-4 min
    python scripts/equality_snapshot.py compare A.json B.json      # exit 1 and list every difference

What ``write`` records (fixed seeds, ``torch.use_deterministic_algorithms(True)``, ``--threads`` threads, default 1):

* ``solves``: ``solve_layer`` for ``lobs``/``exact``/``fast`` x sparsity 0.5 / 0.7 / ``"2:4"`` x {no prior mask,
  prior mask} x {float32, float64 solve} on random layers with correlated inputs (a plain Linear-shaped weight with
  ``refit`` None / True / False, a bias column, a grouped conv-shaped weight with a 3-d Hessian), plus ``exact`` with a
  ``greedy_trace``: sha256 of the weight, mask and bias bytes, the error and damp as ``repr`` floats, the warnings.
* ``prunes``: ``prune_model`` on seeded small LeNet-300-100, LeNet-5, ResNet (BatchNorm) and 2-layer GPT-2 models
  (auto/exact/fast/lobs x global/uniform, sequential, 2:4, ``prune_head``, float64 solve, a sparsity mapping,
  BatchNorm recalibration off, a second step on top of the first's masks; ``PRUNE_CASES``) and on the real-size
  LeNet-300-100 with the README main job's settings (``FULL_CASES``): ``report.metrics()`` (no timings in it), every ``LayerReport`` field but ``seconds``, the
  report's fields but ``calibration_seconds``/``solve_seconds``, sha256 of every state_dict tensor after the prune
  (with its float64 sum, to size a difference), the ``MaskSet``'s hashes, the warnings.
An exception is recorded as its type and message, so the errors must match as well.

``examples`` runs the README's main job (LeNet-300-100) and the LeNet-5, ResNet and GPT-2 examples in their quick
modes (commands in ``EXAMPLE_COMMANDS``) and keeps the lines they print to stdout with durations replaced by
``<t>``, plus their results JSON without timing, version and path entries.

How to use it for a refactor (run both sides from the checkout's root with the same thread count: results are only
promised bit-identical on one machine, one torch build, one thread count)::

    git worktree add /tmp/before <base commit>
    (cd /tmp/before && PYTHONPATH=$PWD OMP_NUM_THREADS=1 python /path/to/scripts/equality_snapshot.py write /tmp/a.json)
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/equality_snapshot.py write /tmp/b.json
    python scripts/equality_snapshot.py compare /tmp/a.json /tmp/b.json

``compare`` prints each differing entry by its path (``solves/<case>/weight_sha256``, ``prunes/<case>/metrics/...``)
with both values, then a count; it exits 1 on any difference. ``meta`` (versions, commit, threads, timings of the
run itself) is printed as notes and never fails the comparison; a different ``threads`` is flagged because the
results do depend on it: on 72acc18, ``write`` with ``--threads 2`` differed from ``--threads 1`` in 968 of 18,222
entries (``exact``'s trace increments on the 160-column layer, and last-bits report floats, state_dicts and a few
masks of the LeNet and ResNet prunes), while two 1-thread runs were identical. Compare snapshots of one thread count. ``--ignore PREFIX`` (repeatable) leaves out entries whose path starts with PREFIX.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lightning_lobs
from lightning_lobs import (
    GlobalAllocation,
    MaskSet,
    PruneReport,
    SolverOptions,
    greedy_trace,
    prune_model,
    solve_layer,
)

REPO = Path(__file__).resolve().parents[1]
FORMAT_VERSION = 1

# --------------------------------------------------------------------------- encoding


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of the tensor's dtype, shape and raw bytes (so a dtype or shape change shows too)."""
    shape = tuple(t.shape)
    t = t.detach().cpu().contiguous().reshape(-1)  # 1-d: a 0-d tensor (num_batches_tracked) has no byte view
    h = hashlib.sha256(f"{t.dtype}{shape}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def exact(value: Any) -> Any:
    """JSON-safe exact form: floats as ``repr`` strings (nan/inf included), tensors as hashes, containers recursed."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.Tensor):
        return {"sha256": tensor_sha256(value)}
    if isinstance(value, dict):
        return {str(k): exact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [exact(v) for v in value]
    return repr(value)


def captured(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``'s record plus the warnings it gave (category: message, in order); an exception is the record."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - the error is part of the behaviour under comparison
            out = {"error": f"{type(e).__name__}: {e}"}
    out["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    return out


def seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- a) solve_layer


def correlated_hessian(d: int, n: int, gen: torch.Generator, bias: bool = False) -> torch.Tensor:
    """``X^T X / n`` (float64) of inputs with correlated columns; the last column is the constant 1 when ``bias``."""
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64)
    x = x + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    if bias:
        x = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    return x.T @ x / n


def prior_mask(shape: tuple[int, ...], pattern: bool, gen: torch.Generator) -> torch.Tensor:
    """An earlier step's keep-mask: for 2:4, one pruned weight in every other group of 4; else 25% pruned at random."""
    rows, d = shape[0], int(torch.tensor(shape[1:]).prod())
    if pattern:
        mask = torch.ones(rows, d // 4, 4, dtype=torch.bool)
        pos = torch.randint(0, 4, (rows, d // 4), generator=gen)
        hit = torch.rand(rows, d // 4, generator=gen) < 0.5
        mask[torch.arange(rows)[:, None], torch.arange(d // 4)[None, :], pos] = ~hit
        return mask.reshape(shape)
    return (torch.rand(rows, d, generator=gen) >= 0.25).reshape(shape)


def solve_layers() -> dict[str, dict[str, Any]]:
    """The random layers the solves run on: weight, Hessian, bias, solver overrides."""
    gen = seeded(1)
    layers: dict[str, dict[str, Any]] = {}
    w = torch.randn(16, 24, generator=gen)
    h = correlated_hessian(24, 200, gen)
    for name, refit in (("linear", None), ("linear_refit_on", True), ("linear_refit_off", False)):
        layers[name] = {"weight": w, "hessian": h, "bias": None, "solver": {"refit": refit}}
    # Small blocks and lazy steps: several of fast's column blocks and of exact's batched downdates; dead rows allowed.
    layers["linear_small_blocks"] = {
        "weight": w,
        "hessian": h,
        "bias": None,
        "solver": {"block_size": 8, "lazy_steps": 4, "min_kept_per_row": 0},
    }
    # Wider than one default block (128 columns) and lazy_steps (32) with the default options.
    layers["wide"] = {
        "weight": torch.randn(24, 160, generator=gen),
        "hessian": correlated_hessian(160, 400, gen),
        "bias": None,
        "solver": {},
    }
    # Inputs that are always zero (a dead column of H) and a rank-deficient H: the damping and dead-input paths.
    x = torch.randn(10, 20, generator=gen, dtype=torch.float64)
    x[:, 3] = 0.0
    layers["singular"] = {
        "weight": torch.randn(8, 20, generator=gen),
        "hessian": x.T @ x / 10,
        "bias": None,
        "solver": {"damp": 0.0},
    }
    layers["bias"] = {
        "weight": torch.randn(12, 20, generator=gen),
        "hessian": correlated_hessian(20, 150, gen, bias=True),
        "bias": torch.randn(12, generator=gen),
        "solver": {},
    }
    # A grouped conv's (out, C_in/groups, kh, kw) weight: each group of output rows has its own Hessian.
    hg = torch.stack([correlated_hessian(16, 120, gen) for _ in range(2)])
    layers["grouped_conv"] = {
        "weight": torch.randn(8, 4, 2, 2, generator=gen),
        "hessian": hg,
        "bias": None,
        "solver": {},
    }
    return layers


def one_solve(
    layer: dict[str, Any], method: str, target: str, prior: torch.Tensor | None, dtype: torch.dtype, use_trace: bool
) -> dict[str, Any]:
    solver = SolverOptions(dtype=dtype, **layer["solver"])
    kw: dict[str, Any] = {"bias": layer["bias"], "solver": solver, "prior_mask": prior}
    if target == "2:4":
        kw["pattern"] = "2:4"
    else:
        kw["sparsity"] = float(target)
    if use_trace:
        trace = greedy_trace(
            layer["weight"],
            layer["hessian"],
            bias=layer["bias"],
            pattern=kw.get("pattern"),
            solver=solver,
            prior_mask=prior,
        )
        kw["trace"] = trace
    res = solve_layer(layer["weight"], layer["hessian"], method=method, **kw)
    out = {
        "weight_sha256": tensor_sha256(res.weight),
        "mask_sha256": tensor_sha256(res.mask),
        "bias_sha256": None if res.bias is None else tensor_sha256(res.bias),
        "error": repr(res.error),
        "damp": repr(res.damp),
        "method": res.method,
        "kept": int(res.mask.sum()),
        "weight_sum": repr(res.weight.double().sum().item()),
    }
    if use_trace:
        out["trace_order_sha256"] = tensor_sha256(kw["trace"].order)
        out["trace_increments_sha256"] = tensor_sha256(kw["trace"].increments)
        out["trace_damp"] = repr(kw["trace"].damp)
    return out


def snapshot_solves() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for lname, layer in solve_layers().items():
        for target in ("0.5", "0.7", "2:4"):
            prior = prior_mask(tuple(layer["weight"].shape), target == "2:4", seeded(2))
            for with_prior in (False, True):
                for dtype in (torch.float32, torch.float64):
                    variants = [(m, False) for m in ("lobs", "exact", "fast")] + [("exact", True)]
                    for method, use_trace in variants:
                        key = (
                            f"{lname}/{method}{'+trace' if use_trace else ''}/{target}/"
                            f"{'prior' if with_prior else 'noprior'}/{str(dtype)[6:]}"
                        )
                        args = (layer, method, target, prior if with_prior else None, dtype, use_trace)
                        out[key] = captured(lambda args=args: one_solve(*args))
    return out


# --------------------------------------------------------------------------- b) prune_model


class BasicBlock(nn.Module):
    """The ResNet example's block: two 3x3 conv + BatchNorm, identity or strided 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            None
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2))
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def lenet300() -> nn.Module:
    """LeNet-300-100's chain at a quarter of the width on 14x14 inputs (widths divisible by 4, so 2:4 fits)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(196, 76), nn.ReLU(), nn.Linear(76, 24), nn.ReLU(), nn.Linear(24, 10))


def lenet300_full() -> nn.Module:
    """LeNet-300-100 at its real size (784-300-100-10), for the README main job's settings."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def lenet5() -> nn.Module:
    """The Caffe LeNet-5 chain (conv, pool, conv, pool, fc, fc) with fewer channels."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 5),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 40),
        nn.ReLU(),
        nn.Linear(40, 10),
    )


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(cfg).eval()


def build(model_name: str) -> tuple[nn.Module, list[torch.Tensor]]:
    """A freshly seeded model and its seeded calibration batches (4 batches)."""
    gen = seeded(10)
    if model_name == "gpt2":
        model = gpt2()
        return model, [torch.randint(0, 64, (4, 16), generator=gen) for _ in range(4)]
    shape = {
        "lenet300": (16, 1, 14, 14),
        "lenet300_full": (64, 1, 28, 28),
        "lenet5": (16, 1, 28, 28),
        "resnet": (16, 1, 12, 12),
    }[model_name]
    model = {"lenet300": lenet300, "lenet300_full": lenet300_full, "lenet5": lenet5, "resnet": SmallResNet}[
        model_name
    ]()
    batches = [torch.randn(*shape, generator=gen) for _ in range(4)]
    if model_name == "resnet":  # BatchNorm statistics away from their defaults, as after training
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(1.5 * torch.randn(*shape, generator=gen) + 0.2)
        model.eval()
    return model, batches


PRUNE_CASES: dict[str, list[dict[str, Any]]] = {
    **{
        f"{m}/{a}": [{"sparsity": 0.6, "method": m, "allocation": a}]
        for m in ("auto", "exact", "fast", "lobs")
        for a in ("global", "uniform")
    },
    "auto/global/sequential": [{"sparsity": 0.6, "method": "auto", "sequential": True}],
    "fast/uniform/sequential": [{"sparsity": 0.6, "method": "fast", "allocation": "uniform", "sequential": True}],
    "auto/2:4": [{"method": "auto", "pattern": "2:4"}],
    "lobs/2:4/sequential": [{"method": "lobs", "pattern": "2:4", "sequential": True}],
    "auto/global/prune_head": [{"sparsity": 0.6, "method": "auto", "prune_head": True}],
    "exact/uniform/prune_head": [{"sparsity": 0.6, "method": "exact", "allocation": "uniform", "prune_head": True}],
    "exact/global/float64": [{"sparsity": 0.6, "method": "exact", "solver": {"dtype": torch.float64}}],
    "auto/global/collapse": [{"sparsity": 0.8, "method": "auto", "allocation": GlobalAllocation()}],
    "two_steps/exact_uniform_then_auto_global": [
        {"sparsity": 0.4, "method": "exact", "allocation": "uniform"},
        {"sparsity": 0.7, "method": "auto"},
    ],
    "two_steps/fast_then_lobs_sequential": [
        {"sparsity": 0.3, "method": "fast", "allocation": "uniform"},
        {"sparsity": 0.6, "method": "lobs", "allocation": "uniform", "sequential": True},
    ],
    "two_steps/uniform_then_2:4": [  # an error today: a 25% unstructured prior mask cannot hold 2:4
        {"sparsity": 0.25, "method": "exact", "allocation": "uniform"},
        {"method": "exact", "pattern": "2:4"},
    ],
    "two_steps/3:4_then_2:4": [{"method": "fast", "pattern": "3:4"}, {"method": "auto", "pattern": "2:4"}],
    "lobs/mapping/calibration_batches": [{"sparsity": {"*": 0.5}, "method": "lobs", "calibration_batches": 2}],
    "exact/uniform/no_bn_recalibration": [
        {"sparsity": 0.6, "method": "exact", "allocation": "uniform", "recalibrate_bn": False}
    ],
}
#: The README main job's prune (93%, global allocation, head pruned) on the real-size LeNet-300-100.
FULL_CASES: dict[str, list[dict[str, Any]]] = {
    f"{m}/global/prune_head": [{"sparsity": 0.93, "method": m, "prune_head": True}] for m in ("auto", "fast", "lobs")
}


def report_record(report: PruneReport, model: nn.Module) -> dict[str, Any]:
    """Everything of a report but wall-clock times, the model's state after the prune, and the masks."""
    layers = {
        name: {f.name: exact(getattr(r, f.name)) for f in dataclasses.fields(r) if f.name != "seconds"}
        for name, r in report.layers.items()
    }
    left_out = {"calibration_seconds", "solve_seconds", "masks", "layers"}  # timings; masks and layers: above
    fields = {f.name: exact(getattr(report, f.name)) for f in dataclasses.fields(report) if f.name not in left_out}
    state = {
        k: {"sha256": tensor_sha256(v), "sum": repr(v.double().sum().item())} for k, v in model.state_dict().items()
    }
    masks = report.masks
    return {
        "metrics": {k: repr(v) for k, v in report.metrics().items()},
        "layers": layers,
        "report": fields,
        "state_dict": state,
        "masks": {name: tensor_sha256(masks[name]) for name in masks},
        "table_lines": len(report.table().splitlines()),
    }


def one_prune(model_name: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    model, batches = build(model_name)
    masks = MaskSet()
    out: dict[str, Any] = {}
    for i, kwargs in enumerate(steps):
        kw = dict(kwargs)
        if isinstance(kw.get("solver"), dict):
            kw["solver"] = SolverOptions(**kw["solver"])
        seeded(100 + i)
        rec = captured(lambda kw=kw: report_record(prune_model(model, batches, masks=masks, **kw), model))
        out[f"step{i}"] = rec
        if "error" in rec:
            break
    return out


def snapshot_prunes(log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model_name in ("lenet300", "lenet5", "resnet", "gpt2", "lenet300_full"):
        t0 = time.perf_counter()
        for case, steps in (FULL_CASES if model_name == "lenet300_full" else PRUNE_CASES).items():
            out[f"{model_name}/{case}"] = one_prune(model_name, steps)
        log(f"prunes {model_name}: {time.perf_counter() - t0:.1f}s")
    return out


# --------------------------------------------------------------------------- c) the examples


MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"


def example_commands(out: Path) -> dict[str, list[str]]:
    """The quickest runs of the examples (the flags tests/test_data_examples.py and test_examples_deep.py use)."""
    py, ex, mnist = sys.executable, REPO / "examples", str(MNIST_DIR)
    quick_lenet = [
        "--epochs",
        "1",
        "--retrain-epochs",
        "1",
        "--no-sweep",
        "--calibration-batches",
        "2",
        "--limit-train-batches",
        "5",
        "--data-dir",
        mnist,
        "--no-download",
        "--threads",
        "1",
    ]
    return {
        "lenet300": [py, str(ex / "lenet300_mnist.py"), *quick_lenet, "--out", str(out / "lenet300")],
        "lenet300_fast": [
            py,
            str(ex / "lenet300_mnist.py"),
            *quick_lenet,
            "--method",
            "fast",
            "--out",
            str(out / "lenet300_fast"),
        ],
        "lenet5": [py, str(ex / "lenet5_mnist.py"), *quick_lenet, "--out", str(out / "lenet5")],
        "resnet": [
            py,
            str(ex / "resnet_mnist.py"),
            "--quick",
            "--data-dir",
            mnist,
            "--threads",
            "1",
            "--out",
            str(out / "resnet"),
        ],
        "gpt2": [py, str(ex / "gpt2_stdlib.py"), "--quick", "--threads", "1", "--out", str(out / "gpt2")],
    }


_DURATION = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?\s?(?:s|ms|min)\b")
# Keys of the examples' results JSON that hold durations, the machine, versions, or the command with its paths.
_TIMING_KEY = re.compile(
    r"(^|_)(s|seconds|secs|time|times|t)$|seconds|wall|elapsed"
    r"|^(versions|args|command|machine|memory|dense_source)$"
)


def strip_timings(lines: list[str]) -> list[str]:
    """Printed lines with durations (``12.3s``) and the cells of table columns named for a time replaced by <t>."""
    out: list[str] = []
    timed: list[int] = []  # columns of the current markdown table whose header names a time
    for line in lines:
        line = _DURATION.sub("<t>", line).rstrip()
        if line.startswith("|"):
            cells = line.split("|")
            if not timed:  # the header row: kept as printed
                timed = [i for i, c in enumerate(cells) if re.search(r"\btime\b|seconds|\bs\b", c)] or [-1]
            else:
                line = "|".join("<t>" if i in timed and not set(c) <= set("-: ") else c for i, c in enumerate(cells))
        else:
            timed = []
        if line:
            out.append(line)
    return out


def placeholders(text: str, out_dir: str) -> str:
    """``text`` with the run's folders replaced, so checkouts at other paths compare equal."""
    return text.replace(out_dir, "<out>").replace(str(MNIST_DIR), "<mnist>").replace(str(REPO), "<repo>")


def without_timings(value: Any, out_dir: str) -> Any:
    """A results JSON with timing, machine, version and command entries removed and the folders replaced."""
    if isinstance(value, dict):
        out = {k: without_timings(v, out_dir) for k, v in value.items() if not _TIMING_KEY.search(str(k))}
        if "val_curve" in out:  # GPT-2's (step, nll, elapsed seconds) points: the seconds go
            out["val_curve"] = [point[:2] for point in out["val_curve"]]
        return out
    if isinstance(value, list):
        return [without_timings(v, out_dir) for v in value]
    if isinstance(value, str):
        return placeholders(value, out_dir)
    return exact(value)


def run_example(name: str, cmd: list[str], out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        MPLBACKEND="Agg",
    )
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True)
    log(f"example {name}: rc {proc.returncode}, {time.perf_counter() - t0:.1f}s")
    lines = strip_timings([placeholders(line, str(out)) for line in proc.stdout.splitlines()])
    rec: dict[str, Any] = {
        "command": [placeholders(c, str(out)) for c in cmd],
        "returncode": proc.returncode,
        "stdout": lines,
    }
    if proc.returncode != 0:
        rec["stderr_tail"] = proc.stderr[-3000:]
    target = out / name
    for path in (target / "results.json", Path(str(target) + ".json")):
        if path.is_file():
            rec["results"] = without_timings(json.loads(path.read_text()), str(out))
    return rec


def snapshot_examples(log: Callable[[str], None], only: list[str] | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lobs_snapshot_") as tmp:
        out = Path(tmp)
        cmds = example_commands(out)
        return {name: run_example(name, cmd, out, log) for name, cmd in cmds.items() if not only or name in only}


# --------------------------------------------------------------------------- compare


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flatten(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        for i, v in enumerate(value):
            yield from flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, value


def compare(a: dict[str, Any], b: dict[str, Any], ignore: list[str]) -> int:
    """Print every difference between two snapshots; returns the count (``meta`` differences are notes only)."""
    for key in sorted(set(a.get("meta", {})) | set(b.get("meta", {}))):
        va, vb = a.get("meta", {}).get(key), b.get("meta", {}).get(key)
        if va != vb:
            flag = "  <- solves depend on the thread count: compare like with like" if key == "threads" else ""
            print(f"note: meta/{key}: {va!r} -> {vb!r}{flag}")
    fa = dict(flatten({k: v for k, v in a.items() if k != "meta"}))
    fb = dict(flatten({k: v for k, v in b.items() if k != "meta"}))
    diffs = 0
    for path in sorted(set(fa) | set(fb)):
        if any(path.startswith(p) for p in ignore):
            continue
        if path not in fa or path not in fb:
            print(f"{'only in B' if path not in fa else 'only in A'}: {path} = {fa.get(path, fb.get(path))!r}")
            diffs += 1
        elif fa[path] != fb[path]:
            print(f"differs: {path}\n    A: {fa[path]!r}\n    B: {fb[path]!r}")
            diffs += 1
    print(f"{diffs} difference(s) over {len(set(fa) | set(fb))} entries")
    return diffs


# --------------------------------------------------------------------------- main


def meta(threads: int, seconds: dict[str, float]) -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            check=False,
            cwd=Path(lightning_lobs.__file__).parent,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "format": FORMAT_VERSION,
        "lightning_lobs_file": lightning_lobs.__file__,
        "commit": commit,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("write", "examples"):
        s = sub.add_parser(name)
        s.add_argument("out")
        s.add_argument("--threads", type=int, default=1, help="torch threads (compare snapshots of equal counts)")
    sub.choices["write"].add_argument("--only", choices=("solves", "prunes"), default=None)
    sub.choices["examples"].add_argument("--only", nargs="*", default=None, help="example names to run")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--ignore", action="append", default=[], help="leave out entries whose path starts with this")
    args = p.parse_args(argv)
    if args.cmd == "compare":
        a, b = (json.loads(Path(x).read_text()) for x in (args.a, args.b))
        return 1 if compare(a, b, args.ignore) else 0
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    snap: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    parts: dict[str, Callable[[], dict[str, Any]]] = (
        {"examples": lambda: snapshot_examples(log, args.only)}
        if args.cmd == "examples"
        else {"solves": snapshot_solves, "prunes": lambda: snapshot_prunes(log)}
    )
    for part, fn in parts.items():
        if args.cmd == "write" and args.only and part != args.only:
            continue
        t0 = time.perf_counter()
        snap[part] = fn()
        seconds[part] = time.perf_counter() - t0
        log(f"{part}: {len(snap[part])} cases, {seconds[part]:.1f}s")
    snap["meta"] = meta(args.threads, seconds)
    Path(args.out).write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
