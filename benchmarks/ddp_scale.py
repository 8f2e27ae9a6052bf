"""LOBSPruning under DDP on CPU: calibration and solve times with 1 rank vs 2 ranks.

    python benchmarks/ddp_scale.py --devices 1 --out benchmarks/results/ddp_1.json
    python benchmarks/ddp_scale.py --devices 2 --out benchmarks/results/ddp_2.json   # strategy="ddp"

Lightning relaunches this script for rank 1 (``_SubprocessScriptLauncher``), so it must stay a plain script
with all work under ``main()``. The model is an MLP 784-H-H-10 (default H=1024) on real MNIST digits
(``lobs_lab.mnist.load_mnist``, flattened); the callback prunes every Linear layer to ``--sparsity`` with
``--method`` at the start of epoch 0 from ``--cal-batches-total`` calibration batches of ``--batch`` images in
total (each rank takes its share from its DistributedSampler shard), then trains ``--train-batches`` steps.
Rank 0 writes ``calibration_seconds`` / ``solve_seconds`` of ``LOBSPruning.last_report`` (and each layer's
seconds and owner-side method) as JSON. Timings on a shared 2-core machine: 2 ranks compete for the same cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--method", default="exact")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--cal-batches-total", type=int, default=8)
    p.add_argument("--train-batches", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    t_script = time.perf_counter()
    import pytorch_lightning as pl
    import torch
    from lobs_lab.harness import loadavg, machine_info, peak_rss_gib, write_json
    from lobs_lab.mnist import load_mnist
    from lobs_lab.models import MNISTClassifier
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lobs import LOBSPruning

    if args.cal_batches_total % args.devices:
        raise SystemExit("--cal-batches-total must be divisible by --devices")
    torch.manual_seed(0)
    data = load_mnist()
    ds = TensorDataset(data.train_x.reshape(-1, 784), data.train_y)
    loader = DataLoader(ds, batch_size=args.batch, shuffle=False)
    h = args.hidden
    net = nn.Sequential(nn.Linear(784, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
    model = MNISTClassifier(net)
    threads = {}

    class Probe(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):  # listed before LOBSPruning, so it runs first
            threads[trainer.global_rank] = torch.get_num_threads()

    cb = LOBSPruning(
        sparsity=args.sparsity,
        prune_epoch=0,
        method=args.method,
        calibration_batches=args.cal_batches_total // args.devices,
        log_table=False,
        prune_head=True,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=1,
        limit_train_batches=args.train_batches,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Probe(), cb],
    )
    load0 = loadavg()
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    fit_seconds = time.perf_counter() - t0
    rep = cb.last_report
    if trainer.global_rank == 0:
        write_json(
            args.out,
            {
                "command": "python benchmarks/ddp_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "machine": machine_info(),
                "devices": args.devices,
                "strategy": type(trainer.strategy).__name__,
                "world_size": trainer.world_size,
                "torch_threads_rank0_at_epoch_start": threads.get(0),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "model": f"MLP 784-{h}-{h}-10",
                "method": args.method,
                "sparsity": args.sparsity,
                "calibration": f"{args.cal_batches_total} batches of {args.batch} in total ({args.cal_batches_total // args.devices} per rank)",
                "calibration_seconds": rep.calibration_seconds,
                "solve_seconds": rep.solve_seconds,
                "layers": {
                    n: {
                        "method": r.method,
                        "shape": list(r.shape),
                        "seconds": r.seconds,
                        "layer_error": r.layer_error,
                        "sparsity": r.sparsity,
                    }
                    for n, r in rep.layers.items()
                },
                "fit_seconds": fit_seconds,
                "script_seconds": time.perf_counter() - t_script,
                "load": [load0, loadavg()],
                "peak_rss_gib_rank0": peak_rss_gib(),
            },
        )
        print(
            f"devices={args.devices}: calibration {rep.calibration_seconds:.2f}s solve {rep.solve_seconds:.2f}s "
            f"threads(rank0)={threads.get(0)} load {loadavg()}",
            flush=True,
        )


if __name__ == "__main__":
    main()
