"""GPT-2 pieces for the GPT-2 benchmarks (no Lightning import: their child processes start faster).

* GPT-2 built from its config with seeded random weights and the real 50,257-token vocabulary
  (:func:`random_gpt2`), fed the stdlib's source bytes mapped to GPT-2's own byte tokens (:func:`gpt2_byte_ids`).
* The logits error of a pruned model against the dense one, computed through the (tied, unpruned) output embedding
  one sequence at a time, so the ``(tokens, vocabulary)`` logits never exist whole (:func:`logits_relative_error`).

The byte-level GPT-2 of examples/gpt2_stdlib.py (its data, training and cache) is :mod:`lobs_lab.byte_gpt2`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

GPT2_VOCAB = 50257

# --------------------------------------------------------------------------- GPT-2 from its config, real vocabulary


def _byte_order() -> list[int]:
    """GPT-2's byte-level BPE lists the 256 bytes first, printable ones (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``)
    in byte order, then the others in byte order (its ``bytes_to_unicode``); token id = position in this list."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return printable + [b for b in range(256) if b not in printable]


#: ``BYTE_TO_GPT2_ID[b]`` is GPT-2's token id of the single byte ``b`` (space, byte 32, is its token 220).
BYTE_TO_GPT2_ID = torch.empty(256, dtype=torch.long)
BYTE_TO_GPT2_ID[torch.tensor(_byte_order())] = torch.arange(256)


def gpt2_byte_ids(tokens: Tensor) -> Tensor:
    """Byte tokens (any integer tensor of values 0-255) as GPT-2 token ids (int64): text GPT-2's tokenizer would
    see, one token per byte (no merges; needs no tokenizer files)."""
    return BYTE_TO_GPT2_ID[tokens.long()]


def random_gpt2(layers: int, width: int, heads: int, context: int, seed: int) -> nn.Module:
    """``GPT2LMHeadModel`` from a ``GPT2Config`` (no download): GPT-2's vocabulary and defaults, ``layers`` blocks of
    ``width``, weights drawn by its own initialisation after ``torch.manual_seed(seed)``, no dropout, eval mode,
    no key/value cache (the benchmarks run whole sequences)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=GPT2_VOCAB,
        n_positions=max(context, 1024),
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).eval()


@torch.no_grad()
def final_hidden(model: nn.Module, windows: Tensor, batch: int = 8) -> Tensor:
    """The hidden states the LM head reads (after ``ln_f``), ``(N, T, width)``, of input ids ``windows``."""
    out = [model.transformer(input_ids=windows[i : i + batch]).last_hidden_state for i in range(0, len(windows), batch)]
    return torch.cat(out)


@torch.no_grad()
def logits_relative_error(hidden: Tensor, dense_hidden: Tensor, head_weight: Tensor) -> float:
    """``||logits - dense logits|| / ||dense logits||`` (Frobenius over all positions and the vocabulary) with
    ``logits = hidden @ head_weight.T``; accumulated in float64 one sequence at a time."""
    num = den = 0.0
    for h, h0 in zip(hidden, dense_hidden):
        num += float(((h - h0) @ head_weight.T).double().square().sum())
        den += float((h0 @ head_weight.T).double().square().sum())
    return (num / den) ** 0.5


def block_layer_sparsity(blocks: nn.Module) -> float:
    """Fraction of zeros over the weights of every ``nn.Linear`` / ``Conv1D`` inside ``blocks``."""
    from lobs_lab.peers import prunable_layers

    weights = [layer.weight for layer in prunable_layers(blocks).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
