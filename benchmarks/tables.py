"""Print Markdown tables from benchmarks/results/layers.json and scale.json (used for layers.md / scale.md).

python benchmarks/tables.py layers [path]
python benchmarks/tables.py scale [path]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ["exact", "fast+refit", "fast", "lobs", "lobs-literal", "magnitude+refit", "magnitude"]


def layers_tables(path: Path) -> str:
    data = json.loads(path.read_text())
    lines = []
    for net, nd in data["nets"].items():
        tr, cal = nd["train"], nd["calibration"]
        lines.append(f"### {net} (input {nd['input']})\n")
        lines.append(
            f"Training: {tr['steps']} x {tr['batch']} images, {tr['optimizer']}, {tr['seconds']:.0f} s (load {tr['load'][0]} -> {tr['load'][1]}); "
            f"loss {tr['loss_first10pct']:.3f} -> {tr['loss_last10pct']:.3f}; test accuracy ({tr['test_images']} digits) "
            f"{tr['test_accuracy_before']:.3f} -> {tr['test_accuracy_after']:.3f}. Calibration: {cal['images']} train images, "
            f"{cal['seconds']:.0f} s.\n"
        )
        sps = sorted({e["sparsity"] for l in nd["layers"] for e in l["evals"]})
        head = (
            "| layer | W shape | rows x d | H rows / eig>damp | set | method | "
            + " | ".join(f"s={s:g}" for s in sps)
            + " | s/solve |"
        )
        lines.append(head)
        lines.append("|" + "---|" * (head.count("|") - 1))
        for l in nd["layers"]:
            sets = []
            for e in l["evals"]:
                if e["set"] not in sets:
                    sets.append(e["set"])
            for st in sets:
                for m in ORDER:
                    ev = {e["sparsity"]: e for e in l["evals"] if e["set"] == st and e["method"] == m}
                    if not ev:
                        continue
                    errs = " | ".join(f"{ev[s]['rel_error']:.4f}" if s in ev else "" for s in sps)
                    secs = [ev[s]["seconds"] for s in sps if s in ev]
                    t = (
                        f"{min(secs):.2f}-{max(secs):.2f}"
                        if max(secs) - min(secs) > 0.05 * max(secs) + 0.01
                        else f"{sum(secs) / len(secs):.2f}"
                    )
                    spec = l.get("hessian_spectrum") or {}
                    lines.append(
                        f"| {l['name']} | {'x'.join(map(str, l['weight_shape']))} | {l['rows']} x {l['d']} | "
                        f"{l['hessian_rows']} / {spec.get('eig_gt_damping', '')} | {st} | {m} | {errs} | {t} |"
                    )
        lines.append("")
    return "\n".join(lines)


def scale_tables(path: Path) -> str:
    d = json.loads(path.read_text())
    out = []
    if "prune" in d:
        out.append(
            "| model | input, calibration | H dtype | calibration s | solve s | other s | prune_model wall s | peak RSS GiB | layers | load |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for k, v in d["prune"].items():
            if k in ("fc6_proxy", "operator_norm_timing"):
                continue
            if "error" in v:
                out.append(
                    f"| {k} | {v.get('input')}, {v.get('batches')}x{v.get('batch_size')} | {v.get('hessian_dtype')} | refused before calibration: {v['error'][:160]}... | | | {v.get('seconds_until_error', 0):.1f} | {v.get('peak_rss_gib', 0):.2f} | | {v['load'][0]} |"
                )
                continue
            if v.get("killed"):
                out.append(
                    f"| {k} | | | KILLED: {v['killed']} after {v['wall_seconds']:.0f} s | | | | {v['polled_peak_rss_gib']:.2f} (polled) | | |"
                )
                continue
            out.append(
                f"| {k}{' (exclude ' + v['exclude'] + ')' if v.get('exclude') else ''} | {v['input']}, {v['batches']}x{v['batch_size']} | {v['hessian_dtype']} | "
                f"{v['calibration_seconds']:.1f} | {v['solve_seconds']:.1f} | {v['other_seconds']:.1f} | {v['prune_model_wall_seconds']:.1f} | "
                f"{v['peak_rss_gib']:.2f} | {v['layers_pruned']} | {v['load'][0]} -> {v['load'][1]} |"
            )
        out.append("")
    if "sweep" in d:
        sw = d["sweep"]
        ot = sw["other_threads"]
        gem_ot = sw[f"gemm_gflops_f32_{ot}_threads"]
        out.append(
            f"Sweep: sparsity {sw['sparsity']}, rows = d, {sw['threads']} thread(s); GEMM 2048^3 float32 {sw['gemm_gflops_f32_before']:.1f} GFLOP/s "
            f"(float64 {sw['gemm_gflops_f64_before']:.1f}; {ot} threads: {gem_ot:.1f}; "
            f"float32 after the sweep {sw.get('gemm_gflops_f32_after', float('nan')):.1f})\n"
        )
        out.append(
            "| d | method | rows run | seconds (run) | seconds (full layer) | fast GFLOP/s | fraction of GEMM | fast, other thread count | load |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in sw["runs"]:
            other = r.get(f"seconds_{ot}_threads")
            out.append(
                f"| {r['d']} | {r['method']} | {r['rows_run']} | {r['seconds_run']:.2f} | {r['seconds_full']:.1f}{' (extrapolated)' if r['extrapolated'] else ''} | "
                f"{r.get('gflops', float('nan')):.1f} | {r.get('fraction_of_gemm', float('nan')):.2f} | {'' if other is None else f'{other:.2f}'} | {r['load'][0]} |"
            )
        out.append("")
        for m, f in sw.get("fits", {}).items():
            out.append(
                f"- {m}: exponent (last two d) {f['exponent_last_two']:.2f}, least squares over the last three {f['exponent_lsq_last3']:.2f} (expected {f['expected']})"
            )
        out.append("")
    if "ddp" in d:
        out.append("| run | threads/rank | calibration s | solve s | fit wall s | per-layer seconds | load |")
        out.append("|---|---|---|---|---|---|---|")
        for k, v in d["ddp"].items():
            if "calibration_seconds" not in v:
                out.append(
                    f"| {k} | | failed/killed: {v.get('killed')} rc={v.get('returncode')} after {v['wall_seconds']:.0f} s | | | | |"
                )
                continue
            per = ", ".join(f"{n} {x['seconds']:.1f}" for n, x in v["layers"].items())
            out.append(
                f"| {k} | {v['torch_threads_rank0_at_epoch_start']} | {v['calibration_seconds']:.2f} | {v['solve_seconds']:.2f} | {v['fit_seconds']:.1f} | {per} | {v['load'][0]} -> {v['load'][1]} |"
            )
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    kind = sys.argv[1]
    path = Path(sys.argv[2]) if len(sys.argv) > 2 else RESULTS / f"{kind}.json"
    print(layers_tables(path) if kind == "layers" else scale_tables(path))
