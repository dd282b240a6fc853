"""The entity-attribute labeler: which SAE features and which MLP neurons of the SAE's layer encode an attribute
value of an entity ("Kenya" -> continent = Africa), how well an attribute can be read from them, and whether
the model uses them.

Fact-recall studies found early MLP layers acting as a lookup from an entity's tokens to attribute directions,
with single neurons there heavily polysemantic. This module measures that for one SAE, in five steps:

1. Knowledge filter. An (entity, attribute) pair is kept only if the model knows it: averaged over the first
   `templates` attribute prompts, the log-probability of the first token of " <correct value>" is the highest
   among the first tokens of all the attribute's values. (Values whose answers share a first token cannot be
   told apart at that token; they count as one candidate and are listed in the report.) The kept fraction per
   attribute is reported.
2. Attribute scores. The entity's *context* prompt ("The country Kenya") runs to the SAE's layer; each unit's
   activation is read at the entity's last token (`pooling: last`) or max-pooled over its tokens (`max`), for
   every SAE feature and every neuron (`blocks.L.mlp.hook_post`). For every unit and every value:
   precision, recall and F1 of "the unit is on" against "the entity has the value", AUROC of the activation,
   and the support (known entities with the value). A neuron is never off in the "fires" sense (SiLU-gated
   activations are nonzero almost everywhere), so "on" is "above the threshold that maximises the unit's F1 for
   that value", and by default features get the same rule, so features and neurons are compared like for like
   (`feature_on: fires` uses activation > 0 for features instead). All of it is a few matrix products and one
   sort per attribute.
3. Tags: a unit is tagged with a value when F1 >= `min_f1` (0.6: it fires on most of the value's entities and
   mostly on them), AUROC >= `min_auroc` (0.85: its activation ranks the value's entities far above the rest,
   which an always-on unit of a majority value cannot fake -- F1 alone can be 0.87 for such a unit when 77% of
   entities share the value) and support >= `min_positives` (10: below that, F1 = 1 happens by chance among
   thousands of units). A tag lists the entities behind it (those it fires on).
4. Probes (`features/probes.py`): held-out accuracy of a full linear probe on the SAE's input activations and
   of the best 1-sparse and k-sparse probes on features and on neurons.
5. Causal check, for the best tag of each value (up to `causal_tags` per kind): on the attribute prompts of the
   value's known entities where the unit is on at the entity's tokens, subtract the unit's contribution there
   (feature: activation x decoder row at the SAE's output hook; neuron: its activation at mlp.hook_post, i.e.
   activation x its W_out row) and measure the change in the correct answer's log-probability. Controls:
   `causal_controls` random units of the same kind, active at the same tokens on at least a quarter of those
   prompts, of similar firing frequency (features, within 3x) or similar activation size (neurons). The tag's
   `causal_effect` is the mean drop in log-probability (nats; positive = the unit supports the answer) and its
   `causal_status` is "causal" when the drop is at least `causal_min_effect` (0.1 nats: the answer's probability
   falls by about 10%) and its z-score against the controls is at least `causal_min_z` (2: outside the spread
   of removing any co-active unit), else "correlational only". Feature tags are also steered: add
   activation x (decoder row of the best feature tagged with another value - this decoder row) and measure how
   far the log-odds of the other value against this one move.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from features.entities import PLACEHOLDER, EntitySet, load_builtin_entity_sets, load_entity_sets, usable_attributes
from features.probes import probe_suite, split_train_test, stable_hash
from features.store import Probe, Tag
from sae.architectures import SAE
from sae.config import LabelConfig
from sae.errors import SaekitError
from sae.models import hook_layer

KINDS = ("feature", "neuron")
MAX_TAG_ENTITIES = 100  # entities listed per tag
CONTROL_MIN_COACTIVE = 0.25  # a control must be on at the entity tokens of at least this share of the prompts
CONTROL_FREQ_RATIO = 3.0  # ... and fire within this factor of the tagged feature's frequency
Z_STD_FLOOR = 0.02  # nats: the controls' spread is never taken as smaller than this


# ---------------------------------------------------------------------------------------------
# Prompts and forward passes


class Encoded(NamedTuple):
    """A prompt's token ids and the entity's tokens ids[span[0]:span[1]]."""

    ids: list[int]
    span: tuple[int, int]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer: Any, template: str, entity: str, start_id: int | None) -> Encoded:
    """Fill `template` with `entity` and tokenise it, locating the entity's tokens (its last occurrence).

    The prefix before the entity is tokenised without its trailing space, which belongs to the entity's first
    token in byte-level BPE (" Kenya"). Should a tokenizer merge across the boundary, the span falls back to the
    last token of the text up to the entity's end.
    """
    cut = template.rfind(PLACEHOLDER)
    before = template[:cut].replace(PLACEHOLDER, entity)
    text = before + entity + template[cut + len(PLACEHOLDER):].replace(PLACEHOLDER, entity)
    ids = _encode(tokenizer, text)
    upto = _encode(tokenizer, before + entity)
    pre = _encode(tokenizer, before.rstrip())
    if ids[:len(upto)] == upto and upto[:len(pre)] == pre and len(upto) > len(pre):
        span = (len(pre), len(upto))
    else:
        span = (max(len(upto) - 1, 0), max(len(upto), 1))
    if start_id is not None:
        return Encoded([start_id, *ids], (span[0] + 1, span[1] + 1))
    return Encoded(ids, span)


def first_token(tokenizer: Any, answer: str) -> int:
    ids = _encode(tokenizer, answer)
    if not ids:
        raise SaekitError(f"the answer {answer!r} tokenises to nothing; fix the value or its answer_prefix")
    return ids[0]


def length_batches(prompts: list[Encoded], batch_size: int) -> Iterator[list[int]]:
    """Indices of prompts in batches of similar length (sorted by length, then by index)."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i].ids), i))
    for s in range(0, len(order), batch_size):
        yield order[s:s + batch_size]


class Timer:
    """Wall time per named phase; `forward` collects every model forward pass."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def _tokens(model: HookedTransformer, prompts: list[Encoded], idx: list[int]) -> tuple[Tensor, Tensor]:
    """The batch's token ids, right-padded with each row's last token, and each row's last position.

    Right padding needs no attention mask: attention is causal, so padding after a prompt's end never reaches
    the prompt's own positions, and rotary positions still count from the prompt's first token."""
    longest = max(len(prompts[i].ids) for i in idx)
    rows = [prompts[i].ids + [prompts[i].ids[-1]] * (longest - len(prompts[i].ids)) for i in idx]
    last = torch.tensor([len(prompts[i].ids) - 1 for i in idx])
    return torch.tensor(rows, device=model.cfg.device), last


@torch.inference_mode()
def span_activations(model: HookedTransformer, prompts: list[Encoded], hooks: list[str], batch_size: int,
                     timer: Timer) -> dict[str, list[Tensor]]:
    """Per hook, per prompt, the activations at the entity's tokens [span, d]; the model runs to the last
    needed layer only."""
    stop = max(hook_layer(h) for h in hooks) + 1
    out: dict[str, list[Tensor]] = {h: [torch.empty(0)] * len(prompts) for h in hooks}
    captured: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        captured[hook.name] = act

    with model.hooks(fwd_hooks=[(h, keep) for h in hooks]):
        for idx in length_batches(prompts, batch_size):
            with timer("forward"):
                model(_tokens(model, prompts, idx)[0], stop_at_layer=stop)
            for h in hooks:
                act = captured[h].float().cpu()
                for row, i in enumerate(idx):
                    a, b = prompts[i].span
                    out[h][i] = act[row, a:b].clone()
    return out


def _last_logprobs(model: HookedTransformer, resid: Tensor, last: Tensor, token_ids: Tensor) -> Tensor:
    """log-softmax over the vocabulary at each row's position `last`, read at `token_ids` -> [batch, V]."""
    final = model.ln_final(resid[torch.arange(len(last)), last.to(resid.device)][:, None])
    logits = model.unembed(final)[:, 0].float()
    return logits.log_softmax(-1)[:, token_ids.to(logits.device)].cpu()


@torch.inference_mode()
def answer_logprobs(model: HookedTransformer, prompts: list[Encoded], token_ids: Tensor, batch_size: int,
                    timer: Timer, capture: list[str] | None = None,
                    keep_resid_pre: int | None = None) -> tuple[Tensor, dict[str, list[Tensor]]]:
    """Log-probabilities of `token_ids` as the next token after each prompt [P, V]; optionally also each
    prompt's entity-span activations at the `capture` hooks and the whole prompt's `blocks.<keep_resid_pre>
    .hook_resid_pre` (key 'resid_pre', [T, d_model]) for later patched runs."""
    hooks = list(capture or [])
    if keep_resid_pre is not None:
        hooks.append(f"blocks.{keep_resid_pre}.hook_resid_pre")
    captured: dict[str, Tensor] = {}
    spans: dict[str, list[Tensor]] = {h: [torch.empty(0)] * len(prompts) for h in hooks}
    out = torch.empty(len(prompts), len(token_ids))

    def keep(act: Tensor, hook: Any) -> None:
        captured[hook.name] = act

    with model.hooks(fwd_hooks=[(h, keep) for h in hooks]):
        for idx in length_batches(prompts, batch_size):
            with timer("forward"):
                tokens, last = _tokens(model, prompts, idx)
                resid = model(tokens, stop_at_layer=model.cfg.n_layers)
                out[idx] = _last_logprobs(model, resid, last, token_ids)
            for h in hooks:
                act = captured[h].float().cpu()
                for row, i in enumerate(idx):
                    a, b = prompts[i].span
                    whole = act[row, :len(prompts[i].ids)]
                    spans[h][i] = whole.clone() if h.endswith("hook_resid_pre") else act[row, a:b].clone()
    if keep_resid_pre is not None:
        spans["resid_pre"] = spans.pop(f"blocks.{keep_resid_pre}.hook_resid_pre")
    return out, spans


class Patch(NamedTuple):
    """Add `delta` [span, width] to the activations at `hook` on prompt `prompt`'s entity tokens."""

    prompt: int
    hook: str
    delta: Tensor


@torch.inference_mode()
def patched_logprobs(model: HookedTransformer, layer: int, prompts: list[Encoded], resid_pre: list[Tensor],
                     patches: list[Patch], token_ids: Tensor, batch_size: int, timer: Timer) -> Tensor:
    """[len(patches), V]: next-token log-probabilities of `token_ids` with each patch applied, the model run from
    block `layer` on the stored clean residual stream (every patched hook lies in that block), right-padded."""
    out = torch.empty(len(patches), len(token_ids))
    by_hook: dict[str, list[int]] = {}
    for j, p in enumerate(patches):
        by_hook.setdefault(p.hook, []).append(j)
    for hook, members in sorted(by_hook.items()):
        members = sorted(members, key=lambda j: (len(prompts[patches[j].prompt].ids), j))
        for s in range(0, len(members), batch_size):
            chunk = members[s:s + batch_size]
            lengths = [len(prompts[patches[j].prompt].ids) for j in chunk]
            longest = max(lengths)
            resid = torch.zeros(len(chunk), longest, resid_pre[0].shape[-1])
            delta = torch.zeros(len(chunk), longest, patches[chunk[0]].delta.shape[-1])
            for row, j in enumerate(chunk):  # right-padded: causal attention keeps padding out of each prompt
                resid[row, :lengths[row]] = resid_pre[patches[j].prompt]
                a, b = prompts[patches[j].prompt].span
                delta[row, a:b] = patches[j].delta
            resid, delta = resid.to(model.cfg.device), delta.to(model.cfg.device)
            last = torch.tensor(lengths) - 1

            def add(act: Tensor, hook: Any, delta: Tensor = delta) -> Tensor:
                return act + delta.to(act.dtype)

            with timer("forward"), model.hooks(fwd_hooks=[(hook, add)]):
                res = model(resid, start_at_layer=layer, stop_at_layer=model.cfg.n_layers)
                out[chunk] = _last_logprobs(model, res, last, token_ids)
    return out


# ---------------------------------------------------------------------------------------------
# Scores


def average_ranks(a: Tensor) -> Tensor:
    """Ranks 1..N along dim 1 of a [U, N], ties sharing their average rank (float64)."""
    u, n = a.shape
    s, order = a.sort(dim=1)
    pos = torch.arange(1, n + 1, dtype=torch.float64).expand(u, n)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    gid = new.long().cumsum(1) - 1
    first = torch.full((u, n), math.inf, dtype=torch.float64).scatter_reduce(1, gid, pos, "amin")
    last = torch.zeros((u, n), dtype=torch.float64).scatter_reduce(1, gid, pos, "amax")
    avg = ((first + last) / 2).gather(1, gid)
    return torch.empty_like(avg).scatter_(1, order, avg)


def auroc(a: Tensor, y: Tensor) -> Tensor:
    """AUROC of each unit's activation (a [U, N]) for each class (one-hot y [N, V]) -> [U, V]; NaN without
    negatives or positives. Mann-Whitney U from average ranks, so ties count one half."""
    y = y.double()
    n_pos = y.sum(0)
    n_neg = len(y) - n_pos
    rank_sum = average_ranks(a.double()) @ y
    return ((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).float()


class UnitScores(NamedTuple):
    """Per unit and value [U, V]; `support` [V] is the number of entities with each value."""

    precision: Tensor
    recall: Tensor
    f1: Tensor
    auroc: Tensor
    threshold: Tensor
    support: Tensor


def firing_scores(a: Tensor, y: Tensor, threshold: float = 0.0) -> UnitScores:
    """Scores of "activation > threshold" (one threshold for all units), e.g. a feature firing."""
    on = (a > threshold).float()
    y = y.float()
    tp = on @ y
    n_on = on.sum(1, keepdim=True)
    support = y.sum(0)
    precision = torch.where(n_on > 0, tp / n_on.clamp_min(1), 0.0)
    recall = tp / support.clamp_min(1)
    f1 = 2 * tp / (n_on + support).clamp_min(1)
    return UnitScores(precision, recall, f1, auroc(a, y), torch.full_like(f1, threshold), support)


def best_f1_scores(a: Tensor, y: Tensor, chunk: int = 256) -> UnitScores:
    """Scores of "activation > t" with t chosen per unit and value to maximise F1 (thresholds lie halfway
    between consecutive distinct activations; t below the minimum means always on)."""
    u, n = a.shape
    y = y.float()
    support = y.sum(0)
    prec, rec, f1s, thr = (torch.empty(u, y.shape[1]) for _ in range(4))
    k = torch.arange(1, n + 1, dtype=torch.float32)
    for s in range(0, u, chunk):
        sa, order = a[s:s + chunk].float().sort(dim=1, descending=True)
        tp = y[order].cumsum(1)  # [c, N, V]: positives among the top k
        valid = torch.ones_like(sa, dtype=torch.bool)
        valid[:, :-1] = sa[:, :-1] > sa[:, 1:]  # a threshold can separate the top k from the rest
        f1 = 2 * tp / (k[None, :, None] + support)
        f1 = torch.where(valid[:, :, None], f1, -1.0)
        best = f1.argmax(1)  # [c, V]
        tp_best = tp.gather(1, best[:, None]).squeeze(1)
        kb = (best + 1).float()
        prec[s:s + chunk] = tp_best / kb
        rec[s:s + chunk] = tp_best / support.clamp_min(1)
        f1s[s:s + chunk] = f1.gather(1, best[:, None]).squeeze(1)
        upper = sa.gather(1, best)
        lower = sa.gather(1, (best + 1).clamp_max(n - 1))
        thr[s:s + chunk] = torch.where(best + 1 < n, (upper + lower) / 2, sa[:, -1:] - 1.0)
    return UnitScores(prec, rec, f1s, auroc(a, y), thr, support)


def select_tags(scores: UnitScores, min_f1: float, min_auroc: float, min_positives: int) -> list[tuple[int, int]]:
    """(unit, value) pairs clearing all three thresholds, best F1 first."""
    ok = (scores.f1 >= min_f1) & (scores.auroc >= min_auroc) & (scores.support >= min_positives)[None]
    pairs = ok.nonzero().tolist()
    return sorted(((int(u), int(v)) for u, v in pairs), key=lambda p: (-float(scores.f1[p]), p))


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class AttributeReport:
    """What happened to one attribute: sizes, the knowledge filter, why it was skipped, its tags."""

    entity_type: str
    attribute: str
    n_entities: int
    n_values: int
    n_known: int | None = None
    kept_fraction: float | None = None
    values: list[tuple[str, int]] = field(default_factory=list)  # (value, known entities) used for scoring
    dropped_values: list[tuple[str, int]] = field(default_factory=list)  # too few known entities
    collisions: list[list[str]] = field(default_factory=list)  # values sharing an answer's first token
    skipped: str | None = None
    n_tags: dict[str, int] = field(default_factory=dict)
    best: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # kind -> best unit per value

    @property
    def name(self) -> str:
        return f"{self.entity_type}.{self.attribute}"


@dataclass
class CausalResult:
    kind: str
    index: int
    entity_type: str
    attribute: str
    value: str
    n_prompts: int
    drop: float | None = None  # mean drop in the correct answer's log-prob when the unit is removed (nats)
    control_drops: list[float] = field(default_factory=list)
    z: float | None = None
    status: str = "not tested"
    reason: str = ""
    steer_value: str | None = None  # the other value steered towards
    steer_shift: float | None = None  # mean change of log p(other) - log p(this), nats
    steer_flip: float | None = None  # share of prompts whose best candidate became the other value


@dataclass
class LabelResult:
    attributes: list[AttributeReport]
    tags: list[Tag]
    probes: list[Probe]
    causal: list[CausalResult]
    settings: dict[str, Any]
    timings: dict[str, float]
    # with keep_activations: per entity type {"names", "input", "feature", "neuron"} and per attribute
    # {"entity_type", "rows" (into the type's names), "labels", "values"}
    data: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The labeler


def sample_entities(entity_set: EntitySet, max_entities: int | None) -> list[int]:
    """Indices of at most `max_entities` entities: the first by sha256 of the name, back in file order."""
    n = len(entity_set.entities)
    if max_entities is None or n <= max_entities:
        return list(range(n))
    order = sorted(range(n), key=lambda i: stable_hash(entity_set.entities[i]))
    return sorted(order[:max_entities])


def load_entities(cfg: LabelConfig) -> list[EntitySet]:
    sets = load_builtin_entity_sets() if cfg.entities == "builtin" else load_entity_sets(Path(cfg.entities))
    if cfg.entity_types is not None:
        known = {s.entity_type for s in sets}
        missing = [t for t in cfg.entity_types if t not in known]
        if missing:
            raise SaekitError(f"label.entity_types names {', '.join(missing)}, not among the entity types in "
                              f"{cfg.entities}: {', '.join(sorted(known))}")
        sets = [s for s in sets if s.entity_type in cfg.entity_types]
    return sets


class _Attr(NamedTuple):
    report: AttributeReport
    rows: list[int]  # the known entities' indices into the type's sampled entities
    labels: Tensor  # [len(rows)] class ids into report.values
    names: list[str]  # the type's sampled entities
    prompts: list[Encoded]  # template-0 attribute prompt per sampled entity
    answer_ids: Tensor  # first answer token per value of report.values
    logp0: Tensor  # [n sampled, len(values)] template-0 log-probs of the answers
    spans: dict[str, list[Tensor]]  # template-0 captures per sampled entity


def _pool(span: Tensor, pooling: str) -> Tensor:
    return span[-1] if pooling == "last" else span.max(0).values


def label(model: HookedTransformer, sae: SAE, entity_sets: list[EntitySet], cfg: LabelConfig, *,
          tokenizer: Any = None, feature_freq: Tensor | None = None, neuron_freq: Tensor | None = None,
          neurons: bool = True, keep_activations: bool = False, log: Callable[[str], None] = print) -> LabelResult:
    """Run the labeler for `sae` (on `model`) over `entity_sets`; returns tags, probes and causal results
    (nothing is written). `feature_freq` (firing frequency per feature, e.g. from the feature store) matches
    causal controls; without it, the firing rate on the entity prompts is used."""
    from features.analyze import check_fit

    timer = Timer()
    t0 = time.perf_counter()
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise SaekitError("the model has no tokenizer; the labeler needs one to build entity prompts")
    neuron_hook = check_fit(model, sae)
    sae = sae.cpu().eval()
    in_hook = sae.cfg.hook_name
    out_hook = sae.cfg.hook_name_out or in_hook
    layer = hook_layer(in_hook)
    if hook_layer(out_hook) != layer:
        raise SaekitError(f"the SAE reads {in_hook} and writes {out_hook}: the labeler needs both in one block")
    start_id = None
    if cfg.start_token:
        from sae.corpus import default_separator_id

        start_id = default_separator_id(tokenizer)
    kinds = ["feature", "neuron"] if neurons else ["feature"]
    W_dec = sae.W_dec.detach().float().cpu()

    attributes: list[AttributeReport] = []
    tags: list[Tag] = []
    probes: list[Probe] = []
    # causal candidates: (kind, unit, attr, value index, tag f1)
    causal_todo: list[tuple[str, int, _Attr, int, float]] = []
    best_by_value: dict[tuple[str, str], dict[int, int]] = {}  # (type, attr) -> value -> best feature
    entity_feats: dict[str, Tensor] = {}
    data: dict[str, Any] = {}

    for es in entity_sets:
        rows = sample_entities(es, cfg.max_entities)
        names = [es.entities[i] for i in rows]
        usable, skipped = usable_attributes(es, min_values=2, min_entities=cfg.min_class_size * 2)
        for attr, reason in skipped.items():
            attributes.append(AttributeReport(es.entity_type, attr, len(rows), len(es.values(attr)),
                                              skipped=reason))
            log(f"label: warning: skipping {es.entity_type}.{attr}: {reason}")
        todo: list[tuple[str, AttributeReport]] = []
        for attr in usable:
            column = [es.attributes[attr][i] for i in rows]
            counts: dict[str, int] = {}
            for v in column:
                counts[v] = counts.get(v, 0) + 1
            rep = AttributeReport(es.entity_type, attr, len(rows), len(counts))
            if sum(c >= cfg.min_class_size for c in counts.values()) < 2:
                rep.skipped = (f"fewer than 2 values with at least {cfg.min_class_size} entities "
                               f"(largest: {max(counts.values())}); too few entities share a value")
                attributes.append(rep)
                log(f"label: warning: skipping {rep.name}: {rep.skipped}")
                continue
            todo.append((attr, rep))
        if not todo:
            continue
        log(f"label: {es.entity_type}: {len(rows)} entities, attributes {', '.join(a for a, _ in todo)}")

        # -- unit activations on the context prompts
        ctx_prompts = [encode_prompt(tokenizer, es.context_template, n, start_id) for n in names]
        hooks = list(dict.fromkeys([in_hook] + ([neuron_hook] if neurons else [])))
        acts = span_activations(model, ctx_prompts, hooks, cfg.batch_size, timer)
        with timer("encode"):
            x_in = torch.stack([s[-1] if cfg.pooling == "last" else s.mean(0) for s in acts[in_hook]])
            with torch.inference_mode():
                feats = torch.stack([_pool(sae.encode(s).float(), cfg.pooling) for s in acts[in_hook]])
            units = {"feature": feats}
            if neurons:
                units["neuron"] = torch.stack([_pool(s, cfg.pooling) for s in acts[neuron_hook]])
        entity_feats[es.entity_type] = feats
        if keep_activations:
            data[es.entity_type] = {"names": names, "input": x_in, **units}

        for attr, rep in todo:
            a = _knowledge(model, tokenizer, es, attr, rows, rep, cfg, start_id, timer, layer, in_hook, out_hook,
                           neuron_hook if neurons else None)
            if rep.skipped:
                attributes.append(rep)
                log(f"label: warning: skipping {rep.name}: {rep.skipped}")
                continue
            if keep_activations:
                data[rep.name] = {"entity_type": es.entity_type, "rows": a.rows, "labels": a.labels,
                                  "values": [v for v, _ in rep.values]}
            attributes.append(rep)
            y = torch.nn.functional.one_hot(a.labels, len(rep.values))
            kept_names = [names[i] for i in a.rows]
            values = [v for v, _ in rep.values]
            best_by_value[(es.entity_type, attr)] = {}
            with timer("scores"):
                for kind in kinds:
                    m = units[kind][a.rows].T.contiguous()  # [U, N]
                    fires = kind == "feature" and cfg.feature_on == "fires"
                    sc = firing_scores(m, y) if fires else best_f1_scores(m, y)
                    pairs = select_tags(sc, cfg.min_f1, cfg.min_auroc, cfg.min_positives)
                    rep.n_tags[kind] = len(pairs)
                    rep.best[kind] = _best_per_value(sc, values, kind)
                    seen: set[int] = set()
                    for u, v in pairs:
                        on = (m[u] > sc.threshold[u, v]) & (a.labels == v)
                        tags.append(Tag(kind, u, es.entity_type, attr, values[v], float(sc.precision[u, v]),
                                        float(sc.recall[u, v]), float(sc.f1[u, v]), float(sc.auroc[u, v]),
                                        int(sc.support[v]),
                                        [kept_names[i] for i in on.nonzero().flatten().tolist()][:MAX_TAG_ENTITIES],
                                        None, "not tested"))
                        if v not in seen:  # the best tag of each value goes to the causal check
                            seen.add(v)
                            causal_todo.append((kind, u, a, v, float(sc.f1[u, v])))
                            if kind == "feature":
                                best_by_value[(es.entity_type, attr)][v] = u
            with timer("probes"), _one_thread():
                probes += _probes(a, x_in, units, kept_names, cfg, kinds)
            log(f"label: {rep.name}: kept {rep.n_known}/{rep.n_entities} known entities "
                f"({rep.kept_fraction:.0%}), {len(rep.values)} values; tags: "
                + ", ".join(f"{rep.n_tags.get(k, 0)} {k}s" for k in kinds))

    # -- causal checks, the best tag per value, round-robin over attributes, up to cfg.causal_tags per kind
    causal: list[CausalResult] = []
    if cfg.causal_tags > 0 and causal_todo:
        freq = {"feature": feature_freq, "neuron": neuron_freq}
        if freq["feature"] is None:
            freq["feature"] = (torch.cat(list(entity_feats.values())) > 0).float().mean(0)
        tagged_units = {(t.kind, t.entity_type, t.attribute, t.index) for t in tags}
        for kind in kinds:
            chosen = _round_robin([c for c in causal_todo if c[0] == kind], cfg.causal_tags)
            with timer("causal"):
                for _, u, a, v, _f1 in chosen:
                    res = _causal(model, sae, a, u, v, kind, cfg, layer, in_hook, out_hook, neuron_hook,
                                  W_dec, freq[kind], tagged_units, best_by_value, timer)
                    causal.append(res)
            done = [c for c in causal if c.kind == kind]
            n_causal = sum(c.status == "causal" for c in done)
            log(f"label: causal check of {len(done)} {kind} tags: {n_causal} causal")
        by_key = {(c.kind, c.index, c.entity_type, c.attribute, c.value): c for c in causal}
        tags = [_with_causal(t, by_key.get((t.kind, t.index, t.entity_type, t.attribute, t.value))) for t in tags]

    settings = {"sae_hook": in_hook, "sae_out_hook": out_hook, "neuron_hook": neuron_hook if neurons else None,
                "layer": layer, "start_token": start_id, "label_config": dict(vars(cfg)),
                "n_features": sae.cfg.d_sae, "n_neurons": model.cfg.d_mlp if neurons else 0}
    timings = dict(timer.seconds)
    timings["total"] = time.perf_counter() - t0
    return LabelResult(attributes, tags, probes, causal, settings, timings, data)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Small problems (the probes) run several times faster on one thread than on a shared pool."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _with_causal(tag: Tag, res: CausalResult | None) -> Tag:
    if res is None:
        return tag
    from dataclasses import replace

    return replace(tag, causal_effect=res.drop, causal_status=res.status)


def _round_robin(cands: list[tuple[str, int, _Attr, int, float]], limit: int) -> list[tuple[str, int, _Attr, int,
                                                                                             float]]:
    """Up to `limit` candidates, taking each attribute's best (by F1) in turn."""
    queues: dict[str, list[tuple[str, int, _Attr, int, float]]] = {}
    for c in sorted(cands, key=lambda c: -c[4]):
        queues.setdefault(c[2].report.name, []).append(c)
    out: list[tuple[str, int, _Attr, int, float]] = []
    while len(out) < limit and any(queues.values()):
        for q in queues.values():
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


def _best_per_value(sc: UnitScores, values: list[str], kind: str) -> list[dict[str, Any]]:
    """The unit with the highest F1 for each value, for the report (tagged or not)."""
    out = []
    for v, name in enumerate(values):
        u = int(sc.f1[:, v].argmax())
        out.append({"value": name, "unit": u, "f1": round(float(sc.f1[u, v]), 4),
                    "auroc": round(float(sc.auroc[u, v]), 4), "precision": round(float(sc.precision[u, v]), 4),
                    "recall": round(float(sc.recall[u, v]), 4), "support": int(sc.support[v]),
                    "max_auroc": round(float(torch.nan_to_num(sc.auroc[:, v], nan=0.0).max()), 4)})
    return out


def _knowledge(model: HookedTransformer, tokenizer: Any, es: EntitySet, attr: str, rows: list[int],
               rep: AttributeReport, cfg: LabelConfig, start_id: int | None, timer: Timer, layer: int, in_hook: str,
               out_hook: str, neuron_hook: str | None) -> _Attr:
    """Run the attribute prompts, keep the known entities, and settle the values used for scoring."""
    spec = es.templates[attr]
    column = [es.attributes[attr][i] for i in rows]
    all_values = sorted(set(column))
    answer_ids = torch.tensor([first_token(tokenizer, spec.answer_prefix + v) for v in all_values])
    groups: dict[int, list[str]] = {}
    for v, t in zip(all_values, answer_ids.tolist(), strict=True):
        groups.setdefault(t, []).append(v)
    rep.collisions = [vs for vs in groups.values() if len(vs) > 1]
    names = [es.entities[i] for i in rows]
    n_templates = min(cfg.templates, len(spec.templates))
    capture = list(dict.fromkeys([in_hook, out_hook] + ([neuron_hook] if neuron_hook else [])))
    total = torch.zeros(len(rows), len(all_values))
    logp0, spans = torch.empty(0), {}
    prompts0: list[Encoded] = []
    for t in range(n_templates if cfg.knowledge_filter else 1):
        prompts = [encode_prompt(tokenizer, spec.templates[t], n, start_id) for n in names]
        lp, caught = answer_logprobs(model, prompts, answer_ids, cfg.batch_size, timer,
                                     capture=capture if t == 0 else None, keep_resid_pre=layer if t == 0 else None)
        total += lp
        if t == 0:
            logp0, spans, prompts0 = lp, caught, prompts
    value_index = {v: i for i, v in enumerate(all_values)}
    correct = torch.tensor([value_index[v] for v in column])
    if cfg.knowledge_filter:
        # best candidate among distinct first tokens: a value's score is its token's; ties go to the correct one
        best_other = total.clone()
        same_token = answer_ids[None, :] == answer_ids[correct][:, None]
        best_other[same_token] = -math.inf
        known = total.gather(1, correct[:, None]).squeeze(1) >= best_other.max(1).values
    else:
        known = torch.ones(len(rows), dtype=torch.bool)
    rep.n_known = int(known.sum())
    rep.kept_fraction = rep.n_known / max(len(rows), 1)
    counts: dict[str, int] = {}
    for i in known.nonzero().flatten().tolist():
        counts[column[i]] = counts.get(column[i], 0) + 1
    used = sorted(v for v, c in counts.items() if c >= cfg.min_class_size)
    rep.values = [(v, counts[v]) for v in used]
    rep.dropped_values = sorted(((v, counts.get(v, 0)) for v in all_values if v not in used), key=lambda p: -p[1])
    if len(used) < 2:
        rep.skipped = (f"too few known entities after the knowledge filter: {rep.n_known}/{len(rows)} known, "
                       f"{len(used)} value(s) with at least {cfg.min_class_size} known entities (need 2)")
    used_index = {v: i for i, v in enumerate(used)}
    keep_rows = [i for i in known.nonzero().flatten().tolist() if column[i] in used_index]
    labels = torch.tensor([used_index[column[i]] for i in keep_rows], dtype=torch.long)
    sel = torch.tensor([value_index[v] for v in used], dtype=torch.long)
    return _Attr(rep, keep_rows, labels, names, prompts0, answer_ids[sel] if len(sel) else answer_ids[:0],
                 logp0[:, sel] if len(sel) else logp0[:, :0], spans)


def _probes(a: _Attr, x_in: Tensor, units: dict[str, Tensor], names: list[str], cfg: LabelConfig,
            kinds: list[str]) -> list[Probe]:
    rep = a.report
    n_classes = len(rep.values)
    train, test = split_train_test(names, a.labels, cfg.test_fraction)
    y = a.labels
    counts = torch.bincount(y[test], minlength=n_classes)
    baseline = float(counts.max()) / max(len(test), 1)
    out: list[Probe] = []
    common = {"values": [v for v, _ in rep.values]}
    for res in probe_suite(x_in[a.rows], y, train, test, n_classes, sparse=False, l2=cfg.probe_l2,
                           steps=cfg.probe_steps):
        out.append(Probe("feature", rep.entity_type, rep.attribute, "full", res.accuracy, baseline, len(train),
                         len(test), {**common, **res.details, "train_accuracy": res.train_accuracy,
                                     "input": "the SAE's input hook (shared by both kinds)"}))
    for kind in kinds:
        for res in probe_suite(units[kind][a.rows], y, train, test, n_classes, sparse=True, k=cfg.probe_k,
                               l2=cfg.probe_l2, steps=cfg.probe_steps):
            out.append(Probe(kind, rep.entity_type, rep.attribute, res.method, res.accuracy, baseline, len(train),
                             len(test), {**common, **res.details, "units": res.units,
                                         "train_accuracy": res.train_accuracy}))
    return out


def _causal(model: HookedTransformer, sae: SAE, a: _Attr, u: int, v: int, kind: str, cfg: LabelConfig, layer: int,
            in_hook: str, out_hook: str, neuron_hook: str, W_dec: Tensor, freq: Tensor | None,
            tagged: set[tuple[str, str, str, int]], best_by_value: dict[tuple[str, str], dict[int, int]],
            timer: Timer) -> CausalResult:
    rep = a.report
    value = rep.values[v][0]
    res = CausalResult(kind, u, rep.entity_type, rep.attribute, value, 0)
    rows = [r for r, lab in zip(a.rows, a.labels.tolist(), strict=True) if lab == v]
    # the unit's activations at the entity tokens of each attribute prompt
    with torch.inference_mode():
        if kind == "feature":
            span_units = {r: sae.encode(a.spans[in_hook][r]).float() for r in rows}
        else:
            span_units = {r: a.spans[neuron_hook][r] for r in rows}
    on_rows = [r for r in rows if float(span_units[r][:, u].max()) > 0]
    on_rows = sorted(on_rows, key=lambda r: stable_hash(a.names[r]))[:cfg.causal_prompts]
    res.n_prompts = len(on_rows)
    if not on_rows:
        res.reason = "the unit is off at the entity tokens of every attribute prompt"
        return res
    hook = out_hook if kind == "feature" else neuron_hook
    width = W_dec.shape[1] if kind == "feature" else model.cfg.d_mlp

    def delta_for(r: int, unit: int) -> Tensor:
        """Remove `unit`'s contribution at prompt r's entity tokens."""
        act = span_units[r][:, unit]
        if kind == "feature":
            return -act[:, None] * W_dec[unit]
        d = torch.zeros(len(act), width)
        d[:, unit] = -act
        return d

    # controls: same kind, on at the same tokens in >= a quarter of the prompts, similar frequency / size
    n_units = W_dec.shape[0] if kind == "feature" else model.cfg.d_mlp
    stack = torch.stack([span_units[r].max(0).values for r in on_rows])  # [P, U]
    coactive = ((stack > 0).float().mean(0) >= CONTROL_MIN_COACTIVE) if kind == "feature" else \
        torch.ones(n_units, dtype=torch.bool)
    excluded = torch.zeros(n_units, dtype=torch.bool)
    for k_, et, at, i in tagged:
        if k_ == kind and et == rep.entity_type and at == rep.attribute:
            excluded[i] = True
    excluded[u] = True
    if kind == "feature" and freq is not None:
        ratio = (freq.clamp_min(1e-9) / max(float(freq[u]), 1e-9)).log().abs()
    else:  # neurons: similar mean |activation| at these tokens
        size = stack.abs().mean(0)
        ratio = (size.clamp_min(1e-9) / max(float(size[u]), 1e-9)).log().abs()
    pool = (coactive & ~excluded & (ratio <= math.log(CONTROL_FREQ_RATIO))).nonzero().flatten()
    if len(pool) < cfg.causal_controls:  # relax the match: the co-active units closest in frequency / size
        cand = (coactive & ~excluded).nonzero().flatten()
        pool = cand[ratio[cand].argsort()[:max(cfg.causal_controls, len(pool))]]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + stable_hash(f"{kind}:{u}:{rep.name}") % 1_000_003)
    controls = pool[torch.randperm(len(pool), generator=gen)[:cfg.causal_controls]].tolist()

    patches: list[Patch] = []
    owners: list[tuple[str, int]] = []  # ("clean"|"unit"|"control"|"steer", control index)
    for r in on_rows:
        patches.append(Patch(r, hook, torch.zeros(len(span_units[r]), width)))
        owners.append(("clean", -1))
        patches.append(Patch(r, hook, delta_for(r, u)))
        owners.append(("unit", -1))
        for ci, c in enumerate(controls):
            if float(span_units[r][:, c].abs().max()) > 0:
                patches.append(Patch(r, hook, delta_for(r, c)))
                owners.append(("control", ci))
    target = None
    if kind == "feature":
        others = {w: g for w, g in best_by_value.get((rep.entity_type, rep.attribute), {}).items() if w != v}
        if others:
            target = max(others, key=lambda w: (rep.values[w][1], -w))  # the most common other tagged value
            direction = W_dec[others[target]] - W_dec[u]
            for r in on_rows:
                act = span_units[r][:, u]
                patches.append(Patch(r, hook, act[:, None] * direction))
                owners.append(("steer", -1))
    lp = patched_logprobs(model, layer, a.prompts, a.spans["resid_pre"], patches, a.answer_ids, cfg.batch_size,
                          timer)
    by_prompt: dict[int, dict[str, Any]] = {r: {"control": {}} for r in on_rows}
    for (role, ci), p, row in zip(owners, patches, lp, strict=True):
        slot = by_prompt[p.prompt]
        if role == "control":
            slot["control"][ci] = row
        else:
            slot[role] = row
    drops = [float(s["clean"][v] - s["unit"][v]) for s in by_prompt.values()]
    res.drop = sum(drops) / len(drops)
    for ci in range(len(controls)):
        d = [float(s["clean"][v] - s["control"][ci][v]) if ci in s["control"] else 0.0 for s in by_prompt.values()]
        res.control_drops.append(sum(d) / len(d))
    if res.control_drops:
        cd = torch.tensor(res.control_drops)
        std = float(cd.std(unbiased=len(cd) > 1)) if len(cd) > 1 else 0.0
        res.z = (res.drop - float(cd.mean())) / max(std, Z_STD_FLOOR)
    else:
        res.z = res.drop / Z_STD_FLOOR
    ok = res.drop >= cfg.causal_min_effect and res.z >= cfg.causal_min_z
    res.status = "causal" if ok else "correlational only"
    res.reason = (f"drop {res.drop:.3f} nats vs controls {_mean(res.control_drops):.3f}, z {res.z:.1f}, "
                  f"{len(on_rows)} prompts, {len(controls)} controls")
    if target is not None:
        shifts, flips = [], []
        for s in by_prompt.values():
            before = s["clean"][target] - s["clean"][v]
            after = s["steer"][target] - s["steer"][v]
            shifts.append(float(after - before))
            flips.append(float(int(s["steer"].argmax()) == target))
        res.steer_value = rep.values[target][0]
        res.steer_shift = sum(shifts) / len(shifts)
        res.steer_flip = sum(flips) / len(flips)
    return res


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


# ---------------------------------------------------------------------------------------------
# From a run: read the store, label, write tags / probes / semantics and the report


def run_label(cfg: Any, model: HookedTransformer, sae_dir: Path, log: Callable[[str], None] = print,
              plots: bool = True) -> tuple[LabelResult, dict[str, Any] | None, Path]:
    """Label the SAE in `sae_dir` with the run config's `label` section: tags, probes and semantics go into the
    SAE's feature store (which the analysis pass must have built), the report into runs/<name>/reports/<sae-id>/.
    Returns the result, the semantics summary and the report's path."""
    from features.analyze import sae_fingerprint
    from features.report import write_report
    from features.semantics import score_store, to_store_rows
    from features.store import FeatureStore, store_path
    from sae.export import load_sae

    sae_dir = Path(sae_dir)
    path = store_path(sae_dir)
    if not path.is_file():
        raise SaekitError(f"no feature store for SAE '{sae_dir.name}' ({path} is missing): the labeler writes into "
                          "the analysis pass's store; run `saekit analyze --config <your config>` first")
    sae = load_sae(sae_dir)
    lab: LabelConfig = cfg.label
    entity_sets = load_entities(lab)
    with FeatureStore.open(path, writable=True) as store:
        if store.meta.get("sae_sha256") not in (None, sae_fingerprint(sae_dir)):
            raise SaekitError(f"{path} was built for other weights than the SAE now in {sae_dir} (retrained?); "
                              "rebuild it with `saekit analyze --config <your config> --overwrite`")
        n_feat, n_neur = store.n_units("feature"), store.n_units("neuron")
        if n_feat != sae.cfg.d_sae:
            raise SaekitError(f"{path} holds {n_feat} features but the SAE has {sae.cfg.d_sae}; rebuild it with "
                              "`saekit analyze --config <your config> --overwrite`")
        freq = torch.zeros(n_feat)
        for u in store.search("", "feature", limit=n_feat, include_dead=True):
            freq[u.index] = u.freq
        result = label(model, sae, entity_sets, lab, feature_freq=freq, neurons=n_neur > 0, log=log)
        if n_neur == 0:
            result.settings["note"] = "the store has no neurons (analyze.neurons: false); neurons not labeled"
        store.write_tags(result.tags)
        store.write_probes(result.probes)
        summary = None
        if lab.semantics:
            t0 = time.perf_counter()
            tok = model.tokenizer

            def encode(text: str) -> list[int]:
                return _encode(tok, text)

            rows, summary = score_store(store, entity_sets, encode if tok is not None else None, log=log)
            store.write_semantics(to_store_rows(rows), replace=True)
            result.timings["semantics"] = time.perf_counter() - t0
            result.timings["total"] += result.timings["semantics"]
        meta = {"sae_id": sae_dir.name, "model_name": model.cfg.model_name, "store": str(path),
                "entity_types": [es.entity_type for es in entity_sets], "eval": store.meta.get("eval")}
    report = write_report(Path(cfg.run_dir) / "reports" / sae_dir.name, result, summary, meta, plots=plots)
    return result, summary, report
