"""Uncertainty and significance, one implementation for every figure the labeler reports.

- `bootstrap_ci`: a percentile 95% interval of a statistic, resampling the units of analysis (entities, pairs or
  SAE units) with replacement; seeded, so a report is reproducible.
- `sign_flip_test`: a paired permutation test of "mean difference > 0" over samples (e.g. per-pair outcome of the
  chosen units minus that of size-matched random units on the same pairs); exact when the sample is small.
- `holm`: Holm's step-down correction across everything tested, so "significant" means family-wise p < alpha.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

DEFAULT_RESAMPLES = 2000


class Interval(NamedTuple):
    value: float
    lo: float
    hi: float

    def as_list(self) -> list[float]:
        return [self.lo, self.hi]


def bootstrap_ci(samples: Sequence[float] | np.ndarray, statistic: Callable[[np.ndarray], float] = np.mean,
                 resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95) -> Interval:
    """The statistic on `samples` (first axis = the resampled unit) with its percentile bootstrap interval.

    An empty sample gives NaNs rather than an error: "nothing to measure" is reported, not hidden."""
    x = np.asarray(samples, dtype=np.float64)
    if x.shape[0] == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    value = float(statistic(x))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(resamples, x.shape[0]))
    stats = np.array([statistic(x[i]) for i in idx], dtype=np.float64)
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(stats, [alpha, 1 - alpha])
    return Interval(value, float(lo), float(hi))


def paired_bootstrap_ci(groups: Sequence[np.ndarray], statistic: Callable[[list[np.ndarray]], float],
                        resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95) -> Interval:
    """Like `bootstrap_ci` for a statistic over several groups (e.g. attributes), each resampled on its own
    first axis; used for means over attributes of per-pair outcomes."""
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    if not arrays or any(a.shape[0] == 0 for a in arrays):
        return Interval(float("nan"), float("nan"), float("nan"))
    value = float(statistic(arrays))
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for r in range(resamples):
        stats[r] = statistic([a[rng.integers(0, a.shape[0], a.shape[0])] for a in arrays])
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(stats, [alpha, 1 - alpha])
    return Interval(value, float(lo), float(hi))


def sign_flip_test(differences: Sequence[float] | np.ndarray, resamples: int = 10000, seed: int = 0) -> float:
    """One-sided p-value that the mean paired difference is > 0, by randomly flipping each pair's sign.

    Exact (all 2^n flips) for n <= 16; otherwise Monte Carlo with the observed sign pattern counted, so p > 0."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[d != 0]  # zero differences carry no sign information
    n = d.shape[0]
    if n == 0:
        return 1.0
    observed = d.mean()
    if n <= 16:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        means = (signs * d).mean(axis=1)
        return float((means >= observed - 1e-12).mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(resamples, n))
    means = (signs * d).mean(axis=1)
    return float((1 + (means >= observed - 1e-12).sum()) / (resamples + 1))


def holm(p_values: Sequence[float], alpha: float = 0.05) -> tuple[list[float], list[bool]]:
    """Holm-adjusted p-values (monotone, capped at 1) and which hypotheses are rejected at `alpha`."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.shape[0]
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist(), (adjusted < alpha).tolist()


def bootstrap_of_means(groups: Sequence[np.ndarray], statistic: Callable[[list[np.ndarray]], np.ndarray],
                       resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95) -> Interval:
    """Like `paired_bootstrap_ci` for a statistic of the groups' column means, vectorised: each group [n] or [n, c]
    is resampled on its first axis (the columns of a row together, e.g. one pair's outcomes under several kinds),
    and `statistic` maps the per-group means, each [R, c], to [R] values (R = 1 for the estimate itself)."""
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    if not arrays or any(a.shape[0] == 0 for a in arrays):
        return Interval(float("nan"), float("nan"), float("nan"))
    arrays = [a.reshape(a.shape[0], -1) for a in arrays]
    value = float(statistic([a.mean(0, keepdims=True) for a in arrays])[0])
    rng = np.random.default_rng(seed)
    means = [a[rng.integers(0, a.shape[0], (resamples, a.shape[0]))].mean(1) for a in arrays]
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = np.asarray(statistic(means), dtype=np.float64)
    if np.isnan(stats).all():
        return Interval(value, float("nan"), float("nan"))
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(stats, [alpha, 1 - alpha])
    return Interval(value, float(lo), float(hi))
