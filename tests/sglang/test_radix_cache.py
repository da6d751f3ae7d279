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


def _insert(tree, tokens: list[int], tenant: int | None = None) -> torch.Tensor:
    """A finished request's tokens go into the tree: fresh slots (all cells), the duplicates freed as SGLang does;
    the new ones tagged with ``tenant`` if given."""
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams

    slots = tree.token_to_kv_pool_allocator.alloc(len(tokens))
    prefix = tree.insert(InsertParams(key=_key(tokens), value=slots)).prefix_len
    tree.token_to_kv_pool_allocator.free(slots[:prefix])
    if tenant is not None:
        tree.store.set_tenant(slots[prefix:], tenant)
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


def test_the_deep_idle_check_reports_a_leaked_tree_lock(tree):
    """A lock left on a cached prefix at idle pins its cells for ever while every sum still balances (the locked cells
    count as protected); with ``KVZAP_CHECK_INVARIANTS=1`` (the stress tests' servers) the idle check names it."""
    allocator = tree.token_to_kv_pool_allocator
    allocator.deep_checks = True
    _insert(tree, list(range(100, 110)))
    node = _match(tree, list(range(100, 110))).last_device_node
    tree.inc_lock_ref(node)
    assert allocator.available_size() + tree.evictable_size() + tree.protected_size() == TOKENS
    problems = allocator.verify_byte_accounting()
    assert problems == ["KVzap store invariant: 10 cached slots still locked at idle (a leaked tree lock)"]
    tree.dec_lock_ref(node)
    allocator._changes += 1  # the check reruns only after the store changed
    assert allocator.verify_byte_accounting() == []


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


def test_evicting_for_a_tenant_takes_its_leaves_and_the_unused_continuations_on_its_paths_only(tree):
    """Tenant 1 cached a document; tenant 2 (same prefix-cache group) cached three continuations of it, branching at
    two depths; tenants 2 and 3 cached documents of their own. Evicting for tenant 1 frees its document and the
    continuations on top of it (it is no leaf while they stay), counts only tenant 1's cells, and leaves the rest."""
    document = list(range(100, 110))
    _insert(tree, document, tenant=1)
    for branch in ([200, 201, 202, 203], [200, 201, 300, 301], [400, 401]):
        _insert(tree, document + branch, tenant=2)
    _insert(tree, list(range(500, 510)), tenant=2)
    _insert(tree, list(range(600, 610)), tenant=3)
    _idle_invariant(tree)
    held = [int(tree.store.tenant.cells[t]) for t in range(4)]
    assert held[1:] == [10 * PER_TOKEN, (4 + 2 + 2 + 10) * PER_TOKEN, 10 * PER_TOKEN]

    assert tree.evict_tenant(1, 10**9) == 10 * PER_TOKEN
    assert _match(tree, document).device_prefix_len == 0
    assert [_match(tree, document + b).device_prefix_len for b in ([200], [400])] == [0, 0]
    assert _match(tree, list(range(500, 510))).device_prefix_len == 10
    assert _match(tree, list(range(600, 610))).device_prefix_len == 10
    assert [int(tree.store.tenant.cells[t]) for t in (1, 2, 3)] == [0, 10 * PER_TOKEN, 10 * PER_TOKEN]
    assert tree.evict_tenant(1, PER_TOKEN) == 0  # nothing of tenant 1's is left
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


def _admit_and_allocate(tree) -> None:
    """SGLang admits up to ``available_size + evictable_size`` tokens (``PrefillBudget``) and allocates them with
    ``alloc_token_slots`` (evicts the shortfall, then ``alloc``; raises "Out of memory" when that fails, which
    kills the scheduler): the whole admission figure must be allocatable, and handing it back restores it."""
    from sglang.srt.mem_cache.allocation import alloc_token_slots
    from sglang.srt.mem_cache.prefill_budget import PrefillBudget

    allocator = tree.token_to_kv_pool_allocator
    admitted = PrefillBudget(allocator, tree).remaining_total
    assert 0 <= allocator.available_size() <= tree.store.free_cells() // PER_TOKEN
    if admitted == 0:
        return
    slots = alloc_token_slots(tree, admitted)
    assert slots.numel() == admitted
    allocator.free(slots)
    tree.store.check_invariants()


def test_the_admission_figure_is_allocatable_when_slots_run_short(tree):
    """Live requests lock heavily pruned prefixes (many slots, few cells): slots, not cells, bound what fits.
    An evictable cached prefix's slots must not be counted twice (once in available_size, once in evictable_size)."""
    allocator, store = tree.token_to_kv_pool_allocator, tree.store
    locked = []
    for base, n in ((100, 64), (200, 64), (300, 64), (400, 62)):  # 254 of the 256 virtual slots, every entry pruned
        tokens = list(range(base, base + n))
        slots = _insert(tree, tokens)
        node = _match(tree, tokens).last_device_node
        tree.inc_lock_ref(node)
        locked.append(node)
        store.prune_mask(0, slots, torch.ones(n, HEADS, dtype=torch.bool))
        store.prune_mask(1, slots, torch.ones(n, HEADS, dtype=torch.bool))
    _insert(tree, [900, 901])  # one evictable cached prefix, intact: 2 slots, 12 cells
    assert allocator.free_slot_count() == 0 and tree.evictable_size() == 2
    assert allocator.available_size() + tree.evictable_size() == 2  # the 2 slots, once
    _admit_and_allocate(tree)
    for node in locked:
        tree.dec_lock_ref(node)
    _idle_invariant(tree)


def test_the_admission_figure_is_allocatable_at_the_rounding_edge(tree):
    """Cells of running requests freed by pruning and an evictable prefix's cells that are not a multiple of a
    token's: rounding the evictable size up must not promise a token that is not there."""
    allocator, store = tree.token_to_kv_pool_allocator, tree.store
    live = allocator.alloc(TOKENS - 1)  # running requests: every token but one
    cached = _insert(tree, [900])  # the last token's cells, cached and evictable
    store.prune_mask(0, live[:1], torch.tensor([[True, True, False]]))  # pruning frees 2 live cells
    store.prune_mask(0, cached, torch.tensor([[True, True, True]]))
    store.prune_mask(1, cached, torch.tensor([[True, False, False]]))  # the cached token keeps 2 cells
    assert store.free_cells() == 6 and store.group_cells[1] == 2
    _admit_and_allocate(tree)  # 8 cells: one token, not two
    allocator.free(live)
    _idle_invariant(tree)


def test_random_pressure_never_admits_more_than_fits(tree):
    """Random live requests (locked prefixes of random tokens) and pruning at random rates, the admission figure
    checked after every step; at the end everything comes back."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    rng = random.Random(1)
    allocator, store = tree.token_to_kv_pool_allocator, tree.store
    live: list = []
    for step in range(300):
        op = rng.random()
        if op < 0.45:
            tokens = [rng.randrange(1000, 1100) for _ in range(rng.randint(1, 40))]
            if len(tokens) > allocator.available_size():
                tree.evict(EvictParams(num_tokens=len(tokens) - allocator.available_size()))
            if len(tokens) <= allocator.available_size():
                slots = _insert(tree, tokens)
                rate = rng.choice([0.0, 0.5, 0.9, 1.0])
                for layer in range(LAYERS):
                    mask = torch.rand(len(tokens), HEADS, generator=torch.Generator().manual_seed(step * 7 + layer))
                    store.prune_mask(layer, slots, mask < rate)
                node = _match(tree, tokens).last_device_node
                tree.inc_lock_ref(node)
                live.append(node)
        elif op < 0.75 and live:
            tree.dec_lock_ref(live.pop(rng.randrange(len(live))))
        elif op < 0.85:
            tree.evict(EvictParams(num_tokens=rng.randint(1, 20)))
        _admit_and_allocate(tree)
    for node in live:
        tree.dec_lock_ref(node)
    _idle_invariant(tree)


def _tightenable_tenant(tree):
    """The runtime with one tenant at τ 0 that may tighten up to τ 2, and 10 fresh slots scoring 1 (kept at τ 0,
    freed by a tightening to τ 2)."""
    from kvzap_sglang.plugin import runtime
    from kvzap_sglang.plugin.tenants import TenantTable

    rt = runtime.current()
    rt.tenants = TenantTable(names=["default"], thresholds=[0.0], windows=[WINDOW], budget_cells=[None],
                             row_tenant=torch.zeros(8, dtype=torch.int64), base_thresholds=[0.0],
                             ranges=[(0.0, 2.0)], entries_reserved=[0], entries_pruned=[0], queued=[0], running=[0],
                             held_back=[0], refused=[0], tightenings=[0], entries_pruned_tightening=[0])  # fmt: skip
    slots = tree.token_to_kv_pool_allocator.alloc(10)
    tree.store.slot_scores[slots] = 1.0
    return rt, tree.store, slots


def test_tightening_leaves_a_reused_prefix_inside_a_live_window_alone(tree):
    """A slot decided (kept) by one request comes back into the window of a later request that reuses the prefix:
    tighten-before-queueing judges decided entries again, but never those a live window protects."""
    rt, store, slots = _tightenable_tenant(tree)
    # Request A (row 0), 10 tokens: positions 0..5 leave its window and are decided at τ 0 (all kept).
    store.slot_decided[rt.windows.advance(torch.tensor([0]), slots[None], torch.tensor([10]))] = 0.0
    rt.windows.release(0, slots)
    # Request B (row 1) reuses positions 0..5 and adds one token: its window covers positions 3..6.
    b_slots = torch.cat([slots[:6], tree.token_to_kv_pool_allocator.alloc(1)])
    rt.windows.advance(torch.tensor([1]), b_slots[None], torch.tensor([7]))
    freed = rt.tighten_tenant(0, 10_000)
    assert freed == 3 * PER_TOKEN  # positions 0..2 only
    assert store.slot_cells[b_slots[:3]].tolist() == [0, 0, 0]
    assert store.slot_cells[b_slots[3:]].tolist() == [PER_TOKEN] * 4  # B's window: intact
    rt.windows.release(1, b_slots)
    rt.tenants = None
    tree.token_to_kv_pool_allocator.free(torch.cat([slots, b_slots[6:]]))
    store.check_invariants()


def test_tightening_leaves_the_prefixes_counted_as_reused_alone(tree):
    """Admission counts a waiting request's cached prefix as reused (not new cells) and then may tighten its tenant:
    judging that prefix again would punch holes its match backs off at, and the tokens after them would be
    prefilled uncounted. The slots passed as ``keep`` are not judged again."""
    rt, store, slots = _tightenable_tenant(tree)
    store.slot_decided[rt.windows.advance(torch.tensor([0]), slots[None], torch.tensor([10]))] = 0.0
    rt.windows.release(0, slots)  # positions 0..5 decided (kept), the request gone: nothing protects them
    freed = rt.tighten_tenant(0, 10_000, keep=slots[:4])
    assert freed == 2 * PER_TOKEN  # positions 4 and 5 only
    assert store.slot_cells[slots[:4]].tolist() == [PER_TOKEN] * 4
    assert store.slot_cells[slots[4:6]].tolist() == [0, 0]
    rt.tenants = None
    tree.token_to_kv_pool_allocator.free(slots)
    store.check_invariants()

