"""Layer reconstruction quality of the OBS solvers on bigger layers (ResNet-18, VGG-16) against magnitude baselines.

    python benchmarks/layers.py --quick        # smoke test (minutes)
    python benchmarks/layers.py                # the real run -> benchmarks/results/layers.json

For each chosen Linear/Conv layer of torchvision ``resnet18(num_classes=10)`` and ``vgg16(num_classes=10)``
(``weights=None``: nothing pretrained exists offline) the nets are first trained briefly on real MNIST
(``lobs_lab.mnist.load_mnist()``: the 4,000 train digits, resized bilinearly to SxS and repeated to 3
channels; ResNet-18 at S=64, VGG-16 at S=32), then the layer-input Hessians ``H = 1/n sum x~ x~^T`` are
collected in float64 with ``HessianCollector`` from real calibration images through the trained nets.
Every method prunes the same weights and is scored by the relative output error

    rel = ||(W^ - W) X~||_F / ||W X~||_F = sqrt(dE / (1/2 tr(W~ H W~^T)))

(``W~`` = weight with the bias column, ``dE`` = lightning_lobs.solvers.layer_error with the undamped H).
Methods (``solve_layer``, float32 solve, damp 0.01; ``refit`` pinned so the rows do not depend on the automatic
cost limit): ``lobs`` (the paper's ranking, jointly compensated: ``refit=True``, the library default where
affordable), ``lobs-literal`` (``refit=False``: one-by-one corrections with the stale ``H^-1``), ``exact``,
``fast`` (SparseGPT as published, ``refit=False``), ``fast+refit`` (SparseGPT's mask, kept weights refitted:
``refit=True``, the library default where affordable), ``magnitude`` (largest |w| kept layer-wide, no update)
and ``magnitude+refit`` (same mask, kept weights refitted with ``lightning_lobs.solvers.refit``).

Layers whose exact cost rows*d^3 exceeds ``--exact-full-max`` are evaluated, for ALL methods, on one random
subset of output rows (``--subset-rows``, or ``--subset-rows-large`` when d >= ``--large-d``): exact's per-row
budgets, lobs's layer-wide ranking, fast's per-block masks and the magnitude threshold then all act within that
subset. On those layers fast and magnitude (and lobs where rows*d^2 <= ``--lobs-full-max``) are also run on the
full layer.

``exact`` is traced once per layer and its per-row budgets are allocated for every sparsity from that one trace
(the greedy trace runs every row to the end independently of the sparsity, so this is what ``solve_layer`` does,
minus the repeated trace); the code uses the library's private pieces in the same order as ``solve_layer`` and
checks that the result matches ``solve_layer(method="exact")`` on every layer where that is cheap. The seconds
reported for exact are trace + allocation + refit, i.e. one ``solve_layer`` call.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from lobs_lab.harness import Stopwatch, loadavg, machine_info, peak_rss_gib, write_json
from lobs_lab.metrics import tensor_accuracy
from lobs_lab.mnist import mnist_images
from torch import Tensor, nn

from lightning_lobs.hessian import HessianCollector
from lightning_lobs.layers import weight_matrix
from lightning_lobs.solvers import SolverOptions, layer_error, magnitude_mask, refit, solve_layer
from lightning_lobs.solvers.core import inverse_with_damping, row_chunk, row_groups
from lightning_lobs.solvers.exact import allocate_rows
from lightning_lobs.solvers.trace import greedy_rows

RESULTS = Path(__file__).resolve().parent / "results"

NETS = {
    # name: (input size, layers, optimizer lr)
    "resnet18": (
        64,
        [
            "conv1",
            "layer1.0.conv1",
            "layer2.0.conv1",
            "layer2.0.downsample.0",
            "layer3.1.conv2",
            "layer4.1.conv2",
            "fc",
        ],
        1e-3,
    ),
    "vgg16": (32, ["features.0", "features.10", "features.28", "classifier.3"], 1e-4),
}
QUICK_LAYERS = {"resnet18": ["conv1", "layer1.0.conv1", "fc"], "vgg16": ["features.0", "features.5"]}
METHODS = ("lobs", "lobs-literal", "exact", "fast", "fast+refit", "magnitude", "magnitude+refit")
#: solve_layer method and SolverOptions.refit of the OBS variants other than exact
VARIANTS = {
    "lobs": ("lobs", True),
    "lobs-literal": ("lobs", False),
    "fast": ("fast", False),
    "fast+refit": ("fast", True),
}


def build(net: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, net)(weights=None, num_classes=10)


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float, batch: int, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses: list[float] = []
    perm = torch.randperm(len(x), generator=gen)
    pos = 0
    with Stopwatch() as sw:
        for _ in range(steps):
            if pos + batch > len(x):
                perm, pos = torch.randperm(len(x), generator=gen), 0
            idx = perm[pos : pos + batch]
            pos += batch
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    model.eval()
    k = max(1, len(losses) // 10)
    return {
        "steps": steps,
        "batch": batch,
        "optimizer": f"Adam(lr={lr})",
        "seconds": sw.seconds,
        "load": [sw.load_before, sw.load_after],
        "loss_first10pct": sum(losses[:k]) / k,
        "loss_last10pct": sum(losses[-k:]) / k,
    }


def rel_error(W: Tensor, W_new: Tensor, H: Tensor, base: float) -> float:
    return math.sqrt(max(layer_error(W, W_new, H), 0.0) / base)


def split(W_aug: Tensor, frozen: int):
    return (W_aug[:, :-1], W_aug[:, -1]) if frozen else (W_aug, None)


def achieved(mask: Tensor, frozen: int) -> float:
    m = mask[:, : mask.shape[1] - frozen] if frozen else mask
    return 1.0 - m.float().mean().item()


class ExactTracer:
    """``exact`` traced once, budgets allocated per sparsity: the steps of solve_layer(method="exact")
    for an unstructured pattern without a prior mask, in the same order, on the library's private pieces."""

    def __init__(self, W_aug: Tensor, H: Tensor, frozen: int, opts: SolverOptions) -> None:
        t0 = time.perf_counter()
        self.opts, self.frozen, self.H = opts, frozen, H
        self.work = W_aug.to(opts.dtype)
        _Hd, Hinv, self.damp, dead = inverse_with_damping(H, opts)
        del _Hd
        rows, d = self.work.shape
        steps = d - frozen
        gidx = row_groups(rows, Hinv.shape[0], self.work.device)
        chunk = row_chunk(rows, d, self.work.element_size(), opts.max_memory_bytes)
        orders, incs = [], []
        for start in range(0, rows, chunk):
            sl = slice(start, start + chunk)
            Hrows = Hinv[gidx[sl]].contiguous()
            o, i = greedy_rows(self.work[sl], Hrows, dead[gidx[sl]], steps, None, frozen, opts.lazy_steps, None)
            del Hrows
            orders.append(o)
            incs.append(i)
        self.order, self.inc = torch.cat(orders), torch.cat(incs)
        self.trace_seconds = time.perf_counter() - t0

    def solve(self, sparsity: float):
        t0 = time.perf_counter()
        rows, d = self.work.shape
        dp = d - self.frozen
        counts = allocate_rows(self.inc, int(round(sparsity * rows * dp)))
        taken = torch.arange(dp).unsqueeze(0) < counts.unsqueeze(1)
        mask = torch.ones(rows, d, dtype=torch.bool)
        mask.scatter_(1, self.order, ~taken)
        new = refit(self.work, self.H, mask, replace(self.opts, damp=self.damp))
        return new, mask, time.perf_counter() - t0


def evaluate(
    W_aug: Tensor, H: Tensor, frozen: int, sparsities, methods, opts: SolverOptions, label: str, check_exact: bool, log
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    base = layer_error(W_aug, torch.zeros_like(W_aug), H)
    weight, bias = split(W_aug, frozen)
    tracer: ExactTracer | None = None
    for method in methods:
        for s in sparsities:
            load0 = loadavg()
            extra: dict[str, Any] = {}
            if method in VARIANTS:
                solver_method, with_refit = VARIANTS[method]
                t0 = time.perf_counter()
                res = solve_layer(weight, H, s, solver_method, bias=bias, solver=replace(opts, refit=with_refit))
                new = torch.cat([res.weight, res.bias.unsqueeze(1)], 1) if frozen else res.weight
                mask = torch.cat([res.mask, torch.ones(len(res.mask), 1, dtype=torch.bool)], 1) if frozen else res.mask
                secs = time.perf_counter() - t0
            elif method == "exact":
                if tracer is None:
                    tracer = ExactTracer(W_aug, H, frozen, opts)
                    extra["trace_seconds"] = tracer.trace_seconds
                new, mask, fin = tracer.solve(s)
                secs = tracer.trace_seconds + fin
                extra["allocate_refit_seconds"] = fin
                if check_exact:
                    ref = solve_layer(weight, H, s, "exact", bias=bias, solver=opts)
                    ref_new = torch.cat([ref.weight, ref.bias.unsqueeze(1)], 1) if frozen else ref.weight
                    same_mask = bool((ref.mask == (mask[:, :-1] if frozen else mask)).all())
                    close = bool(torch.allclose(ref_new, new.to(ref_new.dtype), rtol=1e-4, atol=1e-6))
                    extra["matches_solve_layer"] = same_mask and close
                    if not (same_mask and close):
                        log(
                            f"  WARNING exact tracer differs from solve_layer at s={s} (mask equal {same_mask}, weights close {close})"
                        )
            else:
                t0 = time.perf_counter()
                mask = magnitude_mask(W_aug, s, None, frozen)
                new = W_aug * mask
                if method == "magnitude+refit":
                    new = refit(W_aug, H, mask, opts)
                secs = time.perf_counter() - t0
            rel = rel_error(W_aug, new, H, base)
            row = {
                "set": label,
                "method": method,
                "sparsity": s,
                "rel_error": rel,
                "seconds": secs,
                "achieved_sparsity": achieved(mask, frozen),
                "load": [load0, loadavg()],
                **extra,
            }
            out.append(row)
            log(
                f"  [{label}] {method:<16} s={s:.2f} rel={rel:.4f} t={secs:7.2f}s sp={row['achieved_sparsity']:.4f} load={loadavg()}"
            )
    return out


def run_net(net: str, args, log) -> dict[str, Any]:
    size, layer_names, lr = NETS[net]
    if args.quick:
        layer_names = QUICK_LAYERS[net]
    if args.layers:
        layer_names = [n for n in args.layers.split(",") if n]
    tx, ty, vx, vy, source = mnist_images(size)
    model = build(net)
    steps = 3 if args.quick else args.train_steps
    acc0 = tensor_accuracy(model, vx[:200] if args.quick else vx, vy[:200] if args.quick else vy, batch=250)
    log(f"{net}: input 3x{size}x{size}, training {steps} steps of {args.batch} (load {loadavg()})")
    tr = train(model, tx, ty, steps, lr, args.batch)
    tr["test_accuracy_before"] = acc0
    tr["test_accuracy_after"] = tensor_accuracy(
        model, vx[:200] if args.quick else vx, vy[:200] if args.quick else vy, batch=250
    )
    tr["test_images"] = 200 if args.quick else len(vx)
    log(
        f"{net}: trained in {tr['seconds']:.1f}s, loss {tr['loss_first10pct']:.3f} -> {tr['loss_last10pct']:.3f}, "
        f"test acc {acc0:.3f} -> {tr['test_accuracy_after']:.3f}"
    )

    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(1)
    n_cal = 128 if args.quick else args.cal_images
    cal_idx = torch.randperm(len(tx), generator=gen)[:n_cal]
    collector = HessianCollector({n: modules[n] for n in layer_names}, dtype=torch.float64)
    with Stopwatch() as sw, torch.no_grad(), collector:
        for i in range(0, n_cal, args.cal_batch):
            model(tx[cal_idx[i : i + args.cal_batch]])
    hessians = collector.hessians()
    counts = {n: collector.accumulators[n].count for n in layer_names}
    del collector
    cal = {
        "images": n_cal,
        "batch": args.cal_batch,
        "seconds": sw.seconds,
        "load": [sw.load_before, sw.load_after],
        "hessian_rows": counts,
        "dtype": "float64",
    }
    log(f"{net}: calibrated {len(layer_names)} layers on {n_cal} images in {sw.seconds:.1f}s")

    sparsities = [0.5] if args.quick else args.sparsities
    opts = SolverOptions()
    layers_out = []
    for name in layer_names:
        mod = modules[name]
        W_aug = weight_matrix(mod).float()
        frozen = 1 if getattr(mod, "bias", None) is not None else 0
        H = hessians[name]
        rows, D = W_aug.shape
        cost = rows * float(D) ** 3
        ev = torch.linalg.eigvalsh(H[0])
        mean_diag = float(torch.diagonal(H[0]).mean())
        rank = {
            "eig_gt_1e-6_max": int((ev > 1e-6 * ev.max()).sum()),
            "eig_gt_damping": int((ev > opts.damp * mean_diag).sum()),
        }
        entry: dict[str, Any] = {
            "name": name,
            "kind": type(mod).__name__,
            "weight_shape": list(mod.weight.shape),
            "rows": rows,
            "d": D,
            "bias": bool(frozen),
            "exact_cost_rows_d3": cost,
            "hessian_rows": counts[name],
            "hessian_spectrum": rank,
            "load_start": loadavg(),
        }
        log(
            f"{net}.{name}: W {tuple(mod.weight.shape)} -> {rows} x {D} (bias col {bool(frozen)}), rows*d^3={cost:.3g}, "
            f"H from {counts[name]} rows, eigenvalues >1e-6*max: {rank['eig_gt_1e-6_max']}, "
            f"> damping (0.01*mean diag): {rank['eig_gt_damping']}"
        )
        evals: list[dict[str, Any]] = []
        check = cost <= args.check_exact_max
        if cost > args.exact_full_max:
            R = args.subset_rows_large if D >= args.large_d else args.subset_rows
            R = min(R, rows)
            idx = torch.randperm(rows, generator=torch.Generator().manual_seed(2)).narrow(0, 0, R).sort().values
            entry["subset_rows"] = R
            entry["subset_index_first"] = idx[:8].tolist()
            log(f"  subset of {R} rows (seed 2) for all methods")
            evals += evaluate(W_aug[idx], H, frozen, sparsities, METHODS, opts, f"subset{R}", check, log)
            full_methods = ["fast", "magnitude"] + (
                ["lobs-literal"] if rows * float(D) ** 2 <= args.lobs_full_max else []
            )
            evals += evaluate(W_aug, H, frozen, sparsities, full_methods, opts, "full", False, log)
        else:
            entry["subset_rows"] = None
            evals += evaluate(W_aug, H, frozen, sparsities, METHODS, opts, "full", check, log)
        entry["evals"] = evals
        entry["load_end"] = loadavg()
        layers_out.append(entry)
        args.result["nets"][net] = {
            "input": f"3x{size}x{size}",
            "data": source,
            "train": tr,
            "calibration": cal,
            "layers": layers_out,
            "partial": True,
        }
        write_json(args.out, args.result)
    return {"input": f"3x{size}x{size}", "data": source, "train": tr, "calibration": cal, "layers": layers_out}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 3 training steps, 128 calibration images, 2-3 small layers, s=0.5",
    )
    p.add_argument("--nets", default="resnet18,vgg16")
    p.add_argument("--layers", default="", help="comma-separated layer names (overrides the defaults; one net only)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    p.add_argument(
        "--train-steps",
        type=int,
        default=32,
        help="Adam steps of --batch images (32 x 64 = half an epoch of the 4,000 train digits)",
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cal-images", type=int, default=2048)
    p.add_argument("--cal-batch", type=int, default=128)
    p.add_argument(
        "--exact-full-max", type=float, default=2e12, help="rows*d^3 above which all methods run on a row subset"
    )
    p.add_argument("--subset-rows", type=int, default=64)
    p.add_argument("--subset-rows-large", type=int, default=16)
    p.add_argument("--large-d", type=int, default=4000)
    p.add_argument(
        "--lobs-full-max", type=float, default=2e9, help="rows*d^2 up to which lobs also runs on the full layer"
    )
    p.add_argument(
        "--check-exact-max",
        type=float,
        default=2e10,
        help="rows*d^3 up to which exact is cross-checked against solve_layer",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: on this shared, oversubscribed "
        "2-core box 2-thread OpenMP regions stall the solvers' step loops 10-100x)",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.exact_full_max = min(args.exact_full_max, 1e9)
        args.subset_rows = min(args.subset_rows, 8)
    args.out = args.out or RESULTS / ("layers_quick.json" if args.quick else "layers.json")
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/layers.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "machine": machine_info(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "result"},
        "nets": {},
    }
    args.result = result

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    log(f"machine: {result['machine']}")
    for net in [n for n in args.nets.split(",") if n]:
        result["nets"][net] = run_net(net, args, log)
        result["peak_rss_gib"] = peak_rss_gib()
        write_json(args.out, result)
    result["wall_seconds"] = time.perf_counter() - t_start
    result["peak_rss_gib"] = peak_rss_gib()
    result["machine"]["loadavg_at_end"] = loadavg()
    write_json(args.out, result)
    log(f"done in {result['wall_seconds']:.0f}s, peak RSS {result['peak_rss_gib']:.2f} GiB -> {args.out}")


if __name__ == "__main__":
    main()
