"""Pruning a ``fully_shard`` (FSDP2) model on 2 CPU ranks: peak memory per rank against the model, time against DDP.

    OMP_NUM_THREADS=1 python benchmarks/fsdp_memory.py --width 1024 --layers 24 --out benchmarks/results/fsdp_memory.json

An MLP of ``--layers`` ``Linear(width, width)`` layers (float32) is pruned to 50% with ``method="fast"``,
``sequential=True`` and ``SolverOptions(refit=False)`` (one Hessian and a small workspace at a time, so that the
weights dominate) on 2 gloo ranks, each with its own 4 batches
of 64 samples, in three ways, each in fresh processes (a peak is a process's high-water mark):

* ``fsdp``: the layers sharded with ``fully_shard``; ``prune_model`` on every rank;
* ``ddp``: the same model whole on every rank; the engine's DDP path (``prune(..., rank=RankInfo.current())``);
* ``single``: one process, ``prune_model`` on the union of the batches (the memory a single process needs).

Per rank: the model's bytes it holds, the peak resident memory of the model and the prune (``ru_maxrss`` at the end
minus the resident memory just before the model was built, after a tiny warm-up prune the same way), and the
prune's wall time. The ``fsdp`` model is built on the meta device and sharded before its weights exist (FSDP2's
way for models larger than one process), its shards drawn per rank. One torch thread per process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

BATCHES, BATCH = 4, 64


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


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


def measure(mode: str, rank: int, width: int, layers: int) -> dict[str, Any]:
    """This rank's numbers (``single``: one process on both ranks' batches)."""
    # A tiny prune first, the same way: the imports and first-call allocations are not the prune's memory.
    run_once(mode, build(mode, 64, 2), batches(64, rank)[:1], 64)
    data = batches(width, rank) if mode != "single" else batches(width, 0) + batches(width, 1)
    base = rss_bytes()
    return run_once(mode, build(mode, width, layers), data, width, base)


def build(mode: str, width: int, layers: int) -> nn.Sequential:
    if mode != "fsdp":
        return make_net(width, layers)
    with torch.device("meta"):
        return make_net(width, layers)


def run_once(mode: str, net: nn.Module, data: list[torch.Tensor], width: int, base: int = 0) -> dict[str, Any]:
    from lightning_lobs import CalibrationOptions, PruneOptions, SolverOptions, prune_model
    from lightning_lobs.distributed import RankInfo
    from lightning_lobs.engine import prune
    from lightning_lobs.sharding import local

    if mode == "fsdp":  # built on the meta device and sharded before any weight exists: no rank ever holds it whole
        from torch.distributed.fsdp import fully_shard

        for m in net:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(net)
        net.to_empty(device="cpu")
        g = torch.Generator().manual_seed(1 + dist.get_rank())
        with torch.no_grad():
            for p in net.parameters():
                local(p).copy_(torch.randn(local(p).shape, generator=g) / width**0.5)
    held = sum(local(p).numel() * local(p).element_size() for p in net.parameters())
    # The budget check is not what is measured here (it reads the machine's free pages, few on a shared machine).
    calibration = CalibrationOptions(memory_budget_bytes=1 << 40)
    # No refit: its batched systems (rows x d^2 words, up to SolverOptions.max_memory_bytes) would dwarf the weights.
    solver = SolverOptions(refit=False)
    kwargs = dict(
        method="fast", sequential=True, allocation="uniform", prune_head=True, calibration=calibration, solver=solver
    )
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    if mode == "ddp":
        prune(net, data, PruneOptions(sparsity=0.5, **kwargs), rank=RankInfo.current())
    else:
        prune_model(net, data, 0.5, **kwargs)
    seconds = time.perf_counter() - t0
    # the peak above the resident memory before the model existed: the model (or this rank's shards) and the prune
    return {"held_bytes": held, "peak_added_bytes": peak_bytes() - base, "seconds": seconds}


def worker(rank: int, port: int, mode: str, width: int, layers: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = measure(mode, rank, width, layers)
        with open(f"{out}.{mode}.rank{rank}", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import torch.multiprocessing as mp

    results: dict[str, Any] = {}
    for mode in ("fsdp", "ddp"):
        mp.spawn(worker, args=(_free_port(), mode, args.width, args.layers, args.out), nprocs=2, join=True)
        results[mode] = []
        for r in (0, 1):
            path = f"{args.out}.{mode}.rank{r}"
            with open(path) as f:
                results[mode].append(json.load(f))
            os.remove(path)
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:  # a fresh process: its own high-water mark
        results["single"] = [pool.apply(_single, (args.width, args.layers))]
    model_bytes = args.layers * (args.width * args.width + args.width) * 4
    summary = {
        "command": f"OMP_NUM_THREADS=1 python benchmarks/fsdp_memory.py --width {args.width} --layers {args.layers}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, torch {torch.__version__}",
        "model_bytes": model_bytes,
        "one_layer_bytes": (args.width * args.width + args.width) * 4,
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    mib = 2**20
    print(f"model {model_bytes / mib:.1f} MiB, one layer {summary['one_layer_bytes'] / mib:.1f} MiB")
    for mode, ranks in results.items():
        for r, res in enumerate(ranks):
            print(
                f"{mode:>6} rank {r}: holds {res['held_bytes'] / mib:7.1f} MiB, peak model + prune "
                f"{res['peak_added_bytes'] / mib:7.1f} MiB, {res['seconds']:.1f} s"
            )


def _single(width: int, layers: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    return measure("single", 0, width, layers)


if __name__ == "__main__":
    main()
