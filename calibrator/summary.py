"""Per-request score summary: what the KVzap plugin emits for a sampled request.

A histogram (layout in ``calibrator.bins``) of the log-scores of the *eligible* entries — those outside the
protected window of the last ``window`` tokens — is enough to compute the removed fraction of the request for
any τ under the DMS rule of ``kvzap_sglang/policy.py``:

    removed(τ) = #(eligible entries with score < τ) / (layers × kv_heads × tokens)

(the denominator includes the window, as in kvpress). It is exact at every bin edge; see ``calibrator.bins``
for the error bound between edges. Serialised sparsely (non-empty buckets only), so its size is bounded by
``NUM_BUCKETS`` pairs whatever the request length.
"""

from __future__ import annotations

import time

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from calibrator.bins import EDGES, LAYOUT_ID, NUM_BUCKETS, bucket_index, edge_index

# Model ids may contain "/" (HF style); task and tenant labels are single path segments.
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$"
LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]*$"
MAX_LABEL_LENGTH = 128


class ScoreSummary(BaseModel):
    """Histogram of one request's eligible KVzap log-scores plus the labels the calibrator groups by."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # no "3" → 3 coercion from JSON

    layout: str = Field(LAYOUT_ID, description="bin layout id; only the current layout is accepted")
    model: str = Field(min_length=1, max_length=MAX_LABEL_LENGTH, pattern=MODEL_PATTERN)
    task: str = Field(min_length=1, max_length=MAX_LABEL_LENGTH, pattern=LABEL_PATTERN)
    tenant: str | None = Field(None, min_length=1, max_length=MAX_LABEL_LENGTH, pattern=LABEL_PATTERN)
    timestamp: float = Field(default_factory=time.time, ge=0, le=1e11, description="unix seconds")
    num_layers: int = Field(ge=1, le=1024)
    num_kv_heads: int = Field(ge=1, le=1024)
    # Counted as 0 % removed, a request without tokens (removed fraction 0/0) would drag the mean down and τ up.
    num_tokens: int = Field(ge=1, le=100_000_000, description="tokens of the request (0 has no removed fraction)")
    window: int = Field(ge=0, le=100_000_000, description="protected recent tokens (policy window)")
    buckets: list[int] = Field(default_factory=list, max_length=NUM_BUCKETS, description="non-empty bucket ids, increasing")
    counts: list[int] = Field(default_factory=list, max_length=NUM_BUCKETS, description="entries per listed bucket, > 0")

    @model_validator(mode="after")
    def _consistent(self) -> ScoreSummary:
        if self.layout != LAYOUT_ID:
            raise ValueError(f"unknown bin layout {self.layout!r}; this calibrator reads {LAYOUT_ID!r}")
        if len(self.buckets) != len(self.counts):
            raise ValueError(f"buckets ({len(self.buckets)}) and counts ({len(self.counts)}) differ in length")
        if any(b < 0 or b >= NUM_BUCKETS for b in self.buckets):
            raise ValueError(f"bucket ids must lie in [0, {NUM_BUCKETS - 1}]")
        if any(b1 <= b0 for b0, b1 in zip(self.buckets, self.buckets[1:])):
            raise ValueError("bucket ids must be strictly increasing")
        if any(c <= 0 for c in self.counts):
            raise ValueError("counts must be positive (list non-empty buckets only)")
        if sum(self.counts) != self.eligible_entries:
            raise ValueError(
                f"counts sum to {sum(self.counts)} but layers × kv_heads × max(tokens − window, 0) = "
                f"{self.eligible_entries} entries are eligible"
            )
        return self

    @property
    def total_entries(self) -> int:
        """Denominator of the removed fraction: every (layer, KV head, token) entry, window included."""
        return self.num_layers * self.num_kv_heads * self.num_tokens

    @property
    def eligible_entries(self) -> int:
        return self.num_layers * self.num_kv_heads * max(self.num_tokens - self.window, 0)

    def dense_counts(self) -> np.ndarray:
        """``[NUM_BUCKETS]`` int64 counts."""
        dense = np.zeros(NUM_BUCKETS, dtype=np.int64)
        dense[np.asarray(self.buckets, dtype=np.int64)] = self.counts
        return dense


def summarize(
    scores: np.ndarray,
    window: int,
    *,
    model: str,
    task: str,
    tenant: str | None = None,
    timestamp: float | None = None,
) -> ScoreSummary:
    """Summarise one request's scores.

    Args:
        scores: ``[layers, kv_heads, tokens]`` log-scores in token order (float32/float64; convert bf16 tensors
            with ``.float().numpy()`` — exact). NaN = unscored, never removed.
        window: protected recent tokens, as in ``policy.keep_mask``.
    """
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise ValueError(f"scores must be [layers, kv_heads, tokens], got shape {scores.shape}")
    num_layers, num_kv_heads, num_tokens = scores.shape
    if num_tokens == 0:
        raise ValueError("scores have no tokens: a request without tokens has no removed fraction; skip it")
    eligible = scores[..., : max(num_tokens - window, 0)]
    dense = np.bincount(bucket_index(eligible).ravel(), minlength=NUM_BUCKETS)
    return summary_from_counts(dense, num_layers, num_kv_heads, num_tokens, window, model=model, task=task,
                               tenant=tenant, timestamp=timestamp)  # fmt: skip


def summary_from_counts(
    dense: np.ndarray,
    num_layers: int,
    num_kv_heads: int,
    num_tokens: int,
    window: int,
    *,
    model: str,
    task: str,
    tenant: str | None = None,
    timestamp: float | None = None,
) -> ScoreSummary:
    """The summary of a request whose eligible entries (those outside its window) fill the ``[NUM_BUCKETS]``
    histogram ``dense`` (``bins.bucket_index`` semantics), for callers that count them their own way (the plugin
    counts with torch where the scores are)."""
    dense = np.asarray(dense)
    if dense.shape != (NUM_BUCKETS,):
        raise ValueError(f"counts must be [{NUM_BUCKETS}] (bins.NUM_BUCKETS), got shape {dense.shape}")
    (buckets,) = np.nonzero(dense)
    return ScoreSummary(
        model=model,
        task=task,
        tenant=tenant,
        timestamp=time.time() if timestamp is None else float(timestamp),
        num_layers=int(num_layers),
        num_kv_heads=int(num_kv_heads),
        num_tokens=int(num_tokens),
        window=int(window),
        buckets=buckets.tolist(),
        counts=dense[buckets].tolist(),
    )


def removed_curve(summary: ScoreSummary) -> np.ndarray:
    """``[NUM_EDGES]`` float64: removed fraction of the request at τ = ``EDGES[k]`` (exact), 0 when empty."""
    if summary.total_entries == 0:
        return np.zeros(len(EDGES))
    return np.cumsum(summary.dense_counts())[: len(EDGES)] / summary.total_entries


def removed_fraction_at(summary: ScoreSummary, tau: float) -> float:
    """Removed fraction at τ. Exact when τ is a bin edge (``EDGES``); otherwise the value at the largest edge
    <= τ, a lower bound that is off by at most the mass of the bucket containing τ (``removed_fraction_bounds``)."""
    return removed_fraction_bounds(summary, tau)[0]


def removed_fraction_bounds(summary: ScoreSummary, tau: float) -> tuple[float, float]:
    """(lower, upper) bounds of the removed fraction at any τ; equal when τ is a bin edge or outside the layout."""
    if summary.total_entries == 0:
        return 0.0, 0.0
    cumulative = np.cumsum(summary.dense_counts())
    if tau < EDGES[0]:
        return 0.0, cumulative[0] / summary.total_entries
    if tau > EDGES[-1]:
        return cumulative[-2] / summary.total_entries, cumulative[-1] / summary.total_entries
    k = edge_index(tau)
    lower = cumulative[k] / summary.total_entries
    upper = lower if EDGES[k] == tau else cumulative[k + 1] / summary.total_entries
    return float(lower), float(upper)
