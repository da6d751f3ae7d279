"""KVzap's radix cache (SGLang's ``RadixCache`` over the cell store) built directly on the real pools, no engine:
sizes in token-equivalents of cells, the match back-off rules, lock transitions, eviction by cells, and a random
operation sequence that keeps SGLang's idle invariant and the store's invariants at every step."""

from __future__ import annotations

import os
import random
from array import array

import pytest
import torch

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

LAYERS, HEADS, DIM, TOKENS, WINDOW = 2, 3, 4, 64, 4
PER_TOKEN = LAYERS * HEADS


@pytest.fixture
def tree():
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    from kvzap_sglang.plugin import runtime
    from kvzap_sglang.plugin.cell_pool import KvzapCellPool, KvzapSlotAllocator
    from kvzap_sglang.plugin.radix_cache import KvzapRadixCache
    from kvzap_sglang.plugin.settings import KVzapSettings
    from kvzap_sglang.surrogate import KVzapConfig, KVzapSurrogate

    pool = KvzapCellPool(TOKENS, page_size=1, dtype=torch.bfloat16, head_num=HEADS, head_dim=DIM, layer_num=LAYERS,
                         device="cpu", enable_memory_saver=False)  # fmt: skip
    allocator = KvzapSlotAllocator(TOKENS, dtype=torch.bfloat16, device="cpu", kvcache=pool, need_sort=False)
    req_pool = ReqToTokenPool(8, 256, "cpu", False)
    surrogate = KVzapSurrogate(KVzapConfig(input_dim=8, output_dim=HEADS, n_modules=LAYERS))
    settings = KVzapSettings(threshold=0.5, surrogate="linear", window=WINDOW, score_decode=True)
    runtime._runtime = runtime.KvzapRuntime(settings=settings, store=pool.store, surrogate=surrogate)
    runtime._runtime.track_windows(req_pool.req_to_token.shape[0])
    cache = KvzapRadixCache(CacheInitParams(disable=False, req_to_token_pool=req_pool,
                                            token_to_kv_pool_allocator=allocator, page_size=1))  # fmt: skip
    yield cache
    runtime.uninstall()


def _key(tokens):
    from sglang.srt.mem_cache.radix_cache import RadixKey

    return RadixKey(array("q", tokens))


def _insert(tree, tokens: list[int]) -> torch.Tensor:
    """A finished request's tokens go into the tree: fresh slots (all cells), the duplicates freed as SGLang does."""
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams

    slots = tree.token_to_kv_pool_allocator.alloc(len(tokens))
    prefix = tree.insert(InsertParams(key=_key(tokens), value=slots)).prefix_len
    tree.token_to_kv_pool_allocator.free(slots[:prefix])
    return slots


def _match(tree, tokens: list[int]):
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams

    return tree.match_prefix(MatchPrefixParams(key=_key(tokens)))


def _idle_invariant(tree) -> None:
    allocator = tree.token_to_kv_pool_allocator
    assert allocator.available_size() + tree.evictable_size() + tree.protected_size() == TOKENS
    assert allocator.verify_byte_accounting() == []
    tree.store.check_invariants()


def test_sizes_count_cells_in_token_equivalents(tree):
    slots = _insert(tree, list(range(100, 110)))
    assert tree.evictable_size() == 10 and tree.protected_size() == 0
    _idle_invariant(tree)
    tree.store.prune_mask(0, slots[:6], torch.tensor([[True, True, False]] * 6))  # 12 cells of 60
    assert tree.evictable_size() == 8  # 48 cells = 8 tokens' worth
    _idle_invariant(tree)  # the 12 freed cells are 2 tokens of admission capacity
    node = _match(tree, list(range(100, 110))).last_device_node
    tree.inc_lock_ref(node)
    assert tree.protected_size() == 8 and tree.evictable_size() == 0
    tree.dec_lock_ref(node)
    assert tree.protected_size() == 0 and tree.evictable_size() == 8
    _idle_invariant(tree)


def test_match_backs_off_before_a_hole_in_the_requests_window(tree):
    tokens = list(range(200, 220))  # 20 cached tokens
    slots = _insert(tree, tokens)
    assert _match(tree, tokens + [1, 2]).device_prefix_len == 20  # intact: all of it
    tree.store.prune(1, slots[17:18], torch.tensor([2]))  # one entry of position 17
    # A 22-token request's window (4) covers positions 18..21: the hole at 17 lies outside it.
    assert _match(tree, tokens + [1, 2]).device_prefix_len == 20
    # A 19-token request has positions 15..18 in its window: back off to the hole at 17.
    assert _match(tree, tokens[:19]).device_prefix_len == 17
    _idle_invariant(tree)


def test_match_backs_off_before_entries_pruned_harder_than_the_requests_tau(tree):
    from kvzap_sglang.plugin import runtime

    rt = runtime.current()
    tokens = list(range(300, 316))
    slots = _insert(tree, tokens)
    tree.store.slot_scores[slots] = 1.0
    tree.store.slot_scores[slots[5], 0, 1] = 0.7  # pruned at τ = 0.8: a request at τ = 0.5 would keep it
    tree.store.prune(0, slots[5:6], torch.tensor([1]))
    rt.highest_decided_tau = 0.8
    assert _match(tree, tokens + [9] * 10).device_prefix_len == 5
    rt.settings = rt.settings.__class__(threshold=0.75, surrogate="linear", window=WINDOW, score_decode=True)
    assert _match(tree, tokens + [9] * 10).device_prefix_len == 16  # τ 0.75: the entry would be pruned anyway


def test_evict_frees_cells_for_the_tokens_asked(tree):
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    a = _insert(tree, list(range(400, 420)))
    _insert(tree, list(range(500, 520)))
    tree.store.prune_mask(0, a, torch.tensor([[True, True, True]] * 20))  # a's leaf holds half its cells
    free_before = tree.store.free_cells()
    evicted = tree.evict(EvictParams(num_tokens=15))
    assert evicted.num_tokens_evicted >= 15
    assert tree.store.free_cells() - free_before >= 15 * PER_TOKEN
    _idle_invariant(tree)


def test_random_operations_keep_every_invariant(tree):
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    rng = random.Random(0)
    families = [[rng.randrange(1000, 2000) for _ in range(30)] for _ in range(4)]
    allocator = tree.token_to_kv_pool_allocator
    for step in range(400):
        op = rng.random()
        if op < 0.5:
            tokens = rng.choice(families)[: rng.randint(1, 30)] + [rng.randrange(3000, 4000) for _ in range(rng.randint(0, 8))]
            if len(tokens) > allocator.available_size():
                tree.evict(EvictParams(num_tokens=len(tokens)))
            if len(tokens) <= allocator.available_size():
                _insert(tree, tokens)
        elif op < 0.8:
            held = (tree.store.slot_group == 1).nonzero().reshape(-1)
            if held.numel():
                pick = held[torch.randperm(held.numel(), generator=torch.Generator().manual_seed(step))[:5]]
                tree.store.prune(rng.randrange(LAYERS), pick, torch.randint(0, HEADS, (pick.numel(),)))
        elif op < 0.9:
            tree.evict(EvictParams(num_tokens=rng.randint(1, 20)))
        else:
            node = _match(tree, rng.choice(families)).last_device_node
            tree.inc_lock_ref(node)
            tree.store.check_invariants()
            tree.dec_lock_ref(node)
        _idle_invariant(tree)
    tree.evict(EvictParams(num_tokens=TOKENS))
    assert tree.store.used_cells() == 0 and allocator.available_size() == TOKENS
