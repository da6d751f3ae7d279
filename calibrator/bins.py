"""The fixed log-score bin layout shared by the KVzap plugin (which fills it) and the calibrator (which reads it).

Every edge is exactly representable in bfloat16, float16 and float32: multiples of 1/16 on [-16, 16] and of
1/8 on [-32, -16). KVzap scores are bf16 for a bf16 model (kvzap-method.md §3.1) and ``policy.keep_mask``
compares ``scores < τ`` in the scores' dtype, so a τ chosen on an edge means the same thing in the plugin as
in the histogram — no rounding of τ can move an entry across it.

Bucket semantics (the strict ``<`` rule of kvzap_sglang/policy.py): an entry with score ``s`` goes to bucket
``j = #{edges <= s}`` (``np.searchsorted(EDGES, s, side="right")``), so

* bucket 0 holds ``s < EDGES[0]`` (underflow, removed by every candidate τ),
* bucket ``j`` (1 <= j < NUM_EDGES) holds ``EDGES[j-1] <= s < EDGES[j]``,
* bucket ``NUM_EDGES`` holds ``s >= EDGES[-1]`` and NaN (overflow, kept by every candidate τ; NaN is never
  pruned by the policy either).

Then ``#(s < EDGES[k]) = sum(count[0..k])`` exactly — the histogram introduces no error at an edge. For a τ
strictly between ``EDGES[k-1]`` and ``EDGES[k]`` the removed count lies between ``cum[k-1]`` and ``cum[k]``;
the error is at most the mass of the one bucket containing τ (bucket width 1/16, or 1/8 below -16).
"""

from __future__ import annotations

import numpy as np

LAYOUT_ID = "bf16grid-v1"

# Two regular grids: COARSE_STEP from COARSE_START up to FINE_START, then FINE_STEP up to FINE_END (inclusive).
COARSE_START, COARSE_STEP, FINE_START, FINE_STEP, FINE_END = -32.0, 1 / 8, -16.0, 1 / 16, 16.0
EDGES: np.ndarray = np.concatenate([np.arange(COARSE_START, FINE_START, COARSE_STEP),
                                    np.arange(FINE_START, FINE_END + FINE_STEP / 2, FINE_STEP)])  # fmt: skip
NUM_COARSE_EDGES = int(round((FINE_START - COARSE_START) / COARSE_STEP))  # EDGES[NUM_COARSE_EDGES] == FINE_START
EDGES.setflags(write=False)
NUM_EDGES = len(EDGES)  # 641 candidate thresholds
NUM_BUCKETS = NUM_EDGES + 1  # + underflow and overflow

UNDERFLOW_BUCKET = 0
OVERFLOW_BUCKET = NUM_EDGES


def bucket_index(scores: np.ndarray) -> np.ndarray:
    """Bucket of each score (same shape, int64); NaN goes to the overflow bucket (kept)."""
    values = np.asarray(scores, dtype=np.float64)
    buckets = np.searchsorted(EDGES, values, side="right")
    buckets[np.isnan(values)] = OVERFLOW_BUCKET
    return buckets


def edge_index(tau: float) -> int:
    """Index of the largest edge <= τ (clamped to the layout). Exact match when τ is an edge."""
    return int(np.clip(np.searchsorted(EDGES, tau, side="right") - 1, 0, NUM_EDGES - 1))
