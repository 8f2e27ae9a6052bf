"""Helper for ``tests/test_distributed.py`` (not a test module: it has no ``test_`` functions).

Fits small LightningModules with ``LOBSPruning`` under a 2-process CPU DDP strategy and, on
every rank, saves what that rank saw and produced to ``<out>/<tag>_rank<r>.pt``:
the calibration batches it used, the dense state_dict at prune time, the Hessians it solved
with, the layers it solved itself, the masks, the pruned and the final state_dicts, and the
report's metrics.

    python tests/ddp_prune_script.py --out DIR [--strategy ddp|ddp_spawn] [--runs mlp-exact,cnn-fast,...]

A run is ``<mlp|cnn|blk>-<method>[-seq][-uni][-failbudget1|-failsolve1]``: ``seq`` calibrates sequentially,
``uni`` prunes every layer to the same sparsity (default: global allocation);
the ``fail`` options make rank 1 alone fail (memory check / layer solves), and every rank then
records the error it raised instead of the pruning results. ``raw-<method>`` (``ddp`` only, after
a Trainer run) calls ``prune`` directly with ``RankInfo.current()`` on uneven per-rank batches.

With ``--strategy ddp`` Lightning starts rank 1 by re-running this script (LOCAL_RANK set);
with ``ddp_spawn`` it spawns workers that re-import this module. Several runs (several
``Trainer.fit`` calls) share one process group.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_lobs.engine.calibrate as _calibrate_mod  # noqa: E402
import lightning_lobs.engine.solve as _solve_mod  # noqa: E402
from lightning_lobs import LOBSPruning  # noqa: E402
from lightning_lobs.config import CalibrationOptions, PruneOptions  # noqa: E402
from lightning_lobs.distributed import RankInfo  # noqa: E402
from lightning_lobs.engine import prune  # noqa: E402

N_SAMPLES = 256
BATCH = 32
CALIBRATION_BATCHES = 4  # = 256 / 2 ranks / 32: each rank's whole DistributedSampler shard

# --------------------------------------------------------------------------- spies on the engine
# Installed at import in the script and in ddp_spawn workers (which re-import this file as __mp_main__).

# Float64 products: the tests compare these runs with one process on the union of the batches, bit for bit in the
# Hessians; the default "mixed" rounds each rank's float32 partial sums differently from one process's.
C64 = CalibrationOptions(hessian_dtype=torch.float64)
SPY: dict[str, Any] = {"hessians": {}, "positions": {}, "solved": []}
_orig_calibrate = _calibrate_mod.collect_hessians
_orig_solve_one = _solve_mod.solve_one


def _spy_calibrate(*args: Any, **kwargs: Any):
    hessians, positions, order, missing = _orig_calibrate(*args, **kwargs)
    # another rank's Hessian is a meta tensor here (summed onto its owner only): kept as it is
    SPY["hessians"].update({n: h.detach().clone().to("meta" if h.is_meta else "cpu") for n, h in hessians.items()})
    SPY["positions"].update(positions)
    return hessians, positions, order, missing


def _spy_solve_one(layer: Any, *args: Any, **kwargs: Any):
    SPY["solved"].append(layer.name)
    if SPY.get("fail_solve_rank") == torch.distributed.get_rank():
        raise ValueError(f"injected failure solving {layer.name}")
    return _orig_solve_one(layer, *args, **kwargs)


def install_spies() -> None:
    """Wrap the engine's calibration and solve steps (only in the DDP processes, never on import by tests)."""
    _calibrate_mod.collect_hessians = _spy_calibrate
    _solve_mod.solve_one = _spy_solve_one


if __name__ in ("__main__", "__mp_main__"):  # the launched script, or a ddp_spawn worker re-importing it
    install_spies()


# --------------------------------------------------------------------------- models and data


def make_data(kind: str) -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    if kind in ("mlp", "blk"):
        x = torch.randn(N_SAMPLES, 16, generator=g)
        y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    else:
        x = torch.randn(N_SAMPLES, 3, 8, 8, generator=g)
        y = (x.flatten(1) @ torch.randn(3 * 64, 4, generator=g)).argmax(1)
    return TensorDataset(x, y)


def make_net(kind: str) -> nn.Sequential:
    if kind == "mlp":  # three layers: with two ranks both must get a solve
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))
    if kind == "blk":  # two blocks of one layer and a head: sequential=True prunes it block by block
        blocks = (nn.Sequential(nn.Linear(16, 32), nn.ReLU()), nn.Sequential(nn.Linear(32, 24), nn.ReLU()))
        return nn.Sequential(*blocks, nn.Linear(24, 4))
    return nn.Sequential(  # BatchNorm: re-estimated per rank, then averaged over ranks
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12 * 4 * 4, 4),
    )


class LitNet(pl.LightningModule):
    def __init__(self, kind: str = "mlp") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.net = make_net(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(self.kind), batch_size=BATCH, shuffle=True)


# --------------------------------------------------------------------------- the recording callback


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().cpu()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


class RecordingLOBS(LOBSPruning):
    """LOBSPruning that writes what this rank calibrated on and produced to ``<out>/<tag>_rank<r>.pt``."""

    def __init__(self, out: str, tag: str, fail_rank: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = out
        self.tag = tag
        self.fail_rank = fail_rank  # this rank's memory budget is made too small
        self.record: dict[str, Any] = {}

    def calibration_batches_for(self, trainer: pl.Trainer) -> list:
        batches = super().calibration_batches_for(trainer)
        self.record["batches"] = _clone(batches)
        return batches

    def prune_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int):
        SPY["hessians"].clear()
        SPY["positions"].clear()
        SPY["solved"].clear()
        self.record["dense"] = _clone(pl_module.state_dict())
        if trainer.global_rank == self.fail_rank:  # this rank alone finds the memory budget too small
            self.options = [
                dataclasses.replace(o, calibration=dataclasses.replace(o.calibration, memory_budget_bytes=1))
                for o in self.options
            ]
        report = super().prune_now(trainer, pl_module, index)
        self.record.update(
            pruned=_clone(pl_module.state_dict()),
            masks=_clone(self.masks.state_dict()),
            metrics=dict(report.metrics()),
            layers={
                n: {k: v for k, v in dataclasses.asdict(r).items() if k != "seconds"} for n, r in report.layers.items()
            },
            bound_note=report.bound_note,
            hessians=dict(SPY["hessians"]),
            positions=dict(SPY["positions"]),
            solved=list(SPY["solved"]),
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            rank_info=(RankInfo.current().rank, RankInfo.current().world_size),
            strategy=type(trainer.strategy).__name__,
        )
        return report

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["final"] = _clone(pl_module.state_dict())
        self.record["final_masks_held"] = all(
            bool((dict(pl_module.named_modules())[n].weight[~m] == 0).all()) for n, m in self.masks.state_dict().items()
        )
        torch.save(self.record, os.path.join(self.out, f"{self.tag}_rank{trainer.global_rank}.pt"))


# --------------------------------------------------------------------------- main


def run(out: str, strategy: str, run_name: str) -> None:
    kind, method, *rest = run_name.split("-")
    sequential = "seq" in rest
    # Failure injection on rank 1 only: its memory check ("failbudget1") or its layer solves ("failsolve1").
    budget_fail_rank = 1 if "failbudget1" in rest else None
    SPY["fail_solve_rank"] = 1 if "failsolve1" in rest else None
    expect_failure = budget_fail_rank is not None or SPY["fail_solve_rank"] is not None
    pl.seed_everything(0, workers=True, verbose=False)
    model = LitNet(kind)
    tag = f"{strategy}_{run_name}"
    callback = RecordingLOBS(
        out,
        tag,
        fail_rank=budget_fail_rank,
        sparsity=0.6,
        prune_epoch=1,
        method=method,
        calibration_batches=CALIBRATION_BATCHES,
        sequential=sequential,
        log_table=False,
        allocation="uniform" if "uni" in rest else "global",
        prune_head=True,
        calibration=C64,
    )
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    if not expect_failure:
        trainer.fit(model)
        return
    # One rank fails: every rank must raise (none left waiting in a collective); record what each raised.
    try:
        trainer.fit(model)
    except Exception as err:  # noqa: BLE001 - recorded for the test
        callback.record.update(
            error_type=type(err).__name__,
            error=str(err),
            after=_clone(model.state_dict()),
            masks=_clone(callback.masks.state_dict()),
            calibrated=sorted(SPY["hessians"]),  # layers whose Hessians were gathered before the failure
        )
    else:
        callback.record.update(error_type=None, error="")
    torch.save(callback.record, os.path.join(out, f"{tag}_rank{trainer.global_rank}.pt"))


def raw_batches() -> list[torch.Tensor]:
    """Uneven shards for ``run_raw``: rank 0 gets the first batch (16 samples), rank 1 the other three (32 each)."""
    g = torch.Generator().manual_seed(7)
    return [torch.randn(16, 3, 8, 8, generator=g)] + [torch.randn(32, 3, 8, 8, generator=g) for _ in range(3)]


def run_raw(out: str, method: str) -> None:
    """``prune`` called directly with ``RankInfo.current()`` (no Trainer) on uneven per-rank batches."""
    info = RankInfo.current()
    assert info.world_size == 2, "run_raw needs the process group of an earlier DDP fit"
    for key in ("hessians", "positions", "solved"):
        SPY[key].clear()
    model = LitNet("cnn")
    model.net.train()
    with torch.no_grad():  # rank-specific BatchNorm statistics, as DDP training leaves them
        model(raw_batches()[info.rank] * (1 + info.rank))
    dense = _clone(model.state_dict())
    mine = raw_batches()[:1] if info.rank == 0 else raw_batches()[1:]
    report = prune(model, mine, PruneOptions(sparsity=0.6, method=method, prune_head=True, calibration=C64), rank=info)
    record = dict(
        dense=dense,
        pruned=_clone(model.state_dict()),
        masks=_clone(report.masks.state_dict()),
        metrics=dict(report.metrics()),
        hessians=dict(SPY["hessians"]),
        positions=dict(SPY["positions"]),
        solved=list(SPY["solved"]),
    )
    torch.save(record, os.path.join(out, f"raw_cnn-{method}_rank{info.rank}.pt"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "ddp_spawn"])
    parser.add_argument("--runs", default="mlp-exact,mlp-fast,cnn-exact,cnn-fast")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # two ranks on two shared cores
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    for name in args.runs.split(","):
        if name.startswith("raw-"):  # raw-<method>: after the Trainer runs, in their process group
            run_raw(args.out, name.split("-", 1)[1])
        else:
            run(args.out, args.strategy, name)


if __name__ == "__main__":
    main()
