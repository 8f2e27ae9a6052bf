"""Helper for ``tests/test_fsdp_gpt2.py``: ``LOBSPruning`` on a GPT-2 under Lightning's ``ModelParallelStrategy``.

Started on 2 CPU ranks by ``torch.distributed.run`` (gloo). A LightningModule holds the small GPT-2 of
``tests/fsdp_gpt2_script.py`` and shards it in ``configure_model`` (``fully_shard`` per block, then the module);
it trains on next-token loss over dict batches (``input_ids``, ``labels``), ``LOBSPruning`` prunes it to 50% at
epoch 1 of 3 (``sequential=`` the run says) on each rank's own calibration batches. Every rank saves to
``<out>/<run>_rank<r>.pt`` the gathered dense weights at the prune, its calibration batches, the masks and the
gathered weights after every epoch, and the report's numbers.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_lightning_gpt2_script.py --out DIR --runs fit
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from lightning_lobs import CalibrationOptions, LOBSPruning

EPOCHS, PRUNE_EPOCH, SAMPLES, BATCH, LR = 3, 1, 32, 4, 1e-3


def gpt2_script():
    """``tests/fsdp_gpt2_script.py`` as a module (its GPT-2)."""
    path = Path(__file__).resolve().parent / "fsdp_gpt2_script.py"
    spec = importlib.util.spec_from_file_location("fsdp_gpt2_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_data() -> list[dict[str, torch.Tensor]]:
    """Token sequences as dicts (what a tokenizer's collate gives), next-token labels."""
    s = gpt2_script()
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, s.VOCAB, (SAMPLES, s.CONTEXT), generator=g)
    return [{"input_ids": x, "labels": x} for x in ids]


def _full(t: torch.Tensor) -> torch.Tensor:
    from lightning_lobs.sharding import gather

    return gather(t.detach()).clone()


def callback_options(run: str) -> dict[str, Any]:
    """The ``LOBSPruning`` options of a run (the test prunes with the same in one process)."""
    return dict(sequential=run == "fit-seq", calibration=CalibrationOptions(hessian_dtype=torch.float64))


def lit_classes():
    """The LightningModule and the recording callback (built here: importing the script needs no Lightning)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    class LitGPT2(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = gpt2_script().make_gpt2(2, 32)

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
            return self.model(input_ids=input_ids, labels=labels)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self(**batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=LR)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(make_data(), batch_size=BATCH, shuffle=False)

    class Recording(LOBSPruning):
        """Records the calibration batches, the dense weights at the prune, and the masks and weights after every
        epoch (all gathered)."""

        epochs: list[dict[str, Any]]

        def calibration_batches_for(self, trainer: pl.Trainer) -> list:
            self.batches = super().calibration_batches_for(trainer)  # this rank's DistributedSampler shard
            return self.batches

        def prune_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> Any:
            self.dense = {k: _full(v) for k, v in pl_module.state_dict().items()}
            return super().prune_now(trainer, pl_module, index)

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            super().on_train_epoch_end(trainer, pl_module)
            masks = self.masks.state_dict()
            weights = {n: _full(pl_module.get_submodule(n).weight) for n in masks}
            at_pruned = {n: float(weights[n][~m].abs().max()) if (~m).any() else 0.0 for n, m in masks.items()}
            logged = float(trainer.callback_metrics.get("lobs/sparsity", float("nan")))
            self.epochs = [*getattr(self, "epochs", []), dict(masks=masks, at_pruned=at_pruned, logged=logged)]

    return pl, LitGPT2, Recording


def run_fit(out: str, name: str) -> None:
    from pytorch_lightning.strategies import ModelParallelStrategy

    pl, LitGPT2, Recording = lit_classes()
    callback = Recording(
        sparsity=0.5, prune_epoch=PRUNE_EPOCH, calibration_batches=2, log_table=False, **callback_options(name)
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=EPOCHS,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = LitGPT2()
    trainer.fit(model)
    rec = dict(
        epochs=callback.epochs,
        pruned_points=callback.pruned_points,
        metrics=dict(callback.reports[0].metrics()) if callback.reports else {},
        dense=callback.dense,
        batches=[{k: v.clone() for k, v in b.items()} for b in callback.batches],
        sharded={n: type(p).__name__ for n, p in model.named_parameters()},
        final={k: _full(v) for k, v in model.state_dict().items()},
    )
    torch.save(rec, os.path.join(out, f"{name}_rank{trainer.global_rank}.pt"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="fit")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # two ranks on two shared cores
    warnings.filterwarnings("ignore")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    for name in args.runs.split(","):
        if name not in ("fit", "fit-seq"):
            raise ValueError(f"unknown run {name!r}")
        run_fit(args.out, name)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
