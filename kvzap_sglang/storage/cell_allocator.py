"""Hands out KV cell ids; knows nothing about tensors of K/V, layers, heads or requests.

A *cell* is one row of the cell store: the K (and V) vector of one (layer, KV head, token) entry. Cell ids run
``1 .. num_cells``; id 0 is reserved as padding (SGLang's slot 0 convention: dummy writes of padded tokens land
there, and it is the filler of index tensors), so it is never handed out and freeing it is an error.

Bookkeeping is a LIFO stack of free ids plus an in-use bitmap. Every operation is O(n) in the number of ids it
touches and vectorised; the bitmap is what lets ``free`` reject double frees and foreign ids (SGLang's own token
allocator silently corrupts its free list on a double free, see ../shared/notes/sglang-internals.md §1.2).
"""

from __future__ import annotations

import torch


class OutOfCells(RuntimeError):
    """Raised by ``CellAllocator.alloc`` when fewer cells are free than requested; nothing was allocated."""

    def __init__(self, requested: int, available: int) -> None:
        super().__init__(f"cannot allocate {requested} KV cells: only {available} free")
        self.requested = requested
        self.available = available


class InvalidCellFree(ValueError):
    """Raised by ``CellAllocator.free`` on id 0, an out-of-range id, a cell not in use or an id repeated in
    one call; nothing was freed."""


class CellAllocator:
    """Free list of cell ids ``1 .. num_cells`` with an in-use bitmap.

    Args:
        num_cells: number of allocatable cells (ids ``1 .. num_cells``).
        device: where the id tensors live (the store's device, so ids never cross devices).
    """

    def __init__(self, num_cells: int, device: torch.device | str = "cpu") -> None:
        if num_cells < 0:
            raise ValueError(f"num_cells must be >= 0, got {num_cells}")
        self.num_cells = num_cells
        self.device = torch.device(device)
        # Stack of free ids; the top is at _num_free - 1. Reversed so the first allocation returns 1, 2, 3, ...
        self._free_stack = torch.arange(num_cells, 0, -1, dtype=torch.int64, device=self.device)
        self._num_free = num_cells
        self.in_use = torch.zeros(num_cells + 1, dtype=torch.bool, device=self.device)  # [num_cells + 1]
        # Scratch counter used to detect ids repeated within one free() call in O(n); always all zeros between calls.
        self._hits = torch.zeros(num_cells + 1, dtype=torch.int32, device=self.device)

    def available(self) -> int:
        """Number of free cells."""
        return self._num_free

    def used(self) -> int:
        """Number of cells in use."""
        return self.num_cells - self._num_free

    def alloc(self, n: int) -> torch.Tensor:
        """Take ``n`` free cells.

        Returns:
            int64 tensor ``[n]`` of distinct cell ids in ``1 .. num_cells``.

        Raises:
            OutOfCells: when ``n > available()``; nothing is allocated.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of cells ({n})")
        if n > self._num_free:
            raise OutOfCells(n, self._num_free)
        ids = self._free_stack[self._num_free - n : self._num_free].clone()
        self._num_free -= n
        self.in_use[ids] = True
        return ids

    def free(self, ids: torch.Tensor) -> None:
        """Give cells back.

        Args:
            ids: integer tensor ``[n]`` (any shape is flattened) of cells currently in use, each at most once.

        Raises:
            InvalidCellFree: on id 0, an id outside ``1 .. num_cells``, an id not in use (double free) or an id
                repeated in ``ids``; nothing is freed.
        """
        ids = ids.reshape(-1).to(device=self.device, dtype=torch.int64)
        if ids.numel() == 0:
            return
        if bool(((ids < 1) | (ids > self.num_cells)).any()):
            bad = ids[(ids < 1) | (ids > self.num_cells)][:5].tolist()
            raise InvalidCellFree(f"cell ids out of range 1..{self.num_cells} (0 is padding): {bad}")
        if not bool(self.in_use[ids].all()):
            bad = ids[~self.in_use[ids]][:5].tolist()
            raise InvalidCellFree(f"double free: cells not in use {bad}")
        self._hits.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        repeated = self._hits[ids] > 1
        self._hits[ids] = 0
        if bool(repeated.any()):
            raise InvalidCellFree(f"cells repeated in one free: {ids[repeated][:5].tolist()}")
        self.in_use[ids] = False
        self._free_stack[self._num_free : self._num_free + ids.numel()] = ids
        self._num_free += ids.numel()

    def check_invariants(self) -> None:
        """Assert that the free stack and the bitmap describe the same partition of ``1 .. num_cells``."""
        free = self._free_stack[: self._num_free]
        assert not bool(self.in_use[0]), "padding cell 0 marked in use"
        assert bool(((free >= 1) & (free <= self.num_cells)).all()), "free list holds an id outside 1..num_cells"
        assert int(self.in_use.sum()) == self.used(), "bitmap count != used()"
        assert not bool(self.in_use[free].any()), "a cell is both free and in use"
        assert int(torch.unique(free).numel()) == free.numel(), "a cell is on the free list twice"
        assert not bool(self._hits.any()), "scratch counter not cleared"
