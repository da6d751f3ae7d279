"""Apply DMS decisions (``kvzap_sglang.policy``) to the cell store: where entries are actually freed.

When a forward grows request ``b`` from ``prev_lens[b]`` to ``new_lens[b]`` tokens, the tokens at positions
``policy.window_exits(prev, new, window)`` leave the protected window and are decided once, with the score stored
when they were written: an entry is freed iff its score is strictly below τ (NaN = no score = kept). Feeding any
split of a sequence (prefill, chunked prefill, decode steps) through this gives ``policy.keep_mask`` of the whole
sequence (tested in tests/core/test_pruning_store.py).
"""

from __future__ import annotations

import torch

from kvzap_sglang.policy import window_exits
from kvzap_sglang.storage.cell_store import CellStore


def window_exit_positions(
    prev_lens: torch.Tensor, new_lens: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions leaving the window, for a batch.

    Args:
        prev_lens, new_lens: integer ``[bs]`` lengths before and after the forward.

    Returns:
        ``(requests, positions)``: int64 ``[n]`` each, the request index and absolute position of every exit.
    """
    exits = [window_exits(int(p), int(n), window) for p, n in zip(prev_lens.tolist(), new_lens.tolist())]
    counts = torch.tensor([len(e) for e in exits], dtype=torch.int64)
    starts = torch.tensor([e.start for e in exits], dtype=torch.int64)
    requests = torch.repeat_interleave(torch.arange(len(exits)), counts)
    offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return requests, starts[requests] + offsets


def prune_window_exits(
    store: CellStore,
    layer: int | None,
    token_slots: torch.Tensor,
    prev_lens: torch.Tensor,
    new_lens: torch.Tensor,
    threshold: float,
    window: int,
) -> torch.Tensor:
    """Free the cells of exiting entries whose stored score is ``< threshold``.

    Args:
        store: the cell store (scores must already be in ``store.slot_scores``).
        layer: the layer to decide, or ``None`` for every layer at once.
        token_slots: integer ``[bs, T]``, ``T >= max(new_lens)``: each request's slot ids by position
            (SGLang: ``req_to_token[req_pool_indices, :T]``).
        prev_lens, new_lens: integer ``[bs]`` request lengths before/after this forward.
        threshold: τ (strict ``<``).
        window: protected recent tokens.

    Returns:
        int64 ``[bs]``: cells freed per request. Entries already freed are skipped, so calling this again for
        the same growth, or on a slot shared by two requests, never frees a cell twice.
    """
    requests, positions = window_exit_positions(prev_lens, new_lens, window)
    requests, positions = requests.to(store.device), positions.to(store.device)
    slots = token_slots.to(device=store.device, dtype=torch.int64)[requests, positions]  # [n]
    freed_per_request = torch.zeros(prev_lens.numel(), dtype=torch.int64, device=store.device)
    if slots.numel() == 0:
        return freed_per_request
    rows, layers, heads, _ = _held_entries_below(store, layer, slots, threshold)
    # Two requests may list the same slot (prefix sharing): count each entry for the first request listing it.
    entry = (slots[rows] * store.config.num_layers + layers) * store.config.num_kv_heads + heads
    _, first = _first_occurrence(entry)
    freed_per_request.index_add_(0, requests[rows[first]], torch.ones_like(first))
    store.prune_entries(slots[rows], layers, heads)
    return freed_per_request


def _first_occurrence(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique values ``[u]`` and the index ``[u]`` of each one's first occurrence in ``values`` ``[n]``."""
    unique, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((unique.numel(),), values.numel(), dtype=torch.int64, device=values.device)
    first.scatter_reduce_(0, inverse, torch.arange(values.numel(), device=values.device), reduce="amin")
    return unique, first


def prune_decided(store: CellStore, layer: int | None, slots: torch.Tensor, threshold: float | torch.Tensor) -> int:
    """Free the cells of ``slots`` ``[n]`` (distinct) whose stored score is ``< threshold`` (one τ, or one per slot
    ``[n]``: multi-tenant), in ``layer`` (or every layer for ``None``); returns the cells freed.

    The shared-prefix counterpart of ``prune_window_exits``: the caller has already worked out which slots are
    decided now (``windows.WindowTracker.advance``: outside every live request's window, not decided before).
    """
    slots = slots.reshape(-1).to(device=store.device, dtype=torch.int64)
    if slots.numel() == 0:
        return 0
    rows, layers, heads, cells = _held_entries_below(store, layer, slots, threshold)
    if rows.numel() == 0:
        return 0
    return store.free_held_entries(slots[rows], layers, heads, cells)  # distinct slots: distinct entries


def _held_entries_below(
    store: CellStore, layer: int | None, slots: torch.Tensor, threshold: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, layers, heads, cells)`` of the entries of ``slots`` ``[n]`` that still hold a cell and score
    ``< threshold`` (one τ, or one per slot ``[n]``) in ``layer`` (every layer for ``None``); ``rows`` index
    ``slots``, ``cells`` are the entries' cells (int64)."""
    if layer is None:
        scores = store.slot_scores.index_select(0, slots)  # [n, L, H]
        cells = store.slot_to_cell.index_select(0, slots)
    else:
        if not 0 <= layer < store.config.num_layers:
            raise ValueError(f"layer must be in 0..{store.config.num_layers - 1}, got {layer}")
        scores = store.slot_scores[:, layer].index_select(0, slots)[:, None]  # [n, 1, H]
        cells = store.slot_to_cell[:, layer].index_select(0, slots)[:, None]
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.reshape(-1, 1, 1).to(device=store.device, dtype=scores.dtype)
    rows, layer_idx, heads = ((scores < threshold) & (cells >= 0)).nonzero(as_tuple=True)  # [n, L', H] mask
    if rows.numel() == 0:  # the common case of a decode step: nothing of this layer to free
        return rows, rows, rows, rows
    layers = layer_idx if layer is None else torch.full_like(layer_idx, layer)
    return rows, layers, heads, cells[rows, layer_idx, heads].to(torch.int64)


def retighten(
    store: CellStore, slots: torch.Tensor, cells_needed: int, tau_from: float, tau_max: float
) -> tuple[float, int]:
    """Judge the decided ``slots`` ``[n]`` again at the lowest τ' in ``[tau_from, tau_max]`` that frees at least
    ``cells_needed`` of their cells (``tau_max`` when even that falls short), and free them.

    The tighten-before-queueing policy of a tenant at its KV budget: the per-entry scores are kept, so entries that
    were kept at a lower τ can be judged again without scoring anything; an entry freed here is one the tenant
    would have dropped had it run at τ' all along. ``slot_decided`` rises to τ' (the prefix cache's back-off reads
    it through the scores: a request below τ' recomputes the entries freed here). Returns ``(τ', cells freed)``.
    """
    if tau_from > tau_max:
        raise ValueError(f"tau_from ({tau_from}) must not exceed tau_max ({tau_max})")
    slots = slots.reshape(-1).to(device=store.device, dtype=torch.int64)
    if slots.numel() == 0:
        return tau_from, 0
    scores = store.slot_scores.index_select(0, slots)
    held = (store.slot_to_cell.index_select(0, slots) >= 0) & ~torch.isnan(scores)
    candidates = torch.sort(scores[held & (scores < tau_max)]).values
    tau = tau_from
    if cells_needed > candidates.numel():
        tau = tau_max
    elif cells_needed > 0:
        # The smallest float above the k-th lowest score frees it (strict <) and every score below it.
        kth = candidates[cells_needed - 1]
        tau = max(tau_from, min(float(torch.nextafter(kth, kth.new_tensor(float("inf")))), tau_max))
    freed = prune_decided(store, None, slots, tau)
    decided = store.slot_decided.index_select(0, slots)
    store.slot_decided[slots] = torch.clamp(decided, min=tau)
    return tau, freed
