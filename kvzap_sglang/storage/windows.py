"""Which token slots lie inside the protected window of a live request: the DMS rule when requests share slots.

Without sharing, a token is decided (kept or freed by its score) when it leaves the last ``window`` tokens of its
request. With a prefix cache several live requests may hold the same slot at different positions relative to
their ends, so the rule becomes: *a slot is decided once it lies outside the window of every live request holding
it* (issue #4, rule 1). ``WindowTracker`` keeps, per request row, the position range ``[lo, hi)`` its window covers
and, per slot, how many live windows cover it (``refs``). Each forward moves the windows of the batch's rows
(``advance``) and returns the slots that left a window and are covered by none; the caller decides those
that are still undecided. A row's first forward treats its whole cached prefix before the window as leaving
it, so cached tokens another request left undecided (its window tail when it finished) are decided now.

Rows are SGLang's ``req_to_token`` rows; slot ids follow the cell store's (0 = padding, never counted).
"""

from __future__ import annotations

import torch


class WindowTracker:
    """Per-row window ranges and per-slot window reference counts.

    Args:
        num_slots: slot ids run ``1 .. num_slots``.
        num_rows: request rows ``0 .. num_rows - 1``.
        window: protected most-recent tokens per request (>= 0).
    """

    def __init__(self, num_slots: int, num_rows: int, window: int, device: torch.device | str = "cpu") -> None:
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.window = window
        self.device = torch.device(device)
        self.refs = torch.zeros(num_slots + 1, dtype=torch.int32, device=self.device)
        # hi == 0: the row has no window registered (free row, or a request before its first forward).
        self.lo = torch.zeros(num_rows, dtype=torch.int64, device=self.device)
        self.hi = torch.zeros(num_rows, dtype=torch.int64, device=self.device)

    def advance(self, rows: torch.Tensor, token_slots: torch.Tensor, new_lens: torch.Tensor,
                windows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Move the windows of ``rows`` ``[bs]`` to the last ``window`` of ``new_lens`` ``[bs]`` tokens.

        Args:
            token_slots: ``[bs, T]`` slot ids by position, ``T >= max(new_lens)``.
            windows: optional ``[bs]`` window per row (per-tenant windows); default ``self.window``.

        Returns:
            int64 ``[n]`` distinct slots that left (or never entered) a window in this call — positions before the
            new window start, from the old window start on (from 0 on the row's first call) — and are now covered
            by no live window.
        """
        rows = rows.reshape(-1).to(device=self.device, dtype=torch.int64)
        new_lens = new_lens.reshape(-1).to(device=self.device, dtype=torch.int64)
        token_slots = token_slots.to(device=self.device, dtype=torch.int64)
        if rows.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        if token_slots.shape[0] != rows.numel() or token_slots.shape[1] < int(new_lens.max()):
            raise ValueError(  # positions past T would be in the window but hold no reference
                f"token_slots must be [{rows.numel()}, >= {int(new_lens.max())}], got {tuple(token_slots.shape)}"
            )
        lo, hi = self.lo[rows], self.hi[rows]
        if bool((new_lens < hi).any()):
            raise ValueError("a request's length went down between forwards")
        window = self.window if windows is None else windows.reshape(-1).to(device=self.device, dtype=torch.int64)
        new_lo = (new_lens - window).clamp_min(0)
        pos = torch.arange(token_slots.shape[1], device=self.device)[None, :]
        was = (pos >= lo[:, None]) & (pos < hi[:, None])
        now = (pos >= new_lo[:, None]) & (pos < new_lens[:, None])
        self._add(token_slots[was & ~now], -1)
        self._add(token_slots[now & ~was], 1)
        first_start = torch.where(hi == 0, torch.zeros_like(lo), lo)
        leaving = (pos >= first_start[:, None]) & (pos < new_lo[:, None])
        self.lo[rows], self.hi[rows] = new_lo, new_lens
        slots = torch.unique(token_slots[leaving])
        slots = slots[slots != 0]
        return slots[self.refs[slots] == 0]

    def release(self, row: int, row_slots: torch.Tensor) -> None:
        """The request of ``row`` is gone (finished, aborted, retracted): its window covers nothing any more.

        ``row_slots``: the row's slot ids by position (``req_to_token[row]``), at least ``hi`` long.
        """
        lo, hi = int(self.lo[row]), int(self.hi[row])
        if row_slots.numel() < hi:
            raise ValueError(f"row {row}'s window ends at {hi} but {row_slots.numel()} slots were given")
        if hi:
            self._add(row_slots[lo:hi].to(device=self.device, dtype=torch.int64), -1)
        self.lo[row] = self.hi[row] = 0

    def window_range(self, row: int) -> tuple[int, int]:
        """Positions ``[lo, hi)`` the row's window covers (``(0, 0)`` if none)."""
        return int(self.lo[row]), int(self.hi[row])

    def retarget(self, old_slots: torch.Tensor, new_slots: torch.Tensor) -> None:
        """Window positions whose slot changed (a prefix cache swapped a request's copy for its own): move the
        references from ``old_slots[i]`` to ``new_slots[i]``."""
        old_slots = old_slots.reshape(-1).to(device=self.device, dtype=torch.int64)
        new_slots = new_slots.reshape(-1).to(device=self.device, dtype=torch.int64)
        changed = old_slots != new_slots
        self._add(old_slots[changed], -1)
        self._add(new_slots[changed], 1)

    def covered(self, slots: torch.Tensor) -> torch.Tensor:
        """bool ``[n]``: the slot lies in some live window."""
        return self.refs[slots.reshape(-1).to(device=self.device, dtype=torch.int64)] > 0

    def check_idle(self) -> None:
        """Assert that no window is registered and no slot is referenced (every request released)."""
        assert not bool(self.hi.any()), f"rows {self.hi.nonzero().reshape(-1)[:8].tolist()} still hold a window"
        assert not bool(self.refs.any()), f"slots {self.refs.nonzero().reshape(-1)[:8].tolist()} still referenced"

    def check_nonnegative(self) -> None:
        assert bool((self.refs >= 0).all()), "a window reference count went negative"

    def _add(self, slots: torch.Tensor, delta: int) -> None:
        slots = slots[slots != 0]
        if slots.numel():
            self.refs.index_add_(0, slots, torch.full_like(slots, delta, dtype=torch.int32))
