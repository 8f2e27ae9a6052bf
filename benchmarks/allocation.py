"""The global allocation for `fast`/`lobs` layers, measured error curves vs one-pass costs.

    python benchmarks/allocation.py --data-dir ../shared/data/mnist --seeds 0 1 2 --out benchmarks/results/allocation_lenet300.json
    python benchmarks/allocation.py --net resnet --width 8 --sparsity 0.8 --calibration 1024 --train-images 20000 \
        --no-uniform --data-dir ../shared/data/mnist --seeds 0 1 2 --out benchmarks/results/allocation_resnet.json
    python benchmarks/allocation.py --layer-times resnet50 --out benchmarks/results/allocation_layer_times_resnet50.json

For every seed: train the net dense on the full MNIST training set (or its first ``--train-images``;
plain PyTorch loop, Adam lr 1e-3, batch 128, shuffled with the seed, ``--epochs`` epochs), then, from the SAME
dense weights each time, prune one-shot to ``--sparsity`` with ``prune_model`` calibrated on the
first ``--calibration`` training images (unshuffled, batches of 256), and measure test accuracy
(10,000 images) with no retraining. Runs:

* ``exact global``: ``method="exact"``, default ``allocation="global"`` (trace costs).
* ``<m> global``: ``method=m`` (fast / lobs), default allocation: ``GlobalAllocation()`` (curve costs).
* ``<m> one-pass``: ``allocation=GlobalAllocation(costs="one-pass")``: the pooled one-pass ``L_q``.
* ``<m> exact split``: ``method=m`` with ``sparsity`` = the per-layer sparsities ``exact global`` chose
  (a mapping, so the solver is the only difference).
* ``<m> uniform``: every layer at ``--sparsity``.
* ``global magnitude``: keep the ``(1 - s) N`` largest ``|w|`` over all Linear/Conv weights (ResNet: then
  BatchNorm statistics re-estimated on the calibration images, as ``prune_model`` does after its prune).

Writes every raw number (accuracies, per-layer sparsities, prune seconds) to ``--out`` and a Markdown
table (mean ± std over seeds) to ``<out stem>.md``. One process; set ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import torch
from lobs_lab.harness import train_epochs
from lobs_lab.metrics import correct_count
from lobs_lab.mnist import load_mnist
from lobs_lab.models import BasicBlock, lenet300_100
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lobs import GlobalAllocation, prune_model
from lightning_lobs.batchnorm import recalibrate_batchnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_resnet(width: int = 8) -> nn.Module:
    """A small ResNet for 28x28 MNIST: stem conv 3x3 (1->w), three stages of two BasicBlocks
    (w, 2w, 4w channels; stride 2 at stages 2 and 3 with 1x1 projection shortcuts), global
    average pool, Linear(4w, 10). BatchNorm after every conv, no conv bias; 16 prunable layers
    (stem, 12 block convs, 2 shortcuts, fc); w = 8: 44,064 weights."""

    layers: list[nn.Module] = [nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for cout, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
        layers += [BasicBlock(cin, cout, stride, project=True), BasicBlock(cout, cout, 1, project=True)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10)]
    return nn.Sequential(*layers)


def prunable(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def test_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy in percent (the model is left in eval mode, as the prunes that follow expect)."""
    return 100.0 * correct_count(model, x, y, batch=1000) / len(y)


def global_magnitude(model: nn.Module, s: float) -> None:
    mods = prunable(model)
    allw = torch.cat([m.weight.detach().abs().reshape(-1) for m in mods.values()])
    k = int(round(s * allw.numel()))
    thr = torch.kthvalue(allw, k).values if k > 0 else -1.0
    with torch.no_grad():
        for m in mods.values():
            m.weight.mul_(m.weight.abs() > thr)


def layer_cost_times(model_name: str, out: str, curve_rows: int, levels: int, max_d: int | None = None) -> None:
    """Seconds of the allocation's per-layer costs on a torchvision ``model_name``'s layer shapes (random H).

    For every distinct (rows, d) of its Conv/Linear layers (timed once, counted as often as it occurs):
    the one-pass costs (``obs_scores`` + ``output_energy``, what ``costs="one-pass"`` computes), the
    curve (``error_curve`` at the default grid on ``curve_rows`` rows), and the ``fast`` solve itself at
    90% (``solve_layer``, default options, refit included where automatic). float32 solves like the
    library's default; H = B B^T / k + 0.1 I with B (d x min(d, 256)) Gaussian (timings do not depend on
    the values). Layers with more than ``max_d`` columns are left out (and listed).
    """
    import torchvision

    from lightning_lobs.solvers import SolverOptions, error_curve, obs_scores, output_energy, solve_layer

    model = getattr(torchvision.models, model_name)(weights=None, num_classes=1000)
    shapes: dict[tuple, int] = {}
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            key = (
                m.weight.shape[0] // getattr(m, "groups", 1),
                m.weight[0].numel() + (m.bias is not None),
                m.bias is not None,
            )
            shapes[key] = shapes.get(key, 0) + 1
    skipped = [k for k in shapes if max_d is not None and k[1] > max_d]
    for k in skipped:
        print(f"left out: {k[0]} x {k[1]} (x{shapes.pop(k)})")
    grid = GlobalAllocation(levels=levels).sparsity_grid()
    rows_out = []
    tot = {"one_pass": 0.0, "curve": 0.0, "fast_solve": 0.0}
    for (rows, D, bias), count in sorted(shapes.items(), key=lambda kv: kv[0][1]):
        g = torch.Generator().manual_seed(rows * 7 + D)
        k = min(D, 256)
        B = torch.randn(D, k, generator=g)
        H = B @ B.T / k + 0.1 * torch.eye(D)
        W = torch.randn(rows, D, generator=g) / math.sqrt(D)
        w, b = (W[:, :-1], W[:, -1]) if bias else (W, None)
        t = time.perf_counter()
        obs_scores(w, H, bias=b)
        output_energy(w, H, bias=b)
        t_one = time.perf_counter() - t
        t = time.perf_counter()
        error_curve(w, H, grid, bias=b, solver=SolverOptions(), sample_rows=curve_rows)
        t_curve = time.perf_counter() - t
        t = time.perf_counter()
        solve_layer(w, H, 0.9, "fast", bias=b)
        t_fast = time.perf_counter() - t
        rows_out.append(
            {"rows": rows, "d": D, "count": count, "one_pass_s": t_one, "curve_s": t_curve, "fast_solve_s": t_fast}
        )
        tot["one_pass"] += count * t_one
        tot["curve"] += count * t_curve
        tot["fast_solve"] += count * t_fast
        print(
            f"{rows:5d} x {D:5d} (x{count:2d}): one-pass {t_one:6.2f} s  curve {t_curve:6.2f} s  fast solve {t_fast:6.2f} s",
            flush=True,
        )
    result = {
        "model": model_name,
        "curve_rows": curve_rows,
        "levels": len(grid),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "layers": rows_out,
        "totals_s": tot,
        "loadavg": os.getloadavg(),
        "left_out": [list(k[:2]) for k in skipped],
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"{model_name} totals: one-pass {tot['one_pass']:.1f} s, curve {tot['curve']:.1f} s, fast solves {tot['fast_solve']:.1f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", choices=["lenet300", "resnet"], default="lenet300")
    ap.add_argument(
        "--layer-times",
        default=None,
        metavar="TORCHVISION_MODEL",
        help="instead: time the allocation's per-layer costs on that model's layer shapes (e.g. resnet50)",
    )
    ap.add_argument("--max-d", type=int, default=None, help="--layer-times: leave out layers with more columns")
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data", "mnist"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="default: 8 (lenet300), 1 (resnet)")
    ap.add_argument("--sparsity", type=float, default=0.93)
    ap.add_argument("--calibration", type=int, default=4096)
    ap.add_argument("--methods", nargs="+", default=["fast", "lobs"])
    ap.add_argument("--width", type=int, default=8, help="resnet: channels of the first stage")
    ap.add_argument(
        "--train-images", type=int, default=None, help="train on the first N training images (default: all)"
    )
    ap.add_argument("--no-uniform", action="store_true", help="skip the uniform-allocation runs")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "allocation_lenet300.json"))
    args = ap.parse_args()
    if args.layer_times:
        defaults = GlobalAllocation()
        layer_cost_times(args.layer_times, args.out, defaults.curve_rows, defaults.levels, args.max_d)
        return
    epochs = args.epochs if args.epochs is not None else (8 if args.net == "lenet300" else 1)
    warnings.filterwarnings("ignore")
    splits = load_mnist(data_dir=args.data_dir)
    flat = args.net == "lenet300"
    prep = (lambda t: t.reshape(t.shape[0], -1)) if flat else (lambda t: t)  # noqa: E731
    xtr, ytr, xte, yte = prep(splits.train_x), splits.train_y, prep(splits.test_x), splits.test_y
    calib = DataLoader(TensorDataset(xtr[: args.calibration], ytr[: args.calibration]), batch_size=256, shuffle=False)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "?"
    meta = {
        "net": args.net,
        "width": args.width if args.net == "resnet" else None,
        "epochs": epochs,
        "train_images": args.train_images or int(len(ytr)),
        "sparsity": args.sparsity,
        "calibration": args.calibration,
        "data": splits.source,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "commit": commit,
        "cmd": " ".join(sys.argv),
    }
    results: dict[str, Any] = {"meta": meta, "runs": []}
    s = args.sparsity
    for seed in args.seeds:
        torch.manual_seed(seed)
        dense = lenet300_100() if flat else small_resnet(args.width)
        t0 = time.perf_counter()
        ntr = args.train_images or len(ytr)
        train_epochs(dense, xtr[:ntr], ytr[:ntr], epochs, seed, batch=128)
        t_train = time.perf_counter() - t0
        state = {k: v.clone() for k, v in dense.state_dict().items()}
        base = test_accuracy(dense, xte, yte)
        print(f"seed {seed}: dense {base:.2f}% ({t_train:.0f} s training)", flush=True)
        results["runs"].append({"seed": seed, "run": "dense", "acc": base, "seconds": t_train})

        def fresh() -> nn.Module:
            m = lenet300_100() if flat else small_resnet(args.width)
            m.load_state_dict(state)
            return m

        def record(name: str, model: nn.Module, seconds: float, report: Any = None) -> dict[str, float]:
            acc = test_accuracy(model, xte, yte)
            per = {n: float((m.weight == 0).float().mean()) for n, m in prunable(model).items()}
            total = sum(int((m.weight == 0).sum()) for m in prunable(model).values()) / sum(
                m.weight.numel() for m in prunable(model).values()
            )
            results["runs"].append(
                {"seed": seed, "run": name, "acc": acc, "seconds": seconds, "layers": per, "sparsity": total}
            )
            show = (
                ", ".join(f"{v:.3f}" for v in per.values()) if len(per) <= 6 else f"max layer {max(per.values()):.3f}"
            )
            print(f"  {name:<22} {acc:6.2f}%  sparsity {total:.4f}  [{show}]  {seconds:.1f} s", flush=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
            return per

        def run(name: str, method: str, sparsity: Any, **kw: Any) -> dict[str, float]:
            m = fresh()
            t = time.perf_counter()
            rep = prune_model(m, calib, sparsity, method, **kw, prune_head=True)
            return record(name, m, time.perf_counter() - t, rep)

        split = run("exact global", "exact", s)
        for meth in args.methods:
            run(f"{meth} global", meth, s)
            run(f"{meth} one-pass", meth, s, allocation=GlobalAllocation(costs="one-pass"))
            run(f"{meth} exact split", meth, split)
            if not args.no_uniform:
                run(f"{meth} uniform", meth, s, allocation="uniform")
        m = fresh()
        t = time.perf_counter()
        global_magnitude(m, s)
        if not flat:  # BatchNorm statistics re-estimated on the calibration images, as prune_model does
            recalibrate_batchnorm(m, list(calib), lambda b: m(b[0]))
        record("global magnitude", m, time.perf_counter() - t)
    write_table(results, os.path.splitext(args.out)[0] + ".md")


def write_table(results: dict[str, Any], path: str) -> None:
    runs = results["runs"]
    names: list[str] = []
    for r in runs:
        if r["run"] not in names:
            names.append(r["run"])
    lines = [
        f"{results['meta']['net']}, one-shot at {results['meta']['sparsity']}, seeds "
        f"{sorted({r['seed'] for r in runs})}, test accuracy % (mean ± std) and mean per-layer sparsity",
        "",
        "| run | accuracy | per-layer sparsity (mean over seeds) | prune s |",
        "|---|---|---|---|",
    ]
    for n in names:
        rs = [r for r in runs if r["run"] == n]
        accs = [r["acc"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        layers = ""
        if rs[0].get("layers"):
            keys = list(rs[0]["layers"])
            means = [statistics.mean(r["layers"][k] for r in rs) for k in keys]
            layers = (
                ", ".join(f"{v:.3f}" for v in means)
                if len(keys) <= 6
                else f"min {min(means):.3f}, max {max(means):.3f}"
            )
        secs = statistics.mean(r["seconds"] for r in rs)
        lines.append(f"| {n} | {statistics.mean(accs):.2f} ± {sd:.2f} | {layers} | {secs:.1f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
