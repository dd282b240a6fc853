"""Step 1, the knowledge filter: which entities' attribute the model knows, and which values are left to score.

A unit cannot be expected to encode what the model does not know, so an (entity, attribute) pair counts only when
the model ranks the first token of the correct answer above those of every other value.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from features.labeling.activations import answer_logprobs
from features.labeling.context import LabelContext
from features.labeling.entities import EntitySet
from features.labeling.prompts import Encoded, encode_prompt, first_token
from features.labeling.results import AttributeReport


class KnownAttribute(NamedTuple):
    """One attribute after the knowledge filter, with the template-0 prompts and captures the causal checks reuse."""

    report: AttributeReport
    rows: list[int]  # the known entities' indices into the type's sampled entities
    labels: Tensor  # [len(rows)] class ids into report.values
    names: list[str]  # the type's sampled entities
    prompts: list[Encoded]  # template-0 attribute prompt per sampled entity
    answer_ids: Tensor  # first answer token per value of report.values
    logp0: Tensor  # [n sampled, len(values)] template-0 log-probs of the answers
    spans: dict[str, list[Tensor]]  # template-0 captures per sampled entity, and "resid_pre" (whole prompts)


class _Runs(NamedTuple):
    total: Tensor  # [n sampled, all values] answer log-probs summed over the templates
    logp0: Tensor
    spans: dict[str, list[Tensor]]
    prompts: list[Encoded]


def _answer_ids(ctx: LabelContext, prefix: str, values: list[str], rep: AttributeReport) -> Tensor:
    """First answer token per value; values sharing one are recorded as collisions (told apart at no token)."""
    ids = torch.tensor([first_token(ctx.tokenizer, prefix + v) for v in values])
    groups: dict[int, list[str]] = {}
    for v, t in zip(values, ids.tolist(), strict=True):
        groups.setdefault(t, []).append(v)
    rep.collisions = [vs for vs in groups.values() if len(vs) > 1]
    return ids


def _run_templates(ctx: LabelContext, templates: list[str], names: list[str], answer_ids: Tensor) -> _Runs:
    """Answer log-probs over the filter's templates; template 0 also captures the SAE's and neurons' hooks."""
    cfg = ctx.cfg
    n_templates = min(cfg.templates, len(templates)) if cfg.knowledge_filter else 1
    capture = list(dict.fromkeys([ctx.in_hook, ctx.out_hook] + ([ctx.neuron_hook] if ctx.neuron_hook else [])))
    total = torch.zeros(len(names), len(answer_ids))
    logp0, spans, prompts0 = torch.empty(0), {}, []
    for t in range(n_templates):
        prompts = [encode_prompt(ctx.tokenizer, templates[t], n, ctx.start_id) for n in names]
        lp, caught = answer_logprobs(ctx.model, prompts, answer_ids, cfg.batch_size, ctx.timer,
                                     capture=capture if t == 0 else None, keep_resid_pre=ctx.layer if t == 0 else None)
        total += lp
        if t == 0:
            logp0, spans, prompts0 = lp, caught, prompts
    return _Runs(total, logp0, spans, prompts0)


def _known(total: Tensor, answer_ids: Tensor, correct: Tensor, enabled: bool) -> Tensor:
    """[n] bool: the correct value's first token scores highest among the distinct first tokens (ties go to the
    correct one); everything is known when the filter is off."""
    if not enabled:
        return torch.ones(len(correct), dtype=torch.bool)
    best_other = total.clone()
    same_token = answer_ids[None, :] == answer_ids[correct][:, None]
    best_other[same_token] = -math.inf
    return total.gather(1, correct[:, None]).squeeze(1) >= best_other.max(1).values


def _settle_values(rep: AttributeReport, column: list[str], known: Tensor, all_values: list[str],
                   min_class_size: int) -> list[str]:
    """Record the filter's outcome in `rep` and return the values with enough known entities to score."""
    rep.n_known = int(known.sum())
    rep.kept_fraction = rep.n_known / max(len(column), 1)
    counts: dict[str, int] = {}
    for i in known.nonzero().flatten().tolist():
        counts[column[i]] = counts.get(column[i], 0) + 1
    used = sorted(v for v, c in counts.items() if c >= min_class_size)
    rep.values = [(v, counts[v]) for v in used]
    rep.dropped_values = sorted(((v, counts.get(v, 0)) for v in all_values if v not in used), key=lambda p: -p[1])
    if len(used) < 2:
        rep.skipped = (f"too few known entities after the knowledge filter: {rep.n_known}/{len(column)} known, "
                       f"{len(used)} value(s) with at least {min_class_size} known entities (need 2)")
    return used


def knowledge_filter(ctx: LabelContext, es: EntitySet, attr: str, rows: list[int],
                     rep: AttributeReport) -> KnownAttribute:
    """Run the attribute prompts, keep the known entities, and settle the values used for scoring (`rep.skipped`
    says why when fewer than two are left)."""
    spec = es.templates[attr]
    column = [es.attributes[attr][i] for i in rows]
    names = [es.entities[i] for i in rows]
    all_values = sorted(set(column))
    answer_ids = _answer_ids(ctx, spec.answer_prefix, all_values, rep)
    runs = _run_templates(ctx, spec.templates, names, answer_ids)
    value_index = {v: i for i, v in enumerate(all_values)}
    correct = torch.tensor([value_index[v] for v in column])
    known = _known(runs.total, answer_ids, correct, ctx.cfg.knowledge_filter)
    used = _settle_values(rep, column, known, all_values, ctx.cfg.min_class_size)
    used_index = {v: i for i, v in enumerate(used)}
    keep_rows = [i for i in known.nonzero().flatten().tolist() if column[i] in used_index]
    labels = torch.tensor([used_index[column[i]] for i in keep_rows], dtype=torch.long)
    sel = torch.tensor([value_index[v] for v in used], dtype=torch.long)
    return KnownAttribute(rep, keep_rows, labels, names, runs.prompts,
                          answer_ids[sel] if len(sel) else answer_ids[:0],
                          runs.logp0[:, sel] if len(sel) else runs.logp0[:, :0], runs.spans)
