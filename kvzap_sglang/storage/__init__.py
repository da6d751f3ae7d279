"""Head-granular KV storage (core, no SGLang): cells freed per (layer, KV head, token) entry.

* ``cell_allocator`` — ids of free/used cells (``CellAllocator``, ``OutOfCells``);
* ``cell_store`` — K/V cells, the slot → cell map and per-entry scores (``CellStore``, ``CellStoreConfig``);
* ``layout`` — per-layer, head-folded attention metadata of a batch (``build_layout``, or its parts ``BatchSlots`` /
  ``layer_cells`` / ``layout_from_cells`` / ``holds_every_entry`` for several layers of one batch;
  ``HeadFoldedLayout``, ``QueryLayout``, ``fold_queries`` for FlashInfer's folded batch);
* ``attention`` — torch attention over that metadata (``attend``);
* ``pruning`` — DMS decisions applied to the store (``prune_window_exits`` for private sequences,
  ``prune_decided`` for the slots a ``WindowTracker`` says are decided now, ``retighten`` to judge decided
  entries again at a higher τ);
* ``windows`` — which slots lie in some live request's window when requests share slots (``WindowTracker``).

One forward, per layer ``l`` (``token_slots = req_to_token[req_pool_indices, :max(seq_lens)]``)::

    store.write(l, out_cache_loc, k, v)                         # or reserve() at slot allocation + write in place
    layout = build_layout(store, l, token_slots, seq_lens)      # kept cells per (request, KV head)
    out = attend(q, store.k_cells, store.v_cells, layout, QueryLayout.for_extend(seq_lens, extend_lens))
    store.set_scores(l, out_cache_loc, surrogate_scores)        # [num_tokens, H]
    prune_window_exits(store, l, token_slots, seq_lens - extend_lens, seq_lens, tau, window)

and ``store.free_slots(slots)`` when slots are released; ``store.token_capacity()`` for admission control.
"""

from kvzap_sglang.storage.cell_allocator import CellAllocator, InvalidCellFree, OutOfCells
from kvzap_sglang.storage.cell_store import NO_CELL, CellStore, CellStoreConfig
from kvzap_sglang.storage.layout import (
    BatchSlots,
    FoldedQueries,
    HeadFoldedLayout,
    QueryLayout,
    build_layout,
    fold_queries,
    holds_every_entry,
    layer_cells,
    layout_from_cells,
    pad_slot_lists,
)
from kvzap_sglang.storage.attention import attend
from kvzap_sglang.storage.pruning import prune_decided, prune_window_exits, retighten, window_exit_positions
from kvzap_sglang.storage.windows import WindowTracker

__all__ = [
    "NO_CELL",
    "BatchSlots",
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
    "holds_every_entry",
    "layer_cells",
    "layout_from_cells",
    "pad_slot_lists",
    "prune_decided",
    "prune_window_exits",
    "retighten",
    "window_exit_positions",
    "WindowTracker",
]
