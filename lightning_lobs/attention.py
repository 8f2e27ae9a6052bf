"""``nn.MultiheadAttention`` as prunable layers: the one place that knows how attention holds its weights.

An attention module holds its q, k and v projections as row blocks of one bare Parameter
(``in_proj_weight``, ``(3E, E)``) or as three (``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ from
``embed_dim``), their biases as blocks of ``in_proj_bias``, and applies ``out_proj`` functionally. No
forward hook sees any of their inputs, so the rest of the library could not prune them.

Here each projection becomes a layer of its own, named ``<attn>.q_proj``, ``<attn>.k_proj``,
``<attn>.v_proj`` (an :class:`AttentionProjection`: an ``nn.Linear`` whose weight and bias are views of
the attention's Parameters, so a solve written into it lands in the model) and ``<attn>.out_proj`` (the
module itself). While :func:`feeding` is active, every attention call is followed by calls of those
four layers on their true inputs: the query, key and value as given (so self-attention shares one
Hessian, cross-attention's k and v see the memory), and the attention output before ``out_proj``,
recomputed by the module's own forward with ``out_proj`` set to the identity (exact: ``x @ I`` adds
only zeros), so key padding masks, attention masks, ``batch_first``, ``add_bias_kv`` and the rest are
honoured as the module honours them. Masks are kept per Parameter (``<attn>.in_proj_weight``, or
``<attn>.q_proj_weight`` ...), so :class:`~lightning_lobs.MaskSet` holds them through training. The
attention's ``bias_k``/``bias_v`` (``add_bias_kv=True``) are not projections and stay dense, listed with the
skipped modules (:func:`dense_parameters`).
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "AttentionProjection",
    "attention_reason",
    "dense_parameters",
    "feeding",
    "mask_weight_names",
    "projections",
    "to_parameter_masks",
]

_BLOCKS = ("q", "k", "v")
_FORWARD = inspect.signature(nn.MultiheadAttention.forward)


class AttentionProjection(nn.Linear):
    """One of the q/k/v projections of an ``nn.MultiheadAttention``, as an ``nn.Linear`` over views of its weights.

    ``weight`` and ``bias`` are plain tensors sharing storage with the attention's Parameters (never
    registered here, so nothing is added to any ``state_dict``); ``attention`` is the owner's name,
    ``parameter`` the qualified name of the Parameter holding the weight and ``rows`` its row block.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, attention: str, parameter: str, rows: slice) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
        self.weight = weight  # type: ignore[assignment]  # a view, deliberately not a Parameter
        self.bias = bias  # type: ignore[assignment]
        self.attention = attention
        self.parameter = parameter
        self.rows = rows


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _blocks(name: str, mha: nn.MultiheadAttention) -> dict[str, AttentionProjection]:
    e = mha.embed_dim
    bias = None if mha.in_proj_bias is None else mha.in_proj_bias.detach()
    out: dict[str, AttentionProjection] = {}
    for i, block in enumerate(_BLOCKS):
        rows = slice(i * e, (i + 1) * e)
        if mha._qkv_same_embed_dim:
            param, weight, wrows = "in_proj_weight", mha.in_proj_weight.detach()[rows], rows
        else:
            param = f"{block}_proj_weight"
            weight, wrows = getattr(mha, param).detach(), slice(0, e)
        out[_join(name, f"{block}_proj")] = AttentionProjection(
            weight, None if bias is None else bias[rows], name, _join(name, param), wrows
        )
    return out


def projections(model: nn.Module) -> dict[str, AttentionProjection]:
    """The q/k/v projections of every ``nn.MultiheadAttention`` in ``model``, by layer name (fresh views each call)."""
    out: dict[str, AttentionProjection] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) and not attention_reason(m):
            out.update(_blocks(name, m))
    return out


def attention_reason(mha: nn.MultiheadAttention) -> str:
    """Why this attention's projections cannot be pruned ("" when they can)."""
    if parametrize.is_parametrized(mha):
        return "its projection weights are computed by a parametrization, so zeros written to them would not hold"
    return ""


def whole_module_reason(name: str) -> str:
    """What to name instead of an attention module itself."""
    parts = ", ".join(repr(_join(name, p)) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    return f"it is pruned as its projections {parts}; name those, or {_join(name, '*')!r}"


def dense_parameters(modules: Mapping[str, nn.Module], targets: Collection[str]) -> dict[str, str]:
    """The attention Parameters left dense beside pruned projections, with why: ``bias_k`` / ``bias_v``.

    ``modules``: the model's modules by name; ``targets``: the layers being pruned. Listed for every attention with
    a projection among ``targets``, so the skip warning names them as it names every other dense weight.
    """
    out: dict[str, str] = {}
    for name, mha in modules.items():
        if not isinstance(mha, nn.MultiheadAttention):
            continue
        if not any(_join(name, f"{p}_proj") in targets for p in ("q", "k", "v", "out")):
            continue
        for attr, what in (("bias_k", "key"), ("bias_v", "value")):
            if getattr(mha, attr, None) is not None:
                out[_join(name, attr)] = (
                    f"the learned {what} add_bias_kv=True appends to every sequence: attention's own Parameter, "
                    "applied after the projections, not a weight matrix of one"
                )
    return out


def mask_weight_names(model: nn.Module) -> list[str]:
    """Qualified names of the attention projection Parameters that masks are kept on."""
    return sorted({p.parameter for p in projections(model).values()})


def _batch_first(mha: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """Rows as ``(batch, length, features)``, so a layer's sample count is the batch size."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x if mha.batch_first else x.transpose(0, 1)


def attention_output(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> Tensor:
    """The input of ``out_proj`` in this call: the module's own forward with ``out_proj`` as the identity."""
    w = mha.out_proj.weight
    params = {"out_proj.weight": torch.eye(w.shape[0], dtype=w.dtype, device=w.device)}
    if mha.out_proj.bias is not None:
        params["out_proj.bias"] = torch.zeros_like(mha.out_proj.bias)
    out = torch.func.functional_call(mha, params, args, kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def feeding(model: nn.Module, layers: Mapping[str, nn.Module]) -> Iterator[None]:
    """While active, each call of an attention module owning one of ``layers`` calls its projection layers.

    ``layers``: the engine's selected layers; only attention modules with a projection among them get a hook.
    The calls come right after the attention's own forward, so their hooks see the true inputs in call order.
    """
    modules = dict(model.named_modules())
    owned = {n: m for n, m in layers.items() if isinstance(m, AttentionProjection)}
    names = {m.attention for m in owned.values()}
    names |= {
        n.rpartition(".")[0]
        for n, m in layers.items()
        if isinstance(modules.get(n.rpartition(".")[0]), nn.MultiheadAttention)
    }
    busy: list[bool] = [False]

    def make_hook(name: str, mha: nn.MultiheadAttention):
        mine = [(owned.get(_join(name, f"{b}_proj")), b) for b in _BLOCKS]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            if busy[0]:  # the recomputation below calls the module again
                return
            bound = _FORWARD.bind(module, *args, **kwargs).arguments
            inputs = {"q": bound["query"], "k": bound["key"], "v": bound["value"]}
            for proj, block in mine:
                if proj is not None:
                    proj(_batch_first(mha, inputs[block]))
            if _join(name, "out_proj") in layers:
                busy[0] = True
                try:
                    pre = attention_output(mha, args, kwargs)
                finally:
                    busy[0] = False
                mha.out_proj(_batch_first(mha, pre))

        return hook

    handles = []
    try:
        for name in sorted(names):
            mha = modules[name]
            handles.append(mha.register_forward_hook(make_hook(name, mha), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def to_parameter_masks(
    model: nn.Module, layers: Mapping[str, nn.Module], masks: Mapping[str, Tensor], current: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Masks by layer name, with the projections' blocks gathered into masks of their Parameters.

    A block not in ``masks`` keeps its mask from ``current`` (the MaskSet so far), or none pruned.
    """
    out: dict[str, Tensor] = {}
    blocks: dict[str, list[tuple[slice, Tensor]]] = {}
    for n, mask in masks.items():
        layer = layers[n]
        if isinstance(layer, AttentionProjection):
            blocks.setdefault(layer.parameter, []).append((layer.rows, mask))
        else:
            out[n] = mask
    for param, parts in blocks.items():
        weight = model.get_parameter(param)
        prior = current.get(param)
        full = prior.to(weight.device).clone() if prior is not None else torch.ones_like(weight, dtype=torch.bool)
        for rows, mask in parts:
            full[rows] = mask.to(full.device)
        out[param] = full
    return out


def prior_mask(layer: nn.Module, name: str, masks: Mapping[str, Tensor]) -> Tensor | None:
    """The earlier keep-mask of one layer: a projection's block of its Parameter's mask."""
    if isinstance(layer, AttentionProjection):
        full = masks.get(layer.parameter)
        return None if full is None else full[layer.rows]
    return masks.get(name)
