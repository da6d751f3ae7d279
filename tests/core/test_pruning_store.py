"""DMS decisions applied to the store: any split of a sequence frees exactly what ``policy.keep_mask`` drops."""

from __future__ import annotations

import pytest
import torch

from kvzap_sglang.policy import keep_mask, removed_fraction
from kvzap_sglang.storage import CellStore, CellStoreConfig, pad_slot_lists, prune_window_exits, window_exit_positions

L, H, D = 3, 2, 4


def make_store(num_slots: int = 300) -> CellStore:
    cfg = CellStoreConfig(num_slots=num_slots, num_cells=num_slots * L * H, num_layers=L, num_kv_heads=H, head_dim=D)
    return CellStore(cfg)


def held_mask(store: CellStore, slots: torch.Tensor) -> torch.Tensor:
    """bool ``[L, H, T]``: which entries still hold a cell."""
    return (store.slot_to_cell[slots] >= 0).permute(1, 2, 0)


def run_split(store, slot_lists, scores, splits, threshold, window, per_layer):
    """Grow every request by its steps (writing K/V + scores, then pruning), like a server forward by forward.

    scores[b]: ``[T_b, L, H]``; splits[b]: step sizes summing to T_b (requests advance together, step by step).
    """
    token_slots, _ = pad_slot_lists(slot_lists)
    lens = [0] * len(slot_lists)
    freed_total = torch.zeros(len(slot_lists), dtype=torch.int64)
    for step in range(max(len(s) for s in splits)):
        prev = list(lens)
        for b, steps in enumerate(splits):
            if step < len(steps):
                lo, hi = lens[b], lens[b] + steps[step]
                for layer in range(L):
                    store.write(layer, slot_lists[b][lo:hi], torch.randn(hi - lo, H, D), torch.randn(hi - lo, H, D),
                                scores=scores[b][lo:hi, layer])
                lens[b] = hi
        prev_t, new_t = torch.tensor(prev), torch.tensor(lens)
        if per_layer:
            for layer in range(L):
                freed_total += prune_window_exits(store, layer, token_slots, prev_t, new_t, threshold, window)
        else:
            freed_total += prune_window_exits(store, None, token_slots, prev_t, new_t, threshold, window)
        store.check_invariants()
    return freed_total


@pytest.mark.parametrize("per_layer", [True, False])
@pytest.mark.parametrize("window", [0, 4, 100])
def test_any_split_frees_exactly_what_keep_mask_drops(per_layer, window):
    gen = torch.Generator().manual_seed(window)
    store = make_store()
    lengths = [30, 12, 45]
    splits = [[30], [5, 1, 1, 1, 4], [16, 16, 1, 1, 11]]  # prefill, decode-heavy, chunked prefill + decode
    # Disjoint, shuffled slots per request.
    slot_lists = list(torch.split((torch.randperm(300, generator=gen) + 1)[: sum(lengths)], lengths))
    scores = [torch.randn(n, L, H, generator=gen) for n in lengths]
    threshold = 0.0
    freed = run_split(store, slot_lists, scores, splits, threshold, window, per_layer)
    total_dropped = 0
    for b, slots in enumerate(slot_lists):
        expected = keep_mask(scores[b].permute(1, 2, 0), threshold, window)  # [L, H, T]
        assert torch.equal(held_mask(store, slots), expected)
        assert int(freed[b]) == int((~expected).sum())
        assert store.cells_held(slots).sum() == int(expected.sum())
        total_dropped += int((~expected).sum())
        if window >= lengths[b]:
            assert removed_fraction(expected) == 0.0
    assert store.used_cells() == sum(lengths) * L * H - total_dropped
    assert store.entries_pruned == total_dropped


def test_strict_threshold_and_nan_scores_are_kept():
    store = make_store()
    slots = torch.arange(1, 7)
    scores = torch.tensor([-1.0, 0.0, float("nan"), -5.0, 2.0, -3.0])[:, None].expand(6, H)
    for layer in range(L):
        store.write(layer, slots, torch.randn(6, H, D), torch.randn(6, H, D), scores=scores)
    prune_window_exits(store, 1, slots[None], torch.tensor([0]), torch.tensor([6]), threshold=0.0, window=1)
    held = held_mask(store, slots)
    assert held[1, 0].tolist() == [False, True, True, False, True, True]  # last token protected by the window
    assert held[0].all() and held[2].all(), "only the requested layer is decided"


def test_repeating_a_decision_and_pruning_freed_entries_is_harmless():
    store = make_store()
    slots = torch.arange(1, 11)
    for layer in range(L):
        store.write(layer, slots, torch.randn(10, H, D), torch.randn(10, H, D), scores=torch.full((10, H), -9.0))
    args = (slots[None], torch.tensor([0]), torch.tensor([10]), 0.0, 2)
    first = prune_window_exits(store, None, *args)
    assert int(first[0]) == 8 * L * H
    assert int(prune_window_exits(store, None, *args)[0]) == 0, "already freed: nothing freed, no error"
    store.free_slots(slots[:3])  # request partly gone
    assert int(prune_window_exits(store, 0, *args)[0]) == 0
    store.check_invariants()
    assert store.used_cells() == 2 * L * H


def test_a_slot_shared_by_two_requests_is_freed_once_and_counted_once():
    store = make_store()
    shared = torch.arange(1, 6)  # a common 5-token prefix
    rows = [torch.cat([shared, torch.tensor([10, 11])]), torch.cat([shared, torch.tensor([20, 21, 22])])]
    store.write(0, torch.cat([shared, torch.tensor([10, 11, 20, 21, 22])]), torch.randn(10, H, D),
                torch.randn(10, H, D), scores=torch.full((10, H), -1.0))
    token_slots, _ = pad_slot_lists(rows)
    freed = prune_window_exits(store, 0, token_slots, torch.tensor([0, 0]), torch.tensor([7, 8]), 0.0, 2)
    assert freed.tolist() == [5 * H, 1 * H]  # the shared prefix counts for the first request only
    assert store.used_cells() == 4 * H  # slots 10, 11 (request 0) and 21, 22 (request 1) are in their windows
    store.check_invariants()


def test_window_exit_positions_for_a_batch():
    requests, positions = window_exit_positions(torch.tensor([0, 10, 3]), torch.tensor([5, 11, 3]), window=2)
    assert requests.tolist() == [0, 0, 0, 1]
    assert positions.tolist() == [0, 1, 2, 8]
    with pytest.raises(ValueError):
        window_exit_positions(torch.tensor([5]), torch.tensor([4]), window=2)


def test_bad_layer_is_rejected():
    store = make_store()
    with pytest.raises(ValueError, match="layer"):
        prune_window_exits(store, L, torch.ones(1, 3, dtype=torch.int64), torch.tensor([0]), torch.tensor([3]), 0.0, 0)
