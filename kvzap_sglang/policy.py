"""DMS-style threshold pruning with a protected recent window (KVzap paper Algorithm 1, kvpress ``DMSPress``).

A (layer, KV head, token) entry is dropped iff its log-score is *strictly* below the threshold τ and the token
is not among the last ``window`` tokens of the sequence. Each token's fate is decided once, with the score it
got when it was written, at the moment it leaves the window; the last ``window`` tokens are always kept, so a
sequence of at most ``window`` tokens is never pruned. There is no attention-sink protection (as in the paper).

Two forms of the same rule:

* ``keep_mask`` — the dense form over a whole sequence of scores;
* ``window_exits`` / ``WindowedPruner`` — the incremental form a server needs: tokens arrive in steps of any
  size (prefill, chunked prefill, decode) and are decided when they leave the window. Feeding any split of a
  sequence through ``WindowedPruner`` gives exactly ``keep_mask`` of the whole sequence (tested).

Removed fraction (kvpress's "compression ratio") = pruned entries / (layers × KV heads × tokens); the
denominator includes the protected window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

DEFAULT_WINDOW = 128
# Bounds of the settings, checked where they enter (flags, tenants file, the service's τ): a window past any context
# length keeps everything already, and a larger one overflowed the int64 arithmetic of the window tracker at the
# first forward; τ is compared with float32 scores, where a larger magnitude became an infinity.
MAX_WINDOW = 2**31 - 1
MAX_ABS_THRESHOLD = float(torch.finfo(torch.float32).max)


def is_usable_threshold(tau: float) -> bool:
    """Finite and within float32's range (the dtype scores are compared in)."""
    return math.isfinite(tau) and abs(tau) <= MAX_ABS_THRESHOLD


def _check_window(window: int) -> None:
    if window < 0:  # a negative window would reach past the sequence's end
        raise ValueError(f"window must be >= 0, got {window}")


def _check(threshold: float, window: int) -> None:
    _check_window(window)
    if threshold != threshold:  # NaN
        raise ValueError("threshold must be a number, got NaN")


def keep_mask(scores: torch.Tensor, threshold: float, window: int = DEFAULT_WINDOW) -> torch.Tensor:
    """Which entries survive the DMS rule.

    Args:
        scores: ``[..., T]`` log-scores of one sequence's tokens in order (e.g. ``[layers, kv_heads, T]``).
        threshold: τ; entries with ``score < τ`` (strict) outside the window are dropped.
        window: number of most recent tokens that are always kept.

    Returns:
        Bool tensor shaped like ``scores``; True = keep. NaN scores are kept (no decision without a score).
    """
    _check(threshold, window)
    keep = ~(scores < threshold)
    num_tokens = scores.shape[-1]
    keep[..., max(num_tokens - window, 0) :] = True
    return keep


def window_exits(prev_len: int, new_len: int, window: int = DEFAULT_WINDOW) -> range:
    """Positions that leave the protected window when a sequence grows from ``prev_len`` to ``new_len`` tokens.

    A token at position ``p`` is protected while ``p >= len - window``; it is decided when that stops holding.
    """
    if not 0 <= prev_len <= new_len:
        raise ValueError(f"sequence lengths must satisfy 0 <= prev_len <= new_len, got {prev_len}, {new_len}")
    _check_window(window)
    return range(max(prev_len - window, 0), max(new_len - window, 0))


@dataclass
class WindowedPruner:
    """Incremental DMS decisions for one sequence.

    ``push(scores)`` appends the scores ``[..., n]`` of the ``n`` tokens written this step and returns
    ``(positions, keep)`` for the tokens that left the window in this step: ``positions`` is the ``range`` of
    their absolute positions and ``keep`` is ``[..., len(positions)]`` (True = keep). Scores of tokens still in
    the window are buffered; decided tokens' scores are forgotten, so memory stays ``O(window)``.
    """

    threshold: float
    window: int = DEFAULT_WINDOW
    length: int = 0
    _pending: torch.Tensor | None = field(default=None, repr=False)  # [..., tokens still in the window]
    _pending_start: int = 0  # absolute position of _pending[..., 0]

    def __post_init__(self) -> None:
        _check(self.threshold, self.window)

    def push(self, scores: torch.Tensor) -> tuple[range, torch.Tensor]:
        pending = scores if self._pending is None else torch.cat([self._pending, scores], dim=-1)
        exits = window_exits(self.length, self.length + scores.shape[-1], self.window)
        self.length += scores.shape[-1]
        first = exits.start - self._pending_start
        decided = pending[..., first : first + len(exits)]
        self._pending = pending[..., first + len(exits) :]
        self._pending_start = exits.stop if len(exits) else self._pending_start
        return exits, ~(decided < self.threshold)


def removed_fraction(keep: torch.Tensor) -> float:
    """Pruned entries / all entries of a ``[layers, kv_heads, T]`` (or any shape) keep mask; 0.0 when empty."""
    if keep.numel() == 0:
        return 0.0
    return 1.0 - keep.float().mean().item()
