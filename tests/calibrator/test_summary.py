"""Score summaries reproduce the policy's removed fraction exactly at every bin edge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from calibrator import EDGES, NUM_BUCKETS, ScoreSummary, removed_fraction_at, removed_fraction_bounds, summarize
from calibrator.bins import edge_index
from kvzap_sglang.policy import keep_mask


def removed_fraction(keep: torch.Tensor) -> float:
    """policy.removed_fraction in float64 (the policy's float32 mean is off by ~1e-8)."""
    return float((~keep).sum().item() / keep.numel())


def _awkward_scores(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Normal scores plus values sitting exactly on edges, outside the layout, NaN and ±inf."""
    scores = rng.normal(-6.0, 5.0, size=shape).astype(np.float32)
    flat = scores.reshape(-1)
    picks = rng.choice(flat.size, size=flat.size // 5, replace=False)
    flat[picks] = rng.choice(EDGES, size=len(picks)).astype(np.float32)
    flat[:4] = [np.nan, np.inf, -np.inf, 40.0]
    return scores


@pytest.mark.parametrize("window", [0, 7, 128])
def test_removed_fraction_is_exact_on_every_edge(window):
    scores = _awkward_scores(np.random.default_rng(0), (3, 2, 150))
    summary = summarize(scores, window, model="m", task="t")
    tensor = torch.from_numpy(scores)
    for tau in [*EDGES[::7], EDGES[-1], -3.0, -16.0]:
        expected = removed_fraction(keep_mask(tensor, float(tau), window))
        assert removed_fraction_at(summary, float(tau)) == pytest.approx(expected, abs=1e-12), tau


def test_bf16_scores_compared_in_bf16_match_the_histogram():
    """The plugin compares bf16 scores with τ in bf16; edges are bf16-exact, so nothing flips."""
    scores = torch.randn(4, 3, 200, generator=torch.Generator().manual_seed(1)).mul(4).sub(6).to(torch.bfloat16)
    summary = summarize(scores.float().numpy(), 16, model="m", task="t")
    for tau in EDGES[::3]:
        expected = removed_fraction(keep_mask(scores, float(tau), 16))
        assert removed_fraction_at(summary, float(tau)) == pytest.approx(expected, abs=1e-12), tau


def test_off_edge_tau_is_bracketed_by_the_bounds():
    scores = _awkward_scores(np.random.default_rng(2), (2, 2, 300))
    summary = summarize(scores, 10, model="m", task="t")
    for tau in np.random.default_rng(3).uniform(-40, 40, size=200):
        true = removed_fraction(keep_mask(torch.from_numpy(scores), float(tau), 10))
        lower, upper = removed_fraction_bounds(summary, float(tau))
        assert lower - 1e-12 <= true <= upper + 1e-12
        assert removed_fraction_at(summary, float(tau)) == lower


def test_edge_index_matches_edges():
    assert edge_index(float(EDGES[100])) == 100
    assert edge_index(float(EDGES[100]) + 1e-6) == 100
    assert edge_index(-1e9) == 0 and edge_index(1e9) == len(EDGES) - 1


def test_window_covering_the_sequence_removes_nothing():
    summary = summarize(np.full((2, 2, 50), -30.0, dtype=np.float32), 50, model="m", task="t")
    assert summary.eligible_entries == 0 and summary.counts == []
    assert removed_fraction_at(summary, 16.0) == 0.0


def test_a_request_without_tokens_is_refused():
    """It has no removed fraction (0/0): counted as 0 % removed, it would drag the mean down and τ up."""
    with pytest.raises(ValueError, match="no tokens: a request without tokens has no removed fraction"):
        summarize(np.zeros((2, 2, 0), dtype=np.float32), 4, model="m", task="t")
    with pytest.raises(ValidationError, match="num_tokens\n  Input should be greater than or equal to 1"):
        ScoreSummary(model="m", task="t", num_layers=2, num_kv_heads=2, num_tokens=0, window=0)


def test_json_round_trip_and_bounded_size():
    scores = np.random.default_rng(4).uniform(-40, 40, size=(30, 3, 5000)).astype(np.float32)
    summary = summarize(scores, 128, model="HuggingFaceTB/SmolLM2-135M", task="code", tenant="acme")
    payload = summary.model_dump_json()
    assert ScoreSummary.model_validate_json(payload) == summary
    assert len(summary.buckets) <= NUM_BUCKETS
    assert len(payload) < 16 * NUM_BUCKETS + 400  # every bucket non-empty here: still a few KB


@pytest.mark.parametrize(
    "change, message",
    [
        ({"counts": [5, 6]}, "differ in length"),
        ({"buckets": [9, 3, 4], "counts": [4, 4, 4]}, "strictly increasing"),
        ({"buckets": [1, 2, NUM_BUCKETS], "counts": [4, 4, 4]}, "bucket ids must lie"),
        ({"counts": [12, 0, 0]}, "positive"),
        ({"counts": [4, 4, 5]}, "eligible"),
        ({"layout": "other-v9"}, "unknown bin layout"),
        ({"extra": 1}, "Extra inputs"),
        ({"task": "a/b"}, "pattern"),
        ({"num_tokens": -1}, "greater than or equal"),
    ],
)
def test_malformed_summaries_are_rejected(change, message):
    good = {"model": "m", "task": "t", "num_layers": 2, "num_kv_heads": 2, "num_tokens": 5, "window": 2,
            "buckets": [1, 2, 3], "counts": [4, 4, 4]}
    ScoreSummary.model_validate(good)
    with pytest.raises(ValidationError, match=message):
        ScoreSummary.model_validate({**good, **change})
