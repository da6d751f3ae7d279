"""WindowTracker: a slot is decided once it lies outside every live request's window, and bad shapes change nothing."""

from __future__ import annotations

import pytest
import torch

from kvzap_sglang.storage import WindowTracker


def rows(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_a_shared_slot_is_decided_only_when_no_live_window_covers_it():
    tracker = WindowTracker(num_slots=10, num_rows=2, window=2)
    shared = torch.tensor([[1, 2, 3, 4]])  # two requests over the same four slots
    assert tracker.advance(rows(0), shared[:, :3], rows(3)).tolist() == [1]  # window [1, 3)
    assert tracker.advance(rows(1), shared[:, :2], rows(2)).tolist() == []  # window [0, 2) covers slots 1, 2
    assert tracker.advance(rows(0), shared, rows(4)).tolist() == []  # slot 2 left row 0's window, still in row 1's
    tracker.release(1, shared[0])
    assert tracker.covered(rows(1, 2, 3, 4)).tolist() == [False, False, True, True]
    tracker.release(0, shared[0])
    tracker.check_idle()


def test_token_slots_narrower_than_the_new_length_are_refused_before_any_change():
    """Positions past the slot tensor's width would be in the window but hold no reference; releasing the row
    later took references that were never added (counts went negative)."""
    tracker = WindowTracker(num_slots=10, num_rows=1, window=4)
    row = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with pytest.raises(ValueError, match="token_slots"):
        tracker.advance(rows(0), row[:, :3], rows(6))
    with pytest.raises(ValueError, match="token_slots"):
        tracker.advance(rows(0, 0), row, rows(6))  # two rows, one slot list
    assert tracker.window_range(0) == (0, 0)
    tracker.check_idle()


def test_release_with_fewer_slots_than_the_window_is_refused_before_any_change():
    tracker = WindowTracker(num_slots=10, num_rows=1, window=4)
    row = torch.tensor([[1, 2, 3, 4, 5, 6]])
    tracker.advance(rows(0), row, rows(6))  # window [2, 6)
    with pytest.raises(ValueError, match="window ends at 6"):
        tracker.release(0, row[0, :4])
    assert tracker.window_range(0) == (2, 6)
    tracker.release(0, row[0])
    tracker.check_idle()
