"""Helper for ``tests/test_fsdp_gpt2.py`` (not a test module: it has no ``test_`` functions).

Starts 2 gloo processes on CPU; in each, builds the same small ``transformers`` GPT-2 (``GPT2LMHeadModel`` from a
config, seeded random weights, no download), shards it as FSDP2 users do (``fully_shard`` on every block of
``transformer.h``, then on the root: the embeddings, the tied ``lm_head`` and ``ln_f`` sharded with the root) and
calls ``prune_model`` on this rank's own calibration batches (dicts of ``input_ids`` and ``attention_mask``, as a
tokenizer gives them). Every rank saves to ``<out>/<run>_rank<r>.pt`` the dense state, its batches, the held-out
ids, the gathered weights and masks after the prune, the report's numbers, the warnings it raised and the logits
error of its sharded model against the dense one on the held-out sequences.

    python tests/fsdp_gpt2_script.py --out DIR [--runs default,seq]

Runs: ``default`` is ``prune_model(model, batches, 0.5)`` (global allocation, ``auto`` method); ``seq`` adds
``sequential=True`` (the block pipeline: each block calibrated on the pruned blocks before it). Both with float64
Hessians, so that the tests can compare them with one process's up to the summation order.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ranks import free_port  # tests/ is sys.path[0] when this script runs

BLOCKS, WIDTH, HEADS, VOCAB, CONTEXT = 2, 64, 2, 96, 24
SEQUENCES, BATCH = 8, 4  # per rank
HELDOUT = 4
SPARSITY = 0.5


def make_gpt2(blocks: int = BLOCKS, width: int = WIDTH) -> nn.Module:
    """``blocks`` x ``width`` GPT-2 (tied ``lm_head``), seeded, no dropout, eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=CONTEXT,
        n_embd=width,
        n_layer=blocks,
        n_head=HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # GPT-2 starts its biases at zero: give them some spread, as trained weights have
        for m in model.modules():
            if getattr(m, "bias", None) is not None and isinstance(m.bias, nn.Parameter):
                m.bias.normal_(0.0, 0.05)
    return model


def rank_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    """This rank's calibration batches (different on each rank), as a tokenizer would give them."""
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, VOCAB, (SEQUENCES, CONTEXT), generator=g)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(BATCH)]


def heldout_ids() -> torch.Tensor:
    """Held-out sequences for the logits error (the same on every rank)."""
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (HELDOUT, CONTEXT), generator=g)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.double()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` (Frobenius, float64)."""
    return float((out - ref).norm() / ref.norm())


def shard(model: nn.Module) -> None:
    """``fully_shard`` every GPT-2 block, then the root (the usual FSDP2 wrapping of a transformer)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def prune(model: nn.Module, batches: list[Any], run: str) -> Any:
    """``prune_model`` as the run says (the same call the tests make on one process)."""
    from lightning_lobs import CalibrationOptions, prune_model

    calibration = CalibrationOptions(hessian_dtype=torch.float64)
    return prune_model(model, batches, SPARSITY, calibration=calibration, sequential=run == "seq")


def _whole(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from lightning_lobs.sharding import gather

    return {k: gather(v.detach()).clone() for k, v in state.items()}


def run(run_name: str, rank: int) -> dict[str, Any]:
    from lightning_lobs.sharding import gather, is_sharded

    model = make_gpt2()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    heldout = heldout_ids()
    dense_logits = logits(model, heldout)
    shard(model)
    batches = rank_batches(rank)
    record: dict[str, Any] = {"dense": dense, "batches": batches, "heldout": heldout}
    record["sharded"] = {n: is_sharded(p) for n, p in model.named_parameters()}
    # sharded logits before the prune: the sharded forward is the dense one (up to summation order)
    record["dense_logits_error"] = relative_error(logits(model, heldout), dense_logits)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune(model, batches, run_name)
    masks = report.masks.masks
    record.update(
        warnings=[str(w.message) for w in caught],
        pruned=_whole(model.state_dict()),
        masks={n: gather(m).clone() for n, m in masks.items()},
        layer_sparsity={n: r.sparsity for n, r in report.layers.items()},
        methods={n: r.method for n, r in report.layers.items()},
        sparsity=report.sparsity,
        metrics=dict(report.metrics()),
        logits_error=relative_error(logits(model, heldout), dense_logits),
    )
    return record


def worker(rank: int, port: int, out: str, runs: list[str]) -> None:
    torch.set_num_threads(1)  # two ranks on two shared cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for name in runs:
            torch.save(run(name, rank), os.path.join(out, f"{name}_rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="default,seq")
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(free_port(), args.out, args.runs.split(",")), nprocs=2, join=True)


if __name__ == "__main__":
    sys.exit(main())
