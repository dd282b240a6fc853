"""Attribute directions across the early MLP layers, tested by RAVEL-style interchange: the entry point.

Per entity type and attribute: the knowledge filter (`knowledge.py`), clean activations at the entity's last token
of the attribute prompt (template 0) in every layer, units chosen on the training entities (`directions.py`), and
patched runs on held-out (base, source) pairs (`interchange.py`):

- upper bound: every layer's whole `hook_mlp_out` set to the source's;
- per kind (features, neurons, baseline): the chosen units set to the source's, and on the same pairs, for each pair
  `random_groups` size-matched random groups of the same kind drawn afresh (the significance test's controls);
- isolation: the same chosen units interchanged in the prompt of each other known attribute of the entity type.

Outcome: the model's choice among the attribute's values (the highest first-token logit). Nothing is written here;
`directions_stats.summarize` computes the figures and `features.run_report` writes them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from features.labeling.config import LabelConfig
from features.labeling.context import LabelContext, make_context
from features.labeling.directions import (
    DIR_KINDS,
    MIN_PAIRS,
    AttributeOutcomes,
    DirectionsConfig,
    DirectionsResult,
    DirKind,
    check_layer_saes,
    choose_units,
    feature_basis,
    mlp_out,
    mlp_post,
    neuron_basis,
    random_groups,
    rotation_basis,
    sample_pairs,
    split_entities,
    whole_output_basis,
)
from features.labeling.entities import EntitySet, load_entities, too_few_per_value, value_counts
from features.labeling.interchange import Basis, Patch, interchanged_logits, last_token_acts, source_values
from features.labeling.knowledge import KnownAttribute, knowledge_filter
from features.labeling.labeler import sample_entities
from features.labeling.probes import stable_hash
from features.labeling.results import AttributeReport
from sae.formats import CFG_FILE, load_sae
from sae.hooks import hook_layer, sae_hooks

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from sae.saes import SAE

class _Kit(NamedTuple):
    """What every attribute shares: the labeling context (model, tokenizer, timer), layers, SAEs, settings."""

    ctx: LabelContext
    layers: list[int]
    saes: list[SAE]
    cfg: DirectionsConfig


class _Direction(NamedTuple):
    bases: list[Basis]  # per layer
    chosen: list[Tensor]  # per layer, unit indices
    random: list[Tensor]  # per layer [random_groups * P, k]: row r * P + i is pair i's r-th size-matched random group


class _Prepared(NamedTuple):
    """One known attribute, ready to interchange."""

    known: KnownAttribute
    acts: dict[str, Tensor]  # hook -> [n sampled, d] at the entity's last token of the template-0 prompt
    label: Tensor  # [n sampled] class id into known.report.values; -1: not known (or a value too rare to score)
    pairs: Tensor  # [P, 2] (base, source) sampled indices, held-out entities only
    directions: dict[DirKind, _Direction]
    outcome: AttributeOutcomes


def _hooks(kit: _Kit) -> list[str]:
    """Every hook an attribute's clean activations are needed at: the MLP outputs and neurons of each layer, and
    the SAEs' own inputs (a transcoder reads the MLP's input)."""
    reads = [r for sae in kit.saes for r in sae_hooks(sae)[:1]]
    return list(dict.fromkeys([h for layer in kit.layers for h in (mlp_out(layer), mlp_post(layer))] + reads))


def _seed(cfg: DirectionsConfig, *parts: str) -> int:
    return stable_hash("\x00".join([*parts, str(cfg.seed)])) % 2 ** 31



def _directions(kit: _Kit, name: str, acts: dict[str, Tensor], train: Tensor, labels: Tensor,
                n_pairs: int) -> dict[DirKind, _Direction]:
    """Per kind, the bases of every layer, the chosen units (`cfg.unit_rule`, training entities), and for every pair
    its own `random_groups` random groups of the same sizes, so the controls sample many groups, not a few."""
    cfg, model = kit.cfg, kit.ctx.model
    out: dict[DirKind, _Direction] = {}
    for kind in DIR_KINDS:
        allowed = None
        if kind == "feature":
            bases = [feature_basis(sae, layer) for sae, layer in zip(kit.saes, kit.layers, strict=True)]
            widths = [sae.shape.d_sae for sae in kit.saes]
        elif kind == "neuron":
            bases = [neuron_basis(layer) for layer in kit.layers]
            widths = [model.cfg.d_mlp] * len(kit.layers)
        else:
            made = [rotation_basis(layer, acts[mlp_out(layer)][train], cfg.baseline, _seed(cfg, name, "rotation"))
                    for layer in kit.layers]
            bases, allowed = [b for b, _ in made], [a for _, a in made]
            widths = [model.cfg.d_model] * len(kit.layers)
        with torch.inference_mode():
            coords = [b.encode(acts[b.read_hook][train].to(model.cfg.device)).cpu() for b in bases]
        norms = _out_norms(kit, kind, bases) if cfg.unit_rule == "output_variance" else None
        chosen = choose_units(coords, labels, cfg.units_per_layer, allowed, norms)
        drawn = random_groups(chosen, widths, cfg.random_groups * n_pairs, _seed(cfg, name, kind))
        random = [torch.stack([g[i] for g in drawn]) for i in range(len(chosen))]
        out[kind] = _Direction(bases, chosen, random)
    return out


def _out_norms(kit: _Kit, kind: DirKind, bases: list[Basis]) -> list[Tensor]:
    """Per layer [U], the norm of each unit's direction in hook_mlp_out: a neuron's row of W_out, a feature's
    decoder row, a baseline's (unit) basis row."""
    if kind == "neuron":
        return [kit.ctx.model.W_out[layer].detach().float().norm(dim=1).cpu() for layer in kit.layers]
    return [b.rows.float().norm(dim=1).cpu() for b in bases]  # features and baselines always have rows


def _prepare(kit: _Kit, es: EntitySet, known: KnownAttribute, is_train: Tensor) -> _Prepared:
    """Capture the clean activations, split the known entities, choose the units and sample the held-out pairs."""
    ctx, cfg = kit.ctx, kit.cfg
    rep = known.report
    out = AttributeOutcomes(es.entity_type, rep.attribute, [v for v, _ in rep.values], len(known.rows))
    label = torch.full((len(known.names),), -1, dtype=torch.long)
    label[torch.tensor(known.rows, dtype=torch.long)] = known.labels
    with ctx.timer("capture"):
        acts = last_token_acts(ctx.model, known.prompts, _hooks(kit), ctx.cfg.batch_size, ctx.timer)
    rows = torch.tensor(known.rows, dtype=torch.long)
    train, held = rows[is_train[rows]], rows[~is_train[rows]]
    out.train, out.heldout = [known.names[i] for i in train], [known.names[i] for i in held]
    n_values = len(torch.unique(label[train]))
    pairs = held[sample_pairs(label[held], known.answer_ids, cfg.pairs, _seed(cfg, rep.name, "pairs"))]
    out.pairs = [(known.names[b], known.names[s]) for b, s in pairs.tolist()]
    if n_values < 2 or len(train) <= n_values:
        out.skipped = (f"too few training entities to choose units: {len(train)} known entities with "
                       f"{n_values} value(s) in the training half (train_fraction {cfg.train_fraction})")
    elif len(pairs) < MIN_PAIRS:
        out.skipped = (f"too few held-out pairs with different answers: {len(pairs)} (need {MIN_PAIRS}); "
                       f"add entities or raise label.max_entities")
    if out.skipped:
        return _Prepared(known, acts, label, pairs, {}, out)
    with ctx.timer("choose"):
        directions = _directions(kit, rep.name, acts, train, label[train], len(pairs))
    out.units = {k: [u.tolist() for u in d.chosen] for k, d in directions.items()}
    out.moved = {k: units_moved(d, acts, pairs, ctx.model.cfg.device) for k, d in directions.items()}
    return _Prepared(known, acts, label, pairs, directions, out)


def units_moved(direction: _Direction, acts: dict[str, Tensor], pairs: Tensor, device: Any) -> float:
    """Mean over held-out pairs of how many chosen units (all layers) differ between source and base: what an
    interchange of the group can change at all. Sparse features chosen on other entities may be off for both."""
    moved = torch.zeros(len(pairs))
    with torch.inference_mode():
        for b, units in zip(direction.bases, direction.chosen, strict=True):
            if len(units) == 0:
                continue
            coords = b.encode(acts[b.read_hook][pairs.flatten()].to(device)).cpu()[:, units].view(len(pairs), 2, -1)
            moved += ((coords[:, 0] - coords[:, 1]).abs() > 1e-6).sum(1).float()
    return float(moved.mean()) if len(pairs) else 0.0


def _patch(bases: list[Basis], units: list[Tensor], acts: dict[str, Tensor], base: Tensor, source: Tensor) -> Patch:
    """Interchange per layer `units` [N, k] of `bases` from the sources into the bases, where row j of `units` runs
    on pair j % P of (base, source) [P]."""
    repeat = len(units[0]) // len(base)
    src = source.repeat(repeat)
    values = [source_values(b, acts[b.read_hook], src, u) for b, u in zip(bases, units, strict=True)]
    return Patch(bases, base.repeat(repeat), units, values)


def _every(units: list[Tensor], n: int) -> list[Tensor]:
    """The same units for `n` rows, per layer [n, k]."""
    return [u.expand(n, -1) for u in units]


def _choice_tokens(logits: Tensor, answer_ids: Tensor) -> Tensor:
    """The first answer token the model picks among the values' first tokens."""
    return answer_ids[logits.argmax(1)]


def _interchange(kit: _Kit, target: _Prepared, others: list[_Prepared]) -> None:
    """Every patched run on `target`'s prompts: its upper bound, its chosen and random groups per kind, every
    feature of every SAE at once (what the SAEs could carry at all: their reconstruction error stays the base's),
    and the isolation runs of the other attributes' chosen units; outcomes go into the attributes' records."""
    model, t = kit.ctx.model, target
    base, source = t.pairs[:, 0], t.pairs[:, 1]
    whole = _every([torch.arange(model.cfg.d_model)] * len(kit.layers), len(base))
    patches = [_patch([whole_output_basis(layer) for layer in kit.layers], whole, t.acts, base, source)]
    patches += [_patch(d.bases, [torch.cat([c.expand(len(base), -1), r]) for c, r in zip(d.chosen, d.random,
                                                                                         strict=True)],
                       t.acts, base, source) for d in t.directions.values()]
    feat = t.directions["feature"]
    every = _every([torch.arange(sae.shape.d_sae) for sae in kit.saes], len(base))
    patches.append(_patch(feat.bases, every, t.acts, base, source))  # all features: the SAEs' own ceiling
    iso: list[tuple[_Prepared, Tensor]] = []
    for o in others:  # o's directions, interchanged in t's prompt on o's pairs whose base t knows
        keep = t.label[o.pairs[:, 0]] >= 0
        if keep.any():
            iso.append((o, o.pairs[keep, 0]))
            patches += [_patch(d.bases, _every(d.chosen, int(keep.sum())), t.acts, o.pairs[keep, 0], o.pairs[keep, 1])
                        for d in o.directions.values()]
    logits = interchanged_logits(model, t.known.prompts, t.known.answer_ids, patches, kit.cfg.batch_size,
                                 kit.ctx.timer)
    ids = t.known.answer_ids
    moved = ids[t.label[source]]
    n_pairs = len(base)
    t.outcome.upper = (_choice_tokens(logits[0], ids) == moved).numpy().astype(np.float64)
    for j, kind in enumerate(t.directions):
        hit = (_choice_tokens(logits[1 + j], ids) == moved.repeat(1 + kit.cfg.random_groups)).numpy()
        hit = hit.reshape(1 + kit.cfg.random_groups, n_pairs).astype(np.float64)
        t.outcome.chosen[kind], t.outcome.random[kind] = hit[0], hit[1:]
    at = 1 + len(t.directions)
    t.outcome.all_features = (_choice_tokens(logits[at], ids) == moved).numpy().astype(np.float64)
    at += 1
    for o, iso_bases in iso:
        o.outcome.other_attributes.append(t.known.report.attribute)
        for kind in o.directions:
            stayed = (_choice_tokens(logits[at], ids) == ids[t.label[iso_bases]]).numpy().astype(np.float64)
            prev = o.outcome.isolation.get(kind)
            o.outcome.isolation[kind] = stayed if prev is None else np.concatenate([prev, stayed])
            at += 1


def _entity_type(kit: _Kit, es: EntitySet) -> list[AttributeOutcomes]:
    """Every attribute of one entity type: filter, prepare, interchange (isolation across its attributes)."""
    ctx, cfg = kit.ctx, kit.cfg
    rows = sample_entities(es, ctx.cfg.max_entities)
    names = [es.entities[i] for i in rows]
    is_train = split_entities(es.entity_type, names, cfg.train_fraction, cfg.seed)
    done: list[AttributeOutcomes] = []
    ready: list[_Prepared] = []
    for attr in es.attributes:
        reason = too_few_per_value(value_counts(es, attr, rows), ctx.cfg.min_class_size)
        rep = AttributeReport(es.entity_type, attr, len(rows), len(es.values(attr)), skipped=reason)
        known = None
        if not reason:
            with ctx.timer("knowledge"):
                known = knowledge_filter(ctx, es, attr, rows, rep)
        if known is None or rep.skipped:
            done.append(AttributeOutcomes(es.entity_type, attr, skipped=rep.skipped))
            ctx.log(f"directions: warning: skipping {rep.name}: {rep.skipped}")
            continue
        prep = _prepare(kit, es, known, is_train)
        done.append(prep.outcome)
        if prep.outcome.skipped:
            ctx.log(f"directions: warning: skipping {rep.name}: {prep.outcome.skipped}")
        else:
            ready.append(prep)
    for t in ready:
        _interchange(kit, t, [o for o in ready if o is not t] if cfg.isolation else [])
    for t in ready:
        o = t.outcome
        ctx.log(f"directions: {o.name}: {o.n_known} known ({len(o.train)} train, {len(o.heldout)} held out), "
                f"{len(o.pairs)} pairs; upper bound {o.upper.mean():.0%}; cause "
                + ", ".join(f"{k} {o.chosen[k].mean():.0%}" for k in DIR_KINDS))
    return done


def _layers(kit: _Kit) -> list[dict[str, Any]]:
    return [{"layer": layer, "hook": mlp_out(layer), "neuron_hook": mlp_post(layer), "architecture": sae.architecture,
             "n_features": sae.shape.d_sae, "n_neurons": kit.ctx.model.cfg.d_mlp, "d_model": kit.ctx.model.cfg.d_model}
            for layer, sae in zip(kit.layers, kit.saes, strict=True)]


def directions(model: HookedTransformer, saes: list[SAE], entity_sets: list[EntitySet], cfg: DirectionsConfig,
               label_cfg: LabelConfig, *, tokenizer: Any = None, seeds: list[int] | None = None,
               log: Callable[[str], None] = print) -> DirectionsResult:
    """Choose and interchange attribute directions for `saes` (one per early layer's hook_mlp_out) on `model`, over
    `entity_sets` (entities, knowledge filter and prompt batch size from `label_cfg`); nothing is written."""
    t0 = time.perf_counter()
    saes = check_layer_saes(model, saes)
    ctx = make_context(model, saes[0], label_cfg, tokenizer, neurons=False, log=log)
    saes = [sae.to(model.cfg.device).eval() for sae in saes]
    layers = [hook_layer(sae.provenance.hook_name) for sae in saes]
    kit = _Kit(ctx, layers, saes, cfg)
    outcomes = [o for es in entity_sets for o in _entity_type(kit, es)]
    settings = {"directions": asdict(cfg), "layers": layers, "start_token": ctx.start_id,
                "label": {k: getattr(label_cfg, k) for k in ("entities", "entity_types", "max_entities", "templates",
                                                              "knowledge_filter", "min_class_size", "batch_size")}}
    timings = dict(ctx.timer.seconds)
    timings["total"] = time.perf_counter() - t0
    return DirectionsResult(outcomes, _layers(kit), settings, timings, sorted(set(seeds or [cfg.seed])))


def sae_seeds(sae_dirs: list[Path]) -> list[int]:
    """The training seeds recorded in the SAEs' cfg.json metadata (`seed`), where present."""
    seeds = set()
    for d in sae_dirs:
        meta = json.loads((Path(d) / CFG_FILE).read_text()).get("metadata") or {}
        if isinstance(meta.get("seed"), int):
            seeds.add(meta["seed"])
    return sorted(seeds)


def run_directions(model: HookedTransformer, sae_dirs: list[Path], cfg: DirectionsConfig, label_cfg: LabelConfig,
                   *, entity_sets: list[EntitySet] | None = None,
                   log: Callable[[str], None] = print) -> DirectionsResult:
    """The pipeline's entry point: load the exported SAEs in `sae_dirs` (one per early layer's hook_mlp_out) and the
    `label` section's entity sets, and run `directions`. Seeds come from the SAEs' metadata, else `cfg.seed`."""
    saes = [load_sae(d) for d in sae_dirs]
    entity_sets = load_entities(label_cfg) if entity_sets is None else entity_sets
    return directions(model, saes, entity_sets, cfg, label_cfg, seeds=sae_seeds(sae_dirs) or None, log=log)
