"""GPT-2 under FSDP2 on 2 CPU ranks against the single-process prune: logits error, masks, CPU time, peak RSS per rank.

    OMP_NUM_THREADS=1 python benchmarks/gpt2_fsdp.py --blocks 4 --width 768 --out benchmarks/results/gpt2_fsdp_4x768.json
    OMP_NUM_THREADS=1 python benchmarks/gpt2_fsdp.py --quick        # tiny GPT-2: seconds per child

Model and data as in ``benchmarks/gpt2_pipeline.py``: ``GPT2LMHeadModel`` from a ``GPT2Config`` (no download, the
50,257-token vocabulary, seeded random weights, no dropout), ``--blocks`` x ``--width`` (12 x 768 is GPT-2 124M),
the Python standard library's source as GPT-2 byte tokens; ``--calibration`` windows of ``--context`` tokens (16 x 128)
and ``--heldout`` held-out windows for the logits error.

Children, each a fresh interpreter with one torch thread per process (the machine's other jobs share its 2 cores):

* ``dense``: the held-out hidden states of the dense model (the reference of the logits error);
* ``single``: ``prune_model(model, batches, 0.5)`` (the library's defaults) in one process on all the calibration
  windows; it saves its masks and pruned weights for the comparison;
* ``fsdp``: 2 gloo ranks (``torch.multiprocessing``), each ``fully_shard`` s every block of ``transformer.h`` and then
  the root, and calls the same ``prune_model`` on its own half of the windows (8 x 128 each). Rank 0 compares the
  gathered masks and weights, one layer at a time, with the ``single`` child's.

Per process: ``wall s`` and ``CPU s`` (user + system, ``time.process_time``) of the prune alone, ``peak RSS`` its
``ru_maxrss`` after the prune, ``loaded`` its RSS just before (model built, sharded, data loaded). Logits error:
``||logits - dense logits|| / ||dense logits||`` over the held-out windows through the tied (unpruned) head
(``lobs_lab.gpt2.logits_relative_error``); under FSDP2 the hidden states are read by a hook on ``ln_f`` while the
sharded model runs (a ``fully_shard`` model must be called at its root).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lobs_lab.gpt2 import final_hidden, gpt2_byte_ids, logits_relative_error, random_gpt2
from lobs_lab.harness import current_rss_gib, machine_info, write_json
from lobs_lab.isolate import run_guarded
from lobs_lab.text import RandomWindows, eval_windows, inputs_only, load_stdlib_corpus

SPARSITY = 0.5
RANKS = 2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny GPT-2 (2 x 64), short windows: seconds per child")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--calibration", type=int, default=16, help="calibration windows of --context tokens (all ranks)")
    p.add_argument("--calibration-batch", type=int, default=8, help="windows per batch (a rank gets half the windows)")
    p.add_argument("--heldout", type=int, default=16, help="held-out windows for the logits error")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hessian-dtype",
        choices=("mixed", "float64"),
        default="mixed",
        help="CalibrationOptions.hessian_dtype (mixed: the default; float64: sums that differ only by their order)",
    )
    p.add_argument("--rss-limit-gib", type=float, default=12.0, help="kill a child above this resident memory")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="kill a child running longer (seconds)")
    p.add_argument("--out", default=None, help="JSON results (e.g. benchmarks/results/gpt2_fsdp_4x768.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: "<dense|single|fsdp>:<spec json>"
    args = p.parse_args(argv)
    if args.quick:
        args.blocks, args.width, args.context = 2, 64, 32
        args.calibration, args.calibration_batch, args.heldout = 8, 2, 4
    if args.calibration % RANKS:
        p.error(f"--calibration must split evenly over {RANKS} ranks, got {args.calibration}")
    return args


# --------------------------------------------------------------------------- helpers of every child


def _model(spec: dict[str, Any]) -> torch.nn.Module:
    return random_gpt2(spec["blocks"], spec["width"], spec["heads"], spec["context"], spec["seed"])


def _prune(model: torch.nn.Module, batches: list[torch.Tensor], hessian_dtype: str) -> Any:
    from lightning_lobs import CalibrationOptions, prune_model

    kwargs = {}
    if hessian_dtype != "mixed":  # the default otherwise: prune_model(model, batches, 0.5) exactly
        kwargs["calibration"] = CalibrationOptions(hessian_dtype=getattr(torch, hessian_dtype))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*left dense.*")  # the tied lm_head and embeddings, as intended
        return prune_model(model, batches, SPARSITY, **kwargs)


def _measured(model: torch.nn.Module, batches: list[torch.Tensor], spec: dict[str, Any]) -> tuple[Any, dict]:
    """The prune, with its wall and CPU time and this process's peak RSS."""
    loaded = current_rss_gib()
    t0, cpu0 = time.perf_counter(), time.process_time()
    report = _prune(model, batches, spec.get("hessian_dtype", "mixed"))
    stats = {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - cpu0,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_loaded_gib": loaded,
        "sparsity": report.sparsity,
        "calibration_seconds": report.calibration_seconds,
        "solve_seconds": report.solve_seconds,
    }
    return report, stats


@torch.no_grad()
def _root_hidden(model: torch.nn.Module, windows: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """The hidden states after ``ln_f``, read by a hook while the whole model (its root) runs."""
    out: list[torch.Tensor] = []
    handle = model.transformer.ln_f.register_forward_hook(lambda m, a, o: out.append(o.detach().clone()))
    try:
        for i in range(0, len(windows), batch):
            model(input_ids=windows[i : i + batch])
    finally:
        handle.remove()
    return torch.cat(out)


# --------------------------------------------------------------------------- the dense and single children


def dense_child(spec: dict[str, Any]) -> dict[str, Any]:
    model = _model(spec)
    torch.save(final_hidden(model, torch.load(spec["data"])["heldout"]), spec["reference"])
    return {"child": "dense"}


def single_child(spec: dict[str, Any]) -> dict[str, Any]:
    model = _model(spec)
    data = torch.load(spec["data"])
    report, stats = _measured(model, list(data["calib"].split(spec["calibration_batch"])), spec)
    hidden = final_hidden(model, data["heldout"])
    error = logits_relative_error(hidden, torch.load(spec["reference"]), model.lm_head.weight)
    masks = {n: m.clone() for n, m in report.masks.masks.items()}
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in masks}
    torch.save({"masks": masks, "weights": weights}, spec["single_result"])
    return {"child": "single", "logits_error": error, **stats}


# --------------------------------------------------------------------------- the fsdp child: 2 ranks


def _shard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def _compare_with_single(report: Any, model: torch.nn.Module, path: str, rank: int) -> dict[str, Any]:
    """Masks and weights against the single process's, gathered one layer at a time (a collective: every rank)."""
    from lightning_lobs.sharding import gather

    single = torch.load(path) if rank == 0 else None
    mismatched = total = 0
    worst = 0.0
    for n, mask in report.masks.masks.items():
        whole_mask, whole_weight = gather(mask), gather(model.get_submodule(n).weight.detach())
        if single is not None:
            mismatched += int((whole_mask != single["masks"][n]).sum())
            total += whole_mask.numel()
            worst = max(worst, float((whole_weight - single["weights"][n]).abs().max()))
        del whole_mask, whole_weight
    if single is None:
        return {}
    return {"mask_mismatches": mismatched, "mask_entries": total, "max_weight_difference": worst}


def rank_main(rank: int, port: int, spec: dict[str, Any]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    try:
        model = _model(spec)
        _shard(model)
        data = torch.load(spec["data"])
        mine = data["calib"].chunk(RANKS)[rank]  # this rank's half of the windows
        report, stats = _measured(model, list(mine.split(spec["calibration_batch"])), spec)
        hidden = _root_hidden(model, data["heldout"])
        from lightning_lobs.sharding import gather

        head = gather(model.lm_head.weight.detach())
        stats["logits_error"] = logits_relative_error(hidden, torch.load(spec["reference"]), head)
        del head
        stats.update(_compare_with_single(report, model, spec["single_result"], rank))
        gathered: list[Any] = [None] * RANKS
        dist.all_gather_object(gathered, {"rank": rank, **stats})
        if rank == 0:
            Path(spec["fsdp_result"]).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def fsdp_child(spec: dict[str, Any]) -> dict[str, Any]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(port, spec), nprocs=RANKS, join=True)
    return {"child": "fsdp", "ranks": json.loads(Path(spec["fsdp_result"]).read_text())}


CHILDREN = {"dense": dense_child, "single": single_child, "fsdp": fsdp_child}


# --------------------------------------------------------------------------- the parent


def prepare_data(args: argparse.Namespace, path: str) -> dict[str, Any]:
    """Calibration and held-out windows as GPT-2 token ids (as gpt2_pipeline.py draws them), saved to ``path``."""
    corpus = load_stdlib_corpus()
    T = args.context
    calib_ds = RandomWindows(corpus.tokens["train"], T, args.calibration, seed=args.seed)
    calib = inputs_only(torch.stack([calib_ds[i] for i in range(args.calibration)]))
    heldout = inputs_only(eval_windows(corpus.tokens["test"], T, args.heldout))
    torch.save({"calib": gpt2_byte_ids(calib), "heldout": gpt2_byte_ids(heldout)}, path)
    return {"corpus": corpus.info(), "calibration_tokens": calib.numel(), "heldout_tokens": heldout.numel()}


def run_children(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    spec = {
        "blocks": args.blocks,
        "width": args.width,
        "heads": max(1, args.width // 64),
        "context": args.context,
        "seed": args.seed,
        "calibration_batch": args.calibration_batch,
        "hessian_dtype": args.hessian_dtype,
        **{k: os.path.join(tmp, f"{k}.pt") for k in ("data", "reference", "single_result")},
        "fsdp_result": os.path.join(tmp, "fsdp.json"),
    }
    record: dict[str, Any] = {"blocks": args.blocks, "width": args.width, "heads": spec["heads"]}
    record["hessian_dtype"] = args.hessian_dtype
    record.update(prepare_data(args, spec["data"]))
    spec_path = os.path.join(tmp, "spec.json")
    Path(spec_path).write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in CHILDREN:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{name}:{spec_path}"]
        child = run_guarded(cmd, args.rss_limit_gib, args.timeout, env=env)
        if child.result is None:
            raise SystemExit(f"the {name} child: {child.error}\n{child.stderr_tail[-3000:]}")
        print(f"{name}: {json.dumps(child.result)}", flush=True)
        record[name] = {**child.result, "child_wall_s": child.wall_seconds}
    return record


def table(record: dict[str, Any]) -> str:
    """The Markdown table (ready to paste into BENCHMARKS.md)."""
    head = "| GPT-2 | process | wall s | CPU s | loaded GiB | peak RSS GiB | sparsity | logits rel. error |"
    lines = [head, "|" + "---|" * 8]
    model = f"{record['blocks']} x {record['width']}"
    rows = [("single process", record["single"])]
    rows += [(f"FSDP2 rank {r['rank']} of {RANKS}", r) for r in record["fsdp"]["ranks"]]
    for name, r in rows:
        lines.append(
            f"| {model} | {name} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['rss_loaded_gib']:.2f} "
            f"| {r['peak_rss_gib']:.2f} | {r['sparsity']:.4f} | {r['logits_error']:.5f} |"
        )
    r0 = record["fsdp"]["ranks"][0]
    lines.append(
        f"\nFSDP2 against the single process: {r0['mask_mismatches']} of {r0['mask_entries']} mask entries differ, "
        f"largest weight difference {r0['max_weight_difference']:.3g}."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        name, spec_path = args.child.split(":", 1)
        torch.set_num_threads(1)
        print(json.dumps(CHILDREN[name](json.loads(Path(spec_path).read_text()))))
        return {}
    results: dict[str, Any] = {
        "command": "python benchmarks/gpt2_fsdp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "sparsity": SPARSITY,
    }
    with tempfile.TemporaryDirectory() as tmp:
        results["config"] = run_children(args, tmp)
    results["loadavg_end"] = os.getloadavg()
    print(table(results["config"]))
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
