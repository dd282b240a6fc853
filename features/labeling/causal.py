"""Step 5, the causal check: does the model use a tagged unit? A paired test over prompts against random units
of the same kind, corrected across every tag tested.

For the best tag of each value (up to `causal_tags` per kind), on up to `causal_prompts` attribute prompts of
the value's known entities where the tag says the unit is on (above the tag's threshold at an entity token;
chosen by name hash):

- drop_u(r): the fall of the correct answer's log-probability on prompt r when the unit's contribution at the
  entity tokens is removed (feature: activation x decoder row at the SAE's output hook; neuron: its mlp.hook_post
  value, i.e. activation x its W_out row);
- drop_c(r) for each of `causal_controls` random units c of the same kind, not tagged for this attribute and
  matched in firing frequency (within CONTROL_FREQ_RATIO of the unit's, else the closest), drawn once per tag:
  c's own contribution removed where c is on at r's entity tokens; elsewhere a value-matched removal, the
  tagged unit's activation rescaled to c's typical activation (act_u x mean_act_c / mean_act_u) along c's
  direction. So a control never counts as a free zero drop;
- d(r) = drop_u(r) - mean_c drop_c(r).

The tag's effect is mean_r d(r) (nats) with its 95% bootstrap interval over prompts; p is the one-sided paired
sign-flip test of mean d > 0 over prompts (exact up to 16 prompts), Holm-corrected across every tag tested,
features and neurons together (one family: "this tag is causal"). A tag is "causal" when its Holm p < ALPHA and
its effect >= `causal_min_effect` (0.1 nats: the answer's probability falls by about 10% more than for random
units); there is no floor on any spread. Note that with n prompts the smallest p is 2^-n, so Holm over m tags
needs n > log2(m / ALPHA) prompts (m = 48: 10) before anything can be called causal.

Feature tags are also steered: add activation x (decoder row of the best feature tagged with another value -
this decoder row) and measure how far the log-odds of the other value against this one move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from features.labeling.activations import RESID_PRE, Patch, patched_logprobs
from features.labeling.config import LabelConfig
from features.labeling.context import LabelContext
from features.labeling.knowledge import KnownAttribute
from features.labeling.probes import stable_hash
from features.labeling.results import CausalResult, UnitOn
from features.labeling.significance import bootstrap_ci, holm, sign_flip_test
from features.store import Kind, Tag

ALPHA = 0.05  # family-wise error rate of the Holm-corrected causal tests, fixed before looking
CONTROL_FREQ_RATIO = 3.0  # controls fire within this factor of the tagged unit's frequency (where enough do)

TaggedUnits = set[tuple[str, str, str, int]]  # (kind, entity_type, attribute, unit) of every tag
BestByValue = dict[tuple[str, str], dict[int, int]]  # (entity_type, attribute) -> value -> its best tagged feature


class Candidate(NamedTuple):
    """The best tag of one value: the unit, the attribute it was found on, its F1 (for the order of checks) and
    its threshold (the tag says the unit is above it for the value's entities)."""

    kind: Kind
    unit: int
    attr: KnownAttribute
    value: int  # index into attr.report.values
    f1: float
    threshold: float


@dataclass
class _Site:
    """Where one tag is checked: the prompts whose entity tokens the unit is on at, every unit's activations there
    ([span, U] per prompt row), the units' on rule, and the hook where a change of a unit enters the model."""

    cand: Candidate
    acts: dict[int, Tensor]
    rows: list[int]
    on: UnitOn
    hook: str
    width: int
    W_dec: Tensor

    def direction(self, unit: int) -> Tensor:
        """[width]: what one unit of activation of `unit` adds at the hook."""
        if self.cand.kind == "feature":
            return self.W_dec[unit]
        return torch.nn.functional.one_hot(torch.tensor(unit), self.width).float()

    def is_on(self, r: int, unit: int) -> bool:
        return bool((self.acts[r][:, unit] > self.on.threshold[unit]).any())

    def removal(self, r: int, unit: int) -> Tensor:
        """The delta [span, width] that removes `unit`'s contribution at prompt r's entity tokens."""
        return -self.acts[r][:, unit][:, None] * self.direction(unit)

    def matched_removal(self, r: int, unit: int) -> Tensor:
        """For a control off at prompt r: the tagged unit's activation there, rescaled to `unit`'s typical
        activation when on, removed along `unit`'s direction."""
        u = self.cand.unit
        scale = float(self.on.mean_act[unit]) / max(float(self.on.mean_act[u]), 1e-6)
        return -self.acts[r][:, u][:, None] * scale * self.direction(unit)


def _site(ctx: LabelContext, cand: Candidate, on: UnitOn) -> _Site:
    """The unit's activations at the entity tokens of the value's attribute prompts, and the prompts where the tag
    says it is on, above the tag's threshold at an entity token (up to causal_prompts, chosen by name hash)."""
    a = cand.attr
    rows = [r for r, lab in zip(a.rows, a.labels.tolist(), strict=True) if lab == cand.value]
    with torch.inference_mode():
        if cand.kind == "feature":
            acts = {r: ctx.sae.encode(a.spans[ctx.in_hook][r]).float() for r in rows}
        else:
            acts = {r: a.spans[ctx.neuron_hook][r] for r in rows}
    t = cand.threshold
    chosen = sorted((r for r in rows if float(acts[r][:, cand.unit].max()) > t), key=lambda r: stable_hash(a.names[r]))
    if cand.kind == "feature":
        return _Site(cand, acts, chosen[:ctx.cfg.causal_prompts], on, ctx.out_hook, ctx.W_dec.shape[1], ctx.W_dec)
    return _Site(cand, acts, chosen[:ctx.cfg.causal_prompts], on, ctx.neuron_hook, ctx.n_neurons, ctx.W_dec)


def _controls(site: _Site, tagged: TaggedUnits, cfg: LabelConfig) -> list[int]:
    """`causal_controls` random units of the same kind that fire somewhere, not tagged for this attribute, within
    CONTROL_FREQ_RATIO of the unit's firing frequency (the closest in frequency where fewer are)."""
    kind, u, rep = site.cand.kind, site.cand.unit, site.cand.attr.report
    freq = site.on.freq
    allowed = freq > 0
    for k, et, at, i in tagged:
        if k == kind and et == rep.entity_type and at == rep.attribute:
            allowed[i] = False
    allowed[u] = False
    ratio = (freq.clamp_min(1e-12) / max(float(freq[u]), 1e-12)).log().abs()
    pool = (allowed & (ratio <= math.log(CONTROL_FREQ_RATIO))).nonzero().flatten()
    if len(pool) < cfg.causal_controls:
        near = allowed.nonzero().flatten()
        pool = near[ratio[near].argsort()[:cfg.causal_controls]]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + stable_hash(f"{kind}:{u}:{rep.name}") % 1_000_003)
    return pool[torch.randperm(len(pool), generator=gen)[:cfg.causal_controls]].tolist()


def _steer_target(site: _Site, best_by_value: BestByValue) -> tuple[int, Tensor] | None:
    """For a feature: the most common other tagged value, and the direction from this decoder row to its best
    feature's; None for neurons or when no other value has a tagged feature."""
    cand, rep = site.cand, site.cand.attr.report
    if cand.kind != "feature":
        return None
    others = {w: g for w, g in best_by_value.get((rep.entity_type, rep.attribute), {}).items() if w != cand.value}
    if not others:
        return None
    target = max(others, key=lambda w: (rep.values[w][1], -w))
    return target, site.W_dec[others[target]] - site.W_dec[cand.unit]


def _patches(site: _Site, controls: list[int], direction: Tensor | None) -> tuple[list[Patch], list[tuple[str, int]]]:
    """Per prompt: a clean run, the unit removed, each control removed (its own contribution where it is on, else
    value-matched); then the steered runs. The second list names each patch's role ("clean", "unit", "control",
    "steer") and control index."""
    patches: list[Patch] = []
    owners: list[tuple[str, int]] = []
    for r in site.rows:
        patches.append(Patch(r, site.hook, torch.zeros(len(site.acts[r]), site.width)))
        owners.append(("clean", -1))
        patches.append(Patch(r, site.hook, site.removal(r, site.cand.unit)))
        owners.append(("unit", -1))
        for ci, c in enumerate(controls):
            delta = site.removal(r, c) if site.is_on(r, c) else site.matched_removal(r, c)
            patches.append(Patch(r, site.hook, delta))
            owners.append(("control", ci))
    if direction is not None:
        for r in site.rows:
            patches.append(Patch(r, site.hook, site.acts[r][:, site.cand.unit][:, None] * direction))
            owners.append(("steer", -1))
    return patches, owners


def _by_prompt(owners: list[tuple[str, int]], patches: list[Patch], lp: Tensor,
               rows: list[int]) -> list[dict[str, Any]]:
    """The patched log-probs regrouped per prompt: {"clean", "unit", "steer": [V], "control": {index: [V]}}."""
    out: dict[int, dict[str, Any]] = {r: {"control": {}} for r in rows}
    for (role, ci), p, row in zip(owners, patches, lp, strict=True):
        if role == "control":
            out[p.prompt]["control"][ci] = row
        else:
            out[p.prompt][role] = row
    return list(out.values())


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def paired_effect(res: CausalResult, unit_drops: list[float], control_drops: list[list[float]], seed: int) -> None:
    """Fill in the per-prompt differences (unit's drop - controls' mean drop; control_drops [prompt][control]),
    their mean with its bootstrap interval, and the sign-flip p-value; the verdict waits for the Holm correction."""
    res.drop = _mean(unit_drops)
    per_prompt = [_mean(c) for c in control_drops]
    n_controls = len(control_drops[0]) if control_drops else 0
    res.control_drops = [_mean([c[i] for c in control_drops]) for i in range(n_controls)]
    res.control_mean = _mean(per_prompt)
    res.diffs = [u - c for u, c in zip(unit_drops, per_prompt, strict=True)]
    ci = bootstrap_ci(res.diffs, seed=seed)
    res.effect, res.effect_ci = ci.value, ci.as_list()
    res.p = sign_flip_test(res.diffs, seed=seed)


def _judge(res: CausalResult, runs: list[dict[str, Any]], v: int, n_controls: int, seed: int) -> None:
    """The unit's and the controls' drops of log p(correct value) on each prompt, and the paired statistics."""
    unit = [float(s["clean"][v] - s["unit"][v]) for s in runs]
    controls = [[float(s["clean"][v] - s["control"][ci][v]) for ci in range(n_controls)] for s in runs]
    paired_effect(res, unit, controls, seed)


def verdicts(results: list[CausalResult], min_effect: float) -> None:
    """Holm-correct the p-values of every tested tag at once and set each one's status."""
    tested = [r for r in results if r.p is not None]
    adjusted, _ = holm([r.p for r in tested], ALPHA)
    for r, q in zip(tested, adjusted, strict=True):
        r.p_holm = q
        causal = q < ALPHA and r.effect is not None and r.effect >= min_effect
        r.status = "causal" if causal else "correlational only"
        r.reason = (f"effect {r.effect:+.3f} nats [{r.effect_ci[0]:+.3f}, {r.effect_ci[1]:+.3f}] (drop "
                    f"{r.drop:.3f} vs controls {r.control_mean:.3f}), p {r.p:.2g}, Holm p {q:.2g} over "
                    f"{len(tested)} tags, {r.n_prompts} prompts")


def _steering(res: CausalResult, runs: list[dict[str, Any]], v: int, target: int, target_name: str) -> None:
    """How far steering moved log p(target) - log p(this value), and how often the target became the top answer."""
    shifts = [float((s["steer"][target] - s["steer"][v]) - (s["clean"][target] - s["clean"][v])) for s in runs]
    flips = [float(int(s["steer"].argmax()) == target) for s in runs]
    res.steer_value = target_name
    res.steer_shift = _mean(shifts)
    res.steer_flip = _mean(flips)


def causal_check(ctx: LabelContext, cand: Candidate, on: UnitOn, tagged: TaggedUnits,
                 best_by_value: BestByValue) -> CausalResult:
    """Ablate (and for features, steer) one tag's unit on its value's attribute prompts, against controls; the
    status is set later, by `verdicts`, across every tag tested."""
    rep = cand.attr.report
    res = CausalResult(cand.kind, cand.unit, rep.entity_type, rep.attribute, rep.values[cand.value][0], 0)
    site = _site(ctx, cand, on)
    res.n_prompts = len(site.rows)
    if not site.rows:
        res.reason = "the unit is off at the entity tokens of every attribute prompt"
        return res
    controls = _controls(site, tagged, ctx.cfg)
    steer = _steer_target(site, best_by_value)
    patches, owners = _patches(site, controls, steer[1] if steer else None)
    lp = patched_logprobs(ctx.model, ctx.layer, cand.attr.prompts, cand.attr.spans[RESID_PRE], patches,
                          cand.attr.answer_ids, ctx.cfg.batch_size, ctx.timer)
    runs = _by_prompt(owners, patches, lp, site.rows)
    _judge(res, runs, cand.value, len(controls), ctx.cfg.seed)
    if steer is not None:
        _steering(res, runs, cand.value, steer[0], rep.values[steer[0]][0])
    return res


def round_robin(cands: list[Candidate], limit: int) -> list[Candidate]:
    """Up to `limit` candidates, taking each attribute's best (by F1) in turn."""
    queues: dict[str, list[Candidate]] = {}
    for c in sorted(cands, key=lambda c: -c.f1):
        queues.setdefault(c.attr.report.name, []).append(c)
    out: list[Candidate] = []
    while len(out) < limit and any(queues.values()):
        for q in queues.values():
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


def check_tags(ctx: LabelContext, cands: list[Candidate], tags: list[Tag],
               on: dict[Kind, UnitOn]) -> tuple[list[CausalResult], list[Tag]]:
    """Check the best tag per value, round-robin over attributes, up to causal_tags per kind; Holm-correct across
    all of them; returns the checks and the tags with their causal effect, p-value, CI and status filled in."""
    if ctx.cfg.causal_tags <= 0 or not cands:
        return [], tags
    tagged = {(t.kind, t.entity_type, t.attribute, t.index) for t in tags}
    best_by_value: BestByValue = {}
    for c in cands:
        if c.kind == "feature":
            best_by_value.setdefault((c.attr.report.entity_type, c.attr.report.attribute), {})[c.value] = c.unit
    causal: list[CausalResult] = []
    for kind in ctx.kinds:
        with ctx.timer("causal"):
            causal += [causal_check(ctx, c, on[kind], tagged, best_by_value)
                       for c in round_robin([c for c in cands if c.kind == kind], ctx.cfg.causal_tags)]
    verdicts(causal, ctx.cfg.causal_min_effect)
    for kind in ctx.kinds:
        done = [c for c in causal if c.kind == kind]
        ctx.log(f"label: causal test of {len(done)} {kind} tags: {sum(c.status == 'causal' for c in done)} causal "
                f"(Holm p < {ALPHA} over {len(causal)} tags, effect >= {ctx.cfg.causal_min_effect} nats)")
    by_key = {(c.kind, c.index, c.entity_type, c.attribute, c.value): c for c in causal}
    out = []
    for t in tags:
        res = by_key.get((t.kind, t.index, t.entity_type, t.attribute, t.value))
        if res is None or res.p is None:
            out.append(t if res is None else replace(t, causal_status=res.status))
            continue
        out.append(replace(t, causal_effect=res.effect, causal_status=res.status, causal_p=res.p_holm,
                           causal_ci=(res.effect_ci[0], res.effect_ci[1])))
    return causal, out
