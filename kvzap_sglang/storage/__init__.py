"""Head-granular KV storage (core, no SGLang): cells freed per (layer, KV head, token) entry.

* ``cell_allocator`` — ids of free/used cells (``CellAllocator``, ``OutOfCells``);
* ``cell_store`` — K/V cells, the slot → cell map and per-entry scores (``CellStore``, ``CellStoreConfig``);
* ``layout`` — per-layer, head-folded attention metadata of a batch (``build_layout``, ``HeadFoldedLayout``,
  ``QueryLayout``, ``fold_queries`` for FlashInfer's folded batch);
* ``attention`` — torch attention over that metadata (``attend``);
* ``pruning`` — DMS decisions applied to the store (``prune_window_exits``).
"""

from kvzap_sglang.storage.cell_allocator import CellAllocator, InvalidCellFree, OutOfCells
from kvzap_sglang.storage.cell_store import NO_CELL, CellStore, CellStoreConfig
from kvzap_sglang.storage.layout import (
    FoldedQueries,
    HeadFoldedLayout,
    QueryLayout,
    build_layout,
    fold_queries,
    pad_slot_lists,
)
from kvzap_sglang.storage.attention import attend
from kvzap_sglang.storage.pruning import prune_window_exits, window_exit_positions

__all__ = [
    "NO_CELL",
    "CellAllocator",
    "CellStore",
    "CellStoreConfig",
    "FoldedQueries",
    "HeadFoldedLayout",
    "InvalidCellFree",
    "OutOfCells",
    "QueryLayout",
    "attend",
    "build_layout",
    "fold_queries",
    "pad_slot_lists",
    "prune_window_exits",
    "window_exit_positions",
]
