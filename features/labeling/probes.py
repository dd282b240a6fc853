"""Probes: how well an attribute can be read off a layer, from all its dimensions or from a few units.

For one attribute (entities x units activations, one class per entity) this module gives held-out accuracy of

- ``full``: multinomial logistic regression (L2, LBFGS) on every dimension of the activations;
- ``1-sparse``: the same on the single best unit. Units are ranked by a class-separation score on the training
  split (the one-way ANOVA F statistic: between-class over within-class variance); the top CANDIDATES are fitted
  one by one and the one with the best *training* accuracy is kept. Fitting a few instead of trusting the score
  alone guards against a unit whose large F comes from one outlier entity;
- ``k-sparse``: the same on `k` units, chosen round-robin over classes by each class's one-vs-rest standardised
  mean difference (so every class gets a unit before any class gets two).

Selection uses the training split only; accuracy is on the held-out split, with its 95% bootstrap interval over
the held-out entities (`details["accuracy_ci"]`; `details["test_correct"]` keeps each held-out entity's outcome
for intervals of means over attributes). The split is deterministic and stratified: within each class, entities
are ordered by sha256 of their name and the first ceil(test_fraction * n) are held out, so the same entity lands
on the same side on every run and machine.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from features.labeling.config import LabelConfig
from features.labeling.significance import bootstrap_ci
from features.store import Kind, Probe

if TYPE_CHECKING:
    from features.labeling.knowledge import KnownAttribute

CANDIDATES = 16  # single units fitted for the 1-sparse probe (the best by class separation on the training split)


def stable_hash(text: str) -> int:
    """A hash that is the same on every run and machine (Python's `hash` of a str is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


class Split(NamedTuple):
    """Indices of the training and the held-out entities."""

    train: Tensor
    test: Tensor


def split_train_test(names: list[str], labels: Tensor, test_fraction: float) -> Split:
    """(train indices, test indices): per class, the ceil(test_fraction * n) entities first by name hash held out."""
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = sorted(torch.nonzero(labels == c).flatten().tolist(), key=lambda i: stable_hash(names[i]))
        n_test = min(math.ceil(test_fraction * len(idx)), len(idx) - 1) if len(idx) > 1 else 0
        test += idx[:n_test]
        train += idx[n_test:]
    return Split(torch.tensor(sorted(train), dtype=torch.long), torch.tensor(sorted(test), dtype=torch.long))


def _standardise(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    mean = x_train.mean(-2, keepdim=True)
    std = x_train.std(-2, keepdim=True, unbiased=False).clamp_min(1e-6)
    return (x_train - mean) / std, (x_test - mean) / std


def fit_logreg(x: Tensor, y: Tensor, n_classes: int, l2: float = 1e-2, steps: int = 200) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, batched over independent problems.

    x: [G, N, d] standardised inputs (G problems), y: [N] classes. Minimises, per problem, mean cross-entropy +
    l2 * |W|^2 with LBFGS (the problems are independent, so their summed loss has block-diagonal curvature and
    one LBFGS run fits them all). Returns W [G, d, C], b [G, C].
    """
    g, _, d = x.shape
    w = torch.zeros(g, d, n_classes, requires_grad=True)
    b = torch.zeros(g, 1, n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)
    target = y.expand(g, -1).reshape(-1)

    def closure() -> Tensor:
        opt.zero_grad()
        logits = torch.baddbmm(b, x, w)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, n_classes), target, reduction="sum") / len(y)
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach().squeeze(1)


def _correct(x: Tensor, y: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """[G, N] whether each problem's fitted probe classifies each row of x [G, N, d] right."""
    return (torch.bmm(x, w) + b[:, None]).argmax(-1) == y


def _accuracy(x: Tensor, y: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """[G] accuracy of each problem's fitted probe on x [G, N, d]."""
    return _correct(x, y, w, b).float().mean(-1)


def f_statistic(x: Tensor, y: Tensor, n_classes: int) -> Tensor:
    """One-way ANOVA F per column of x [N, U] for classes y [N]: between-class / within-class variance."""
    onehot = torch.nn.functional.one_hot(y, n_classes).float()  # [N, C]
    counts = onehot.sum(0).clamp_min(1)
    means = (onehot.T @ x) / counts[:, None]  # [C, U]
    grand = x.mean(0)
    between = (counts[:, None] * (means - grand).pow(2)).sum(0) / max(n_classes - 1, 1)
    within = (x - means[y]).pow(2).sum(0) / max(len(y) - n_classes, 1)
    return torch.where(within > 1e-12, between / within.clamp_min(1e-12), torch.where(between > 1e-12, 1e12, 0.0))


def one_vs_rest_separation(x: Tensor, y: Tensor, n_classes: int) -> Tensor:
    """[C, U]: |mean in class - mean outside| / pooled std, per class and column of x [N, U]."""
    out = torch.zeros(n_classes, x.shape[1])
    for c in range(n_classes):
        pos, neg = x[y == c], x[y != c]
        if len(pos) == 0 or len(neg) == 0:
            continue
        var = (pos.var(0, unbiased=False) * len(pos) + neg.var(0, unbiased=False) * len(neg)) / len(y)
        out[c] = (pos.mean(0) - neg.mean(0)).abs() / var.sqrt().clamp_min(1e-6)
    return out


def select_k(x: Tensor, y: Tensor, n_classes: int, k: int) -> list[int]:
    """k columns, round-robin over classes by one-vs-rest separation (each class's best unused column in turn)."""
    scores = one_vs_rest_separation(x, y, n_classes)
    order = scores.argsort(dim=1, descending=True)
    chosen: list[int] = []
    depth = [0] * n_classes
    classes = sorted(range(n_classes), key=lambda c: -float(scores[c].max()))
    while len(chosen) < min(k, x.shape[1]):
        progressed = False
        for c in classes:
            while depth[c] < x.shape[1] and int(order[c, depth[c]]) in chosen:
                depth[c] += 1
            if depth[c] < x.shape[1] and len(chosen) < k:
                chosen.append(int(order[c, depth[c]]))
                progressed = True
        if not progressed:
            break
    return chosen


@dataclass
class ProbeResult:
    """One probe's held-out and training accuracy, the units it reads (sparse probes) and method details."""

    method: str
    accuracy: float
    train_accuracy: float
    units: list[int] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    test_correct: list[int] = field(default_factory=list)  # 1 / 0 per held-out entity


def full_probe(x: Tensor, y: Tensor, split: Split, n_classes: int, l2: float = 1e-2,
               steps: int = 200) -> ProbeResult:
    """Held-out accuracy of logistic regression on every column of x [N, d] with classes y [N]."""
    x = x.float()
    xtr, xte = _standardise(x[split.train], x[split.test])
    y_tr, y_te = y[split.train], y[split.test]
    w, b = fit_logreg(xtr[None], y_tr, n_classes, l2, steps)
    correct = _correct(xte[None], y_te, w, b)[0]
    return ProbeResult("full", float(correct.float().mean()), float(_accuracy(xtr[None], y_tr, w, b)[0]),
                       details={"dims": x.shape[1]}, test_correct=correct.int().tolist())


def sparse_probes(x: Tensor, y: Tensor, split: Split, n_classes: int, k: int = 8, l2: float = 1e-2,
                  steps: int = 200) -> list[ProbeResult]:
    """Held-out accuracy of the 1-sparse and the k-sparse probe on x [N, U] with classes y [N]."""
    x = x.float()
    y_tr, y_te = y[split.train], y[split.test]
    xtr_all, xte_all = _standardise(x[split.train], x[split.test])
    live = (x[split.train].std(0, unbiased=False) > 1e-6).nonzero().flatten()
    if len(live) == 0:
        return [ProbeResult("1-sparse", float("nan"), float("nan")), ProbeResult(f"{k}-sparse", float("nan"),
                                                                                  float("nan"))]
    f = f_statistic(xtr_all[:, live], y_tr, n_classes)
    cand = live[f.argsort(descending=True)[:CANDIDATES]]
    xtr = xtr_all[:, cand].T[:, :, None]  # [G, N, 1]
    xte = xte_all[:, cand].T[:, :, None]
    w, b = fit_logreg(xtr, y_tr, n_classes, l2, steps)
    tr_acc = _accuracy(xtr, y_tr, w, b)
    best = int(tr_acc.argmax())
    te = _correct(xte, y_te, w, b)[best]
    results = [ProbeResult("1-sparse", float(te.float().mean()), float(tr_acc[best]), [int(cand[best])],
                           {"candidates": [int(c) for c in cand], "f_statistic": round(float(f.max()), 4)},
                           te.int().tolist())]
    chosen = [int(live[i]) for i in select_k(xtr_all[:, live], y_tr, n_classes, k)]
    xtr, xte = xtr_all[:, chosen][None], xte_all[:, chosen][None]
    w, b = fit_logreg(xtr, y_tr, n_classes, l2, steps)
    te = _correct(xte, y_te, w, b)[0]
    results.append(ProbeResult(f"{k}-sparse", float(te.float().mean()), float(_accuracy(xtr, y_tr, w, b)[0]), chosen,
                               test_correct=te.int().tolist()))
    return results


# ---------------------------------------------------------------------------------------------
# Step 4 of the labeler: the probes of one attribute, as store rows


def attribute_probes(a: KnownAttribute, x_in: Tensor, units: dict[Kind, Tensor], names: list[str],
                     cfg: LabelConfig) -> list[Probe]:
    """The full probe on the SAE's input (x_in [n sampled, d]) and the sparse probes on each kind's units
    ([n sampled, U]) for one attribute's known entities (`names` are theirs, in `a.rows` order)."""
    rep = a.report
    n_classes = len(rep.values)
    split = split_train_test(names, a.labels, cfg.test_fraction)
    baseline = float(torch.bincount(a.labels[split.test], minlength=n_classes).max()) / max(len(split.test), 1)
    common = {"values": [v for v, _ in rep.values]}

    def row(kind: Kind, res: ProbeResult, details: dict[str, Any]) -> Probe:
        ci = bootstrap_ci(res.test_correct, seed=cfg.seed).as_list() if res.test_correct else None
        return Probe(kind, rep.entity_type, rep.attribute, res.method, res.accuracy, baseline, len(split.train),
                     len(split.test), {**common, **res.details, "train_accuracy": res.train_accuracy,
                                       "accuracy_ci": ci, "test_correct": res.test_correct, **details})

    full = full_probe(x_in[a.rows], a.labels, split, n_classes, l2=cfg.probe_l2, steps=cfg.probe_steps)
    out = [row("feature", full, {"input": "the SAE's input hook (shared by both kinds)"})]
    for kind, acts in units.items():
        for res in sparse_probes(acts[a.rows], a.labels, split, n_classes, k=cfg.probe_k, l2=cfg.probe_l2,
                                 steps=cfg.probe_steps):
            out.append(row(kind, res, {"units": res.units}))
    return out
