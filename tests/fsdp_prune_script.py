"""Helper for ``tests/test_fsdp.py`` (not a test module: it has no ``test_`` functions).

Starts 2 gloo processes on CPU; in each, builds small models, shards their layers with
``torch.distributed.fsdp.fully_shard`` (FSDP2: parameters become ``DTensor`` s) and calls ``prune_model`` on this
rank's own calibration batches. Every rank saves what it saw and produced to ``<out>/<run>_rank<r>.pt``: the dense
state, its batches, the Hessians it solved with, the layers it solved itself, the gathered weights and masks after
the prune, what it knows of its own shards and masks, the report's numbers, and what the gather spy saw.

    python tests/fsdp_prune_script.py --out DIR [--runs mlp-exact,cnn-fast,...]

A run is ``<mlp|cnn|gpt>-<method>[-seq][-global][-twice][-failsolve1]``: ``gpt`` is an MLP of ``transformers``
``Conv1D`` layers (GPT-2's, weight ``(in, out)``: sharded along the input, not the rows), ``seq`` calibrates
sequentially, ``global`` uses the global allocation (default: every layer at 0.6), ``twice`` prunes to 0.3 first and
then to 0.6 keeping the first step's (sharded) masks, ``failsolve1`` makes rank 1's layer solves fail and ``failbudget1`` its memory check (a budget of one byte),
``budget<N>`` gives every rank a memory budget of N bytes,
and every rank records the error it raised and the model as it is after.

The gather spy wraps ``DTensor.full_tensor`` and the engine's whole-matrix reads and follows every whole tensor they
return until it is freed: ``max_live_layers`` is the most layers whose whole weights were alive at once (an earlier
step's masks, which a re-prune gathers up front, are listed in ``gathers`` but not counted there).
"""

from __future__ import annotations

import argparse
import os
import sys
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ranks import free_port  # tests/ is sys.path[0] when this script runs

N_SAMPLES = 64  # per rank
BATCH = 16
SPARSITY = 0.6
FIRST_SPARSITY = 0.3  # the first step of a ``twice`` run


# --------------------------------------------------------------------------- models and data


def make_net(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    if kind == "mlp":  # three layers: with two ranks both must get a solve
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))
    if kind == "gpt":
        from transformers.pytorch_utils import Conv1D

        net = nn.Sequential(Conv1D(32, 16), nn.ReLU(), Conv1D(24, 32), nn.ReLU(), Conv1D(5, 24))
        for m in net:  # Conv1D starts with zero biases and tiny weights: give them some spread
            if isinstance(m, Conv1D):
                nn.init.normal_(m.weight, std=0.3)
                nn.init.normal_(m.bias, std=0.1)
        return net
    return nn.Sequential(  # BatchNorm: its parameters sharded too, its statistics re-estimated and averaged
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12 * 4 * 4, 5),
    )


def rank_batches(kind: str, rank: int) -> list[torch.Tensor]:
    """This rank's calibration batches (different on each rank)."""
    g = torch.Generator().manual_seed(100 + rank)
    shape = (BATCH, 3, 8, 8) if kind == "cnn" else (BATCH, 16)
    return [torch.randn(*shape, generator=g) for _ in range(N_SAMPLES // BATCH)]


def shard(net: nn.Module) -> None:
    """``fully_shard`` every Linear and convolution, then the root (the usual FSDP2 wrapping)."""
    from torch.distributed.fsdp import fully_shard

    for m in net.modules():
        if m is not net and getattr(m, "weight", None) is not None and not isinstance(m, nn.BatchNorm2d):
            fully_shard(m)
    fully_shard(net)  # the rest (BatchNorm's parameters) with the root


# --------------------------------------------------------------------------- spies


class GatherSpy:
    """Follows the whole tensors gathered from shards until they are freed, labelled by layer (from their shape)."""

    def __init__(self, labels: dict[tuple[int, ...], str]) -> None:
        self.labels = labels
        self.live: Counter[str] = Counter()
        self.max_live_layers = 0
        self.max_live_bytes = 0
        self.live_bytes = 0
        self.calls: list[str] = []

    def track(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:  # a count summed over shards, not a weight
            return t
        label = self.labels.get(tuple(t.shape), f"unknown{tuple(t.shape)}")
        if t.dtype == torch.bool:  # an earlier step's mask (a re-prune reads them up front): counted apart
            label = f"mask of {label}"
        nbytes = t.numel() * t.element_size()
        self.live[label] += 1
        self.calls.append(label)
        if t.dtype != torch.bool:
            self.live_bytes += nbytes
            self.max_live_bytes = max(self.max_live_bytes, self.live_bytes)
        weights = sum(1 for k, v in self.live.items() if v > 0 and not k.startswith("mask of "))
        self.max_live_layers = max(self.max_live_layers, weights)
        weakref.finalize(t, self._free, label, nbytes)
        return t

    def _free(self, label: str, nbytes: int) -> None:
        self.live[label] -= 1
        if not label.startswith("mask of "):
            self.live_bytes -= nbytes

    def wrap(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
            return self.track(fn(*args, **kwargs))

        return wrapped


def install_spies(spy: GatherSpy, record: dict[str, Any], fail_rank: int | None) -> Callable[[], None]:
    """Wrap the gathers, the calibration and the solve; returns the function that removes the wrappers."""
    from torch.distributed.tensor import DTensor

    import lightning_lobs.engine.calibrate as calibrate_mod
    import lightning_lobs.engine.collective as collective_mod
    import lightning_lobs.engine.report as report_mod
    import lightning_lobs.engine.solve as solve_mod

    saved = [
        (DTensor, "full_tensor", DTensor.full_tensor),
        (collective_mod, "weight_matrix", collective_mod.weight_matrix),
        (report_mod, "weight_matrix", report_mod.weight_matrix),
        (collective_mod._GatheredDense, "__getitem__", collective_mod._GatheredDense.__getitem__),
        (calibrate_mod, "collect_hessians", calibrate_mod.collect_hessians),
        (calibrate_mod, "share_scales", calibrate_mod.share_scales),
        (solve_mod, "solve_one", solve_mod.solve_one),
    ]
    DTensor.full_tensor = spy.wrap(DTensor.full_tensor)
    collective_mod.weight_matrix = spy.wrap(collective_mod.weight_matrix)
    report_mod.weight_matrix = spy.wrap(report_mod.weight_matrix)
    collective_mod._GatheredDense.__getitem__ = spy.wrap(collective_mod._GatheredDense.__getitem__)
    orig_calibrate, orig_solve = calibrate_mod.collect_hessians, solve_mod.solve_one

    orig_share_scales = calibrate_mod.share_scales

    def calibrate(*args: Any, **kwargs: Any):
        hessians, positions, order, missing = orig_calibrate(*args, **kwargs)
        record["hessians"].update({n: h.detach().clone() for n, h in hessians.items()})
        record["positions"].update(positions)
        return hessians, positions, order, missing

    def share_scales(*args: Any, **kwargs: Any):
        scales = orig_share_scales(*args, **kwargs)
        record["scales"].update(scales)
        return scales

    def solve_one(layer: Any, *args: Any, **kwargs: Any):
        record["solved"].append(layer.name)
        record["solve_input_is_whole"].append(type(layer.dense) is torch.Tensor and layer.dense.device.type == "cpu")
        if fail_rank == dist.get_rank():
            raise ValueError(f"injected failure solving {layer.name}")
        return orig_solve(layer, *args, **kwargs)

    calibrate_mod.collect_hessians = calibrate
    calibrate_mod.share_scales = share_scales
    solve_mod.solve_one = solve_one

    def remove() -> None:
        for owner, name, value in saved:
            setattr(owner, name, value)

    return remove


# --------------------------------------------------------------------------- one run on one rank


def _labels(net: nn.Module) -> dict[tuple[int, ...], str]:
    from lightning_lobs.layers import describe_layer

    labels: dict[tuple[int, ...], str] = {}
    for name, m in net.named_modules():
        if m is not net and getattr(m, "weight", None) is not None and not isinstance(m, nn.BatchNorm2d):
            s = describe_layer(m)
            for shape in (tuple(m.weight.shape), tuple(m.bias.shape), (s.rows, s.matrix_cols)):
                assert shape not in labels, "the models' layers must have shapes of their own for the spy"
                labels[shape] = name
    return labels


def _whole(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from lightning_lobs.sharding import gather

    return {k: gather(v.detach()).clone() for k, v in state.items()}


def run(run_name: str, rank: int) -> dict[str, Any]:
    from lightning_lobs.sharding import is_sharded, local

    kind, method, *rest = run_name.split("-")
    net = make_net(kind)
    dense = {k: v.clone() for k, v in net.state_dict().items()}
    spy = GatherSpy(_labels(net))
    shard(net)
    batches = rank_batches(kind, rank)
    record: dict[str, Any] = {"dense": dense, "batches": batches, "hessians": {}, "positions": {}, "solved": []}
    record["scales"] = {}
    record["solve_input_is_whole"] = []
    record["sharded"] = {n: is_sharded(p) for n, p in net.named_parameters()}
    record["local_rows"] = {n: tuple(local(p).shape) for n, p in net.named_parameters()}
    remove = install_spies(spy, record, 1 if "failsolve1" in rest else None)
    try:
        report = prune_steps(net, batches, method, rest, budget=1 if "failbudget1" in rest and rank == 1 else None)
    except Exception as err:  # noqa: BLE001 - recorded for the test
        remove()
        record.update(error_type=type(err).__name__, error=str(err), after=_whole(net.state_dict()))
        return record
    remove()
    masks = report.masks.masks
    params = dict(net.named_parameters())
    record.update(
        error_type=None,
        pruned=_whole(net.state_dict()),
        masks={n: m.full_tensor().clone() if is_sharded(m) else m.clone() for n, m in masks.items()},
        # each mask sharded like its weight: a DTensor on the same mesh and placements, this rank's rows only
        mask_like_weight={
            n: is_sharded(m)
            and m.placements == params[f"{n}.weight"].placements
            and m.device_mesh == params[f"{n}.weight"].device_mesh
            and tuple(local(m).shape) == tuple(local(params[f"{n}.weight"]).shape)
            for n, m in masks.items()
        },
        metrics=dict(report.metrics()),
        layer_sparsity={n: r.sparsity for n, r in report.layers.items()},
        sparsity=report.sparsity,
        bound_note=report.bound_note,
        max_live_layers=spy.max_live_layers,
        max_live_bytes=spy.max_live_bytes,
        gathers=list(spy.calls),
        still_live={k: v for k, v in spy.live.items() if v > 0},
    )
    return record


def prune_steps(
    net: nn.Module, batches: list[torch.Tensor], method: str, rest: list[str], budget: int | None = None
) -> Any:
    """``prune_model`` as the run says: once, or twice with the first step's masks (``twice``); ``budget``: the
    memory budget in bytes (None: 80% of the free memory)."""
    from lightning_lobs import CalibrationOptions, prune_model

    kwargs = dict(prune_head=True, sequential="seq" in rest, allocation="global" if "global" in rest else "uniform")
    given = [int(w[len("budget") :]) for w in rest if w.startswith("budget")]  # ``budget<N>``: every rank's, bytes
    budget = given[0] if given else budget
    # float64 products: the tests compare the Hessians with one process's bit for bit ("mixed" rounds per rank)
    kwargs["calibration"] = CalibrationOptions(memory_budget_bytes=budget, hessian_dtype=torch.float64)
    masks = None
    if "twice" in rest:
        masks = prune_model(net, batches, FIRST_SPARSITY, method, **kwargs).masks
    return prune_model(net, batches, SPARSITY, method, masks=masks, **kwargs)


def worker(rank: int, port: int, out: str, runs: list[str]) -> None:
    torch.set_num_threads(1)  # two ranks on two shared cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for name in runs:
            record = run(name, rank)
            torch.save(record, os.path.join(out, f"{name}_rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="mlp-exact,mlp-fast,cnn-fast")
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(free_port(), args.out, args.runs.split(",")), nprocs=2, join=True)


if __name__ == "__main__":
    sys.exit(main())
