"""Pick τ so that the expected (mean over requests) removed fraction hits a target.

τ is always a bin edge, where the histogram prediction is exact (``calibrator.bins``). The mean curve is
non-decreasing by construction (every request's curve is a cumulative sum), so the inverse is a search, not a
regression: an isotonic fit (scikit-learn) of an already monotone curve would return it unchanged, and
interpolating between edges would give a τ whose prediction is no longer exact. Sampling uncertainty of the
prediction is a bootstrap over requests (seeded).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from calibrator.bins import EDGES
from calibrator.curves import RequestCurves
from calibrator.errors import InvalidTargetError, TargetUnreachableError, TooFewSamplesError

DEFAULT_MIN_SAMPLES = 20
DEFAULT_TOLERANCE = 0.01
_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000  # bounds the [resamples, N] index block held at once (~32 MB)
_EXACT_BOOTSTRAP_WORK = 20_000_000  # resamples × N up to which indices are resampled exactly (~0.4 s)
_BOOTSTRAP_LEVELS = 1024


class ThresholdFit(BaseModel):
    """τ for a target and the evidence behind it (all fractions are removed fractions in [0, 1])."""

    tau: float
    edge_index: int
    target_ratio: float
    predicted_removed_fraction: float
    ci_low: float
    ci_high: float
    confidence: float
    p10: float
    p90: float
    n_requests: int
    entry_weighted_removed_fraction: float
    achievable_min: float
    achievable_max: float
    resolution: float
    bootstrap_resamples: int
    seed: int


def choose_edge(mean_curve: np.ndarray, target: float) -> int:
    """Edge whose mean removed fraction is closest to the target.

    Ties go to the lower fraction (remove less). Within a plateau (no observed score between consecutive edges)
    the middle edge is taken: every edge of the plateau fits the sample equally, the middle one leaves the
    widest margin to scores of unseen requests. Except the lowest plateau (a target of 0, or below what any edge
    removes): there an unseen request can only be pruned more than asked, so its lowest edge is taken.
    """
    distance = np.abs(mean_curve - target)
    candidates = np.flatnonzero(distance <= distance.min() + 1e-12)
    value = mean_curve[candidates].min()
    plateau = candidates[mean_curve[candidates] == value]
    if value == mean_curve[0]:
        return int(plateau[0])
    return int(plateau[len(plateau) // 2])


def gap_around(mean_curve: np.ndarray, target: float) -> tuple[float, float]:
    """The closest achievable mean fractions below and above ``target`` (inside the achievable range)."""
    below = mean_curve.max(where=mean_curve <= target, initial=mean_curve[0])  # the curve is non-decreasing
    above = mean_curve.min(where=mean_curve >= target, initial=mean_curve[-1])
    return float(below), float(above)


def bootstrap_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """``[resamples]`` means of ``values`` ``[N]`` resampled with replacement (seeded).

    Exact index resampling costs O(resamples × N) (2 s for 1000 × 100k on 2 cores), so above
    ``_EXACT_BOOTSTRAP_WORK`` the values are put on ``_BOOTSTRAP_LEVELS`` equal-width levels and each resample is
    one multinomial draw over the levels (O(resamples × levels)); what is resampled is the deviation from the
    levelled mean, added back to the exact mean, so the centre stays exact and each resampled mean moves by less
    than one level width ((max − min) / 1024 <= 0.001 for fractions), typically far less.
    """
    rng = np.random.default_rng(seed)
    n = len(values)
    if n == 0 or resamples <= 0:
        return np.zeros(0)
    if n * resamples <= _EXACT_BOOTSTRAP_WORK:
        chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
        return np.concatenate([
            values[rng.integers(0, n, size=(min(chunk, resamples - i), n), dtype=np.int64)].mean(axis=1)
            for i in range(0, resamples, chunk)
        ])
    low, width = values.min(), max(float(np.ptp(values)), 1e-300) / _BOOTSTRAP_LEVELS
    level = np.minimum(((values - low) / width).astype(np.int64), _BOOTSTRAP_LEVELS - 1)
    counts = np.bincount(level, minlength=_BOOTSTRAP_LEVELS)
    centres = low + (np.arange(_BOOTSTRAP_LEVELS) + 0.5) * width
    levelled_mean = counts @ centres / n
    draws = rng.multinomial(n, counts / n, size=resamples)  # [resamples, levels]
    return values.mean() + (draws @ centres / n - levelled_mean)


def fit_threshold(
    curves: RequestCurves,
    target_ratio: float,
    *,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    tolerance: float = DEFAULT_TOLERANCE,
    bootstrap_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    label: str = "",
) -> ThresholdFit:
    """Fit τ on ``curves``.

    Raises:
        InvalidTargetError: target outside [0, 1).
        TooFewSamplesError: fewer than ``min_samples`` requests.
        TargetUnreachableError: no edge gets within ``tolerance`` of the target (message says what is achievable):
            outside the achievable range, or in a gap of the mean curve inside it.
    """
    if not 0.0 <= target_ratio < 1.0:
        raise InvalidTargetError(f"target_ratio must be in [0, 1), got {target_ratio}")
    if not 0.0 < confidence < 1.0:
        raise InvalidTargetError(f"confidence must be in (0, 1), got {confidence}")
    n = curves.num_requests
    if n < max(min_samples, 1):
        raise TooFewSamplesError(n, max(min_samples, 1), label)
    mean_curve = curves.mean_curve()
    low, high = float(mean_curve[0]), float(mean_curve[-1])
    if target_ratio < low - tolerance or target_ratio > high + tolerance:
        raise TargetUnreachableError(target_ratio, low, high, 1.0 - curves.mean_removable())
    edge = choose_edge(mean_curve, target_ratio)
    if abs(mean_curve[edge] - target_ratio) > tolerance + 1e-12:  # slack: as lenient as the range check's rounding
        gap = gap_around(mean_curve, target_ratio)
        raise TargetUnreachableError(target_ratio, low, high, 1.0 - curves.mean_removable(), gap)
    ratios = curves.ratios_at(edge)
    totals = curves.total_entries()
    means = bootstrap_means(ratios, bootstrap_resamples, seed)
    alpha = (1.0 - confidence) / 2
    ci_low, ci_high = np.quantile(means, [alpha, 1 - alpha]) if len(means) else (np.nan, np.nan)
    p10, p90 = np.quantile(ratios, [0.1, 0.9])
    neighbours = mean_curve[max(edge - 1, 0) : edge + 2]
    return ThresholdFit(
        tau=float(EDGES[edge]),
        edge_index=edge,
        target_ratio=target_ratio,
        predicted_removed_fraction=float(mean_curve[edge]),
        ci_low=float(ci_low),
        ci_high=float(ci_high),
        confidence=confidence,
        p10=float(p10),
        p90=float(p90),
        n_requests=n,
        entry_weighted_removed_fraction=float((ratios * totals).sum() / totals.sum()) if totals.sum() > 0 else 0.0,
        achievable_min=low,
        achievable_max=high,
        resolution=float(np.diff(neighbours).max()) if len(neighbours) > 1 else 0.0,
        bootstrap_resamples=bootstrap_resamples,
        seed=seed,
    )
