"""Calibration of KVzap's threshold τ from sampled traffic (no web code, no SGLang).

* ``summary``: per-request score histograms the plugin emits (``summarize``, ``removed_fraction_at``);
* ``fit``: τ for a target mean removed fraction, with a bootstrap report (``fit_threshold``);
* ``sample_store`` / ``threshold_store``: the Redis layout shared by the service and the plugin side;
* ``sink`` / ``watcher``: plugin-side shipping of summaries and polling of τ, off the hot path.
"""

from calibrator.bins import EDGES, LAYOUT_ID, NUM_BUCKETS, NUM_EDGES
from calibrator.curves import InMemoryCurves, RequestCurves
from calibrator.errors import (
    CalibrationError,
    InvalidTargetError,
    StoreBusyError,
    StoreOutcomeUnknownError,
    StoreUnavailableError,
    TargetUnreachableError,
    ThresholdChangedError,
    ThresholdNotFoundError,
    TooFewSamplesError,
    UnknownModelError,
)
from calibrator.fit import ThresholdFit, fit_threshold
from calibrator.summary import ScoreSummary, removed_curve, removed_fraction_at, removed_fraction_bounds, summarize

__all__ = [
    "EDGES",
    "LAYOUT_ID",
    "NUM_BUCKETS",
    "NUM_EDGES",
    "CalibrationError",
    "InMemoryCurves",
    "InvalidTargetError",
    "RequestCurves",
    "ScoreSummary",
    "StoreBusyError",
    "StoreOutcomeUnknownError",
    "StoreUnavailableError",
    "TargetUnreachableError",
    "ThresholdChangedError",
    "ThresholdFit",
    "ThresholdNotFoundError",
    "TooFewSamplesError",
    "UnknownModelError",
    "fit_threshold",
    "removed_curve",
    "removed_fraction_at",
    "removed_fraction_bounds",
    "summarize",
]
