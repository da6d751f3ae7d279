"""KVzap's SGLang pool and slot allocator on the cell store, built directly (no engine): capacity accounting,
cell reservation, per-entry frees and full release."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

LAYERS, HEADS, DIM, TOKENS = 2, 3, 4, 8  # capacity of 8 tokens = 48 cells, 32 virtual slots


@pytest.fixture
def pool_and_allocator():
    from kvzap_sglang.plugin.cell_pool import SLOTS_PER_TOKEN, KvzapCellPool, KvzapSlotAllocator

    pool = KvzapCellPool(TOKENS, page_size=1, dtype=torch.bfloat16, head_num=HEADS, head_dim=DIM, layer_num=LAYERS,
                         device="cpu", enable_memory_saver=False)  # fmt: skip
    allocator = KvzapSlotAllocator(TOKENS, dtype=torch.bfloat16, device="cpu", kvcache=pool, need_sort=False)
    assert pool.store.config.num_slots == TOKENS * SLOTS_PER_TOKEN
    return pool, allocator


class _Layer:
    def __init__(self, layer_id):
        self.layer_id = layer_id


def test_fresh_allocator_reports_the_token_capacity(pool_and_allocator):
    pool, allocator = pool_and_allocator
    assert allocator.size == TOKENS
    assert allocator.available_size() == TOKENS  # SGLang's idle invariant: available == total
    assert pool.store.config.num_cells == TOKENS * LAYERS * HEADS


def test_alloc_reserves_every_cell_and_refuses_beyond_capacity(pool_and_allocator):
    pool, allocator = pool_and_allocator
    slots = allocator.alloc(5)
    assert slots.numel() == 5 and bool((slots >= 1).all())
    assert pool.store.used_cells() == 5 * LAYERS * HEADS
    assert allocator.available_size() == TOKENS - 5
    assert allocator.alloc(4) is None  # only 3 tokens' worth of cells left
    assert pool.store.used_cells() == 5 * LAYERS * HEADS  # a refused alloc takes nothing
    pool.store.check_invariants()


def test_pruned_entries_become_admission_capacity(pool_and_allocator):
    pool, allocator = pool_and_allocator
    slots = allocator.alloc(TOKENS)
    assert allocator.available_size() == 0
    # Drop KV head 0 and 1 of both layers for 6 tokens: 24 cells = 4 token-equivalents.
    drop = torch.zeros(TOKENS, HEADS, dtype=torch.bool)
    drop[:6, :2] = True
    for layer in range(LAYERS):
        pool.store.prune_mask(layer, slots, drop)
    assert allocator.available_size() == 4
    more = allocator.alloc(4)
    assert more is not None and not set(more.tolist()) & set(slots.tolist())
    pool.store.check_invariants()
    allocator.free(torch.cat([slots, more]))
    assert pool.store.used_cells() == 0 and allocator.available_size() == TOKENS
    pool.store.check_invariants()


def test_set_kv_buffer_writes_cells_in_place(pool_and_allocator):
    pool, allocator = pool_and_allocator
    slots = allocator.alloc(2)
    used = pool.store.used_cells()
    k = torch.arange(2 * HEADS * DIM, dtype=torch.float32).view(2, HEADS * DIM)
    pool.set_kv_buffer(_Layer(1), slots, k, -k)
    assert pool.store.used_cells() == used  # reserved cells are overwritten, none allocated
    keys, values, held = pool.store.read(1, slots)
    assert bool(held.all())
    assert torch.equal(keys.float(), k.view(2, HEADS, DIM)) and torch.equal(values.float(), -k.view(2, HEADS, DIM))
    with pytest.raises(RuntimeError, match="cells"):
        pool.get_key_buffer(0)


def test_grouped_frees_release_cells_once_and_clear_releases_all(pool_and_allocator):
    pool, allocator = pool_and_allocator
    first, second = allocator.alloc(3), allocator.alloc(2)
    allocator.free_group_begin()
    allocator.free(first)
    allocator.free(second)
    assert pool.store.used_cells() == 5 * LAYERS * HEADS  # deferred until the group ends
    allocator.free_group_end()
    assert pool.store.used_cells() == 0
    allocator.alloc(4)
    allocator.clear()
    assert pool.store.used_cells() == 0 and allocator.available_size() == TOKENS
    pool.store.check_invariants()
