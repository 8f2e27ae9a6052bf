"""Helper for ``tests/test_fsdp_lightning.py`` (not a test module: it has no ``test_`` functions).

Started on 2 CPU ranks by ``torch.distributed.run`` (gloo); every rank saves what it saw to
``<out>/<run>_rank<r>.pt``. Runs:

- ``masks``: a ``fully_shard`` (FSDP2) MLP in float64, a few dense AdamW steps, then hand-made masks
  attached to a :class:`~lightning_lobs.MaskSet` (one given sharded, the others whole), then masked
  AdamW steps on each rank's own batches: how the masks are laid out, the gradients, weights and
  optimizer state at pruned positions after every step, the final weights (gathered).
- ``fit-<dcp|full>[-hand]``: ``LOBSPruning`` in a ``Trainer`` with ``ModelParallelStrategy`` (the model
  sharded in ``configure_model``), pruning at epoch 1 of 3, a checkpoint after every epoch (a
  distributed checkpoint directory, or one full file with ``save_distributed_checkpoint=False``);
  ``-hand`` writes hand-made masks at the prune instead of running the engine.
- ``resume-<dcp|full>[-hand]``: a fresh model and callback resumed from that fit's epoch-1 checkpoint.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_lightning_script.py --out DIR --runs masks,fit-dcp
"""

from __future__ import annotations

import argparse
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lobs import LOBSPruning, MaskSet
from lightning_lobs.masks import model_sparsity

N_DENSE, N_MASKED, LR, DECAY = 2, 4, 1e-2, 0.1
WIDTHS = (8, 12, 6, 3)  # the last layer's 3 rows split 2 / 1 over two ranks: uneven shards


def make_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(WIDTHS) - 2 else [])
    return nn.Sequential(*layers).double()


def hand_masks() -> dict[str, torch.Tensor]:
    """About half of each weight pruned, the same on every rank."""
    g = torch.Generator().manual_seed(1)
    net = make_mlp()
    return {
        n: torch.rand(m.weight.shape, generator=g) > 0.5 for n, m in net.named_modules() if isinstance(m, nn.Linear)
    }


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + 10 * step + rank)
    return torch.randn(4, WIDTHS[0], generator=g, dtype=torch.float64), torch.randn(
        4, WIDTHS[-1], generator=g, dtype=torch.float64
    )


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone().cpu()


def _state_at_pruned(opt: torch.optim.Optimizer, net: nn.Module, masks: dict[str, torch.Tensor]) -> float:
    """The largest |optimizer state| at a pruned position, over every masked weight's state tensors (gathered)."""
    worst = 0.0
    for name, mask in masks.items():
        weight = net.get_submodule(name).weight
        for value in opt.state.get(weight, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                worst = max(worst, float(_full(value)[~mask].abs().max()))
    return worst


def frozen_then_unfrozen(mesh: Any, rank: int) -> list[float]:
    """Layer 0's weight frozen when the masks attach (a backbone ``BackboneFinetuning`` unfreezes later), then
    unfrozen: the largest |gradient| at its pruned entries in each step after the unfreeze (gathered)."""
    from torch.distributed.fsdp import fully_shard

    net = make_mlp()
    net[0].weight.requires_grad_(False)
    for m in net:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = torch.optim.AdamW(net.parameters(), lr=LR)
    masks = MaskSet()
    masks.update(hand_masks())
    masks.attach(net, opt)
    pruned = ~hand_masks()["0"]
    seen = []
    for k in range(3):
        if k == 1:
            net[0].weight.requires_grad_(True)
        x, y = batch(k, rank)
        opt.zero_grad()
        F.mse_loss(net(x), y).backward()
        if k >= 1:
            seen.append(float(_full(net[0].weight.grad)[pruned].abs().max()))
        opt.step()
    masks.detach()
    return seen


def run_masks(out: str) -> None:
    """Hand-made masks on a fully_shard MLP held through AdamW steps on two ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    rank = torch.distributed.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    net = make_mlp()
    for m in net:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=DECAY)

    def step(k: int) -> None:
        x, y = batch(k, rank)
        opt.zero_grad()
        F.mse_loss(net(x), y).backward()

    for k in range(N_DENSE):
        step(k)
        opt.step()
    full = hand_masks()
    given = dict(full)
    given["2"] = distribute_tensor(full["2"], mesh, [Shard(0)])  # one mask handed over already sharded
    masks = MaskSet()
    masks.update(given)
    masks.attach(net, opt)
    rec: dict[str, Any] = {
        "layout": {
            n: (
                isinstance(masks[n], DTensor),
                tuple(masks[n].placements) == tuple(net.get_submodule(n).weight.placements),
            )
            for n in full
        },
        "local_rows": {n: tuple(masks[n].to_local().shape) for n in full},
        "state_at_attach": _state_at_pruned(opt, net, full),
        "grad_at_pruned": [],
        "weight_at_pruned": [],
        "state_at_pruned": [],
    }
    for k in range(N_DENSE, N_DENSE + N_MASKED):
        step(k)
        rec["grad_at_pruned"].append(
            max(float(_full(net.get_submodule(n).weight.grad)[~m].abs().max()) for n, m in full.items())
        )
        opt.step()
        rec["weight_at_pruned"].append(
            max(float(_full(net.get_submodule(n).weight)[~m].abs().max()) for n, m in full.items())
        )
        rec["state_at_pruned"].append(_state_at_pruned(opt, net, full))
    rec["final"] = {k: _full(v) for k, v in net.state_dict().items()}
    rec["state_dict"] = masks.state_dict()
    rec["sparsity"] = masks.sparsity()
    rec["model_sparsity"] = model_sparsity(net, list(full))
    rec["repr"] = repr(masks)
    rec["frozen_grad_at_pruned"] = frozen_then_unfrozen(mesh, rank)
    reloaded = MaskSet()
    reloaded.load_state_dict(rec["state_dict"])
    reloaded.attach(net, opt)  # full masks from a checkpoint, cut into shards again on attach
    rec["reloaded"] = reloaded.state_dict()
    rec["reloaded_local_equal"] = all(torch.equal(reloaded[n].to_local(), masks[n].to_local()) for n in full)
    torch.save(rec, os.path.join(out, f"masks_rank{rank}.pt"))


# --------------------------------------------------------------------------- LOBSPruning in a Trainer

N_SAMPLES, BATCH, EPOCHS, PRUNE_EPOCH = 64, 8, 3, 1


def make_data():
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(123)
    x = torch.randn(N_SAMPLES, WIDTHS[0], generator=g, dtype=torch.float64)
    return TensorDataset(x, x @ torch.randn(WIDTHS[0], WIDTHS[-1], generator=g, dtype=torch.float64))


def lit_classes():
    """The LightningModule and the recording callback (built here: importing the script needs no Lightning)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    class LitMLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp()

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for m in self.net:
                if isinstance(m, nn.Linear):
                    fully_shard(m, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.mse_loss(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=DECAY)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(make_data(), batch_size=BATCH, shuffle=False)

    class Recording(LOBSPruning):
        """Records, at every epoch end, the whole masks and how far the weights are from them.

        With ``hand=True`` the prune writes :func:`hand_masks` instead of calling the engine (the masks' life in
        a sharded Trainer - enforcement, logging, checkpoints - apart from how the engine finds them).
        """

        def __init__(self, hand: bool = False, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.hand = hand
            self.epochs: list[dict[str, Any]] = []

        def calibration_batches_for(self, trainer: pl.Trainer) -> list:
            self.batches = super().calibration_batches_for(trainer)  # this rank's DistributedSampler shard
            return self.batches

        def prune_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> Any:
            if not self.hand:
                self.dense = {k: _full(v) for k, v in pl_module.state_dict().items()}  # gathered, at the prune
                getattr(self, "before_prune", lambda module: None)(pl_module)
                return super().prune_now(trainer, pl_module, index)
            self.masks.attach(pl_module, trainer.optimizers)
            self.masks.update({f"net.{n}": m for n, m in hand_masks().items()})
            self.pruned_points = [*self.pruned_points, self.schedule.points[index]]
            return None

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            super().on_train_start(trainer, pl_module)
            self.restored = self.masks.state_dict()  # what a resume attached (gathered: every rank calls it)

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            super().on_train_epoch_end(trainer, pl_module)
            masks = self.masks.state_dict()
            weights = {n: _full(pl_module.net.get_submodule(n.split(".", 1)[1]).weight) for n in masks}
            self.epochs.append(
                dict(
                    epoch=trainer.current_epoch,
                    masks=masks,
                    at_pruned={n: float(weights[n][~m].abs().max()) if (~m).any() else 0.0 for n, m in masks.items()},
                    logged=float(trainer.callback_metrics.get("lobs/sparsity", float("nan"))),
                    zeros={n: int((w == 0).sum()) for n, w in weights.items()},
                    sharded={n: type(self.masks[n]).__name__ for n in masks},
                )
            )

    return pl, LitMLP, Recording


def run_failing(trainer: Any, model: nn.Module, callback: Any) -> dict[str, Any]:
    """Rank 1 alone fails while solving its layers: what every rank raised, and its shards against those before."""
    import lightning_lobs.engine.solve as solve_mod

    original = solve_mod.solve_one

    def failing(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.distributed.get_rank() == 1:
            raise ValueError(f"injected failure solving {layer.name}")
        return original(layer, *args, **kwargs)

    before: dict[str, torch.Tensor] = {}
    solve_mod.solve_one = failing
    callback.before_prune = lambda module: before.update(
        {k: v.to_local().clone() for k, v in module.state_dict().items()}
    )
    try:
        trainer.fit(model)
    except Exception as err:  # noqa: BLE001 - recorded for the test
        error = f"{type(err).__name__}: {err}"
    else:
        error = ""
    finally:
        solve_mod.solve_one = original
    after = {k: v.to_local().clone() for k, v in model.state_dict().items()}
    return dict(
        error=error,
        masks=len(callback.masks),
        attached=callback.masks.attached,
        pruned_points=callback.pruned_points,
        unchanged=bool(before) and all(torch.equal(after[k], v) for k, v in before.items()),
    )


def run_fit(out: str, name: str, ckpt: str | None = None) -> None:
    """``fit-dcp`` / ``fit-full``: prune at epoch 1 under ModelParallelStrategy; ``resume-*``: from its epoch-1 file."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.strategies import ModelParallelStrategy

    pl, LitMLP, Recording = lit_classes()
    kind = name.split("-")[1]
    callback = Recording(
        hand=name.endswith("-hand"),
        sparsity=0.5,
        prune_epoch=PRUNE_EPOCH,
        method="exact",
        allocation="uniform",
        calibration_batches=2,
        log_table=False,
    )
    checkpoints = ModelCheckpoint(dirpath=os.path.join(out, f"ckpt-{name}"), save_top_k=-1, filename="{epoch}")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=kind == "dcp"
        ),
        max_epochs=EPOCHS,
        callbacks=[callback] + ([checkpoints] if ckpt is None else []),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = LitMLP()
    if name.endswith("-failsolve1"):
        torch.save(run_failing(trainer, model, callback), os.path.join(out, f"{name}_rank{trainer.global_rank}.pt"))
        return
    trainer.fit(model, ckpt_path=ckpt)
    rec = dict(
        epochs=callback.epochs,
        restored=callback.restored,
        pruned_points=callback.pruned_points,
        reports=len(callback.reports),
        metrics=dict(callback.reports[0].metrics()) if callback.reports else {},
        dense=getattr(callback, "dense", None),
        batches=[[t.clone() for t in b] for b in getattr(callback, "batches", [])],
        final={k: _full(v) for k, v in model.state_dict().items()},
        repr=repr(callback.masks),
    )
    torch.save(rec, os.path.join(out, f"{name}_rank{trainer.global_rank}.pt"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="masks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # two ranks on two shared cores
    warnings.filterwarnings("ignore")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    for name in args.runs.split(","):
        if name == "masks":
            run_masks(args.out)
        elif name.startswith(("fit-", "fail-")):
            run_fit(args.out, name)
        elif name.startswith("resume-"):  # the checkpoint its fit run wrote after the prune epoch
            fitted = "fit-" + name.split("-", 1)[1]
            run_fit(args.out, name, ckpt=os.path.join(args.out, f"ckpt-{fitted}", f"epoch={PRUNE_EPOCH}.ckpt"))
        else:
            raise ValueError(f"unknown run {name!r}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
