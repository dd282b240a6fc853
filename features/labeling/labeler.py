"""The labeler on one SAE and a list of entity sets: steps 1-5 of the package docstring, in memory.

Nothing here reads or writes the feature store; `run.run_label` does that around `label`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from features.labeling.activations import span_activations
from features.labeling.causal import Candidate, check_tags
from features.labeling.config import LabelConfig
from features.labeling.context import LabelContext, make_context
from features.labeling.entities import EntitySet, usable_attributes
from features.labeling.knowledge import knowledge_filter
from features.labeling.probes import attribute_probes, stable_hash
from features.labeling.prompts import encode_prompt
from features.labeling.results import AttributeReport, LabelResult
from features.labeling.scoring import best_f1_scores, best_per_value, firing_scores, make_tags, select_tags
from features.labeling.timing import one_thread
from features.store import Kind, Probe, Tag

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
    data: dict[str, Any] = field(default_factory=dict)  # LabelResult.data


class _Entities(NamedTuple):
    """One entity type's sampled entities and their activations on the context prompt."""

    rows: list[int]  # indices into the entity set
    names: list[str]
    x_in: Tensor  # [n, d_in] the SAE's input at the entity (last token, or mean over its tokens)
    units: dict[Kind, Tensor]  # kind -> [n, units], pooled over the entity's tokens


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
        counts: dict[str, int] = {}
        for i in rows:
            counts[es.attributes[attr][i]] = counts.get(es.attributes[attr][i], 0) + 1
        rep = AttributeReport(es.entity_type, attr, len(rows), len(counts))
        if sum(c >= min_size for c in counts.values()) < 2:
            rep.skipped = (f"fewer than 2 values with at least {min_size} entities "
                           f"(largest: {max(counts.values())}); too few entities share a value")
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
                     names: list[str]) -> tuple[list[Tag], list[tuple[Kind, int, int, float]]]:
    """Scores and tags of every unit of every kind (acts: [U, N] over the known entities), and the best tag of each
    value as (kind, unit, value, F1), best F1 first within a kind."""
    cfg = ctx.cfg
    y = torch.nn.functional.one_hot(labels, len(rep.values))
    values = [v for v, _ in rep.values]
    tags: list[Tag] = []
    best: list[tuple[Kind, int, int, float]] = []
    for kind, m in acts.items():
        fires = kind == "feature" and cfg.feature_on == "fires"
        sc = firing_scores(m, y) if fires else best_f1_scores(m, y)
        pairs = select_tags(sc, cfg.min_f1, cfg.min_auroc, cfg.min_positives)
        rep.n_tags[kind] = len(pairs)
        rep.best[kind] = best_per_value(sc, values)
        tags += make_tags(kind, m, sc, pairs, labels, names, rep)
        firsts: dict[int, int] = {}
        for u, v in pairs:
            firsts.setdefault(v, u)
        best += [(kind, u, v, float(sc.f1[u, v])) for v, u in firsts.items()]
    return tags, best


def _label_attribute(ctx: LabelContext, es: EntitySet, rep: AttributeReport, ents: _Entities,
                     found: _Found) -> None:
    """Steps 1-4 for one attribute: knowledge filter, scores and tags, probes."""
    a = knowledge_filter(ctx, es, rep.attribute, ents.rows, rep)
    if rep.skipped:
        _skip(ctx, found, rep)
        return
    found.data[rep.name] = {"entity_type": es.entity_type, "rows": a.rows, "labels": a.labels,
                            "values": [v for v, _ in rep.values]}
    found.attributes.append(rep)
    kept_names = [ents.names[i] for i in a.rows]
    with ctx.timer("scores"):
        acts = {kind: u[a.rows].T.contiguous() for kind, u in ents.units.items()}
        tags, best = _score_attribute(ctx, rep, acts, a.labels, kept_names)
    found.tags += tags
    found.candidates += [Candidate(kind, u, a, v, f1) for kind, u, v, f1 in best]
    with ctx.timer("probes"), one_thread():
        found.probes += attribute_probes(a, ents.x_in, ents.units, kept_names, ctx.cfg)
    ctx.log(f"label: {rep.name}: kept {rep.n_known}/{rep.n_entities} known entities ({rep.kept_fraction:.0%}), "
            f"{len(rep.values)} values; tags: " + ", ".join(f"{rep.n_tags.get(k, 0)} {k}s" for k in ctx.kinds))


def _label_type(ctx: LabelContext, es: EntitySet, found: _Found) -> None:
    """Label every scorable attribute of one entity type."""
    rows = sample_entities(es, ctx.cfg.max_entities)
    todo = _scorable(ctx, es, rows, found)
    if not todo:
        return
    ctx.log(f"label: {es.entity_type}: {len(rows)} entities, attributes {', '.join(r.attribute for r in todo)}")
    ents = _entity_units(ctx, es, rows)
    found.data[es.entity_type] = {"names": ents.names, "input": ents.x_in, **ents.units}
    for rep in todo:
        _label_attribute(ctx, es, rep, ents, found)


def _firing_rate(found: _Found) -> Tensor | None:
    """Each feature's firing rate on the context prompts: the control match when the store's is not given."""
    feats = [d["feature"] for d in found.data.values() if "feature" in d]
    return (torch.cat(feats) > 0).float().mean(0) if feats else None


def label(model: HookedTransformer, sae: SAE, entity_sets: list[EntitySet], cfg: LabelConfig, *,
          tokenizer: Any = None, feature_freq: Tensor | None = None, neurons: bool = True,
          log: Callable[[str], None] = print) -> LabelResult:
    """Run the labeler for `sae` (on `model`) over `entity_sets`; returns tags, probes and causal results
    (nothing is written). `feature_freq` (firing frequency per feature, e.g. from the feature store) matches
    causal controls; without it, the firing rate on the entity prompts is used."""
    t0 = time.perf_counter()
    ctx = make_context(model, sae, cfg, tokenizer, neurons, log)
    found = _Found()
    for es in entity_sets:
        _label_type(ctx, es, found)
    freq = feature_freq
    if freq is None and cfg.causal_tags > 0 and found.candidates:
        freq = _firing_rate(found)
    causal, tags = check_tags(ctx, found.candidates, found.tags, freq)
    settings = {"sae_hook": ctx.in_hook, "sae_out_hook": ctx.out_hook, "neuron_hook": ctx.neuron_hook,
                "layer": ctx.layer, "start_token": ctx.start_id, "label_config": dict(vars(cfg)),
                "n_features": ctx.sae.shape.d_sae, "n_neurons": ctx.n_neurons if neurons else 0}
    timings = dict(ctx.timer.seconds)
    timings["total"] = time.perf_counter() - t0
    return LabelResult(found.attributes, tags, found.probes, causal, settings, timings, found.data)
