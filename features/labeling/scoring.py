"""Steps 2 and 3: how well each unit's activation marks each value (precision, recall, F1, AUROC) and which
(unit, value) pairs become tags.

Everything is a few matrix products and one sort per attribute, over all units at once, so scoring 16k features
costs far less than the forward passes that produced their activations.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from features.labeling.results import AttributeReport
from features.store import Kind, Tag

MAX_TAG_ENTITIES = 100  # entities listed per tag


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
