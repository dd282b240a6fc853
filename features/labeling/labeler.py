"""The labeler on one SAE and a list of entity sets: steps 1-5 of the package docstring, in memory.

Nothing here reads or writes the feature store; `run.run_label` does that around `label`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from features.analyze.on_rule import neuron_thresholds
from features.labeling.activations import span_activations
from features.labeling.causal import Candidate, check_tags
from features.labeling.config import LabelConfig
from features.labeling.context import LabelContext, make_context
from features.labeling.entities import EntitySet, too_few_per_value, usable_attributes, value_counts
from features.labeling.knowledge import knowledge_filter
from features.labeling.probes import attribute_probes, stable_hash
from features.labeling.prompts import encode_prompt
from features.labeling.results import AttributeReport, LabelResult, UnitOn
from features.labeling.scoring import (
    TagCounter,
    best_f1_scores,
    best_per_value,
    centered_ci,
    firing_scores,
    make_tags,
    select_tags,
    tag_count_ci,
    tag_counter,
)
from features.labeling.timing import one_thread
from features.store import Kind, Probe, Tag, UnitStats

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from sae.saes import SAE


@dataclass
class _Found:
    """What the labeling of the entity sets has gathered so far."""

    attributes: list[AttributeReport] = field(default_factory=list)
    tags: list[Tag] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)  # the best tag per value, for the causal checks
    counters: list[dict[Kind, TagCounter]] = field(default_factory=list)  # per scored attribute, for the CIs
    data: dict[str, Any] = field(default_factory=dict)  # LabelResult.data


class _Entities(NamedTuple):
    """One entity type's sampled entities and their activations on the context prompt."""

    rows: list[int]  # indices into the entity set
    names: list[str]
    x_in: Tensor  # [n, d_in] the SAE's input at the entity (last token, or mean over its tokens)
    units: dict[Kind, Tensor]  # kind -> [n, units], pooled over the entity's tokens


_Best = tuple[Kind, int, int, float, float]  # a value's best tag: kind, unit, value index, F1, threshold


def sample_entities(entity_set: EntitySet, max_entities: int | None) -> list[int]:
    """Indices of at most `max_entities` entities: the first by sha256 of the name, back in file order."""
    n = len(entity_set.entities)
    if max_entities is None or n <= max_entities:
        return list(range(n))
    order = sorted(range(n), key=lambda i: stable_hash(entity_set.entities[i]))
    return sorted(order[:max_entities])


def _skip(ctx: LabelContext, found: _Found, rep: AttributeReport) -> None:
    found.attributes.append(rep)
    ctx.log(f"label: warning: skipping {rep.name}: {rep.skipped}")


def _scorable(ctx: LabelContext, es: EntitySet, rows: list[int], found: _Found) -> list[AttributeReport]:
    """Reports for the attributes worth scoring on these entities; the others are recorded as skipped, with why."""
    min_size = ctx.cfg.min_class_size
    usable, skipped = usable_attributes(es, min_values=2, min_entities=min_size * 2)
    for attr, reason in skipped.items():
        _skip(ctx, found, AttributeReport(es.entity_type, attr, len(rows), len(es.values(attr)), skipped=reason))
    todo = []
    for attr in usable:
        counts = value_counts(es, attr, rows)
        rep = AttributeReport(es.entity_type, attr, len(rows), len(counts))
        reason = too_few_per_value(counts, min_size)
        if reason:
            rep.skipped = f"{reason}; too few entities share a value"
            _skip(ctx, found, rep)
            continue
        todo.append(rep)
    return todo


def _pool(span: Tensor, pooling: str) -> Tensor:
    return span[-1] if pooling == "last" else span.max(0).values


def _entity_units(ctx: LabelContext, es: EntitySet, rows: list[int]) -> _Entities:
    """Run the context prompts to the SAE's layer; pool the SAE's input, features and neurons at the entity."""
    names = [es.entities[i] for i in rows]
    prompts = [encode_prompt(ctx.tokenizer, es.context_template, n, ctx.start_id) for n in names]
    hooks = list(dict.fromkeys([ctx.in_hook] + ([ctx.neuron_hook] if ctx.neuron_hook else [])))
    acts = span_activations(ctx.model, prompts, hooks, ctx.cfg.batch_size, ctx.timer)
    pooling = ctx.cfg.pooling
    with ctx.timer("encode"):
        x_in = torch.stack([s[-1] if pooling == "last" else s.mean(0) for s in acts[ctx.in_hook]])
        with torch.inference_mode():
            feats = torch.stack([_pool(ctx.sae.encode(s).float(), pooling) for s in acts[ctx.in_hook]])
        units: dict[Kind, Tensor] = {"feature": feats}
        if ctx.neuron_hook:
            units["neuron"] = torch.stack([_pool(s, pooling) for s in acts[ctx.neuron_hook]])
    return _Entities(rows, names, x_in, units)


def _score_attribute(ctx: LabelContext, rep: AttributeReport, acts: dict[Kind, Tensor], labels: Tensor,
                     names: list[str], on: dict[Kind, UnitOn]) -> tuple[list[Tag], list[_Best], dict[Kind, TagCounter]]:
    """Scores and tags of every unit of every kind (acts: [U, N] over the known entities), the best tag of each
    value as (kind, unit, value, F1, threshold), best F1 first within a kind, and each kind's tag counter (its CI
    is set).

    "On" is the same rule for both kinds: above the threshold that maximises the unit's F1 for the value
    (default), or (feature_on: fires) above the unit's on threshold from the analysis pass."""
    cfg = ctx.cfg
    y = torch.nn.functional.one_hot(labels, len(rep.values))
    values = [v for v, _ in rep.values]
    limits = (cfg.min_f1, cfg.min_auroc, cfg.min_positives)
    tags: list[Tag] = []
    best: list[_Best] = []
    counters: dict[Kind, TagCounter] = {}
    for kind, m in acts.items():
        thresholds = on[kind].threshold if cfg.feature_on == "fires" else None
        sc = best_f1_scores(m, y) if thresholds is None else firing_scores(m, y, thresholds)
        pairs = select_tags(sc, *limits)
        rep.n_tags[kind] = len(pairs)
        rep.best[kind] = best_per_value(sc, values)
        tags += make_tags(kind, m, sc, pairs, labels, names, rep)
        counters[kind] = tag_counter(m, labels, sc, thresholds, limits)
        rep.n_tags_ci[kind] = tag_count_ci(counters[kind], cfg.seed).as_list()
        firsts: dict[int, int] = {}
        for u, v in pairs:
            firsts.setdefault(v, u)
        best += [(kind, u, v, float(sc.f1[u, v]), float(sc.threshold[u, v])) for v, u in firsts.items()]
    return tags, best, counters


def _label_attribute(ctx: LabelContext, es: EntitySet, rep: AttributeReport, ents: _Entities, found: _Found,
                     on: dict[Kind, UnitOn]) -> bool:
    """Steps 1-4 for one attribute: knowledge filter, scores and tags, probes; False when the filter left too
    few known entities (`rep.skipped` says why)."""
    a = knowledge_filter(ctx, es, rep.attribute, ents.rows, rep)
    found.attributes.append(rep)
    if rep.skipped:
        return False
    found.data[rep.name] = {"entity_type": es.entity_type, "rows": a.rows, "labels": a.labels,
                            "values": [v for v, _ in rep.values]}
    kept_names = [ents.names[i] for i in a.rows]
    with ctx.timer("scores"):
        acts = {kind: u[a.rows].T.contiguous() for kind, u in ents.units.items()}
        tags, best, counters = _score_attribute(ctx, rep, acts, a.labels, kept_names, on)
    found.tags += tags
    found.counters.append(counters)
    found.candidates += [Candidate(kind, u, a, v, f1, t) for kind, u, v, f1, t in best]
    with ctx.timer("probes"), one_thread():
        found.probes += attribute_probes(a, ents.x_in, ents.units, kept_names, ctx.cfg)
    ctx.log(f"label: {rep.name}: kept {rep.n_known}/{rep.n_entities} known entities ({rep.kept_fraction:.0%}), "
            f"{len(rep.values)} values; tags: " + ", ".join(f"{rep.n_tags.get(k, 0)} {k}s" for k in ctx.kinds))
    return True


def _prepare_type(ctx: LabelContext, es: EntitySet, found: _Found) -> tuple[list[AttributeReport], _Entities] | None:
    """The scorable attributes of one entity type and its entities' activations; None when nothing is scorable."""
    rows = sample_entities(es, ctx.cfg.max_entities)
    todo = _scorable(ctx, es, rows, found)
    if not todo:
        return None
    ctx.log(f"label: {es.entity_type}: {len(rows)} entities, attributes {', '.join(r.attribute for r in todo)}")
    ents = _entity_units(ctx, es, rows)
    found.data[es.entity_type] = {"names": ents.names, "input": ents.x_in, **ents.units}
    return todo, ents


def _label_type(ctx: LabelContext, es: EntitySet, todo: list[AttributeReport], ents: _Entities, found: _Found,
                on: dict[Kind, UnitOn]) -> None:
    """Label every scorable attribute of one entity type. When the knowledge filter leaves none of them, one line
    says so for the whole type (the report still lists each attribute and its kept fraction)."""
    filtered = [rep for rep in todo if not _label_attribute(ctx, es, rep, ents, found, on)]
    if len(filtered) == len(todo):
        why = "; ".join(f"{r.attribute}: {r.n_known}/{r.n_entities} known" for r in filtered)
        ctx.log(f"label: warning: {es.entity_type}: nothing to label, no attribute passes the knowledge filter "
                f"(the model ranks the correct value first for too few entities: {why}; each attribute needs "
                f"{ctx.cfg.min_class_size} known entities in at least 2 values)")
        return
    for rep in filtered:
        ctx.log(f"label: warning: skipping {rep.name}: {rep.skipped}")


def _on_rule(found: _Found, stats: dict[Kind, UnitStats] | None, feature_freq: Tensor | None,
             kinds: list[Kind]) -> dict[Kind, UnitOn]:
    """Each kind's frequency, mean activation when on and on threshold: from the feature store (`stats`), else the
    same rule (features/analyze/on_rule.py) applied to the entities' context-prompt activations."""
    if stats is not None and all(k in stats for k in kinds):
        return {k: UnitOn(torch.tensor(stats[k].freq), torch.tensor(stats[k].mean_act),
                          torch.tensor(stats[k].threshold)) for k in kinds}
    acts = {k: torch.cat([d[k] for d in found.data.values() if k in d]) for k in kinds
            if any(k in d for d in found.data.values())}
    if "feature" not in acts:
        return {}
    thresholds = {"feature": torch.zeros(acts["feature"].shape[1])}
    if "neuron" in acts:
        thresholds["neuron"] = neuron_thresholds((acts["feature"] > 0).sum(0), acts["neuron"])[0]
    out = {}
    for k, a in acts.items():
        on = a > thresholds[k]
        n_on = on.sum(0)
        freq = feature_freq.float() if k == "feature" and feature_freq is not None else n_on / len(a)
        out[k] = UnitOn(freq, (a * on).sum(0) / n_on.clamp_min(1), thresholds[k])
    return out


def label(model: HookedTransformer, sae: SAE, entity_sets: list[EntitySet], cfg: LabelConfig, *,
          tokenizer: Any = None, feature_freq: Tensor | None = None, stats: dict[Kind, UnitStats] | None = None,
          neurons: bool = True, log: Callable[[str], None] = print) -> LabelResult:
    """Run the labeler for `sae` (on `model`) over `entity_sets`; returns tags, probes and causal results
    (nothing is written). `stats` (the feature store's `unit_stats()`) give each unit's on threshold and the
    firing frequencies the causal controls are matched on; without them both come from the entity prompts under
    the same rule, `feature_freq` (firing frequency per feature) replacing the features' frequencies."""
    t0 = time.perf_counter()
    ctx = make_context(model, sae, cfg, tokenizer, neurons, log)
    found = _Found()
    prepared = [(es, p) for es in entity_sets if (p := _prepare_type(ctx, es, found)) is not None]
    on = _on_rule(found, stats, feature_freq, ctx.kinds)
    for es, (todo, ents) in prepared:
        _label_type(ctx, es, todo, ents, found, on)
    causal, tags = check_tags(ctx, found.candidates, found.tags, on)
    settings = {"sae_hook": ctx.in_hook, "sae_out_hook": ctx.out_hook, "neuron_hook": ctx.neuron_hook,
                "layer": ctx.layer, "start_token": ctx.start_id, "label_config": dict(vars(cfg)),
                "n_features": ctx.sae.shape.d_sae, "n_neurons": ctx.n_neurons if neurons else 0,
                "on_thresholds_from": "feature store" if stats is not None else "entity prompts"}
    with ctx.timer("intervals"):
        cis = total_cis(found.counters, ctx.kinds, cfg.seed)
    timings = dict(ctx.timer.seconds)
    timings["total"] = time.perf_counter() - t0
    return LabelResult(found.attributes, tags, found.probes, causal, settings, timings, cis=cis, data=found.data)


def total_cis(counters: list[dict[Kind, TagCounter]], kinds: list[Kind],
              seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Per kind, 95% bootstrap intervals of the total number of tags and of the number of attributes with at least
    one tag, each attribute's entities resampled on their own and by value (as `tag_count_ci`, `centered_ci`)."""
    out: dict[str, dict[str, list[float]]] = {"tags": {}, "attributes_tagged": {}}
    for kind in kinds:
        cs = [c[kind] for c in counters if kind in c]
        if not cs:
            out["tags"][kind], out["attributes_tagged"][kind] = [0.0, 0.0], [0.0, 0.0]
            continue
        groups = [g for c in cs for g in c.strata]
        bounds = np.cumsum([0] + [len(c.strata) for c in cs])

        def counts(parts: list[np.ndarray], cs: list[TagCounter] = cs, bounds: np.ndarray = bounds) -> list[float]:
            return [c(np.concatenate(parts[lo:hi])) for c, lo, hi in zip(cs, bounds[:-1], bounds[1:], strict=True)]

        def total(parts: list[np.ndarray], f: Callable[..., list[float]] = counts) -> float:
            return float(sum(f(parts)))

        def tagged(parts: list[np.ndarray], f: Callable[..., list[float]] = counts) -> float:
            return float(sum(n > 0 for n in f(parts)))

        out["tags"][kind] = centered_ci(groups, total, seed).as_list()
        out["attributes_tagged"][kind] = centered_ci(groups, tagged, seed, upper=len(cs)).as_list()
    return out
