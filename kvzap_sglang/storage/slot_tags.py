"""Per-slot tags with cell counts per tag value, kept exact as pruning frees cells.

The cell store keeps two: the *owner* (0 = a request, 1/2 = the prefix cache's evictable/protected slots) and the
*tenant* (multi-tenant serving: whose budget a slot's cells count against). An owner of slots reads its totals
(``cells[value]``, ``slots[value]``) without being told of every pruned entry.
"""

from __future__ import annotations

import torch


class SlotTags:
    """Tag value per slot ``0 .. num_slots`` (slot 0 is padding and stays 0) and per-value cell/slot counts."""

    def __init__(self, num_slots: int, num_values: int, device: torch.device) -> None:
        self.num_values = num_values
        self.tag = torch.zeros(num_slots + 1, dtype=torch.int16, device=device)
        self.cells = [0] * num_values
        self.slots = [num_slots + 1] + [0] * (num_values - 1)

    def set(self, slots: torch.Tensor, value: int, slot_cells: torch.Tensor) -> None:
        """Tag distinct non-zero ``slots`` with ``value``; their cells (``slot_cells``) move between the counts."""
        if not 0 <= value < self.num_values:
            raise ValueError(f"tag must be in 0..{self.num_values - 1}, got {value}")
        old = self.tag.index_select(0, slots).to(torch.int64)
        moving = old != value
        if not bool(moving.any()):
            return
        slots, old = slots[moving], old[moving]
        cells = slot_cells.index_select(0, slots).to(torch.int64)
        for v, (c, n) in enumerate(zip(torch.bincount(old, weights=cells, minlength=self.num_values).tolist(),
                                       torch.bincount(old, minlength=self.num_values).tolist())):  # fmt: skip
            self.cells[v] -= int(c)
            self.slots[v] -= int(n)
        self.cells[value] += int(cells.sum())
        self.slots[value] += slots.numel()
        self.tag[slots] = value

    def count(self, slots: torch.Tensor, delta: torch.Tensor) -> None:
        """``delta[i]`` cells were added to slot ``slots[i]`` (a slot may repeat)."""
        values = self.tag.index_select(0, slots).to(torch.int64)
        for v, d in enumerate(torch.bincount(values, weights=delta, minlength=self.num_values).tolist()):
            self.cells[v] += int(d)

    def check(self, slot_cells: torch.Tensor, name: str) -> None:
        values = self.tag.to(torch.int64)
        cells = torch.bincount(values, weights=slot_cells.to(torch.int64), minlength=self.num_values).tolist()
        assert [int(c) for c in cells] == self.cells, f"{name} cells {self.cells} != map {cells}"
        assert torch.bincount(values, minlength=self.num_values).tolist() == self.slots, f"{name} slot counts differ"
        assert int(self.tag[0]) == 0, f"padding slot 0 has a {name} tag"
