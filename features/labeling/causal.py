"""Step 5, the causal check: does the model use a tagged unit? Remove the unit at the entity's tokens of the
attribute prompts and measure the fall of the correct answer's log-probability, against random co-active units
of the same kind removed the same way; feature tags are also steered towards another value.

A tag says a unit's activation tracks a value; only a drop well outside the controls' spread says the model reads
the value from it.
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
from features.labeling.results import CausalResult
from features.store import Kind, Tag

CONTROL_MIN_COACTIVE = 0.25  # a control must be on at the entity tokens of at least this share of the prompts
CONTROL_FREQ_RATIO = 3.0  # ... and fire within this factor of the tagged feature's frequency
Z_STD_FLOOR = 0.02  # nats: the controls' spread is never taken as smaller than this

TaggedUnits = set[tuple[str, str, str, int]]  # (kind, entity_type, attribute, unit) of every tag
BestByValue = dict[tuple[str, str], dict[int, int]]  # (entity_type, attribute) -> value -> its best tagged feature


class Candidate(NamedTuple):
    """The best tag of one value: the unit, the attribute it was found on, and its F1 (for the order of checks)."""

    kind: Kind
    unit: int
    attr: KnownAttribute
    value: int  # index into attr.report.values
    f1: float


@dataclass
class _Site:
    """Where one tag is checked: the prompts whose entity tokens the unit is on, and every unit's activations
    there ([span, U] per prompt row), at the hook where a change of the unit enters the model."""

    cand: Candidate
    acts: dict[int, Tensor]
    rows: list[int]
    hook: str
    width: int
    W_dec: Tensor

    def removal(self, r: int, unit: int) -> Tensor:
        """The delta that removes `unit`'s contribution at prompt r's entity tokens."""
        act = self.acts[r][:, unit]
        if self.cand.kind == "feature":
            return -act[:, None] * self.W_dec[unit]
        d = torch.zeros(len(act), self.width)
        d[:, unit] = -act
        return d


def _site(ctx: LabelContext, cand: Candidate) -> _Site:
    """The unit's activations at the entity tokens of the value's attribute prompts, and the prompts it is on
    (up to causal_prompts, chosen by name hash)."""
    a = cand.attr
    rows = [r for r, lab in zip(a.rows, a.labels.tolist(), strict=True) if lab == cand.value]
    with torch.inference_mode():
        if cand.kind == "feature":
            acts = {r: ctx.sae.encode(a.spans[ctx.in_hook][r]).float() for r in rows}
        else:
            acts = {r: a.spans[ctx.neuron_hook][r] for r in rows}
    on = sorted((r for r in rows if float(acts[r][:, cand.unit].max()) > 0), key=lambda r: stable_hash(a.names[r]))
    if cand.kind == "feature":
        return _Site(cand, acts, on[:ctx.cfg.causal_prompts], ctx.out_hook, ctx.W_dec.shape[1], ctx.W_dec)
    return _Site(cand, acts, on[:ctx.cfg.causal_prompts], ctx.neuron_hook, ctx.n_neurons, ctx.W_dec)


def _controls(site: _Site, n_units: int, freq: Tensor | None, tagged: TaggedUnits, cfg: LabelConfig) -> list[int]:
    """Random units of the same kind, on at the same tokens in >= a quarter of the prompts (features), of similar
    firing frequency (features) or similar mean |activation| there (neurons), not tagged for this attribute."""
    kind, u, rep = site.cand.kind, site.cand.unit, site.cand.attr.report
    stack = torch.stack([site.acts[r].max(0).values for r in site.rows])  # [P, U]
    coactive = ((stack > 0).float().mean(0) >= CONTROL_MIN_COACTIVE) if kind == "feature" else \
        torch.ones(n_units, dtype=torch.bool)
    excluded = torch.zeros(n_units, dtype=torch.bool)
    for k, et, at, i in tagged:
        if k == kind and et == rep.entity_type and at == rep.attribute:
            excluded[i] = True
    excluded[u] = True
    size = freq if kind == "feature" and freq is not None else stack.abs().mean(0)
    ratio = (size.clamp_min(1e-9) / max(float(size[u]), 1e-9)).log().abs()
    pool = (coactive & ~excluded & (ratio <= math.log(CONTROL_FREQ_RATIO))).nonzero().flatten()
    if len(pool) < cfg.causal_controls:  # relax the match: the co-active units closest in frequency / size
        cand = (coactive & ~excluded).nonzero().flatten()
        pool = cand[ratio[cand].argsort()[:max(cfg.causal_controls, len(pool))]]
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
    """Per prompt: a clean run, the unit removed, each control that is on there removed; then the steered runs.
    The second list names each patch's role ("clean", "unit", "control", "steer") and control index."""
    patches: list[Patch] = []
    owners: list[tuple[str, int]] = []
    for r in site.rows:
        patches.append(Patch(r, site.hook, torch.zeros(len(site.acts[r]), site.width)))
        owners.append(("clean", -1))
        patches.append(Patch(r, site.hook, site.removal(r, site.cand.unit)))
        owners.append(("unit", -1))
        for ci, c in enumerate(controls):
            if float(site.acts[r][:, c].abs().max()) > 0:
                patches.append(Patch(r, site.hook, site.removal(r, c)))
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


def _judge(res: CausalResult, runs: list[dict[str, Any]], v: int, n_controls: int, cfg: LabelConfig) -> None:
    """The unit's and the controls' mean drops, the z-score, and the verdict."""
    res.drop = _mean([float(s["clean"][v] - s["unit"][v]) for s in runs])
    for ci in range(n_controls):
        res.control_drops.append(_mean([float(s["clean"][v] - s["control"][ci][v]) if ci in s["control"] else 0.0
                                        for s in runs]))
    if res.control_drops:
        cd = torch.tensor(res.control_drops)
        std = float(cd.std(unbiased=len(cd) > 1)) if len(cd) > 1 else 0.0
        res.z = (res.drop - float(cd.mean())) / max(std, Z_STD_FLOOR)
    else:
        res.z = res.drop / Z_STD_FLOOR
    ok = res.drop >= cfg.causal_min_effect and res.z >= cfg.causal_min_z
    res.status = "causal" if ok else "correlational only"
    res.reason = (f"drop {res.drop:.3f} nats vs controls {_mean(res.control_drops):.3f}, z {res.z:.1f}, "
                  f"{len(runs)} prompts, {n_controls} controls")


def _steering(res: CausalResult, runs: list[dict[str, Any]], v: int, target: int, target_name: str) -> None:
    """How far steering moved log p(target) - log p(this value), and how often the target became the top answer."""
    shifts = [float((s["steer"][target] - s["steer"][v]) - (s["clean"][target] - s["clean"][v])) for s in runs]
    flips = [float(int(s["steer"].argmax()) == target) for s in runs]
    res.steer_value = target_name
    res.steer_shift = _mean(shifts)
    res.steer_flip = _mean(flips)


def causal_check(ctx: LabelContext, cand: Candidate, freq: Tensor | None, tagged: TaggedUnits,
                 best_by_value: BestByValue) -> CausalResult:
    """Ablate (and for features, steer) one tag's unit on its value's attribute prompts, against controls."""
    rep = cand.attr.report
    res = CausalResult(cand.kind, cand.unit, rep.entity_type, rep.attribute, rep.values[cand.value][0], 0)
    site = _site(ctx, cand)
    res.n_prompts = len(site.rows)
    if not site.rows:
        res.reason = "the unit is off at the entity tokens of every attribute prompt"
        return res
    n_units = ctx.W_dec.shape[0] if cand.kind == "feature" else ctx.n_neurons
    controls = _controls(site, n_units, freq, tagged, ctx.cfg)
    steer = _steer_target(site, best_by_value)
    patches, owners = _patches(site, controls, steer[1] if steer else None)
    lp = patched_logprobs(ctx.model, ctx.layer, cand.attr.prompts, cand.attr.spans[RESID_PRE], patches,
                          cand.attr.answer_ids, ctx.cfg.batch_size, ctx.timer)
    runs = _by_prompt(owners, patches, lp, site.rows)
    _judge(res, runs, cand.value, len(controls), ctx.cfg)
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
               feature_freq: Tensor | None) -> tuple[list[CausalResult], list[Tag]]:
    """Check the best tag per value, round-robin over attributes, up to causal_tags per kind; returns the checks
    and the tags with their causal effect and status filled in."""
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
            done = [causal_check(ctx, c, feature_freq if kind == "feature" else None, tagged, best_by_value)
                    for c in round_robin([c for c in cands if c.kind == kind], ctx.cfg.causal_tags)]
        causal += done
        ctx.log(f"label: causal check of {len(done)} {kind} tags: {sum(c.status == 'causal' for c in done)} causal")
    by_key = {(c.kind, c.index, c.entity_type, c.attribute, c.value): c for c in causal}
    out = []
    for t in tags:
        res = by_key.get((t.kind, t.index, t.entity_type, t.attribute, t.value))
        out.append(t if res is None else replace(t, causal_effect=res.drop, causal_status=res.status))
    return causal, out
