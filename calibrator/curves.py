"""Per-request removed-fraction curves: the data a threshold fit reads.

Row ``i``, column ``k`` = removed fraction of request ``i`` at τ = ``EDGES[k]``. Each row is a cumulative sum
of a histogram, so rows — and their mean — are non-decreasing in ``k`` by construction. The fit only ever needs
the mean curve, one column, the per-request sizes and the per-request window share, so a store can serve these
from pre-aggregated data without materialising the ``[N, NUM_EDGES]`` matrix (see ``calibrator.sample_store``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from calibrator.summary import ScoreSummary, removed_curve


class RequestCurves(Protocol):
    """What ``fit_threshold`` reads."""

    @property
    def num_requests(self) -> int: ...

    def mean_curve(self) -> np.ndarray:
        """``[NUM_EDGES]`` mean over requests of the removed fraction at each edge."""

    def ratios_at(self, edge: int) -> np.ndarray:
        """``[N]`` per-request removed fraction at τ = ``EDGES[edge]``."""

    def total_entries(self) -> np.ndarray:
        """``[N]`` layers × kv_heads × tokens per request (for the entry-weighted fraction)."""

    def mean_removable(self) -> float:
        """Mean over requests of the eligible (outside-window) share: no τ removes more on average."""


@dataclass(frozen=True)
class InMemoryCurves:
    """Dense curves of a list of summaries.

    ``curves``: ``[N, NUM_EDGES]`` float64; ``totals``: ``[N]`` entries; ``removable``: ``[N]`` eligible share.
    """

    curves: np.ndarray
    totals: np.ndarray
    removable: np.ndarray

    @classmethod
    def from_summaries(cls, summaries: Sequence[ScoreSummary]) -> InMemoryCurves:
        curves = np.stack([removed_curve(s) for s in summaries]) if summaries else np.zeros((0, 0))
        totals = np.array([s.total_entries for s in summaries], dtype=np.float64)
        eligible = np.array([s.eligible_entries for s in summaries], dtype=np.float64)
        removable = np.divide(eligible, totals, out=np.zeros_like(eligible), where=totals > 0)
        return cls(curves=curves, totals=totals, removable=removable)

    @property
    def num_requests(self) -> int:
        return len(self.totals)

    def mean_curve(self) -> np.ndarray:
        return self.curves.mean(axis=0)

    def ratios_at(self, edge: int) -> np.ndarray:
        return self.curves[:, edge]

    def total_entries(self) -> np.ndarray:
        return self.totals

    def mean_removable(self) -> float:
        return float(self.removable.mean()) if len(self.removable) else 0.0
