"""Steps 2 and 3: how well each unit's activation marks each value (precision, recall, F1, AUROC), which
(unit, value) pairs become tags, and how much the number of tags depends on the entities drawn.

Everything is a few matrix products and one sort per attribute, over all units at once, so scoring 16k features
costs far less than the forward passes that produced their activations.

The tag count's 95% interval is a bootstrap over the attribute's known entities, stratified by value (each
value's entities resampled on their own, `significance.paired_bootstrap_ci`): a value's support is a property of
the entity set, and letting it cross `min_positives` from one resample to the next would switch whole groups of
tags on and off. Each resample rescores the *candidate* (unit, value) pairs, those within CANDIDATE_F1_MARGIN of
min_f1 and CANDIDATE_AUROC_MARGIN of min_auroc on all entities; pairs further away are taken as untagged in every
resample. This keeps a resample at the cost of scoring tens of pairs, not thousands.

Counting units past thresholds is not a smooth statistic, and its bootstrap distribution is shifted: a resample
repeats entities, so every unit's scores spread more than the sample's did, and where many units sit just below
the thresholds (neurons on small entity sets) far more of them cross in resamples than did in the sample (on the
default run, 18 neuron tags gave resamples of 40 to 80). The interval reported is therefore the bootstrap's
spread around the observed count (`centered_ci`): [n - (median - q2.5), n + (q97.5 - median)], clipped to the
count's range, which always contains n; read it as how much the count moves with other entities.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from features.labeling.results import AttributeReport
from features.labeling.significance import Interval, paired_bootstrap_ci
from features.store import Kind, Tag

MAX_TAG_ENTITIES = 100  # entities listed per tag
CANDIDATE_F1_MARGIN = 0.2  # units rescored in the tag-count bootstrap: F1 >= min_f1 - this ...
CANDIDATE_AUROC_MARGIN = 0.1  # ... and AUROC >= min_auroc - this, for some value, on all entities
TAG_RESAMPLES = 500  # bootstrap resamples of the tag count per attribute and kind


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


def firing_scores(a: Tensor, y: Tensor, threshold: float | Tensor = 0.0) -> UnitScores:
    """Scores of "activation > threshold" (one threshold, or one per unit [U]: the unit being on)."""
    t = torch.as_tensor(threshold, dtype=torch.float32).reshape(-1, 1)
    on = (a > t).float()
    y = y.float()
    tp = on @ y
    n_on = on.sum(1, keepdim=True)
    support = y.sum(0)
    precision = torch.where(n_on > 0, tp / n_on.clamp_min(1), 0.0)
    recall = tp / support.clamp_min(1)
    f1 = 2 * tp / (n_on + support).clamp_min(1)
    return UnitScores(precision, recall, f1, auroc(a, y), t.expand_as(f1).clone(), support)


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


def _passing(scores: UnitScores, min_f1: float, min_auroc: float, min_positives: int) -> Tensor:
    """[U, V] bool: the (unit, value) pairs clearing all three thresholds."""
    return (scores.f1 >= min_f1) & (scores.auroc >= min_auroc) & (scores.support >= min_positives)[None]


def select_tags(scores: UnitScores, min_f1: float, min_auroc: float, min_positives: int) -> list[tuple[int, int]]:
    """(unit, value) pairs clearing all three thresholds, best F1 first."""
    pairs = _passing(scores, min_f1, min_auroc, min_positives).nonzero().tolist()
    return sorted(((int(u), int(v)) for u, v in pairs), key=lambda p: (-float(scores.f1[p]), p))


def best_per_value(sc: UnitScores, values: list[str]) -> list[dict[str, Any]]:
    """The unit with the highest F1 for each value, for the report (tagged or not)."""
    out = []
    for v, name in enumerate(values):
        u = int(sc.f1[:, v].argmax())
        out.append({"value": name, "unit": u, "f1": round(float(sc.f1[u, v]), 4),
                    "auroc": round(float(sc.auroc[u, v]), 4), "precision": round(float(sc.precision[u, v]), 4),
                    "recall": round(float(sc.recall[u, v]), 4), "support": int(sc.support[v]),
                    "max_auroc": round(float(torch.nan_to_num(sc.auroc[:, v], nan=0.0).max()), 4)})
    return out


def make_tags(kind: Kind, acts: Tensor, sc: UnitScores, pairs: list[tuple[int, int]], labels: Tensor,
              names: list[str], rep: AttributeReport) -> list[Tag]:
    """A tag per (unit, value) pair, listing the entities it is on for (acts [U, N] over the known entities
    `names`, whose classes are `labels`); not yet causally checked."""
    tags = []
    for u, v in pairs:
        on = (acts[u] > sc.threshold[u, v]) & (labels == v)
        tags.append(Tag(kind, u, rep.entity_type, rep.attribute, rep.values[v][0], float(sc.precision[u, v]),
                        float(sc.recall[u, v]), float(sc.f1[u, v]), float(sc.auroc[u, v]), int(sc.support[v]),
                        [names[i] for i in on.nonzero().flatten().tolist()][:MAX_TAG_ENTITIES], None,
                        "not tested"))
    return tags


class TagCounter:
    """Counts one kind's tags of one attribute on a resample of its known entities: the statistic the tag-count
    bootstraps resample. Only candidate (unit, value) pairs are rescored (see the module docstring). A resample is
    a multiset of entities, so it is scored as weights on the full sample: each pair's activations are sorted
    once, and a resample costs a few cumulative sums over [pairs, entities], not a sort."""

    def __init__(self, acts: Tensor, labels: Tensor, pairs: Tensor, thresholds: Tensor | None,
                 limits: tuple[float, float, int]) -> None:
        self.n, self.limits, self.pairs = len(labels), limits, pairs  # pairs [P, 2]: (unit, value)
        self.strata = [(labels == v).nonzero().flatten().numpy() for v in torch.unique(labels).tolist()]
        values, order = acts[pairs[:, 0]].float().sort(dim=1, descending=True)  # [P, N]
        self.order = order
        self.pos = (labels[order] == pairs[:, 1:]).float()
        if thresholds is None:  # best F1: a cut wherever the next value is smaller (and after the last)
            self.cuts = torch.ones_like(values, dtype=torch.bool)
            self.cuts[:, :-1] = values[:, :-1] > values[:, 1:]
        else:  # on above the unit's threshold: the one cut after the last value above it
            above = values > thresholds[pairs[:, 0]][:, None]
            self.cuts = above & ~torch.cat([above[:, 1:], torch.zeros_like(above[:, :1])], dim=1)
        new = torch.ones_like(values, dtype=torch.bool)
        new[:, 1:] = values[:, 1:] != values[:, :-1]
        self.group = new.long().cumsum(1) - 1  # tie groups, in descending order of value
        self._memo: dict[bytes, float] = {}

    @property
    def empty(self) -> bool:
        return len(self.order) == 0

    def weighted(self, w: Tensor) -> Tensor:
        """[P] bool: the candidate pairs that pass every threshold with entity weights w [N]."""
        wo = w[self.order]
        pos = wo * self.pos
        tp, n_on = pos.cumsum(1), wo.cumsum(1)
        support = tp[:, -1]
        n_neg = n_on[:, -1] - support
        f1 = 2 * torch.where(self.cuts, tp / (n_on + support[:, None]).clamp_min(1e-9), 0.0).max(1).values
        tie = torch.zeros_like(wo).scatter_add_(1, self.group, wo - pos)  # negatives' weight per tie group
        mid = (tie.cumsum(1) - 0.5 * tie).gather(1, self.group)  # ... in higher groups, plus half of its own
        auc = (n_neg * support - (pos * mid).sum(1)) / (support * n_neg).clamp_min(1e-9)
        min_f1, min_auroc, min_positives = self.limits
        return (f1 >= min_f1 - 1e-6) & (auc >= min_auroc - 1e-6) & (support >= min_positives)

    def __call__(self, idx: np.ndarray) -> float:
        """The number of tags when the known entities are `idx` (indices into them, repeats allowed)."""
        key = hashlib.blake2b(np.asarray(idx, dtype=np.int64).tobytes(), digest_size=16).digest()
        if key not in self._memo:
            w = torch.bincount(torch.as_tensor(np.asarray(idx), dtype=torch.long), minlength=self.n).float()
            self._memo[key] = 0.0 if self.empty else float(self.weighted(w).sum())
        return self._memo[key]


def tag_counter(acts: Tensor, labels: Tensor, sc: UnitScores, thresholds: Tensor | None,
                limits: tuple[float, float, int]) -> TagCounter:
    """The tag counter of one kind and attribute: acts [U, N] over the known entities with classes `labels`, their
    scores `sc` on all entities (which pick the candidate pairs), and the units' on thresholds when tags use them
    (None: the best-F1 threshold)."""
    min_f1, min_auroc, _ = limits
    near = (sc.f1 >= min_f1 - CANDIDATE_F1_MARGIN) & (torch.nan_to_num(sc.auroc) >= min_auroc - CANDIDATE_AUROC_MARGIN)
    return TagCounter(acts, labels, near.nonzero(), thresholds, limits)


def centered_ci(groups: list[np.ndarray], statistic: Callable[[list[np.ndarray]], float], seed: int = 0,
                upper: float = math.inf) -> Interval:
    """A count with the 95% spread of its bootstrap (`paired_bootstrap_ci` over `groups`) moved to sit around it:
    [n - (median - q2.5), n + (q97.5 - median)], clipped to [0, upper] (see the module docstring for why)."""
    seen: list[float] = []

    def record(parts: list[np.ndarray]) -> float:
        seen.append(statistic(parts))
        return seen[-1]

    ci = paired_bootstrap_ci(groups, record, resamples=TAG_RESAMPLES, seed=seed)
    shift = float(np.median(seen)) - ci.value
    return Interval(ci.value, max(ci.lo - shift, 0.0), min(ci.hi - shift, upper))


def tag_count_ci(counter: TagCounter, seed: int = 0) -> Interval:
    """The number of tags with its 95% bootstrap interval over the known entities, stratified by value."""
    return centered_ci(counter.strata, lambda parts: counter(np.concatenate(parts)), seed)
