"""Running the model on a batch: the default ``forward_fn``, moving batches, eval mode, finding output heads.

Nothing here prunes; the stages of :mod:`lightning_lobs.engine` use these to feed the model.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import add_note
from ..layers import is_prunable

__all__ = [
    "HEAD_REASON",
    "OUTPUT_PIECE_BYTES",
    "PieceRows",
    "batch_rows",
    "default_forward",
    "first_sample",
    "output_rows_match",
    "sample_or_whole",
    "eval_no_grad",
    "is_empty_batch",
    "model_device",
    "move_batch",
    "output_heads",
    "slice_batch",
]

_INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values", "input_ids")


def _keyword_call(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any] | None:
    """The keyword arguments ``model(**kwargs)`` takes from ``batch`` under the default rule, or None.

    Keys the forward names are passed (a forward that names none of them but takes only ``**kwargs``
    gets them all); keys it does not name, a dataset's ``idx`` say, are dropped, as HF's ``Trainer``
    drops unused columns. None (feed one input entry instead) when the forward names none of the keys,
    or when a parameter it requires is missing from the batch (``{"input": x}`` into ``forward(self, x)``).
    """
    forward = getattr(model, "_orig_mod", model).forward  # a torch.compile wrapper: the model's own
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):  # a builtin or C forward: no signature to read
        return None
    kinds = inspect.Parameter
    named = {p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
    required = {
        p.name for p in params if p.default is kinds.empty and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)
    }
    if not required <= set(batch):
        return None
    passed = {k: v for k, v in batch.items() if k in named}
    if passed:
        return passed
    only_kwargs = not named and not required and any(p.kind == kinds.VAR_KEYWORD for p in params)
    only_kwargs = only_kwargs and not any(p.kind == kinds.VAR_POSITIONAL for p in params)
    return dict(batch) if only_kwargs and all(isinstance(k, str) for k in batch) else None


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Feed one batch to the model: a tensor as is, the first item of a tuple/list, a mapping as keywords.

    A mapping (a dict, a transformers ``BatchEncoding``) goes in as ``model(**batch)``, HF's convention,
    limited to the keys the forward's signature names (``labels`` too when it takes them; others
    dropped; a forward taking only ``**kwargs`` gets every key). When the forward names none of the
    keys, or requires an argument the batch lacks, the mapping's ``x``/``input(s)``/``image(s)``/
    ``pixel_values``/``input_ids`` entry is fed as the one input. If the model raises, its own exception
    propagates unchanged, with a note saying what was fed and how to pass ``forward_fn``.
    """
    if isinstance(batch, Tensor):
        fed, call = "model(batch)", lambda: model(batch)
    elif isinstance(batch, (list, tuple)) and batch:
        fed, call = "model(batch[0])", lambda: model(batch[0])
    elif isinstance(batch, Mapping):
        kwargs = _keyword_call(model, batch)
        key = next((k for k in _INPUT_KEYS if k in batch), None)
        if kwargs is not None:
            fed = f"model({', '.join(f'{k}=...' for k in kwargs)})"
            call = lambda: model(**kwargs)  # noqa: E731
        elif key is not None:
            fed, call = f"model(batch[{key!r}])", lambda: model(batch[key])
        else:
            raise TypeError(
                f"cannot tell the model input in a batch with keys {list(batch)}: the model's forward names none of "
                f"them and none is one of {list(_INPUT_KEYS)}; pass forward_fn=lambda model, batch: "
                "model(batch['...']) to say how to run the model on a batch."
            )
    else:
        raise TypeError(
            f"cannot tell the model input in a batch of type {type(batch).__name__}; pass "
            "forward_fn=lambda model, batch: model(...) to say how to run the model on a batch."
        )
    try:
        return call()
    except Exception as error:
        # the model's own exception propagates unchanged (same object, type and arguments), with a note
        add_note(
            error,
            f"lightning_lobs fed this batch as {fed}, the default forward_fn; if the model runs otherwise, say how, "
            "e.g. forward_fn=lambda model, batch: model(batch['input_ids'], attention_mask=batch['attention_mask'])",
        )
        raise


def _tensors(batch: Any) -> Iterator[Tensor]:
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from _tensors(v)


def is_empty_batch(batch: Any) -> bool:
    """A batch whose tensors all have 0 rows (the last batch of some samplers, a filtered shard)."""
    tensors = [t for t in _tensors(batch) if t.dim() > 0]
    return bool(tensors) and all(t.shape[0] == 0 for t in tensors)


def _plain(batch: Any) -> bool:
    """Made of tensors, mappings, lists and tuples (named ones too) and plain values only: what slice_batch rebuilds."""
    if isinstance(batch, Tensor) or batch is None or isinstance(batch, (bool, int, float, complex, str, bytes)):
        return True
    if isinstance(batch, Mapping):
        return all(_plain(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return all(_plain(v) for v in batch)
    return False


def batch_rows(batch: Any) -> int | None:
    """The batch size along dim 0 when every tensor in ``batch`` has it (so the batch can be cut into pieces of
    samples, :func:`slice_batch`), else None (a 0-d tensor, tensors of other lengths, an object not rebuilt)."""
    tensors = list(_tensors(batch))
    if not tensors or not _plain(batch) or any(t.dim() == 0 for t in tensors):
        return None
    rows = {t.shape[0] for t in tensors}
    return rows.pop() if len(rows) == 1 else None


def slice_batch(batch: Any, rows: slice, size: int | None = None) -> Any:
    """``batch`` with every tensor of ``size`` rows (any tensor when None) cut to ``rows`` along dim 0; the
    structure (mappings, named tuples, lists) and everything else as they are."""
    if isinstance(batch, Tensor):
        return batch[rows] if batch.dim() and (size is None or batch.shape[0] == size) else batch
    if isinstance(batch, Mapping):
        items = {k: slice_batch(v, rows, size) for k, v in batch.items()}
        try:
            return type(batch)(items)  # type: ignore[call-arg]  # Mapping is abstract; the batch's type is not
        except TypeError:  # a mapping type that cannot be built from a dict
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(slice_batch(v, rows, size) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, rows, size) for v in batch)
    return batch


def first_sample(batch: Any) -> Any:
    """The batch cut to its first sample where it can be (:func:`batch_rows`): enough for the forwards that only
    look at the model's structure (its output heads, whether its blocks chain), without a whole batch's logits."""
    rows = batch_rows(batch)
    return batch if rows is None or rows <= 1 else slice_batch(batch, slice(0, 1))


def sample_or_whole(run: Callable[[Any], Any], batch: Any) -> Any:
    """``run`` on the batch's first sample; on the whole batch when that raises or its output is not one sample's
    (a ``forward_fn`` that closes over tensors of the batch's size cannot run on a piece)."""
    piece = first_sample(batch)
    if piece is batch:
        return run(batch)
    try:
        out = run(piece)
    except Exception:  # noqa: BLE001 - the model cannot run on a piece: the whole batch, as before
        return run(batch)
    return out if output_rows_match(out, 1) else run(batch)


def output_rows_match(output: Any, rows: int) -> bool:
    """Whether every tensor of at least one dimension in a model output has ``rows`` samples (it ran on a piece)."""
    return all(t.shape[0] == rows for t in _tensors(output) if t.dim())


#: The model-output comparison runs batches in pieces of samples whose output (one copy) stays under this, so a
#: language model's dense and pruned logits (16 x 128 x 50,257 float32 = 0.41 GB per batch for GPT-2) never exist
#: whole, twice.
OUTPUT_PIECE_BYTES = 32 * 2**20


class PieceRows:
    """How many samples a piece of a batch gets: one for the first piece, then as many as keep one model output
    under :data:`OUTPUT_PIECE_BYTES` (learned from that first piece's output by :meth:`learn`)."""

    def __init__(self, limit: int = OUTPUT_PIECE_BYTES) -> None:
        self.limit = limit
        self.rows: int | None = None

    def pieces(self, batch: Any) -> Iterator[slice] | None:
        """The pieces of ``batch``, each sized when it is reached; None when it cannot be cut (run it whole)."""
        total = batch_rows(batch)
        return None if self.whole or total is None or total <= 1 else self._cut(total)

    def _cut(self, total: int) -> Iterator[slice]:
        start = 0
        while start < total:
            stop = min(total, start + (self.rows or 1))
            yield slice(start, stop)
            start = stop

    def learn(self, output: Any, rows: int) -> bool:
        """Size the pieces from one piece's output of ``rows`` samples (the first call only); False (and no more
        pieces) when that output is not ``rows`` samples' (the model runs on whole batches only)."""
        if self.rows is None:
            if not output_rows_match(output, rows):
                self.whole = True
                return False
            size = sum(t.numel() * t.element_size() for t in _tensors(output))
            self.rows = max(1, int(self.limit * rows // max(size, 1)))
        return True

    def first(self, run: Callable[[], Any], rows: int) -> Any:
        """The first piece's run, or None (no more pieces: run whole batches) when it raises or its output is not
        ``rows`` samples'."""
        try:
            out = run()
        except Exception:  # noqa: BLE001 - a forward_fn that cannot run on a piece: whole batches, as before
            self.whole = True
            return None
        return out if self.learn(out, rows) else None

    whole = False


def move_batch(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device``: through tuples, lists, named tuples, mappings and dataclasses,
    and objects with their own ``.to`` (a transformers ``BatchEncoding``, say). Written here rather than borrowed
    from Lightning Fabric so that ``prune_model`` needs no Lightning."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        moved = {f.name: move_batch(getattr(batch, f.name), device) for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **moved)
    if isinstance(batch, Mapping):
        items = {k: move_batch(v, device) for k, v in batch.items()}
        try:
            return type(batch)(items)  # type: ignore[call-arg]  # Mapping is abstract; the batch's type is not
        except TypeError:  # a mapping type that cannot be built from a dict
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(move_batch(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device) for v in batch)
    to = getattr(batch, "to", None)
    return to(device) if callable(to) else batch


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, a forked RNG (so the training shuffle is untouched) and no MHA fast path.

    The fused fast path of ``nn.TransformerEncoderLayer``/``nn.MultiheadAttention`` in eval mode
    skips the Linear modules' forward calls, so their hooks would see nothing.
    """
    modes = {m: m.training for m in model.modules()}
    device = model_device(model)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, mode in modes.items():
            m.training = mode


HEAD_REASON = (
    "output head ({how}): the most sensitive layer, left dense by default as SparseGPT and Wanda do; "
    "prune_head=True prunes it (or name it exactly in a sparsity mapping)"
)


def output_heads(model: nn.Module, run: Callable[[], Any]) -> dict[str, str]:
    """The model's output heads, ``name -> why``, found on one forward pass ``run()``.

    A head is a layer (not the model itself) that transformers' ``get_output_embeddings()`` returns
    for the model or one of its submodules (an HF model inside a LightningModule), or whose output
    tensor *is* the model's output: the returned tensor, a tensor item of a returned tuple/list, or
    a tensor value of a returned mapping or ``ModelOutput`` (its ``logits``). A head whose output is
    transformed before it is returned (``log_softmax(fc(x))``) is not recognised by the second rule.
    """
    names = {id(m): n for n, m in model.named_modules() if n}
    heads: dict[str, str] = {}
    for m in model.modules():
        get = getattr(m, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if isinstance(head, nn.Module) and id(head) in names:
            heads.setdefault(names[id(head)], "the model's get_output_embeddings()")
    outputs: dict[str, Any] = {}

    def keep(name: str):  # noqa: ANN202 - closure
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if isinstance(out, Tensor):  # a weak reference: no activation is kept alive
                outputs[name] = weakref.ref(out)

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n and is_prunable(m)]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    if isinstance(result, Mapping):
        returned = list(result.values())
    elif isinstance(result, (list, tuple)):
        returned = list(result)
    else:
        returned = [result, getattr(result, "logits", None)]
    returned = [t for t in returned if isinstance(t, Tensor)]
    for n, ref in outputs.items():
        out = ref()
        if out is not None and any(out is t for t in returned):
            heads.setdefault(n, "its output is the model's output")
    return {n: HEAD_REASON.format(how=how) for n, how in heads.items()}
