"""Feeding the block-by-block pipeline: check on one forward that the blocks chain, catch the first block's inputs,
run one block on caught inputs, and run the model's tail from the last block's output.

The blocks come from :mod:`lightning_lobs.blocks` (or the user). A chain means: each block is called once per
forward, in one order, block ``i+1``'s hidden input *is* block ``i``'s output (its first tensor), and every other
argument (attention masks, position ids, HF's cached position embeddings...) is the one block 0 got. Then one
forward per batch, stopped at block 0 by a pre-hook, catches everything the blocks need.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor, nn

from ..blocks import layers_in

__all__ = ["BlockCall", "Chain", "catch_first", "next_call", "probe_chain", "run_block", "run_tail"]


class _Stop(Exception):  # noqa: N818 - not an error: the forward stops at block 0 on purpose
    """Raised by the pre-hook on block 0 once it has caught the block's inputs."""


@dataclass(frozen=True)
class BlockCall:
    """One batch's inputs to a block, positional and keyword, with HF caches removed (see :func:`_no_cache`)."""

    args: tuple
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class Chain:
    """Blocks that chain (see the module docstring), and the selected layers grouped around and inside them."""

    blocks: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    prefix: tuple[str, ...]
    """Selected layers the forward calls before block 0 (a CNN's stem), in call order."""
    inside: tuple[tuple[str, ...], ...]
    """Per block, its selected layers in call order (those the probe did not see call last)."""
    suffix: tuple[str, ...]
    """Selected layers after the last block (an lm head, a classifier) and outside layers the probe did not see."""
    hidden: int | str
    """Where the hidden state goes in a block's call: 0 (the first positional argument) or a keyword's name."""
    example: Any = None
    """The model's positional input on the probed batch, when it takes one (for the bound's shape analysis)."""


def _is_cache(value: Any) -> bool:
    return hasattr(value, "get_seq_length") and hasattr(value, "update")


def _no_cache(call: BlockCall) -> BlockCall:
    """The call without HF key/value caches: re-running a block on a cache would append its keys a second time."""
    args = tuple(None if _is_cache(a) else a for a in call.args)
    kwargs = {k: None if _is_cache(v) else v for k, v in call.kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return BlockCall(args, kwargs)


def _hidden_of(out: Any) -> Tensor | None:
    """A block's output hidden state: the tensor itself, the first item of a tuple, the first tensor of a mapping."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if isinstance(out, Mapping):
        return next((v for v in out.values() if isinstance(v, Tensor)), None)
    return None


def _hidden_key(call: BlockCall) -> int | str | None:
    if call.args and isinstance(call.args[0], Tensor):
        return 0
    if isinstance(call.kwargs.get("hidden_states"), Tensor):
        return "hidden_states"
    return next((k for k, v in call.kwargs.items() if isinstance(v, Tensor)), None)


def _get(call: BlockCall, key: int | str) -> Any:
    return call.args[0] if key == 0 else call.kwargs.get(str(key))


def next_call(call: BlockCall, out: Any, key: int | str) -> BlockCall:
    """The next block's inputs: ``call`` with its hidden state replaced by the output of the block it fed."""
    hidden = _hidden_of(out)
    if key == 0:
        return BlockCall((hidden, *call.args[1:]), call.kwargs)
    return BlockCall(call.args, {**call.kwargs, str(key): hidden})


def _same(a: Any, b: Any) -> bool:
    """Whether two block arguments are the same input (the same tensor, or equal plain values)."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool((a == b).all())
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an object without a usable ==: not provably the same
        return False


def _chain_problem(names: Sequence[str], calls: Sequence[BlockCall], outs: Sequence[Any], key: int | str) -> str:
    """Why the probed calls do not chain ("" when they do)."""
    first = calls[0]
    for i in range(1, len(calls)):
        prev, call = names[i - 1], calls[i]
        hidden = _hidden_of(outs[i - 1])
        if hidden is None or not _same(_get(call, key), hidden):
            return f"block {names[i]!r} is not fed the output of {prev!r} (something runs between them)"
        rest = (call.args[1:], {k: v for k, v in call.kwargs.items() if k != key})
        if not _same(rest, (first.args[1:], {k: v for k, v in first.kwargs.items() if k != key})):
            return f"block {names[i]!r} gets other arguments than {names[0]!r} (besides the hidden state)"
    return ""


def probe_chain(
    model: nn.Module, run: Callable[[], Any], blocks: Sequence[str], layers: Mapping[str, nn.Module]
) -> Chain | str:
    """Run the model once (``run()``) and check that ``blocks`` chain; the :class:`Chain`, or why they do not."""
    modules = dict(model.named_modules())
    events: list[tuple[str, str]] = []
    calls: dict[str, BlockCall] = {}
    outs: dict[str, Any] = {}
    counts = dict.fromkeys(blocks, 0)

    def pre(name: str):  # noqa: ANN202 - closure
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            counts[name] += 1
            calls.setdefault(name, BlockCall(tuple(args), dict(kwargs)))
            events.append(("in", name))

        return hook

    def post(name: str):  # noqa: ANN202 - closure
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            outs.setdefault(name, out)
            events.append(("out", name))

        return hook

    handles = [modules[b].register_forward_pre_hook(pre(b), with_kwargs=True) for b in blocks]
    handles += [modules[b].register_forward_hook(post(b)) for b in blocks]
    seen: set[str] = set()

    def first_call(name: str):  # noqa: ANN202 - closure
        def hook(mod: nn.Module, args: tuple) -> None:
            if name not in seen:
                seen.add(name)
                events.append(("layer", name))

        return hook

    handles += [m.register_forward_pre_hook(first_call(n)) for n, m in layers.items()]
    inputs: list[Any] = []
    handles.append(
        model.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]) if len(args) == 1 else None)
    )
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    chain = _make_chain(blocks, modules, layers, (events, calls, outs, counts))
    return chain if isinstance(chain, str) else replace(chain, example=inputs[0] if inputs else None)


def _make_chain(
    blocks: Sequence[str], modules: Mapping[str, nn.Module], layers: Mapping[str, nn.Module], probed: tuple
) -> Chain | str:
    events, calls, outs, counts = probed
    twice = [b for b, c in counts.items() if c != 1]
    if twice:
        return f"blocks {twice} are called {[counts[b] for b in twice]} times in one forward (a chain calls each once)"
    order = [n for kind, n in events if kind == "in"]
    key = _hidden_key(calls[order[0]])
    if key is None:
        return f"block {order[0]!r} gets no tensor input"
    problem = _chain_problem(order, [calls[b] for b in order], [outs[b] for b in order], key)
    if problem:
        return problem
    start, end = events.index(("in", order[0])), events.index(("out", order[-1]))
    called = [(i, n) for i, (kind, n) in enumerate(events) if kind == "layer"]
    inside = tuple(layers_in(b, layers) for b in order)
    in_blocks = {n for group in inside for n in group}
    prefix = tuple(n for i, n in called if i < start and n not in in_blocks)
    between = [n for i, n in called if start < i < end and n not in in_blocks]
    if between:
        return f"layers {between} run between the blocks but outside them"
    rank = {n: i for i, n in called}
    ordered = tuple(tuple(sorted(group, key=lambda n: rank.get(n, len(events)))) for group in inside)
    suffix = tuple(n for n in layers if n not in in_blocks and n not in prefix)
    suffix = tuple(sorted(suffix, key=lambda n: rank.get(n, len(events))))
    return Chain(tuple(order), tuple(modules[b] for b in order), prefix, ordered, suffix, key)


def catch_first(first: nn.Module, run: Callable[[], Any]) -> BlockCall:
    """Run the model (``run()``) up to block ``first`` and return the inputs it would have got (caches removed)."""
    caught: list[BlockCall] = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        caught.append(_no_cache(BlockCall(tuple(args), dict(kwargs))))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if not caught:
        raise RuntimeError(
            "the model's forward did not reach the first block on a calibration batch; the block pipeline needs "
            "every batch to run through the blocks (pass blocks=[...] naming the right modules)."
        )
    return caught[0]


def run_block(block: nn.Module, call: BlockCall) -> Any:
    """The block's output on one batch's caught inputs."""
    return block(*call.args, **call.kwargs)


def run_tail(blocks: Sequence[nn.Module], run: Callable[[], Any], last_output: Any) -> Any:
    """Run the model (``run()``) with every block replaced by one that returns ``last_output`` (the last block's
    output on this batch): what comes after the blocks runs on it, the blocks themselves are not recomputed."""
    saved = [b.__dict__.get("forward") for b in blocks]
    for b in blocks:
        b.forward = lambda *args, **kwargs: last_output
    try:
        return run()
    finally:
        for b, own in zip(blocks, saved):
            del b.forward
            if own is not None:
                b.forward = own
