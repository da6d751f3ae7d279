"""Fitting τ on synthetic traffic whose correct τ is known analytically."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from calibrator import (
    InMemoryCurves,
    InvalidTargetError,
    TargetUnreachableError,
    TooFewSamplesError,
    fit_threshold,
    summarize,
)

BIN_WIDTH = 1 / 16  # the layout's width on [-16, 16]


def _requests(n, mus, sigma=2.0, tokens=2000, window=0, seed=0):
    rng = np.random.default_rng(seed)
    return [
        summarize(rng.normal(mus[i % len(mus)], sigma, size=(4, 2, tokens)).astype(np.float32), window,
                  model="m", task="t")
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def normal_traffic():
    return InMemoryCurves.from_summaries(_requests(40, [-6.0]))


@pytest.mark.parametrize("target", [0.5, 0.67, 0.75])
def test_tau_lands_on_the_true_quantile(normal_traffic, target):
    fit = fit_threshold(normal_traffic, target, bootstrap_resamples=200)
    true_tau = -6.0 + 2.0 * NormalDist().inv_cdf(target)
    # Edge choice moves τ by at most half a bin; sampling (40 × 16k entries) adds well under 0.02.
    assert abs(fit.tau - true_tau) <= BIN_WIDTH / 2 + 0.02
    assert abs(fit.predicted_removed_fraction - target) <= fit.resolution
    assert fit.ci_low <= fit.predicted_removed_fraction <= fit.ci_high
    assert fit.ci_high - fit.ci_low < 0.01
    assert fit.n_requests == 40


def test_window_shrinks_the_fraction_and_bounds_the_target():
    # 300 tokens, window 100: a third of every request is protected; removed(τ) = 2/3 · Φ((τ − μ)/σ).
    curves = InMemoryCurves.from_summaries(_requests(30, [-6.0], tokens=300, window=100))
    fit = fit_threshold(curves, 0.5, bootstrap_resamples=100)
    assert abs(fit.tau - (-6.0 + 2.0 * NormalDist().inv_cdf(0.75))) <= BIN_WIDTH / 2 + 0.05
    with pytest.raises(TargetUnreachableError, match=r"between 0\.0000 and 0\.6667.*window alone keeps 0\.333"):
        fit_threshold(curves, 0.75)


def test_mixed_requests_report_spread():
    curves = InMemoryCurves.from_summaries(_requests(40, [-5.0, -7.0]))
    fit = fit_threshold(curves, 0.5, bootstrap_resamples=200)
    # By symmetry the mean hits 0.5 at τ = −6; the two halves sit at Φ(∓0.5).
    assert abs(fit.tau + 6.0) <= BIN_WIDTH
    assert fit.p10 == pytest.approx(NormalDist().cdf(-0.5), abs=0.03)
    assert fit.p90 == pytest.approx(NormalDist().cdf(0.5), abs=0.03)


def test_bootstrap_is_reproducible_per_seed(normal_traffic):
    first = fit_threshold(normal_traffic, 0.6, bootstrap_resamples=300, seed=7)
    again = fit_threshold(normal_traffic, 0.6, bootstrap_resamples=300, seed=7)
    other = fit_threshold(normal_traffic, 0.6, bootstrap_resamples=300, seed=8)
    assert (first.ci_low, first.ci_high) == (again.ci_low, again.ci_high)
    assert (first.ci_low, first.ci_high) != (other.ci_low, other.ci_high)
    assert first.tau == other.tau


def test_refusals(normal_traffic):
    with pytest.raises(TooFewSamplesError, match="40 sampled requests.*at least 41"):
        fit_threshold(normal_traffic, 0.5, min_samples=41)
    with pytest.raises(TooFewSamplesError):
        fit_threshold(InMemoryCurves.from_summaries([]), 0.5, min_samples=0)
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(InvalidTargetError):
            fit_threshold(normal_traffic, bad)


def test_levelled_bootstrap_agrees_with_exact_resampling(monkeypatch):
    import calibrator.fit as fit_module

    values = np.clip(np.random.default_rng(5).normal(0.6, 0.15, 30_000), 0, 1)
    monkeypatch.setattr(fit_module, "_EXACT_BOOTSTRAP_WORK", 0)
    levelled = fit_module.bootstrap_means(values, 400, seed=3)
    monkeypatch.setattr(fit_module, "_EXACT_BOOTSTRAP_WORK", 10**12)
    exact = fit_module.bootstrap_means(values, 400, seed=3)
    standard_error = values.std() / np.sqrt(len(values))
    assert abs(levelled.mean() - values.mean()) < 0.3 * standard_error
    assert abs(exact.mean() - values.mean()) < 0.3 * standard_error
    assert 0.85 < levelled.std() / standard_error < 1.15 and 0.85 < exact.std() / standard_error < 1.15


def _constant_requests(n, scores_per_cluster):
    """``n`` requests whose entries sit on the given scores, equally many on each: a mean curve of steps."""
    scores = np.repeat(np.array(scores_per_cluster, dtype=np.float32), 100)
    return InMemoryCurves.from_summaries([
        summarize(np.broadcast_to(scores, (2, 2, len(scores))).copy(), 0, model="m", task="t") for _ in range(n)
    ])


def test_a_target_in_a_gap_of_the_curve_is_unreachable():
    # Every score 0.0: the mean curve jumps from 0 to 1 at τ = 0, nothing in between is achievable.
    with pytest.raises(TargetUnreachableError, match=r"gap around it.*0\.0000 and 1\.0000") as caught:
        fit_threshold(_constant_requests(25, [0.0]), 0.5)
    assert caught.value.gap == (0.0, 1.0)
    # Two clusters: 0, 0.5 and 1 are achievable; 0.25 is 0.25 away from both.
    clusters = _constant_requests(25, [-10.0, 5.0])
    with pytest.raises(TargetUnreachableError, match=r"0\.0000 and 0\.5000"):
        fit_threshold(clusters, 0.25)
    # Within the tolerance of a step it is reachable, and the fit is what it was before the gap check.
    for target in (0.5, 0.509, 0.491):
        fit = fit_threshold(clusters, target, bootstrap_resamples=50)
        assert fit.predicted_removed_fraction == 0.5 and -10.0 < fit.tau <= 5.0
    with pytest.raises(TargetUnreachableError):
        fit_threshold(clusters, 0.52)
    assert fit_threshold(clusters, 0.52, tolerance=0.03, bootstrap_resamples=50).predicted_removed_fraction == 0.5


def test_a_target_of_zero_takes_the_lowest_threshold():
    """Every τ up to the lowest score removes nothing from the sample. The middle of that plateau (τ −18 here) was
    returned, which prunes an unseen request with scores between −32 and −18 although nothing was asked for."""
    clusters = _constant_requests(25, [-10.0, 5.0])
    fit = fit_threshold(clusters, 0.0, bootstrap_resamples=50)
    assert fit.tau == -32.0 and fit.edge_index == 0 and fit.predicted_removed_fraction == 0.0
    middle = fit_threshold(clusters, 0.5, bootstrap_resamples=50)  # an inner plateau keeps its middle edge
    assert middle.predicted_removed_fraction == 0.5 and -3.0 <= middle.tau <= -2.0
