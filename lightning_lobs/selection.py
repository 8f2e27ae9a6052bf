"""Which layers a prune touches, and why the others are left alone.

The rule: every pruned tensor is a real leaf weight that its layer uses as is. A layer is
prunable when it is an ``nn.Linear``, an ``nn.Conv1d/2d/3d`` or a ``transformers`` ``Conv1D``
whose ``weight`` is a plain ``nn.Parameter`` of that module alone: not computed by a
parametrization or an old-style hook (``weight_norm``, ``spectral_norm``), not shared with
another module (tied embeddings), and called as a module (not read directly by a fused
kernel). ``nn.MultiheadAttention`` is pruned as four layers, ``<attn>.q_proj/k_proj/v_proj/out_proj``
(:mod:`lightning_lobs.attention` makes their inputs visible). Everything else that holds a
weight of two or more dimensions is *skipped*: a float sparsity leaves it dense and lists it in
one warning, a mapping that names it explicitly is refused with the reason and the fix.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import attention as _attention
from .config import NMPattern, SparsitySpec, as_fraction, normalize_sparsity
from .layers import is_prunable, pattern_problem, weight_refusal, why_not_prunable
from .masks import MaskSet

if TYPE_CHECKING:
    from .config import PruneOptions


@dataclass
class Selection:
    """The layers to prune with their target sparsities, and the weight-bearing modules left dense.

    ``explicit`` holds the layers named exactly (no wildcard) in a mapping: a problem with one
    of those later (never called, say) is an error, for the others a warning.
    """

    targets: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    explicit: set = field(default_factory=set)


def _key(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


def _users(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> ["module.param", ...]`` over every module that holds it directly."""
    users: dict[int, list[str]] = defaultdict(list)
    for mname, module in model.named_modules(remove_duplicate=True):
        for pname, p in module._parameters.items():
            if p is not None:
                users[id(p)].append(_key(mname, pname))
    return users


def unprunable_reason(
    name: str, module: nn.Module, parent: nn.Module | None, users: Mapping[int, list[str]]
) -> tuple[str, bool]:
    """Why ``module`` cannot be pruned as is ("" when it can), and whether that is a refusal.

    A refusal (a computed weight: zeros written to it would not hold) is an error even under a float
    sparsity; the other reasons leave the module dense with a warning.
    """
    if isinstance(module, nn.MultiheadAttention):
        why = _attention.attention_reason(module)
        return (why, True) if why else (_attention.whole_module_reason(name), False)
    if isinstance(module, _attention.AttentionProjection):
        return "", False
    if isinstance(parent, nn.MultiheadAttention) and module is getattr(parent, "out_proj", None):
        why = _attention.attention_reason(parent)
        if why:
            return why, True
    weight = module._parameters.get("weight")
    holders = users.get(id(weight), []) if weight is not None else []
    tied_to = [u for u in holders if u != _key(name, "weight")]
    reason = why_not_prunable(module, name, tied_to)
    if reason is None:
        return "", False
    return reason, is_prunable(module) and weight_refusal(module, name) is not None


def _weight_bearing(module: nn.Module) -> bool:
    """Holds a parameter of two or more dimensions directly (a weight matrix, a filter bank, an embedding)."""
    return any(p is not None and p.dim() >= 2 for p in module._parameters.values())


def select_layers(
    model: nn.Module,
    sparsity: SparsitySpec,
    exclude: Sequence[str] = (),
    pattern: NMPattern | None = None,
    warn: bool = True,
    keep_dense: Mapping[str, str] | None = None,
) -> Selection:
    """Resolve a sparsity spec to the layers to prune (see the module docstring for the rule).

    ``sparsity`` is a float for every prunable layer, a mapping from fnmatch patterns on
    qualified module names to floats (an exactly named layer takes its own value whatever
    wildcard also matches it; among wildcards the first match wins; a pattern that matches
    layers but sets none of them is named in one warning; unmatched layers are left
    alone), or a callable ``(name, module) -> float | None``. ``exclude`` patterns remove
    layers. Patterns that match nothing, and unprunable modules named exactly in a mapping, are
    errors; unprunable modules that a float or a wildcard would have covered are skipped and
    listed in one warning (``warn``). Layers with a 0 target are left out. ``keep_dense`` (name ->
    reason: the output heads) are left dense and listed with the skipped ones, unless a mapping names
    them exactly.
    """
    sparsity = normalize_sparsity(sparsity)
    named, attentions, projections = _candidates(model)
    modules = dict(named)
    users = _users(model)
    parents = {n: modules.get(n.rpartition(".")[0]) for n in modules}
    verdicts = {n: unprunable_reason(n, m, parents[n], users) for n, m in named if is_prunable(m) or _weight_bearing(m)}
    reasons = {n: why for n, (why, _) in verdicts.items()}
    excluded = _excluded(named, exclude, projections, attentions)
    chosen: dict[str, float] = {}
    covered: list[str] = []  # unprunable modules the spec would have covered
    explicit: set = set()
    if isinstance(sparsity, Mapping):
        chosen, covered, explicit = _choose_by_mapping(sparsity, named, reasons, warn)
    elif callable(sparsity):
        for n, m in named:
            if n in reasons and not reasons[n]:
                value = sparsity(n, m)
                if value is not None:
                    chosen[n] = as_fraction(value, f"sparsity({n!r})")
    else:
        chosen = {n: sparsity for n in reasons if not reasons[n]}
        covered = [n for n in reasons if reasons[n]]
    skipped = {n: reasons[n] for n in covered if n not in excluded and n not in attentions}
    for n, why in (keep_dense or {}).items():
        if n in chosen and n not in explicit and n not in excluded:
            del chosen[n]
            skipped[n] = why
    refused = {n: why for n, why in skipped.items() if verdicts[n][1]}
    if refused:  # zeros written to a computed weight would not hold: never leave that to a warning
        raise ValueError(f"cannot prune as asked: {_format(refused)}.")
    targets = _targets(chosen, excluded, explicit, modules, pattern, skipped)
    skipped.update(_attention.dense_parameters(modules, targets))  # an attention's bias_k/bias_v: dense, so listed
    if warn:
        warn_skipped(skipped)
    _check_some_selected(targets, chosen, excluded, skipped)
    return Selection(targets, skipped, explicit)


def _candidates(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], set, dict[str, _attention.AttentionProjection]]:
    """The modules a spec can name (attention projections right after their attention), the prunable attention
    modules' names, and their projections."""
    inner = {id(p) for m in model.modules() if isinstance(m, parametrize.ParametrizationList) for p in m.parameters()}
    named = [
        (n, m)
        for n, m in model.named_modules()
        if (n or is_prunable(m) or _weight_bearing(m))  # the model itself only when it is a layer
        and not isinstance(m, parametrize.ParametrizationList)
        and not (m._parameters and all(id(p) in inner for p in m._parameters.values() if p is not None))
    ]
    # Attention modules are pruned through their projections: the module itself is never "skipped".
    attentions = {n for n, m in named if isinstance(m, nn.MultiheadAttention) and not _attention.attention_reason(m)}
    projections = _attention.projections(model)
    named = [
        item
        for n, m in named
        for item in [(n, m)] + [(p, q) for p, q in projections.items() if q.attention == n and n in attentions]
    ]
    return named, attentions, projections


def _excluded(
    named: Sequence[tuple[str, nn.Module]],
    exclude: Sequence[str],
    projections: Mapping[str, _attention.AttentionProjection],
    attentions: set,
) -> set:
    """Names the ``exclude`` patterns remove (an excluded attention takes its projections along); a pattern that
    matches nothing is an error."""
    if isinstance(exclude, str):
        exclude = (exclude,)
    for pat in exclude:
        if not any(fnmatch.fnmatchcase(n, pat) for n, _ in named):
            raise ValueError(
                f"exclude pattern {pat!r} matches no module; module names look like {_example_names(named)}."
            )
    excluded = {n for n, _ in named if any(fnmatch.fnmatchcase(n, p) for p in exclude)}
    excluded |= {
        p for p, q in projections.items() if q.attention in excluded
    }  # excluding an attention excludes all of it
    excluded |= {f"{a}.out_proj" if a else "out_proj" for a in attentions & excluded}
    return excluded


def _choose_by_mapping(
    sparsity: Mapping[str, float], named: Sequence[tuple[str, nn.Module]], reasons: Mapping[str, str], warn: bool
) -> tuple[dict[str, float], list[str], set]:
    """A mapping spec's ``(chosen, covered, explicit)``: targets by layer, the unprunable modules it names, and its
    exact names. Exact names first, so a layer named exactly gets its own value whatever wildcard precedes it;
    among wildcards the first match wins. Warns (``warn``) about patterns that set no layer."""
    modules = dict(named)
    chosen: dict[str, float] = {}
    covered: list[str] = []
    explicit: set = set()
    ordered = sorted(sparsity.items(), key=lambda kv: not is_literal(kv[0]))
    wins: dict[str, list[str]] = {}
    for pat, value in ordered:
        hits = [n for n, _ in named if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ValueError(
                f"sparsity pattern {pat!r} matches no module; module names look like {_example_names(named)}."
            )
        ok = [n for n in hits if n in reasons and not reasons[n]]
        if not ok:
            n = next((h for h in hits if h in reasons), hits[0])
            why = reasons.get(n) or f"{type(modules[n]).__name__} holds no weight matrix"
            raise ValueError(f"module '{n}' ({type(modules[n]).__name__}) cannot be pruned: {why}.")
        if is_literal(pat):
            explicit.add(pat)
        covered += [n for n in hits if reasons.get(n)]
        wins[pat] = [n for n in ok if n not in chosen]
        for n in ok:
            chosen.setdefault(n, value)
    idle = {pat: sorted({n for n in chosen if fnmatch.fnmatchcase(n, pat)}) for pat, won in wins.items() if not won}
    if idle and warn:
        listed = "; ".join(
            f"{pat!r} (its layers {', '.join(names)} take {', '.join(sorted({repr(chosen[n]) for n in names}))} from "
            "an exact name or an earlier pattern)"
            for pat, names in idle.items()
        )
        warnings.warn(
            f"sparsity pattern(s) that set no layer: {listed}. An exactly named layer beats every wildcard, and "
            "among wildcards the first match wins; reorder the mapping or drop the pattern.",
            UserWarning,
            stacklevel=4,  # select_layers' caller's caller, as before this moved out of select_layers
        )
    return chosen, covered, explicit


def _targets(
    chosen: Mapping[str, float],
    excluded: set,
    explicit: set,
    modules: Mapping[str, nn.Module],
    pattern: NMPattern | None,
    skipped: dict[str, str],
) -> dict[str, float]:
    """The chosen layers' targets, less the excluded and the 0 ones; with an N:M ``pattern`` the pattern's sparsity,
    and a layer that cannot hold it is an error when named exactly, else added to ``skipped``."""
    targets: dict[str, float] = {}
    for n, value in chosen.items():
        if n in excluded or value == 0.0:
            continue
        if pattern is not None:
            reason = pattern_problem(modules[n], pattern)
            if reason:
                if n in explicit:
                    raise ValueError(f"layer '{n}' cannot hold pattern '{pattern}': {reason}.")
                skipped[n] = f"{reason}, so it cannot hold pattern '{pattern}'"
                continue
            value = pattern.sparsity
        targets[n] = value
    return targets


def _check_some_selected(
    targets: Mapping[str, float], chosen: Mapping[str, float], excluded: set, skipped: Mapping[str, str]
) -> None:
    """``ValueError`` when the spec selects no layer to prune, saying whether it was a 0 sparsity."""
    if not targets and chosen and all(v == 0.0 for n, v in chosen.items() if n not in excluded):
        raise ValueError(
            "sparsity 0 prunes nothing: every selected layer's target is 0.0, so there is no layer to prune. Give a "
            "sparsity in (0, 1), e.g. 0.5, or skip pruning."
        )
    if not targets:
        raise ValueError(
            "no layer selected for pruning: the model has no prunable nn.Linear/nn.Conv/Conv1D layer matching the "
            "sparsity spec (or all were excluded)." + (f" Left alone: {_format(skipped)}" if skipped else "")
        )


def is_literal(pattern: str) -> bool:
    """A sparsity key without fnmatch wildcards: it names one layer exactly."""
    return not any(ch in pattern for ch in "*?[")


def _format(skipped: Mapping[str, str]) -> str:
    return "; ".join(f"'{n}': {why}" for n, why in skipped.items())


def warn_skipped(skipped: Mapping[str, str], what: str = "not pruned (left dense)") -> None:
    """One warning listing every skipped module and why (nothing when none)."""
    if skipped:
        warnings.warn(f"{len(skipped)} weight-bearing module(s) {what}: {_format(skipped)}.", UserWarning, stacklevel=3)


def _example_names(named: Sequence[tuple[str, nn.Module]]) -> str:
    names = [n for n, m in named if is_prunable(m)][:4] or [n for n, _ in named][:4]
    return ", ".join(repr(n) for n in names) or "(none)"


def check_prior_masks(
    masks: MaskSet, modules: Mapping[str, nn.Module], targets: Mapping[str, float], options: PruneOptions
) -> None:
    """Refuse a prior mask that does not fit its layer; warn once when prior masks are already sparser than asked.

    Weights an earlier step pruned stay pruned, so a layer whose prior mask removes more than its
    new target ends at its prior sparsity (the report shows that sparsity beside the target).
    With a global allocation the comparison is over all selected layers together.
    """
    shapes = {n: tuple(cast(torch.Tensor, m.weight).shape) for n, m in modules.items()}
    bad = {
        n: (tuple(masks[n].shape), shape)
        for n, shape in shapes.items()
        if n in masks and tuple(masks[n].shape) != shape
    }
    if bad:
        listed = "; ".join(f"'{n}': mask {a}, weight {b}" for n, (a, b) in bad.items())
        raise ValueError(
            f"masks= holds masks that do not fit the model's layers ({listed}): each mask must have its layer's weight "
            "shape. Pass the MaskSet saved with this model (MaskSet.from_model(model) rebuilds one from its zeros)."
        )
    prior = {n: float((~masks[n].to(torch.bool)).sum()) / max(masks[n].numel(), 1) for n in modules if n in masks}
    if not prior:
        return
    overall = options.global_allocation is not None
    if overall:
        sizes = {n: math.prod(shape) for n, shape in shapes.items()}
        total = sum(sizes.values())
        removed = sum(prior[n] * sizes[n] for n in prior)
        asked = float(options.sparsity)  # type: ignore[arg-type]
        if removed / max(total, 1) <= asked:
            return
        over = {n: (prior[n], asked) for n in prior if prior[n] > asked}
        head = (
            f"the prior masks already remove {removed / max(total, 1):.4g} of the selected weights, more than the "
            f"asked sparsity {asked:.4g}"
        )
    else:
        over = {n: (prior[n], targets[n]) for n in prior if prior[n] > targets[n]}
        if not over:
            return
        head = f"{len(over)} layer(s) already sparser than asked"
    listed = "; ".join(f"'{n}' at {now:.4g} (asked {want:.4g})" for n, (now, want) in over.items())
    warnings.warn(
        f"{head}: {listed}. Weights an earlier step pruned stay pruned, so these layers keep their current "
        "sparsity (the report shows it beside the target). Ask for at least the current sparsity, or start from the "
        "dense weights without masks=.",
        UserWarning,
        stacklevel=6,  # the caller of prune_model
    )
