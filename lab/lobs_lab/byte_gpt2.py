"""The byte-level GPT-2 of examples/gpt2_stdlib.py, shared with benchmarks/gpt2_perplexity.py: its data
(:func:`stdlib_lm_data`), its validation curve (:class:`ValCurve`) and its dense training, cached on disk
(:func:`train_byte_gpt2`)."""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader

from lobs_lab.harness import fit_quietly, quiet_trainer, train_or_load
from lobs_lab.metrics import LN2, lm_metrics
from lobs_lab.models import ByteLM, make_gpt2
from lobs_lab.prune_retrain import baseline_masks, collect_input_norms
from lobs_lab.text import RandomWindows, StdlibCorpus, eval_windows, inputs_only, load_stdlib_corpus

log = logging.getLogger("lightning_lobs.examples.gpt2")


class ValCurve(Callback):
    """Validation NLL every ``every`` steps and at the end of training."""

    def __init__(self, windows: Tensor, every: int) -> None:
        self.windows, self.every = windows, every
        self.curve: list[tuple[int, float, float]] = []  # (step, val nll, seconds since start)
        self.t0 = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            nll = lm_metrics(pl_module, self.windows)["nll"]
            self.curve.append((step, nll, time.perf_counter() - self.t0))
            log.info("step %d: validation nll %.4f (%.2f bits/byte), %.0f s", step, nll, nll / LN2, self.curve[-1][2])


@dataclass
class StdlibLMData:
    """The splits of examples/gpt2_stdlib.py: validation and test windows, training and retraining windows, the
    calibration inputs (as ``(N, T)`` and as batches)."""

    corpus: StdlibCorpus
    val: Tensor
    test: Tensor
    train: RandomWindows
    retrain: RandomWindows
    calib_windows: Tensor
    calib: list[Tensor]


def stdlib_lm_data(args: argparse.Namespace, retrain_steps: int = 0) -> StdlibLMData:
    """The data of examples/gpt2_stdlib.py from its arguments (``context``, ``val_windows``, ``test_windows``,
    ``train_steps``, ``batch_size``, ``calibration_windows``, ``calibration_batch``, ``seed``): training windows
    with ``seed``, retraining windows with ``seed + 1``, calibration windows (inputs only) with ``seed + 2``."""
    corpus = load_stdlib_corpus()
    T = args.context
    train_tokens = corpus.tokens["train"]
    calib_ds = RandomWindows(train_tokens, T, args.calibration_windows, seed=args.seed + 2)
    calib_windows = inputs_only(torch.stack([calib_ds[i] for i in range(args.calibration_windows)]))
    return StdlibLMData(
        corpus=corpus,
        val=eval_windows(corpus.tokens["validation"], T, args.val_windows),
        test=eval_windows(corpus.tokens["test"], T, args.test_windows),
        train=RandomWindows(train_tokens, T, args.train_steps * args.batch_size, seed=args.seed),
        retrain=RandomWindows(train_tokens, T, retrain_steps * args.batch_size, seed=args.seed + 1),
        calib_windows=calib_windows,
        calib=list(calib_windows.split(args.calibration_batch)),
    )


#: The arguments the dense training depends on (the cache key of :func:`train_byte_gpt2`, with the corpus).
TRAINING_KEYS = (
    "layers",
    "width",
    "heads",
    "context",
    "batch_size",
    "train_steps",
    "lr",
    "warmup",
    "val_every",
    "val_windows",
    "seed",
)


def train_byte_gpt2(args: argparse.Namespace, data: StdlibLMData, cache: str | None) -> tuple[ByteLM, dict[str, Any]]:
    """The dense byte-level GPT-2 of examples/gpt2_stdlib.py: trained (AdamW, warmup and cosine, clipping 1.0, in a
    quiet Lightning ``Trainer``) or loaded from ``cache`` when it was trained with the same :data:`TRAINING_KEYS`
    and corpus. Returns the module and the training record (``dense_train_s``, ``val_curve``, ``dense_source``)."""
    dense = ByteLM(
        make_gpt2(args.layers, args.width, args.heads, args.context),
        lr=args.lr,
        warmup=args.warmup,
        total_steps=args.train_steps,
    )

    def train() -> dict[str, Any]:
        curve = ValCurve(data.val, args.val_every)
        trainer = quiet_trainer(max_steps=args.train_steps, max_epochs=1, callbacks=[curve], gradient_clip_val=1.0)
        seconds = fit_quietly(trainer, dense, DataLoader(data.train, batch_size=args.batch_size, shuffle=False))
        return {"dense_train_s": seconds, "val_curve": curve.curve}

    key = {k: getattr(args, k) for k in TRAINING_KEYS}
    training = train_or_load(cache, {**key, "corpus": data.corpus.info()}, dense, train)
    return dense, training


def add_training_args(p: argparse.ArgumentParser) -> None:
    """The arguments of the byte-level GPT-2, its training, its data and its cache (examples/gpt2_stdlib.py's
    defaults: 4 layers of width 256, 2,000 steps of 16 x 128 bytes)."""
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--test-windows", type=int, default=192)
    p.add_argument("--calibration-windows", type=int, default=64, help="calibration sequences (of --context tokens)")
    p.add_argument("--calibration-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def set_quick_training(args: argparse.Namespace) -> None:
    """The smoke-run sizes of :func:`add_training_args`' arguments: a 2 x 64 GPT-2, 12 steps of 8 x 32 bytes."""
    args.layers, args.width, args.heads, args.context, args.batch_size = 2, 64, 2, 32, 8
    args.train_steps, args.warmup, args.val_every, args.val_windows, args.test_windows = 12, 2, 6, 8, 16
    args.calibration_windows, args.calibration_batch = 8, 4


def wanda_block_masks(
    module: torch.nn.Module,
    names: Sequence[str],
    calib: Sequence[Tensor],
    sparsity: float | None,
    pattern: tuple[int, int] | None,
) -> dict[str, Tensor]:
    """Wanda's keep-masks for the GPT-2 layers ``names`` (qualified in ``module``), taken block by block as in its
    paper: block ``i``'s input norms come from a pass over ``calib`` through the already pruned blocks before it;
    each block's masks are written into ``module`` before the next (per output row; N:M with ``pattern``)."""
    masks: dict[str, Tensor] = {}
    modules = dict(module.named_modules())
    found = {m.group(1): int(m.group(2)) for n in names if (m := re.match(r"(.*\.h\.(\d+)\.)", n))}
    if len(found) == 0 or any(re.match(r".*\.h\.\d+\.", n) is None for n in names):
        raise ValueError("wanda_block_masks: every name must lie in a GPT-2 block ('...transformer.h.<i>.').")
    prefixes = sorted(found, key=found.__getitem__)
    for prefix in prefixes:
        block = [n for n in names if n.startswith(prefix)]
        norms = collect_input_norms(module, block, calib, lambda b: module(b))
        block_masks = baseline_masks(module, block, "wanda", sparsity, pattern, norms)
        with torch.no_grad():
            for n, m in block_masks.items():
                modules[n].weight.mul_(m.to(modules[n].weight.dtype))
        masks.update(block_masks)
    return masks
