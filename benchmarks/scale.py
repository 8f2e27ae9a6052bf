"""How pruning scales: whole-network one-shot prune time and memory, solve time against layer width, DDP ranks.

    python benchmarks/scale.py --quick                      # smoke test
    python benchmarks/scale.py                              # all parts -> benchmarks/results/scale.json
    python benchmarks/scale.py --parts prune,sweep,ddp      # choose parts

(a) ``prune``: torchvision resnet18 / resnet50 (``num_classes=10, weights=None``: random init, nothing pretrained
    exists offline; timings of ``fast`` do not depend on the weight values) pruned one-shot to 90% with
    ``prune_model(method="fast")`` on CPU; calibration images are real MNIST digits (load_mnist, bilinearly resized
    to SxS, repeated to 3 channels). Calibration and solve seconds come from the PruneReport; the wall time of the
    whole ``prune_model`` call (which also re-estimates BatchNorm and measures output errors) is given too. Each
    model runs in its own child process: peak RSS is the child's ``ru_maxrss``; the parent also polls the child's
    RSS and kills it above ``--rss-limit-gib`` (this machine's RAM is shared). VGG-16 at 3x224x224 with
    ``CalibrationOptions(hessian_dtype=float32)``: first with fc6 (``classifier.0``, 4096 x 25,089) and the library's
    memory check set to ``--rss-limit-gib``; if that refuses, again with fc6 excluded, and fc6's solve is projected
    from a ``fast`` solve of a (4096/k) x (25089/k) layer, k = ``--fc6-proxy-scale`` (time x k^3, memory x k^2).
(b) ``sweep``: ``solve_layer`` time for d in ``--sweep-d`` with rows = d, a random correlated H (H = X^T X / n with
    X = Z (I + G/sqrt(d)), n = 2d Gaussian samples) and sparsity ``--sweep-sparsity``, for lobs / exact / fast.
    exact (rows*d^3 = d^4) and lobs run on a row subset where the full layer would exceed the cap, and are
    extrapolated linearly in rows (labelled). Exponent of time vs d fitted on the largest points. GFLOP/s of fast
    from the count d^3/3 (Cholesky) + d^3/3 (inverse) + 2 rows d^2 (updates), against torch.mm 2048x2048 float32
    measured in the same run.
(c) ``ddp``: benchmarks/ddp_scale.py with devices=1 and devices=2 (strategy="ddp"), LOBSPruning on an MLP.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lobs_lab.harness import Stopwatch, current_rss_gib, gemm_gflops, loadavg, machine_info, peak_rss_gib, write_json
from lobs_lab.mnist import mnist_images

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

HERE = Path(__file__).resolve()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- child processes


def run_child(
    cmd: list[str], out: Path, limit_gib: float, timeout: float, threads: int | None = None
) -> dict[str, Any]:
    """Run ``cmd`` (which writes JSON to ``out``), polling its RSS; kill it above ``limit_gib`` or after ``timeout``."""
    if out.exists():
        out.unlink()
    log("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    load0 = loadavg()
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op thread count in the child
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    polled = 0.0
    killed = None
    while proc.poll() is None:
        rss = current_rss_gib(proc.pid)
        if rss == rss:
            polled = max(polled, rss)
        if rss > limit_gib:
            killed = f"RSS {rss:.2f} GiB > limit {limit_gib} GiB"
        elif time.perf_counter() - t0 > timeout:
            killed = f"timeout {timeout:.0f}s"
        if killed:
            proc.kill()
            proc.wait()
            break
        time.sleep(0.2)
    info: dict[str, Any] = {
        "OMP_NUM_THREADS": threads,
        "returncode": proc.returncode,
        "wall_seconds": time.perf_counter() - t0,
        "polled_peak_rss_gib": polled,
        "load": [load0, loadavg()],
        "killed": killed,
    }
    if out.exists():
        info.update(json.loads(out.read_text()))
    log(
        f"  -> rc={proc.returncode} wall={info['wall_seconds']:.1f}s polled peak RSS {polled:.2f} GiB"
        + (f" KILLED: {killed}" if killed else "")
    )
    return info


def child_prune(args) -> None:
    """One prune_model run (in its own process)."""
    import torchvision

    from lightning_lobs import CalibrationOptions, prune_model

    res: dict[str, Any] = {
        "model": args.model,
        "input": f"3x{args.size}x{args.size}",
        "batches": args.batches,
        "batch_size": args.batch_size,
        "method": args.method,
        "hessian_dtype": args.hessian_dtype,
        "exclude": args.exclude,
        "memory_budget_gib": args.budget_gib,
        "torch_threads": torch.get_num_threads(),
    }
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None, num_classes=10).eval()
    n = args.batches * args.batch_size
    tx, _, _, _, source = mnist_images(args.size, limit=n)  # only the images used: no 224x224 copy of all 4,000
    batches = [tx[i : i + args.batch_size].clone() for i in range(0, n, args.batch_size)]
    del tx
    res["data"] = source
    res["rss_before_gib"] = current_rss_gib()
    cal = CalibrationOptions(
        hessian_dtype=getattr(torch, args.hessian_dtype),
        position_stride=args.position_stride,
        memory_budget_bytes=int(args.budget_gib * 2**30) if args.budget_gib else None,
    )
    load0 = loadavg()
    t0 = time.perf_counter()
    try:
        rep = prune_model(
            model,
            batches,
            sparsity=0.9,
            method=args.method,
            calibration=cal,
            exclude=[e for e in args.exclude.split(",") if e],
            prune_head=True,
        )
    except MemoryError as err:
        res.update(
            {
                "error": f"MemoryError: {err}",
                "seconds_until_error": time.perf_counter() - t0,
                "peak_rss_gib": peak_rss_gib(),
                "load": [load0, loadavg()],
            }
        )
        write_json(Path(args.child_out), res)
        return
    wall = time.perf_counter() - t0
    layers = sorted(rep.layers.values(), key=lambda r: -r.seconds)
    res.update(
        {
            "prune_model_wall_seconds": wall,
            "calibration_seconds": rep.calibration_seconds,
            "solve_seconds": rep.solve_seconds,
            "other_seconds": wall - rep.calibration_seconds - rep.solve_seconds,
            "layers_pruned": len(rep.layers),
            "methods": sorted({r.method for r in rep.layers.values()}),
            "sparsity": rep.sparsity,
            "slowest_layers": [
                {"name": r.name, "shape": list(r.shape), "seconds": r.seconds, "damp": r.damp} for r in layers[:6]
            ],
            "layers_needing_more_damping": [r.name for r in rep.layers.values() if r.damp > 0.01 + 1e-12],
            "sum_layer_seconds": sum(r.seconds for r in rep.layers.values()),
            "peak_rss_gib": peak_rss_gib(),
            "load": [load0, loadavg()],
        }
    )
    write_json(Path(args.child_out), res)


def child_fc6proxy(args) -> None:
    """fast solve of a 4096 x d layer with a float32 H (rank-deficient, as fc6's), timing and peak memory."""
    from lightning_lobs.solvers import solve_layer

    d, rows = args.d, args.rows
    torch.manual_seed(0)
    n = min(2048, d)
    X = torch.randn(n, d)
    H = (X.T @ X / n).unsqueeze(0)  # float32, rank <= n
    del X
    W = torch.randn(rows, d - 1) * 0.01
    b = torch.zeros(rows)
    rss0 = current_rss_gib()
    load0 = loadavg()
    t0 = time.perf_counter()
    res = solve_layer(W, H, 0.9, "fast", bias=b)
    secs = time.perf_counter() - t0
    write_json(
        Path(args.child_out),
        {
            "rows": rows,
            "d": d,
            "hessian_dtype": "float32",
            "seconds": secs,
            "rss_before_solve_gib": rss0,
            "peak_rss_gib": peak_rss_gib(),
            "solve_peak_minus_before_gib": peak_rss_gib() - rss0,
            "damp": res.damp,
            "load": [load0, loadavg()],
            "torch_threads": torch.get_num_threads(),
        },
    )


# --------------------------------------------------------------------------- parts


def part_prune(args, result: dict[str, Any]) -> None:
    out: dict[str, Any] = {}
    result["prune"] = out
    tmp = RESULTS / "_scale_child.json"
    py = [sys.executable, str(HERE)]
    if args.quick:
        plan = [
            ("resnet18", 64, 1, 4, "float64", "", None),
            ("resnet50", 64, 1, 4, "float64", "", None),
            ("vgg16", 64, 1, 2, "float32", "", args.rss_limit_gib),
        ]
    else:
        plan = [
            ("resnet18", 64, 4, 16, "float64", "", None),
            ("resnet50", 64, 4, 16, "float64", "", None),
            ("vgg16", 224, 2, 4, "float32", "", args.rss_limit_gib),
        ]
    for model, size, nb, bs, hdt, excl, budget in plan:
        cmd = py + [
            "--child",
            "prune",
            "--model",
            model,
            "--size",
            str(size),
            "--batches",
            str(nb),
            "--batch-size",
            str(bs),
            "--method",
            "fast",
            "--hessian-dtype",
            hdt,
            "--child-out",
            str(tmp),
        ]
        if budget:
            cmd += ["--budget-gib", str(budget)]
        if excl:
            cmd += ["--exclude", excl]
        key = f"{model}_{size}"
        info = run_child(cmd, tmp, args.rss_limit_gib, args.child_timeout, args.threads)
        info["command"] = " ".join(cmd[1:]).replace(str(HERE), "benchmarks/scale.py").replace(str(tmp), "<tmp>")
        out[key] = info
        write_json(args.out, result)
        if model == "vgg16" and ("error" in info or info.get("killed")):
            cmd2 = [c for c in cmd]
            cmd2 += ["--exclude", "classifier.0"]
            info2 = run_child(cmd2, tmp, args.rss_limit_gib, args.child_timeout, args.threads)
            info2["command"] = " ".join(cmd2[1:]).replace(str(HERE), "benchmarks/scale.py").replace(str(tmp), "<tmp>")
            out[key + "_without_fc6"] = info2
            write_json(args.out, result)
    k = 16.0 if args.quick else args.fc6_proxy_scale
    d, rows = round(25089 / k), round(4096 / k)
    cmd = py + ["--child", "fc6proxy", "--d", str(d), "--rows", str(rows), "--child-out", str(tmp)]
    info = run_child(cmd, tmp, args.rss_limit_gib, args.child_timeout, args.threads)
    if "seconds" in info:
        info["projection_to_fc6"] = {
            "rows": 4096,
            "d": 25089,
            "scale_k": k,
            "seconds_x_k3": info["seconds"] * k**3,
            "solve_extra_memory_gib_x_k2": info["solve_peak_minus_before_gib"] * k**2,
            "hessian_float32_gib": 25089**2 * 4 / 2**30,
            "note": "rows and d both shrunk by k, so every d^3 and rows*d^2 term of the time shrinks by k^3 and every d^2 "
            "and rows*d term of the memory by k^2 (the per-column Python loop, ~d, is the exception); the "
            "projected peak is the caller's float32 H plus the solve's extra memory",
        }
    out["fc6_proxy"] = info
    if tmp.exists():
        tmp.unlink()
    write_json(args.out, result)
    # The spectral norms prune_model computes for every layer's report (bounds.operator_norm, float64 SVD).
    from torch import nn

    from lightning_lobs.bounds import operator_norm

    norms = []
    shapes = [(64, 128)] if args.quick else [(512, 4608), (4096, 4096)]
    for out_f, in_f in shapes:
        W = torch.randn(out_f, in_f)
        with Stopwatch() as sw:
            operator_norm(nn.Linear(in_f, out_f, bias=False), W, "spectral")
        with Stopwatch() as sw2:
            v = torch.randn(in_f)
            for _ in range(30):  # power iteration on W^T W, float32, for comparison
                v = W.T @ (W @ v)
                v = v / v.norm()
        norms.append(
            {
                "shape": [out_f, in_f],
                "operator_norm_spectral_seconds": sw.seconds,
                "power_iteration_30_f32_seconds": sw2.seconds,
                "load": [sw.load_before, sw2.load_after],
            }
        )
        log(f"  operator_norm spectral {out_f}x{in_f}: {sw.seconds:.2f}s (30-step power iteration {sw2.seconds:.3f}s)")
    out["operator_norm_timing"] = norms
    write_json(args.out, result)


def sym_h(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = 2 * d
    Z = torch.randn(n, d, generator=g)
    A = torch.eye(d) + torch.randn(d, d, generator=g) / math.sqrt(d)
    X = Z @ A
    return (X.T.double() @ X.double() / n).unsqueeze(0)


def part_sweep(args, result: dict[str, Any]) -> None:
    from lightning_lobs.solvers import solve_layer

    other = 2 if torch.get_num_threads() == 1 else 1
    nt0 = torch.get_num_threads()
    torch.set_num_threads(other)
    gem_other = gemm_gflops()
    torch.set_num_threads(nt0)
    out: dict[str, Any] = {
        "sparsity": args.sweep_sparsity,
        "threads": nt0,
        "gemm_gflops_f32_before": gemm_gflops(),
        "gemm_gflops_f64_before": gemm_gflops(dtype=torch.float64),
        "other_threads": other,
        f"gemm_gflops_f32_{other}_threads": gem_other,
        "runs": [],
    }
    result["sweep"] = out
    ds = [128, 256] if args.quick else args.sweep_d
    cap = 20.0 if args.quick else args.sweep_cap_seconds
    prev: dict[str, tuple] = {}
    for d in ds:
        H = sym_h(d, d)
        W = torch.randn(d, d, generator=torch.Generator().manual_seed(d + 1))
        for method in ("fast", "lobs", "exact"):
            rows = d
            if (
                method in prev
            ):  # predict the full-rows time from the previous d: t ~ rows * d^3 (exact), rows * d^2 (lobs)
                pd, prow, psec = prev[method]
                power = 3 if method == "exact" else 2
                predicted = psec / prow * d * (d / pd) ** power
                if predicted > cap:
                    rows = max(8, min(d, 2 ** int(math.floor(math.log2(d * args.sweep_subset_seconds / predicted)))))
            with Stopwatch() as sw:
                solve_layer(W[:rows], H, args.sweep_sparsity, method)
            full = sw.seconds * d / rows
            prev[method] = (d, rows, sw.seconds)
            rec = {
                "d": d,
                "rows_total": d,
                "method": method,
                "rows_run": rows,
                "seconds_run": sw.seconds,
                "seconds_full": full,
                "extrapolated": rows < d,
                "load": [sw.load_before, sw.load_after],
            }
            if method == "fast":
                flops = d**3 / 3 + d**3 / 3 + 2 * d * d * d
                rec["gflop_count"] = flops / 1e9
                rec["gflops"] = flops / sw.seconds / 1e9
                torch.set_num_threads(other)
                try:
                    with Stopwatch() as sw1:
                        solve_layer(W, H, args.sweep_sparsity, method)
                finally:
                    torch.set_num_threads(nt0)
                rec[f"seconds_{other}_threads"] = sw1.seconds
            out["runs"].append(rec)
            log(
                f"  d={d} {method:<5} rows {rows}/{d}: {sw.seconds:.2f}s"
                + (f" -> full {full:.1f}s (linear in rows)" if rows < d else "")
                + (
                    f" {rec['gflops']:.1f} GFLOP/s ({other} threads: {rec[f'seconds_{other}_threads']:.2f}s)"
                    if method == "fast"
                    else ""
                )
                + f" load {sw.load_after}"
            )
            write_json(args.out, result)
    out["gemm_gflops_f32_after"] = gemm_gflops()
    fits = {}
    for method in ("fast", "lobs", "exact"):
        pts = [(r["d"], r["seconds_full"]) for r in out["runs"] if r["method"] == method]
        if len(pts) >= 2:
            (d1, t1), (d2, t2) = pts[-2], pts[-1]
            big = [p for p in pts if p[0] >= (pts[-3][0] if len(pts) >= 3 else pts[0][0])]
            lx = [math.log(p[0]) for p in big]
            ly = [math.log(p[1]) for p in big]
            mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
            slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
            fits[method] = {
                "exponent_last_two": math.log(t2 / t1) / math.log(d2 / d1),
                "exponent_lsq_last3": slope,
                "expected": 4 if method == "exact" else 3,
            }
    out["fits"] = fits
    gem = out["gemm_gflops_f32_before"]
    for r in out["runs"]:
        if "gflops" in r:
            r["fraction_of_gemm"] = r["gflops"] / gem
    write_json(args.out, result)


def part_inverse(args, result: dict[str, Any]) -> None:
    """Time of the d x d part that every solve_layer call pays once (damping + Cholesky + cholesky_inverse, the
    library's inverse_with_damping), to separate it from the per-row work when extrapolating row subsets; and
    cholesky_inverse against cholesky_solve(I) on the same factor."""
    from lightning_lobs import solvers as S

    out: list[dict[str, Any]] = []
    result["inverse"] = {"threads": torch.get_num_threads(), "runs": out}
    for d in [128, 256] if args.quick else args.sweep_d:
        H = sym_h(d, d)
        with Stopwatch() as sw:
            S.inverse_with_damping(H, S.SolverOptions())
        Hd, _ = S.damped_hessian(H, 0.01, torch.float32)
        A = Hd[0]
        with Stopwatch() as sc:
            L = torch.linalg.cholesky(A)
        with Stopwatch() as si:
            inv1 = torch.cholesky_inverse(L)
        with Stopwatch() as ss:
            inv2 = torch.cholesky_solve(torch.eye(d), L)
        rec = {
            "d": d,
            "inverse_with_damping_seconds": sw.seconds,
            "cholesky_seconds": sc.seconds,
            "cholesky_inverse_seconds": si.seconds,
            "cholesky_solve_identity_seconds": ss.seconds,
            "max_abs_diff": float((inv1 - inv2).abs().max()),
            "load": [sw.load_before, ss.load_after],
        }
        out.append(rec)
        log(
            f"  d={d}: inverse_with_damping {sw.seconds:.2f}s; cholesky {sc.seconds:.2f}s, cholesky_inverse {si.seconds:.2f}s, "
            f"cholesky_solve(I) {ss.seconds:.2f}s (max diff {rec['max_abs_diff']:.1e}) load {ss.load_after}"
        )
        write_json(args.out, result)


def part_ddp(args, result: dict[str, Any]) -> None:
    out: dict[str, Any] = {}
    result["ddp"] = out
    # 1 rank with torch's default 2 threads, 1 rank with 1 thread, 2 DDP ranks (Lightning sets 1 thread per rank).
    for devices, threads in ((1, 2), (1, 1), (2, None)):
        tmp = RESULTS / f"_ddp_{devices}.json"
        cmd = [sys.executable, str(HERE.parent / "ddp_scale.py"), "--devices", str(devices), "--out", str(tmp)]
        if args.quick:
            cmd += ["--hidden", "128", "--cal-batches-total", "2", "--batch", "64"]
        info = run_child(cmd, tmp, args.rss_limit_gib, args.ddp_timeout, threads)
        out[f"devices_{devices}" + (f"_omp{threads}" if threads else "")] = info
        if tmp.exists():
            tmp.unlink()
        write_json(args.out, result)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--parts", default="prune,sweep,ddp")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--rss-limit-gib", type=float, default=11.5)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for the sweep and the prune children "
        "(1 by default: on this shared, oversubscribed 2-core box 2-thread OpenMP regions stall the solvers' step loops)",
    )
    p.add_argument("--child-timeout", type=float, default=900)
    p.add_argument("--ddp-timeout", type=float, default=420)
    p.add_argument("--fc6-proxy-scale", type=float, default=3.0, help="fc6 proxy: rows 4096/k, d 25089/k")
    p.add_argument("--sweep-d", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--sweep-sparsity", type=float, default=0.7)
    p.add_argument(
        "--sweep-cap-seconds",
        type=float,
        default=120.0,
        help="run a row subset when the full layer is predicted to take longer",
    )
    p.add_argument("--sweep-subset-seconds", type=float, default=30.0, help="target seconds of the row-subset run")
    # child-only options
    p.add_argument("--child", choices=["prune", "fc6proxy"], default=None)
    p.add_argument("--child-out", default=None)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--method", default="fast")
    p.add_argument("--hessian-dtype", default="float64")
    p.add_argument("--position-stride", type=int, default=1)
    p.add_argument("--budget-gib", type=float, default=None)
    p.add_argument("--exclude", default="")
    p.add_argument("--d", type=int, default=8193)
    p.add_argument("--rows", type=int, default=4096)
    args = p.parse_args(argv)
    if args.child == "prune":
        return child_prune(args)
    if args.child == "fc6proxy":
        return child_fc6proxy(args)
    args.out = args.out or RESULTS / ("scale_quick.json" if args.quick else "scale.json")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "rss_limit_gib": args.rss_limit_gib,
    }
    log(f"machine: {result['machine']}")
    for part in [p for p in args.parts.split(",") if p]:
        log(f"part {part} (load {loadavg()})")
        {"prune": part_prune, "sweep": part_sweep, "ddp": part_ddp, "inverse": part_inverse}[part](args, result)
    result["wall_seconds"] = time.perf_counter() - t0
    result["machine"]["loadavg_at_end"] = loadavg()
    write_json(args.out, result)
    log(f"done in {result['wall_seconds']:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
