"""CellStore: writes, in-place rewrites, per-entry prunes, slot frees, accounting and the map invariant."""

from __future__ import annotations

import pytest
import torch

from kvzap_sglang.storage import NO_CELL, CellStore, CellStoreConfig, InvalidCellFree, OutOfCells, prune_decided

L, H, D = 3, 2, 4


def make_store(num_cells: int = 100, num_slots: int = 20, dtype=torch.float32) -> CellStore:
    return CellStore(
        CellStoreConfig(
            num_slots=num_slots, num_cells=num_cells, num_layers=L, num_kv_heads=H, head_dim=D, dtype=dtype
        )
    )


def kv(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, H, D, generator=gen), torch.randn(n, H, D, generator=gen)


def slots(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_then_read_returns_the_values(dtype):
    store = make_store(dtype=dtype)
    k, v = kv(3)
    store.write(1, slots(4, 2, 9), k, v, scores=torch.arange(6.0).reshape(3, 2))
    rk, rv, held = store.read(1, slots(4, 2, 9))
    assert held.all()
    torch.testing.assert_close(rk, k.to(dtype))
    torch.testing.assert_close(rv, v.to(dtype))
    assert store.used_cells() == 3 * H
    assert store.slot_scores[slots(4, 2, 9), 1].flatten().tolist() == list(range(6))
    assert not store.read(0, slots(4))[2].any(), "other layers untouched"
    store.check_invariants()


def test_padding_slot_zero_writes_to_the_padding_cell_without_allocating():
    store = make_store()
    k, v = kv(3)
    store.write(0, slots(0, 5, 0), k, v)
    assert store.used_cells() == H
    assert (store.slot_to_cell[0] == NO_CELL).all()
    assert store.cells_held(slots(0, 5)).tolist() == [0, H]
    store.check_invariants()


def test_padding_slot_in_a_write_whose_entries_are_all_held_allocates_nothing_and_gets_no_score():
    store = make_store()
    store.reserve(slots(5))
    cells = store.slot_to_cell[5, 1].clone()
    k, v = kv(3, seed=3)
    store.write(1, slots(0, 5, 0), k, v, scores=torch.tensor([[7.0, 7.0], [1.0, 2.0], [8.0, 8.0]]))
    assert store.used_cells() == L * H, "reserved cells reused, none allocated"
    assert torch.equal(store.slot_to_cell[5, 1], cells)
    torch.testing.assert_close(store.read(1, slots(5))[0][0], k[1])
    assert store.slot_scores[5, 1].tolist() == [1.0, 2.0]
    assert store.slot_scores[0].isnan().all(), "padding slot gets no score"
    store.check_invariants()


def test_rewrite_overwrites_in_place_and_refills_only_pruned_heads():
    store = make_store()
    k, v = kv(2, seed=1)
    store.write(2, slots(3, 4), k, v)
    cells_before = store.slot_to_cell[slots(3, 4), 2].clone()
    k2, v2 = kv(2, seed=2)
    store.write(2, slots(3, 4), k2, v2)
    assert torch.equal(store.slot_to_cell[slots(3, 4), 2], cells_before), "same cells reused"
    assert store.used_cells() == 2 * H
    torch.testing.assert_close(store.read(2, slots(3, 4))[0], k2)
    assert store.prune(2, slots(3), torch.tensor([1])) == 1
    store.write(2, slots(3, 4), k, v)
    assert store.used_cells() == 2 * H and store.cells_held(slots(3, 4)).tolist() == [H, H]
    torch.testing.assert_close(store.read(2, slots(3, 4))[1], v)
    store.check_invariants()


def test_write_without_scores_resets_stale_scores_to_nan():
    store = make_store()
    k, v = kv(1)
    store.write(0, slots(1), k, v, scores=torch.zeros(1, H))
    store.write(0, slots(1), k, v)
    assert store.slot_scores[1, 0].isnan().all()
    store.set_scores(0, slots(1, 0), torch.tensor([[1.0, 2.0], [5.0, 5.0]]))
    assert store.slot_scores[1, 0].tolist() == [1.0, 2.0]
    assert store.slot_scores[0].isnan().all(), "padding slot gets no score"


def test_out_of_cells_on_write_changes_nothing():
    store = make_store(num_cells=5)
    k, v = kv(3)
    store.write(0, slots(1, 2), k[:2], v[:2])
    map_before, k_before = store.slot_to_cell.clone(), store.k_cells.clone()
    with pytest.raises(OutOfCells):
        store.write(1, slots(1), k[:1], v[:1])  # needs 2 cells, 1 free
    assert torch.equal(store.slot_to_cell, map_before) and torch.equal(store.k_cells, k_before)
    assert store.used_cells() == 4
    store.check_invariants()


def test_duplicate_slot_in_one_write_is_rejected_before_any_change():
    store = make_store()
    k, v = kv(2)
    with pytest.raises(ValueError, match="same slot twice"):
        store.write(0, slots(3, 3), k, v)
    assert store.used_cells() == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.write(L, slots(1), *kv(1)),
        lambda s: s.write(0, slots(21), *kv(1)),
        lambda s: s.write(0, slots(-1), *kv(1)),
        lambda s: s.prune(0, slots(1), torch.tensor([H])),
        lambda s: s.prune(0, slots(1, 2), torch.tensor([0])),
        lambda s: s.prune_entries(slots(1), torch.tensor([L]), torch.tensor([0])),
        lambda s: s.free_slots(slots(99)),
        lambda s: s.write(0, slots(1, 2), *kv(1)),
        lambda s: s.write(0, slots(1, 2), *kv(2), scores=torch.zeros(3)),  # checked before any cell is handed out
    ],
)
def test_invalid_arguments_raise_value_error(call):
    store = make_store()
    with pytest.raises(ValueError):
        call(store)
    assert store.used_cells() == 0


def test_scores_are_kept_in_float32_whatever_the_kv_dtype_so_tau_is_not_rounded():
    store = make_store(dtype=torch.bfloat16)
    store.write(0, slots(1), *kv(1), scores=torch.tensor([[-4.3125, -4.29]]))  # -4.3 in bf16 is -4.3125
    assert store.slot_scores.dtype == torch.float32
    freed = prune_decided(store, 0, slots(1), -4.3)
    assert freed == 1 and store.read(0, slots(1))[2].tolist() == [[False, True]]


def test_config_rejects_unequal_head_dims_and_empty_sizes():
    with pytest.raises(ValueError, match="v_head_dim"):
        CellStoreConfig(num_slots=4, num_cells=4, num_layers=1, num_kv_heads=1, head_dim=8, v_head_dim=4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        CellStoreConfig(num_slots=4, num_cells=4, num_layers=1, num_kv_heads=0, head_dim=8)


def test_prune_frees_single_entries_tolerates_repeats_and_already_pruned():
    store = make_store()
    store.write(0, slots(1, 2, 3), *kv(3))
    store.write(1, slots(1, 2, 3), *kv(3))
    # (1, h0) twice, (2, h1) once, padding slot 0 ignored
    assert store.prune(0, slots(1, 1, 2, 0), torch.tensor([0, 0, 1, 0])) == 2
    assert store.prune(0, slots(1, 2), torch.tensor([0, 1])) == 0, "already pruned: nothing freed"
    assert store.used_cells() == 6 * H - 2
    assert store.slot_to_cell[1, 0].tolist() == [NO_CELL, store.slot_to_cell[1, 0, 1].item()]
    assert store.cells_held(slots(1, 2, 3)).tolist() == [2 * H - 1, 2 * H - 1, 2 * H]
    assert store.entries_pruned == 2 and store.entries_allocated == 6 * H
    store.check_invariants()


def test_prune_mask_and_prune_entries_across_layers():
    store = make_store()
    for layer in range(L):
        store.write(layer, slots(5, 6), *kv(2, seed=layer))
    drop = torch.tensor([[True, False], [True, True]])
    assert store.prune_mask(2, slots(5, 6), drop) == 3
    assert store.prune_entries(slots(5, 6, 6), torch.tensor([0, 1, 1]), torch.tensor([1, 0, 0])) == 2
    assert store.used_cells() == L * 2 * H - 5
    store.check_invariants()


def test_free_held_entries_refuses_a_repeated_or_stale_cell_and_changes_nothing():
    store = make_store()
    store.write(0, slots(1, 2), *kv(2))
    cell = store.slot_to_cell[1, 0, 0].to(torch.int64)
    map_before = store.slot_to_cell.clone()
    one = torch.tensor([0])
    with pytest.raises(InvalidCellFree, match="repeated"):
        store.free_held_entries(slots(1, 1), one.repeat(2), one.repeat(2), cell.repeat(2))
    assert torch.equal(store.slot_to_cell, map_before) and store.used_cells() == 2 * H
    assert store.free_held_entries(slots(1), one, one, cell.reshape(1)) == 1
    with pytest.raises(InvalidCellFree, match="double free"):
        store.free_held_entries(slots(1), one, one, cell.reshape(1))
    assert store.used_cells() == 2 * H - 1 and store.entries_pruned == 1
    store.check_invariants()


def test_free_slots_releases_every_remaining_cell_and_is_idempotent():
    store = make_store()
    for layer in range(L):
        store.write(layer, slots(1, 2, 3), *kv(3, seed=layer), scores=torch.zeros(3, H))
    store.prune(1, slots(2), torch.tensor([0]))
    assert store.free_slots(slots(2, 2, 0)) == L * H - 1
    assert store.free_slots(slots(2)) == 0, "second free of an empty slot is a no-op"
    assert store.used_cells() == 2 * L * H
    assert (store.slot_to_cell[2] == NO_CELL).all() and store.slot_scores[2].isnan().all()
    assert store.free_slots(slots(1, 3)) == 2 * L * H
    assert store.used_cells() == 0
    store.check_invariants()


def test_reserve_gives_every_entry_a_cell_then_write_is_in_place():
    store = make_store(num_cells=40)
    store.write(1, slots(2), *kv(1))
    held_before = store.slot_to_cell[2, 1].clone()
    assert store.reserve(slots(2, 3, 0, 3)) == 2 * L * H - H  # slot 2 layer 1 already held its cells
    assert torch.equal(store.slot_to_cell[2, 1], held_before)
    assert store.cells_held(slots(2, 3)).tolist() == [L * H, L * H]
    used = store.used_cells()
    store.write(0, slots(2, 3), *kv(2))
    assert store.used_cells() == used, "write after reserve allocates nothing"
    store.check_invariants()
    assert store.reserve(slots(4, 5, 6)) == 3 * L * H  # 30 of 40 cells in use now
    map_before = store.slot_to_cell.clone()
    with pytest.raises(OutOfCells):
        store.reserve(slots(7, 8))  # needs 12 cells, 10 free
    assert torch.equal(store.slot_to_cell, map_before) and store.used_cells() == 30
    store.check_invariants()
    assert store.free_slots(torch.arange(0, 21)) == store.entries_allocated


def test_token_capacity_counts_full_tokens_of_free_cells():
    store = make_store(num_cells=20)
    assert store.token_capacity() == 20 // (L * H)
    for layer in range(L):
        store.write(layer, slots(1), *kv(1))
    assert store.token_capacity() == (20 - L * H) // (L * H)
    store.prune(0, slots(1, 1), torch.tensor([0, 1]))
    assert store.free_cells() == 20 - L * H + 2
    assert store.config.kv_bytes == 2 * 21 * D * 4


def test_check_invariants_detects_a_leak_and_a_shared_cell():
    store = make_store()
    store.write(0, slots(1, 2), *kv(2))
    store.slot_to_cell[1, 0, 0] = NO_CELL  # cell still in use, no longer referenced: a leak
    with pytest.raises(AssertionError, match="leak"):
        store.check_invariants()
    store = make_store()
    store.write(0, slots(1, 2), *kv(2))
    store.slot_to_cell[2, 0, 0] = store.slot_to_cell[1, 0, 0]  # two entries on one cell
    with pytest.raises(AssertionError):
        store.check_invariants()
