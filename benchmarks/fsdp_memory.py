"""Pruning a ``fully_shard`` (FSDP2) model on 2 CPU ranks: peak memory per rank against the model, time against DDP.

    OMP_NUM_THREADS=1 python benchmarks/fsdp_memory.py --width 1024 --layers 16 --pipeline one-pass \
        --budget-mib 600 --out benchmarks/results/fsdp_memory_onepass.json

An MLP of ``--layers`` ``Linear(width, width)`` layers (float32) is pruned to 50% with ``method="fast"`` and
``SolverOptions(refit=False)`` (a small solver workspace, so that the weights and Hessians dominate) on 2 gloo ranks,
each with its own 4 batches of 64 samples, in three ways, each in fresh processes:

* ``fsdp``: the layers sharded with ``fully_shard``; ``prune_model`` on every rank;
* ``ddp``: the same model whole on every rank; the engine's DDP path (``prune(..., rank=RankInfo.current())``);
* ``single``: one process, ``prune_model`` on the union of the batches (the memory a single process needs).

``--pipeline one-pass`` calibrates every layer in one pass (each Hessian then summed onto the rank that solves it);
``sequential`` calibrates one layer at a time (this MLP has no repeated blocks: the per-layer path), so the weights
dominate. ``--budget-mib``: every way runs with ``CalibrationOptions(memory_budget_bytes=...)``; a way the memory
check refuses is recorded as refused (with the check's message), before any work.

Per process: the model's bytes it holds; the peak resident memory from just before the model was built to the end
of the prune (the kernel's high-water mark, reset through ``/proc/self/clear_refs`` after a tiny warm-up prune the
same way, so that imports and first calls are not counted), minus the resident memory at that point; the resident
memory and high-water mark at each phase of the prune (from its progress events); how far the high-water mark
before the reset (imports, the warm-up) stood above the resident memory then; the peak of Python-level
allocations (``tracemalloc``; tensors are not among them); what the library's memory check estimated for this rank;
and the prune's wall and CPU time (the process's, all its threads). The ``fsdp`` model is built on the meta device and sharded before its weights exist
(FSDP2's way for models larger than one process), its shards drawn per rank. One torch thread per process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import time
import tracemalloc
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

BATCHES, BATCH = 4, 64
MIB = 2**20


def status_bytes(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    """Reset this process's resident high-water mark to its resident memory now (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_net(width: int, layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods)


def batches(width: int, rank: int) -> list[torch.Tensor]:
    """This rank's calibration batches."""
    g = torch.Generator().manual_seed(10 + rank)
    return [torch.randn(BATCH, width, generator=g) for _ in range(BATCHES)]


def measure(mode: str, rank: int, args: argparse.Namespace) -> dict[str, Any]:
    """This rank's numbers (``single``: one process on both ranks' batches)."""
    # A tiny prune first, the same way: the imports and first-call allocations are not the prune's memory.
    run_once(mode, build(mode, 64, 2), batches(64, rank)[:1], 64, None, args.pipeline)
    data = batches(args.width, rank) if mode != "single" else batches(args.width, 0) + batches(args.width, 1)
    budget = None if args.budget_mib is None else int(args.budget_mib * MIB)
    # The high-water mark before the reset: what the last measurement's ru_maxrss (never reset) counted too.
    earlier = status_bytes("VmHWM") - status_bytes("VmRSS")
    reset_peak()
    base = status_bytes("VmRSS")
    result = run_once(mode, build(mode, args.width, args.layers), data, args.width, budget, args.pipeline, base)
    return {"base_rss_bytes": base, "earlier_peak_above_base_bytes": earlier, **result}


def build(mode: str, width: int, layers: int) -> nn.Sequential:
    if mode != "fsdp":
        return make_net(width, layers)
    with torch.device("meta"):
        return make_net(width, layers)


def shard_and_fill(net: nn.Sequential, width: int) -> None:
    """``fully_shard`` every Linear, then the root; allocate and draw this rank's shards (never the whole model)."""
    from torch.distributed.fsdp import fully_shard

    from lightning_lobs.sharding import local

    for m in net:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(net)
    net.to_empty(device="cpu")
    g = torch.Generator().manual_seed(1 + dist.get_rank())
    with torch.no_grad():
        for p in net.parameters():
            local(p).copy_(torch.randn(local(p).shape, generator=g) / width**0.5)


class Probes:
    """The resident memory and high-water mark at each phase's first progress event, above ``base``; and what the
    library's memory check computed for this rank (it wraps the plan's ``check_budget``)."""

    def __init__(self, base: int) -> None:
        self.base, self.phases, self.check = base, [], {}
        self.phases.append(self.point("model built"))

    def point(self, name: str) -> dict[str, Any]:
        return {
            "phase": name,
            "rss_mib": (status_bytes("VmRSS") - self.base) / MIB,
            "peak_mib": (status_bytes("VmHWM") - self.base) / MIB,
        }

    def __call__(self, event: Any) -> None:
        if event.phase != self.phases[-1]["phase"]:
            self.phases.append(self.point(event.phase))

    def wrap_check(self) -> Any:
        import lightning_lobs.engine.plan as plan_mod

        inner = plan_mod.check_budget

        def checked(*a: Any, **k: Any) -> dict[str, int]:
            try:
                out = inner(*a, **k)
            except MemoryError:  # what it estimated, under a budget nothing exceeds
                self.check = inner(a[0], 1 << 50, *a[2:], **k)
                raise
            self.check = out
            return out

        plan_mod.check_budget = checked
        return lambda: setattr(plan_mod, "check_budget", inner)


def run_once(  # noqa: PLR0913 - one measured prune's inputs
    mode: str, net: nn.Module, data: list[torch.Tensor], width: int, budget: int | None, pipeline: str, base: int = 0
) -> dict[str, Any]:
    from lightning_lobs import CalibrationOptions, PruneOptions, SolverOptions, prune_model
    from lightning_lobs.distributed import RankInfo
    from lightning_lobs.engine import prune
    from lightning_lobs.sharding import local

    if mode == "fsdp":  # built on the meta device and sharded before any weight exists: no rank ever holds it whole
        shard_and_fill(net, width)
    held = sum(local(p).numel() * local(p).element_size() for p in net.parameters())
    probes = Probes(base)
    # A budget far above the machine's when none is given: the check reads the free pages, few on a shared machine.
    calibration = CalibrationOptions(memory_budget_bytes=budget or 1 << 40)
    # No refit: its batched systems (rows x d^2 words, up to SolverOptions.max_memory_bytes) would dwarf the weights.
    kwargs = dict(
        method="fast",
        sequential=pipeline == "sequential",
        allocation="uniform",
        prune_head=True,
        calibration=calibration,
        solver=SolverOptions(refit=False),
    )
    if dist.is_initialized():
        dist.barrier()
    restore = probes.wrap_check()
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    refused = None
    try:
        if mode == "ddp":
            prune(net, data, PruneOptions(sparsity=0.5, **kwargs), rank=RankInfo.current(), progress=probes)
        else:
            prune_model(net, data, 0.5, progress=probes, **kwargs)
    except MemoryError as err:  # the budget check, before any work (a refusal on one rank fails every rank)
        refused = str(err)
    except RuntimeError as err:  # another rank's refusal
        if "the memory check failed" not in str(err):
            raise
        refused = str(err)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    restore()
    probes.phases.append(probes.point("end"))
    return {
        "held_bytes": held,
        "peak_added_bytes": status_bytes("VmHWM") - base,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "phases": probes.phases,
        "python_peak_bytes": python_peak,
        "check": probes.check,
        "refused": refused,
    }


def worker(rank: int, port: int, mode: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = measure(mode, rank, args)
        with open(f"{args.out}.{mode}.rank{rank}", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    return measure("single", 0, args)


def table(paths: list[str]) -> None:
    """BENCHMARKS.md's rows from result files: per way and rank, MiB above the resident memory before the model."""
    print(
        "| run | way | rank | model held | check | peak | RSS at calibrate / solve / measure / end | wall s | CPU s |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for path in paths:
        summary = json.load(open(path))
        run = os.path.basename(path).removesuffix(".json")
        for mode, ranks in summary["results"].items():
            for r, res in enumerate(ranks):
                if res["refused"]:
                    check = res["check"].get("peak", 0) / MIB
                    print(f"| {run} | {mode} | {r} | {res['held_bytes'] / MIB:.0f} | {check:.0f} | refused | | | |")
                    continue
                rss = {p["phase"]: p["rss_mib"] for p in res["phases"]}
                seq = " / ".join(f"{rss[k]:.0f}" if k in rss else "-" for k in ("calibrate", "solve", "measure", "end"))
                cpu = f"{res['cpu_seconds']:.1f}" if "cpu_seconds" in res else "-"
                print(
                    f"| {run} | {mode} | {r} | {res['held_bytes'] / MIB:.0f} | {res['check']['peak'] / MIB:.0f} | "
                    f"{res['peak_added_bytes'] / MIB:.0f} | {seq} | {res['seconds']:.1f} | {cpu} |"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--pipeline", choices=["one-pass", "sequential"], default="one-pass")
    parser.add_argument("--budget-mib", type=float, default=None)
    parser.add_argument("--modes", nargs="+", default=["fsdp", "ddp", "single"])
    parser.add_argument("--out")
    parser.add_argument("--table", nargs="+", help="print BENCHMARKS.md's table from these result files, run nothing")
    args = parser.parse_args()
    if args.table:
        return table(args.table)
    if not args.out:
        parser.error("--out is required to run")
    import torch.multiprocessing as mp

    results: dict[str, Any] = {}
    for mode in [m for m in args.modes if m != "single"]:
        mp.spawn(worker, args=(_free_port(), mode, args), nprocs=2, join=True)
        results[mode] = []
        for r in (0, 1):
            path = f"{args.out}.{mode}.rank{r}"
            with open(path) as f:
                results[mode].append(json.load(f))
            os.remove(path)
    if "single" in args.modes:
        with mp.get_context("spawn").Pool(1) as pool:  # a fresh process: its own high-water mark
            results["single"] = [pool.apply(_single, (args,))]
    write(args, results)


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def write(args: argparse.Namespace, results: dict[str, Any]) -> None:
    one_layer = (args.width * args.width + args.width) * 4
    budget = "" if args.budget_mib is None else f" --budget-mib {args.budget_mib:g}"
    summary = {
        "command": f"OMP_NUM_THREADS=1 python benchmarks/fsdp_memory.py --width {args.width} --layers {args.layers} "
        f"--pipeline {args.pipeline}{budget} --modes {' '.join(args.modes)}",
        "library_commit": _commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, torch {torch.__version__}",
        "load_average_at_end": os.getloadavg(),
        # glibc's malloc settings from the environment (a fixed mmap threshold returns large freed blocks at once)
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "model_bytes": args.layers * one_layer,
        "one_layer_bytes": one_layer,
        "one_hessian_bytes": (args.width + 1) ** 2 * 12,  # "mixed": a float64 sum and a float32 partial sum
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"model {summary['model_bytes'] / MIB:.1f} MiB, one layer {one_layer / MIB:.1f} MiB")
    for mode, ranks in results.items():
        for r, res in enumerate(ranks):
            if res["refused"]:
                print(f"{mode:>6} rank {r}: REFUSED by the memory check ({res['refused'][:90]}...)")
                continue
            phases = ", ".join(f"{p['phase']} {p['rss_mib']:.0f}/{p['peak_mib']:.0f}" for p in res["phases"])
            print(
                f"{mode:>6} rank {r}: holds {res['held_bytes'] / MIB:7.1f} MiB, peak {res['peak_added_bytes'] / MIB:7.1f}"
                f" MiB (check {res['check'].get('peak', 0) / MIB:.1f}), {res['seconds']:.1f} s wall, "
                f"{res['cpu_seconds']:.1f} s CPU; rss/peak MiB: {phases}"
            )


if __name__ == "__main__":
    main()
