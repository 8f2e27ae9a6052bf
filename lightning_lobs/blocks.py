"""Block boundaries: the repeated blocks that the block-by-block pipeline (``sequential=True``) prunes one at a time.

Pure inspection of the module tree, nothing is run. A *block* is a module that holds selected layers inside it (it is
not one itself) and is called once per forward, the output of one block being the input of the next: the decoder
layers of a Hugging Face model (``transformer.h``, ``model.layers``, ``encoder.layer``), the layers of an
``nn.TransformerEncoder``, the stages of a torchvision ResNet (``layer1`` .. ``layer4``), or modules the user names.
Whether the forward really chains them is checked on a forward pass by the engine
(:mod:`lightning_lobs.engine.blocks`); this module only proposes them.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Sequence

from torch import nn

__all__ = ["check_block_names", "find_blocks", "layers_in"]


def layers_in(block: str, layers: Collection[str]) -> list[str]:
    """The selected ``layers`` inside the module named ``block`` (a name prefix match on the module tree)."""
    prefix = f"{block}." if block else ""
    return [n for n in layers if n.startswith(prefix) and n != block]


def find_blocks(model: nn.Module, layers: Collection[str]) -> list[str]:
    """The longest run of sibling modules of one class that hold selected ``layers`` (module names), or ``[]``.

    Candidates are, for every module, its children grouped by class, at least two of a class, one of them at least
    holding a selected layer and none being a selected layer itself (a plain ``nn.Sequential`` of Linears has no
    blocks). The group with the most members wins (GPT-2's 12 ``GPT2Block``s over a block's two LayerNorms, a
    ResNet's four stages over a stage's two BasicBlocks); a tie goes to the group holding more selected layers.
    Every member is returned, those without selected layers too: the pipeline must run them to feed the next.
    """
    selected = set(layers)
    best: tuple[tuple[int, int], list[str]] = ((0, 0), [])
    for parent_name, parent in model.named_modules():
        by_class: dict[type, list[str]] = {}
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            by_class.setdefault(type(child), []).append(full)
        for names in by_class.values():
            if len(names) < 2 or any(n in selected for n in names):
                continue
            held = sum(len(layers_in(n, selected)) for n in names)
            score = (len(names), held)
            if held and score > best[0]:
                best = (score, names)
    return best[1]


def check_block_names(model: nn.Module, names: Sequence[str], layers: Collection[str]) -> list[str]:
    """The user's block names, checked: each names a module of ``model``, none inside another, and together they
    hold at least one selected layer. Raises ``ValueError`` naming ``blocks`` and the fix otherwise."""
    modules = dict(model.named_modules())
    for n in names:
        if n not in modules or not n:
            close = difflib.get_close_matches(n, [m for m in modules if m], n=3)
            hint = f" (did you mean {close}?)" if close else ""
            raise ValueError(
                f"blocks names {n!r}, which is not a submodule of the model{hint}; pass qualified module names as "
                "model.named_modules() lists them, e.g. blocks=['transformer.h.0', 'transformer.h.1', ...]."
            )
    if len(set(names)) != len(names):
        raise ValueError(f"blocks names a module twice: {list(names)}; name each block once.")
    for a in names:
        for b in names:
            if a != b and b.startswith(f"{a}."):
                raise ValueError(
                    f"blocks names {b!r} inside {a!r}; blocks must not nest: name either the outer module or its parts."
                )
    if not any(layers_in(n, layers) for n in names):
        raise ValueError(
            f"the blocks {list(names)} hold none of the layers selected for pruning; name the modules that contain "
            "them (or leave blocks=None to find them)."
        )
    return list(names)
