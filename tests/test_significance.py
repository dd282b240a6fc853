"""The labeler's statistics: bootstrap intervals cover, the sign-flip test and Holm behave as their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from features.labeling.significance import bootstrap_ci, holm, paired_bootstrap_ci, sign_flip_test


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small = bootstrap_ci(rng.normal(1.0, 1.0, 30))
    big = bootstrap_ci(rng.normal(1.0, 1.0, 3000), resamples=500)
    assert small.lo <= small.value <= small.hi and big.lo <= big.value <= big.hi
    assert (big.hi - big.lo) < 0.3 * (small.hi - small.lo)
    assert big.lo < 1.0 < big.hi
    assert np.isnan(bootstrap_ci([]).value)


def test_paired_bootstrap_over_groups():
    groups = [np.ones(20), np.zeros(20)]
    ci = paired_bootstrap_ci(groups, lambda gs: float(np.mean([g.mean() for g in gs])), resamples=200)
    assert ci.value == pytest.approx(0.5) and ci.lo == pytest.approx(0.5) and ci.hi == pytest.approx(0.5)


def test_sign_flip_exact_and_monte_carlo():
    assert sign_flip_test([1.0] * 10) == pytest.approx(1 / 1024)  # only the observed pattern reaches the mean
    assert sign_flip_test([0.0, 0.0]) == 1.0
    rng = np.random.default_rng(1)
    assert sign_flip_test(rng.normal(0.5, 1.0, 200)) < 0.01
    assert sign_flip_test(rng.normal(0.0, 1.0, 200)) > 0.01


def test_holm_adjusts_step_down():
    adjusted, rejected = holm([0.01, 0.04, 0.03, 0.5])
    assert adjusted == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert rejected == [True, False, False, False]
