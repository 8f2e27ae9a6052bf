"""The ``admm`` solver against the peers' own code on LLM-like layers: time and layer error.

    OMP_NUM_THREADS=1 python benchmarks/admm_vs_peers.py \
        --alps-repo /work/.mirror/mazumder-lab+ALPS/repo --sparsegpt-repo /work/.mirror/IST-DASLab+sparsegpt/repo \
        --layers 768x768 --out benchmarks/results/admm_vs_peers.json

On the same weight and Hessian, one torch thread:

* ``sparsegpt``: SparseGPT's own ``sparsegpt.py`` (``SparseGPT.fasterprune``, blocksize 128, 1% damping), its
  ``torch.cuda.synchronize()`` dropped when loading (it needs a GPU driver; nothing else of it does);
* ``alps``: ALPS's own ``alps.py`` (``ALPS_prune.ALPS_admm`` with its defaults, rho 0.1), its hard-coded
  ``'cuda:0'`` patched to ``'cpu'`` and its ``torch.cuda.synchronize()`` calls dropped when loading;
* ``exact`` / ``fast``: ``solve_layer`` with the library defaults (``exact`` only on layers up to ``--exact-max``
  weights: it takes minutes beyond);
* ``fast_sweep``: ``fast`` without the refit (``SolverOptions(refit=False)``: SparseGPT's sweep alone);
* ``fast_before``: ``fast`` as 0.3.0 ran it, for before/after: the direct per-row refit where it cost at most 2e11
  flops (``refit=True``), none elsewhere;
* ``admm``: :func:`lightning_lobs.solvers.admm.admm_prune` with its defaults.

The peers' files are read at run time from the fetched git snapshots (``git --git-dir=REPO show HEAD:file``) and
executed as modules; nothing of theirs is copied into this repository. Their ``import transformers`` needs the
``transformers`` package.

Layers are LLM-like: ``n`` calibration tokens ``x = z (0.3 I + G / sqrt(d))`` with ``z``, ``G`` standard Gaussian
(correlated inputs), then 1% of the input channels multiplied by 20 (outlier channels); ``W`` Gaussian with
variance ``1/d``. The error is the relative layer error ``tr(D H D^T) / tr(W H W^T)`` with ``D = W^ - W`` and the
undamped ``H = X^T X / n``, in float64 for every method (the solves are deterministic: every repeat gives the same
error). Times (wall, and CPU time of the process: ``cpu_seconds``) are the median of ``--repeats`` interleaved runs;
``admm_over_alps_time`` is the median of the per-repeat ratios; ``fast_over_sparsegpt_cpu`` the median of the
per-repeat CPU-time ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lightning_lobs.solvers import SolverOptions, layer_error, solve_layer  # noqa: E402
from lightning_lobs.solvers.admm import admm_prune  # noqa: E402

TARGETS: dict[str, tuple[float | None, str | None]] = {
    "50%": (0.5, None),
    "70%": (0.7, None),
    "2:4": (None, "2:4"),
}


def git_show(repo: str, path: str) -> str:
    """A file of the snapshot's HEAD commit (the mirrors are bare git directories, no work tree)."""
    return subprocess.run(
        ["git", "--git-dir", repo, "show", f"HEAD:{path}"], check=True, capture_output=True, text=True
    ).stdout


def load_module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = f"<{name} from git>"
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - the peer's code, run as-is
    return module


def load_peers(alps_repo: str, sparsegpt_repo: str) -> tuple[types.ModuleType, types.ModuleType]:
    """ALPS's ``alps.py`` and SparseGPT's ``sparsegpt.py`` (with its ``quant.py``), patched to run on the CPU."""
    alps_src = git_show(alps_repo, "alps.py")
    alps_src = (
        alps_src.replace("'cuda:0'", "'cpu'").replace('"cuda:0"', '"cpu"').replace("torch.cuda.synchronize()", "None")
    )
    alps = load_module("alps_peer", alps_src)
    load_module("quant", git_show(sparsegpt_repo, "quant.py"))
    sparsegpt_src = git_show(sparsegpt_repo, "sparsegpt.py").replace("torch.cuda.synchronize()", "None")
    sparsegpt = load_module("sparsegpt_peer", sparsegpt_src)
    return alps, sparsegpt


def llm_layer(rows: int, d: int, tokens: int, seed: int) -> tuple[Tensor, Tensor]:
    """A float32 weight and the float64 Hessian ``X^T X / n`` of correlated inputs with 1% outlier channels."""
    g = torch.Generator().manual_seed(seed)
    mix = 0.3 * torch.eye(d) + torch.randn(d, d, generator=g) / d**0.5
    X = torch.randn(tokens, d, generator=g) @ mix
    X[:, torch.randperm(d, generator=g)[: max(1, d // 100)]] *= 20.0
    W = torch.randn(rows, d, generator=g) / d**0.5
    X64 = X.double()
    return W, X64.T @ X64 / tokens


def run_sparsegpt(mod: types.ModuleType, W: Tensor, H: Tensor, sparsity: float | None, nm: str | None) -> Tensor:
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer.weight.data = W.clone()
    pruner = mod.SparseGPT(layer)
    pruner.H = (2 * H).float()  # their add_batch accumulates 2/n X^T X
    n, m = (int(v) for v in nm.split(":")) if nm else (0, 0)
    with contextlib.redirect_stdout(io.StringIO()):
        pruner.fasterprune(
            sparsity if sparsity is not None else n / m, prunen=n, prunem=m, blocksize=128, percdamp=0.01
        )
    return layer.weight.data.clone()


def run_alps(mod: types.ModuleType, W: Tensor, H: Tensor, sparsity: float | None, nm: str | None) -> Tensor:
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer.weight.data = W.clone()
    pruner = mod.ALPS_prune(layer, nsamples=1, seqlen=1)
    pruner.XtX = H.float().clone()
    n, m = (int(v) for v in nm.split(":")) if nm else (0, 0)
    with contextlib.redirect_stdout(io.StringIO()):
        pruner.ALPS_admm(sp=sparsity if sparsity is not None else 1 - n / m, nm_n=n, nm_m=m, rho=0.1)
    return layer.weight.data.clone()


def timed(fn: Callable[[], Tensor]) -> tuple[float, float, Tensor]:
    """``(wall s, CPU s, result)``: CPU time (this process, one thread) is the steadier number on a shared machine."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def measure(peers: tuple[Any, Any], shape: tuple[int, int], target: str, args: argparse.Namespace) -> dict[str, Any]:
    alps, sparsegpt = peers
    sparsity, nm = TARGETS[target]
    W, H = llm_layer(shape[0], shape[1], args.tokens, args.seed)
    energy = float(torch.einsum("ri,ij,rj->", W.double(), H, W.double()))
    kw: dict[str, Any] = {"pattern": nm} if nm else {"sparsity": sparsity}
    # fast as it was before the CG refit (0.3.0): the direct refit where it cost at most 2e11 flops, none elsewhere
    kept = shape[1] * (1.0 - (sparsity if sparsity is not None else 0.5))
    before = SolverOptions(refit=shape[0] * kept**3 / 3 <= 2e11)
    runs: dict[str, Callable[[], Tensor]] = {
        "sparsegpt": lambda: run_sparsegpt(sparsegpt, W, H, sparsity, nm),
        "alps": lambda: run_alps(alps, W, H, sparsity, nm),
        "fast": lambda: solve_layer(W, H.float(), method="fast", **kw).weight,
        "fast_sweep": lambda: solve_layer(W, H.float(), method="fast", solver=SolverOptions(refit=False), **kw).weight,
        "fast_before": lambda: solve_layer(W, H.float(), method="fast", solver=before, **kw).weight,
        "admm": lambda: admm_prune(W, H.float(), **kw).weight,
    }
    if shape[0] * shape[1] <= args.exact_max:
        runs["exact"] = lambda: solve_layer(W, H.float(), method="exact", **kw).weight
    row: dict[str, Any] = {
        "shape": list(shape),
        "target": target,
        "seconds": {},
        "error": {},
        "sparsity": {},
        "all_seconds": {},
        "cpu_seconds": {},
        "all_cpu_seconds": {},
    }
    names = [name for name in args.methods if name in runs]
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits every method alike
        for name in names:
            seconds, cpu, new = timed(runs[name])
            row["all_seconds"].setdefault(name, []).append(seconds)
            row["all_cpu_seconds"].setdefault(name, []).append(cpu)
            row["error"][name] = 2 * layer_error(W, new, H) / energy
            row["sparsity"][name] = float((new == 0).double().mean())
    for name in names:
        row["seconds"][name] = statistics.median(row["all_seconds"][name])
        row["cpu_seconds"][name] = statistics.median(row["all_cpu_seconds"][name])
        print(
            f"{shape[0]}x{shape[1]} {target:4s} {name:9s} {row['seconds'][name]:8.2f} s ({row['cpu_seconds'][name]:.2f} "
            f"CPU s)  rel. error "
            f"{row['error'][name]:.4f}  sparsity {row['sparsity'][name]:.4f}",
            flush=True,
        )
    if "fast" in names and "sparsegpt" in names:
        row["fast_over_sparsegpt_cpu"] = statistics.median(
            a / b for a, b in zip(row["all_cpu_seconds"]["fast"], row["all_cpu_seconds"]["sparsegpt"])
        )
    if "admm" in names and "alps" in names:
        row["admm_over_alps_time"] = statistics.median(
            a / b for a, b in zip(row["all_seconds"]["admm"], row["all_seconds"]["alps"])
        )
    return row


def table(rows: list[dict[str, Any]], methods: list[str]) -> str:
    head = "| layer (rows x inputs) | target | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (2 + len(methods))]
    for r in rows:
        cells = [f"{r['seconds'][m]:.2f} s / {r['error'][m]:.4f}" if m in r["seconds"] else "-" for m in methods]
        lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['target']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--alps-repo", default="/work/.mirror/mazumder-lab+ALPS/repo")
    p.add_argument("--sparsegpt-repo", default="/work/.mirror/IST-DASLab+sparsegpt/repo")
    p.add_argument("--layers", default="768x768", help="comma-separated ROWSxINPUTS, e.g. 768x768,3072x768,768x3072")
    p.add_argument("--targets", default="50%,70%,2:4")
    p.add_argument("--methods", default="sparsegpt,alps,exact,fast,admm")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exact-max", type=int, default=768 * 768, help="largest layer (weights) that 'exact' runs on")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs per method; the median time is reported")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args()
    args.methods = args.methods.split(",")
    torch.set_num_threads(args.threads)
    peers = load_peers(args.alps_repo, args.sparsegpt_repo)
    results: dict[str, Any] = {
        "command": "python benchmarks/admm_vs_peers.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
        },
        "rows": [],
    }
    for layer in args.layers.split(","):
        shape = tuple(int(v) for v in layer.lower().split("x"))
        for target in args.targets.split(","):
            results["rows"].append(measure(peers, (shape[0], shape[1]), target, args))
    results["machine"]["loadavg_end"] = os.getloadavg()
    print(table(results["rows"], args.methods))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
