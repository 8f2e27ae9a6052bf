"""Hessian accumulation precision on real activations: float64, float32, and "mixed" (float32 products, float64 sum).

    OMP_NUM_THREADS=1 python benchmarks/hessian_precision.py --out benchmarks/results/hessian_precision
    OMP_NUM_THREADS=1 python benchmarks/hessian_precision.py --quick        # smoke run

Two nets, trained briefly in this run (one thread): LeNet-300-100 on MNIST (``--data-dir``, ``lobs_lab.mnist``) and a
GPT-2 (``transformers`` config, byte vocabulary, ``lobs_lab.models.make_gpt2``) on the interpreter's stdlib source
(``lobs_lab.text``). Every prunable layer's inputs over the calibration set are captured batch by batch, then fed to a
fresh :class:`~lightning_lobs.hessian.HessianAccumulator` per precision:

* the relative error of H against a float64 brute force ``X~^T X~ / n`` (one float64 GEMM over all rows, bias
  column appended), in the Frobenius norm and entrywise relative to ``sqrt(H_ii H_jj)``;
* the accumulation time per calibration batch (the best of ``--repeats``);
* the solve: ``fast`` and ``exact`` (``exact`` only on layers with at most ``--exact-max-d`` columns) at
  ``--sparsity`` with each H: the fraction of mask entries that differ from the mask solved with the brute-force H,
  and the relative layer error ``tr(D H D^T) / tr(W H W^T)`` measured with the brute-force H.

Each net is measured at two calibration sizes (``--rows``), the longer one for the long sums.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lobs.hessian import HessianAccumulator
from lightning_lobs.layers import has_bias, is_prunable, weight_matrix
from lightning_lobs.solvers import solve_layer

PRECISIONS: dict[str, Any] = {"float64": torch.float64, "mixed": "mixed", "float32": torch.float32}


def capture(model: nn.Module, batches: list[Tensor], run: Callable[[Tensor], Any]) -> dict[str, list[Tensor]]:
    """Every prunable layer's inputs, batch by batch, as its forward pre-hook sees them."""
    seen: dict[str, list[Tensor]] = {}
    handles = []
    for name, mod in model.named_modules():
        if is_prunable(mod) and name != "lm_head":

            def hook(m: nn.Module, args: tuple, name: str = name) -> None:
                seen.setdefault(name, []).append(args[0].detach().clone())

            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            run(b)
    for h in handles:
        h.remove()
    return seen


def brute_force(module: nn.Module, inputs: list[Tensor]) -> Tensor:
    """float64 ``X~^T X~ / n`` from all rows at once (bias column appended)."""
    d = inputs[0].shape[-1]
    x = torch.cat([t.reshape(-1, d) for t in inputs]).double()
    if has_bias(module):
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    return (x.T @ x) / x.shape[0]


def accumulate(module: nn.Module, inputs: list[Tensor], precision: Any, repeats: int) -> tuple[Tensor, float]:
    """H from ``precision`` and the best per-batch time over ``repeats``."""
    best = math.inf
    h = None
    for _ in range(repeats):
        acc = HessianAccumulator(module, dtype=precision)
        t0 = time.perf_counter()
        for t in inputs:
            acc.add(t)
        h = acc.hessian()
        best = min(best, (time.perf_counter() - t0) / len(inputs))
    assert h is not None
    return h[0], best


def h_errors(h: Tensor, ref: Tensor) -> dict[str, float]:
    diff = h.double() - ref
    scale = torch.sqrt(torch.outer(ref.diagonal(), ref.diagonal())).clamp_min(1e-300)
    return {
        "rel_frobenius": float(diff.norm() / ref.norm()),
        "max_rel_entry": float((diff.abs() / scale).max()),
    }


def relative_error(w: Tensor, w_new: Tensor, ref: Tensor) -> float:
    d = (w_new - w).double()
    w64 = w.double()
    return float(((d @ ref) * d).sum() / ((w64 @ ref) * w64).sum())


def solve(module: nn.Module, h: Tensor, method: str, sparsity: float) -> tuple[Tensor, Tensor, float]:
    """(pruned matrix incl. bias column, keep-mask, seconds)."""
    w = weight_matrix(module).double()
    bias = has_bias(module)
    t0 = time.perf_counter()
    res = solve_layer(w[:, :-1] if bias else w, h.double(), sparsity, method, bias=w[:, -1] if bias else None)
    secs = time.perf_counter() - t0
    new = torch.cat([res.weight, res.bias.reshape(-1, 1)], dim=1) if bias else res.weight
    return new.double(), res.mask, secs


def measure(model: nn.Module, seen: dict[str, list[Tensor]], args: argparse.Namespace) -> dict[str, Any]:
    modules = dict(model.named_modules())
    out: dict[str, Any] = {}
    for name, inputs in seen.items():
        mod = modules[name]
        ref = brute_force(mod, inputs)
        rows = sum(t.reshape(-1, t.shape[-1]).shape[0] for t in inputs)
        rec: dict[str, Any] = {"d": ref.shape[0], "rows": rows, "batches": len(inputs), "precisions": {}}
        hs = {}
        for p, dt in PRECISIONS.items():
            h, secs = accumulate(mod, inputs, dt, args.repeats)
            hs[p] = h
            rec["precisions"][p] = {"secs_per_batch": secs, **h_errors(h, ref)}
        w = weight_matrix(mod).double()
        for method in args.methods:
            if method == "exact" and ref.shape[0] > args.exact_max_d:
                continue
            base, base_mask, base_secs = solve(mod, ref, method, args.sparsity)
            rec.setdefault("solve", {})[method] = {
                "brute_force": {"rel_error": relative_error(w, base, ref), "secs": base_secs}
            }
            for p, h in hs.items():
                new, mask, secs = solve(mod, h, method, args.sparsity)
                rec["solve"][method][p] = {
                    "rel_error": relative_error(w, new, ref),
                    "mask_differs": float((mask != base_mask).double().mean()),
                    "secs": secs,
                }
        out[name] = rec
        print(name, format_record(rec), flush=True)
    return out


def format_record(rec: dict[str, Any]) -> str:
    parts = [f"d={rec['d']} rows={rec['rows']}"]
    for p, v in rec["precisions"].items():
        parts.append(
            f"{p}: {v['secs_per_batch'] * 1e3:.2f} ms/batch fro {v['rel_frobenius']:.2e} ent {v['max_rel_entry']:.2e}"
        )
    for m, s in rec.get("solve", {}).items():
        parts.append(
            f"{m}: ref {s['brute_force']['rel_error']:.6g} "
            + " ".join(f"{p} {s[p]['rel_error']:.6g}/{s[p]['mask_differs']:.1e}" for p in PRECISIONS)
        )
    return " | ".join(parts)


# --------------------------------------------------------------------------- the nets


def lenet(args: argparse.Namespace) -> tuple[nn.Module, Tensor]:
    from lobs_lab.mnist import load_mnist
    from lobs_lab.models import lenet300_100

    torch.manual_seed(0)
    s = load_mnist(args.data_dir)
    net = lenet300_100()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = s.train_x, s.train_y
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(args.lenet_epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 128):
            idx = perm[i : i + 128]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((net(s.test_x).argmax(1) == s.test_y).double().mean())
    print(f"LeNet-300-100: {args.lenet_epochs} epochs in {time.perf_counter() - t0:.0f} s, test accuracy {acc:.4f}")
    return net.eval(), s.train_x


def gpt2(args: argparse.Namespace) -> tuple[nn.Module, Tensor]:
    from lobs_lab.models import make_gpt2
    from lobs_lab.text import eval_windows, load_stdlib_corpus

    torch.manual_seed(0)
    corpus = load_stdlib_corpus()
    model = make_gpt2(args.gpt2_layers, args.gpt2_width, max(1, args.gpt2_width // 64), args.context)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    train = corpus.tokens["train"]
    t0 = time.perf_counter()
    for _ in range(args.gpt2_steps):
        starts = torch.randint(0, train.numel() - args.context - 1, (args.gpt2_batch,), generator=g)
        win = torch.stack([train[s : s + args.context + 1] for s in starts.tolist()]).long()
        logits = model(win[:, :-1]).logits
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(
        f"GPT-2 {args.gpt2_layers}x{args.gpt2_width}: {args.gpt2_steps} steps in {time.perf_counter() - t0:.0f} s, last loss {float(loss):.3f}"
    )
    windows = eval_windows(corpus.tokens["validation"], args.context, max(args.rows) // args.context + 1)
    return model.eval(), windows[:, : args.context].long()


def width_timings(args: argparse.Namespace) -> dict[str, Any]:
    """Accumulation time per batch of ``--batch-rows`` rows at GPT-2 124M's input widths (random inputs: the time
    does not depend on the values)."""
    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(0)
    for d in args.timing_widths:
        lin = nn.Linear(d, 8)
        inputs = [torch.randn(args.batch_rows, d, generator=g) for _ in range(args.timing_batches)]
        out[str(d)] = {p: accumulate(lin, inputs, dt, args.repeats)[1] for p, dt in PRECISIONS.items()}
        print(f"d={d}: " + ", ".join(f"{p} {v * 1e3:.1f} ms/batch" for p, v in out[str(d)].items()), flush=True)
    return out


def lenet_prune(model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """The README main job's one-shot prune (``prune_model`` at ``--prune-sparsity``, its defaults: ``auto``,
    global allocation; 32 batches of 128 training images) of the same dense net with each precision: test accuracy
    and the keep-masks' agreement with the float64 prune."""
    import copy

    from lobs_lab.mnist import load_mnist

    from lightning_lobs import CalibrationOptions, prune_model

    s = load_mnist(args.data_dir)
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(s.train_x.shape[0], generator=g)[: 32 * 128]
    batches = [s.train_x[idx[i : i + 128]] for i in range(0, idx.numel(), 128)]
    out: dict[str, Any] = {}
    masks: dict[str, dict[str, Tensor]] = {}
    for p, dt in PRECISIONS.items():
        net = copy.deepcopy(model)
        t0 = time.perf_counter()
        prune_model(
            net, batches, args.prune_sparsity, calibration=CalibrationOptions(hessian_dtype=dt), prune_head=True
        )
        secs = time.perf_counter() - t0
        with torch.no_grad():
            acc = float((net(s.test_x).argmax(1) == s.test_y).double().mean())
        masks[p] = {n: m.weight != 0 for n, m in net.named_modules() if isinstance(m, nn.Linear)}
        differ = sum(int((masks[p][n] != masks["float64"][n]).sum()) for n in masks[p])
        out[p] = {"test_accuracy": acc, "mask_entries_differing": differ, "seconds": secs}
        print(
            f"prune_model({args.prune_sparsity}) hessian_dtype={p}: test accuracy {acc:.4f}, {differ} mask entries "
            f"differ from float64's, {secs:.1f} s",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="results prefix (writes <out>.json)")
    p.add_argument("--data-dir", default=os.environ.get("MNIST_DIR", "/work/shared/data/mnist"))
    p.add_argument("--nets", default="lenet,gpt2")
    p.add_argument("--rows", default="4096,32768", help="calibration rows (samples / tokens), comma separated")
    p.add_argument("--batch-rows", type=int, default=512, help="rows per calibration batch")
    p.add_argument("--lenet-epochs", type=int, default=2)
    p.add_argument("--gpt2-layers", type=int, default=4)
    p.add_argument("--gpt2-width", type=int, default=256)
    p.add_argument("--gpt2-steps", type=int, default=200)
    p.add_argument("--gpt2-batch", type=int, default=8)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--methods", default="fast,exact")
    p.add_argument("--exact-max-d", type=int, default=320)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timing-widths", default="768,3072", help="input widths of the random-input timing ('' = none)")
    p.add_argument("--timing-batches", type=int, default=4)
    p.add_argument("--prune-sparsity", type=float, default=0.93, help="LeNet one-shot prune (0 = skip)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    args.rows = [int(v) for v in args.rows.split(",")]
    args.methods = args.methods.split(",")
    args.timing_widths = [int(v) for v in args.timing_widths.split(",") if v]
    if args.quick:
        args.rows, args.lenet_epochs, args.gpt2_steps, args.repeats = [1024], 1, 5, 1
        args.gpt2_layers, args.gpt2_width, args.exact_max_d, args.timing_widths = 1, 64, 120, [256]
    torch.set_num_threads(1)
    from lobs_lab.harness import machine_info, write_json

    results: dict[str, Any] = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items()}}
    if args.timing_widths:
        print(f"--- accumulation time per batch of {args.batch_rows} random rows")
        results["width_timings"] = width_timings(args)
    for net_name in [n for n in args.nets.split(",") if n]:
        model, data = lenet(args) if net_name == "lenet" else gpt2(args)
        if net_name == "lenet" and args.prune_sparsity > 0:
            results["lenet_prune"] = lenet_prune(model, args)
        per_row = 1 if net_name == "lenet" else args.context
        for rows in args.rows:
            samples = rows // per_row
            step = max(1, args.batch_rows // per_row)
            batches = [data[i : i + step] for i in range(0, samples, step)]
            seen = capture(model, batches, model)
            print(f"--- {net_name}, {rows} rows in {len(batches)} batches")
            results[f"{net_name}_{rows}"] = measure(model, seen, args)
    if args.out:
        write_json(args.out + ".json", results)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
