"""Prefix sharing of pruned KV: SGLang's radix tree over the head-granular cell store (issue #4).

Registered as radix-cache backend ``kvzap`` (``register_radix_cache_backend``); ``--kvzap-threshold`` selects it, so
the radix cache stays on with KVzap. It is SGLang's ``RadixCache`` (tree, locking, LRU/LFU/... eviction policies,
events) with four changes:

* **Cells, not tokens.** Tree nodes hold token slots whose entries KVzap prunes; a pruned entry is released once,
  and every request that reuses the prefix reads the same kept cells. The store tags the slots the tree holds
  (``EVICTABLE`` / ``PROTECTED``) and counts their cells as pruning frees them, and ``evictable_size`` /
  ``protected_size`` report those cells in token-equivalents (``ceil(cells / (layers · kv_heads))``, evictable capped
  at what eviction can make allocatable), the unit of the allocator's ``available_size``. So SGLang's idle invariant
  ``available + evictable + protected == total`` holds exactly, ``available + evictable`` (its admission figure) is
  never more than can be allocated, and ``evict(n)`` frees at least ``n`` tokens' worth of cells.
* **Matches that keep answers right** (``match_prefix`` backs off to a shorter prefix):
  1. the part of the match that falls in the request's own window (its last ``window`` tokens) must be intact —
     those entries would still be kept had the request computed them itself;
  2. no entry of the match may have been pruned with a score ``>= τ`` of the request (it was pruned at a higher
     τ than this request allows; with one server-wide τ this only matters after τ is lowered live).
  The backed-off tail is recomputed by the request.
* **Inserts never swap a request's copy for a worse one.** ``checkpoint`` inserts a request's tokens only up to the
  first position where the tree already holds a *different* slot with fewer cells (the request recomputed it
  after a back-off); the rest stays the request's own and is freed when it finishes.
* **Window references follow slot swaps** (``WindowTracker.retarget``) when an insert repoints a request's row
  onto the tree's copy.
* **Tenant namespaces** (``--kvzap-tenants``): a request's ``extra_key`` names its tenant, so tenants never share
  cached prefixes; tenants of one ``prefix_cache_group`` do — every key reaching the tree is mapped to the group's
  namespace (``tenants.cache_namespace``) in the two helpers all lookups and inserts go through. The cells of a
  shared node count against the tenant whose request wrote them (the budgets' "share of the prefix cache").
"""

from __future__ import annotations

import heapq
import logging
import time

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult, MatchPrefixParams, MatchResult
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from kvzap_sglang.plugin import runtime
from kvzap_sglang.plugin.cell_pool import EVICTABLE, PROTECTED, KvzapSlotAllocator
from kvzap_sglang.tenants import cache_namespace

logger = logging.getLogger(__name__)

BACKEND_NAME = "kvzap"


class KvzapRadixCache(RadixCache):
    def __init__(self, params: CacheInitParams) -> None:
        allocator = params.token_to_kv_pool_allocator
        if not isinstance(allocator, KvzapSlotAllocator):
            raise RuntimeError("--radix-cache-backend kvzap needs KVzap's cell pool (start with --kvzap-threshold)")
        if params.page_size != 1:
            raise RuntimeError("--radix-cache-backend kvzap needs --page-size 1")
        self.store = allocator.store
        self.entries_per_token = self.store.config.entries_per_token
        self._raw_match = False
        self._groups: dict[str, str] | None = None  # tenant → prefix-cache group, read once from the settings
        super().__init__(params)
        allocator.slot_reclaimer = self.evict_slots
        logger.info("KVzap radix cache: prefix sharing of pruned KV on")

    # ------------------------------------------------------------------ sizes (token-equivalents of cells)

    def evictable_size(self) -> int:
        return self.token_to_kv_pool_allocator.evictable_tokens()

    def protected_size(self) -> int:
        return -(-self.store.group_cells[PROTECTED] // self.entries_per_token)

    # ------------------------------------------------------------------ matching with back-off

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        result = super().match_prefix(params)
        if self._raw_match or result.device_prefix_len == 0:
            return result
        rt = runtime.current()
        if rt is None:
            return result
        path = self.path_device_indices(result.last_device_node)
        request_len = len(params.key)
        if params.req is not None:
            request_len = max(request_len, len(params.req.origin_input_ids) + len(params.req.output_ids))
        window = rt.settings.window
        if rt.tenants is not None and params.req is not None:
            window = rt.tenants.windows[rt.tenants.index_of_request(params.req)]
        usable = self.usable_prefix_len(path, request_len, window, rt.tenant_threshold(params.req))
        if usable == len(path):
            return result
        if usable == 0:
            return self._empty_match_result
        return super().match_prefix(MatchPrefixParams(key=params.key[:usable], cow_mamba=params.cow_mamba, req=params.req))

    def usable_prefix_len(self, path: torch.Tensor, request_len: int, window: int, threshold: float) -> int:
        """How much of a matched prefix (slots ``path``) a request of ``request_len`` tokens may reuse (see module
        docstring, rule 1 and 2)."""
        store, m = self.store, path.numel()
        usable = m
        start = max(0, request_len - window)
        if start < m:
            holed = (store.slot_cells.index_select(0, path[start:]) < self.entries_per_token).nonzero()
            if holed.numel():
                usable = start + int(holed[0])
        rt = runtime.current()
        if rt is not None and threshold < rt.highest_decided_tau:
            cells = store.slot_to_cell.index_select(0, path[:usable])
            scores = store.slot_scores.index_select(0, path[:usable])
            too_hard = ((cells < 0) & (scores >= threshold)).any(dim=(1, 2)).nonzero()
            if too_hard.numel():
                usable = int(too_hard[0])
        return usable

    # ------------------------------------------------------------------ inserting a request's tokens

    def checkpoint(self, req, *, up_to: int):
        """Insert the request's tokens ``[0, up_to)`` (up to the first position where the tree's copy is worse than
        the request's), repoint its row onto the tree's slots, move its lock and window references."""
        if self.disable:
            return
        row = req.kv.req_pool_idx
        token_ids = req.full_untruncated_fill_ids[:up_to]
        limit = self._insertable_len(req, token_ids)
        rt = runtime.current()
        windows = rt.windows if rt is not None else None
        lo, hi = windows.window_range(row) if windows is not None else (0, 0)
        before = self.req_to_token_pool.req_to_token[row, lo:hi].clone()

        radix_key, _, _ = self._insert_cache(req, token_ids, key_limit=limit, split_prompt=True)
        self._raw_match = True
        try:
            last_node = self.match_prefix(MatchPrefixParams(key=radix_key)).last_device_node
        finally:
            self._raw_match = False
        tree_slots = self.path_device_indices(last_node)
        assert len(tree_slots) == len(radix_key), (len(tree_slots), len(radix_key))
        protected = req.kv.cache_protected_len
        self.req_to_token_pool.write((row, slice(protected, len(tree_slots))), tree_slots[protected:])
        req.kv.cache_protected_len = len(tree_slots)
        self.unlock(req.lock)
        req.lock = self.lock(last_node)
        req.last_node = last_node
        if windows is not None:
            windows.retarget(before, self.req_to_token_pool.req_to_token[row, lo:hi])

    def _insertable_len(self, req, token_ids) -> int:
        """First position from ``cache_protected_len`` on where the tree holds a different slot with fewer cells
        than the request's row (``len(token_ids)`` if none)."""
        key = RadixKey(token_ids, req.extra_key, cache_salt=req.cache_salt)
        if len(key) == 0:
            return 0
        values, _ = self._match_prefix_helper(self.root_node, key)
        if not values:
            return len(key)
        tree_slots = torch.cat(values)
        start = req.kv.cache_protected_len
        row_slots = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx, start : tree_slots.numel()].to(torch.int64)
        tree_slots = tree_slots[start:]
        cells = self.store.slot_cells
        worse = (tree_slots != row_slots) & (cells.index_select(0, tree_slots) < cells.index_select(0, row_slots))
        first = worse.nonzero()
        return start + int(first[0]) if first.numel() else len(key)

    def _namespaced(self, key: RadixKey) -> RadixKey:
        """``key`` in its tenant's cache namespace (its group's, for a tenant in a ``prefix_cache_group``)."""
        if self._groups is None:
            rt = runtime.current()
            config = None if rt is None else rt.settings.tenants_config()
            self._groups = {} if config is None else config.prefix_cache_groups()
        namespace = cache_namespace(key.extra_key, self._groups) if self._groups else key.extra_key
        if namespace == key.extra_key:
            return key
        return RadixKey(key.token_ids, namespace, is_bigram=key.is_bigram, limit=key.limit, cache_salt=key.cache_salt)

    def _match_prefix_helper(self, node, key):
        return super()._match_prefix_helper(node, self._namespaced(key))

    def _insert_helper(self, node, key, value, priority=0, inserted_len=0):
        prefix_len, last = super()._insert_helper(node, self._namespaced(key), value, priority, inserted_len)
        if last is not self.root_node and last.lock_ref == 0:
            self.store.set_group(last.value, EVICTABLE)  # a new leaf (no-op for an existing evictable node)
        return prefix_len, last

    # ------------------------------------------------------------------ locks: protected <-> evictable

    def inc_lock_ref(self, node):
        newly_locked = self._path_nodes(node, lock_ref=0)
        result = super().inc_lock_ref(node)
        self._tag(newly_locked, PROTECTED)
        return result

    def dec_lock_ref(self, node, params=None):
        unlocking = self._path_nodes(node, lock_ref=1)
        result = super().dec_lock_ref(node, params)
        self._tag(unlocking, EVICTABLE)
        return result

    def _path_nodes(self, node, lock_ref: int) -> list:
        nodes = []
        while node is not None and node is not self.root_node:
            if node.lock_ref == lock_ref:
                nodes.append(node)
            node = node.parent
        return nodes

    def _tag(self, nodes: list, group: int) -> None:
        if nodes and not self.disable:
            self.store.set_group(torch.cat([n.value for n in nodes]), group)

    # ------------------------------------------------------------------ eviction by cells

    def evict(self, params: EvictParams) -> EvictResult:
        """Evict leaves (configured policy) until ``params.num_tokens`` tokens' worth of cells are free again."""
        if self.disable:
            return EvictResult()
        need = params.num_tokens * self.entries_per_token
        cells, _ = self._evict_until(lambda freed_cells, freed_slots: freed_cells >= need)
        return EvictResult(num_tokens_evicted=-(-cells // self.entries_per_token))

    def evict_slots(self, num_slots: int) -> int:
        """Evict leaves until ``num_slots`` token slots are free again (the allocator's call when slots, not cells,
        run short: heavily pruned cached prefixes hold many slots and few cells). Returns slots freed."""
        if self.disable:
            return 0
        return self._evict_until(lambda freed_cells, freed_slots: freed_slots >= num_slots)[1]

    def evict_tenant(self, tenant: int, num_cells: int) -> int:
        """Evict ``tenant``'s cached leaves until ``num_cells`` of its cells are free; returns its cells freed
        (multi-tenant budgets, ``tenants.admit_within_budgets``). In a prefix-cache group another tenant's cached
        continuation of the tenant's prefix is evicted too when nothing uses it: the prefix is then no leaf, and it
        would hold the tenant's budget for as long as the continuation stays cached (a request waited for ever)."""
        if self.disable or num_cells <= 0:
            return 0
        tags = self.store.tenant.tag
        # node -> whether it or an ancestor holds the tenant's cells; filled once per node, so the leaves' walks up
        # share their ancestors (one tag read a node, not one a node per leaf below it).
        on_path = {self.root_node: False, None: False}

        def owned(node) -> bool:
            return node.value.numel() > 0 and int(tags[node.value[0]]) == tenant

        def on_owned_path(node) -> bool:
            walk = []
            while node not in on_path:
                walk.append(node)
                node = node.parent
            found = on_path[node]
            for node in reversed(walk):
                found = found or owned(node)
                on_path[node] = found
            return found

        return self._evict_until(lambda freed_cells, freed_slots: freed_cells >= num_cells, on_owned_path, owned)[0]

    def _evict_until(self, enough, eligible=None, counted=None) -> tuple[int, int]:
        """Evict leaves (those ``eligible``, oldest first by the eviction strategy) until ``enough``; returns the
        cells (of the leaves ``counted``, all by default) and slots freed."""
        start_time = time.perf_counter()
        leaves = [n for n in self.evictable_leaves if eligible is None or eligible(n)]
        heap = [(self.eviction_strategy.get_priority(node), node) for node in leaves]
        heapq.heapify(heap)
        freed_cells = freed_slots = 0
        while not enough(freed_cells, freed_slots) and heap:
            _, leaf = heapq.heappop(heap)
            if counted is None or counted(leaf):
                freed_cells += int(self.store.slot_cells.index_select(0, leaf.value).sum())
            freed_slots += leaf.value.numel()
            self.token_to_kv_pool_allocator.free_segment(leaf.value, start_pos=0)
            self._delete_leaf(leaf)
            parent = leaf.parent
            if (not parent.children and parent.lock_ref == 0 and parent is not self.root_node
                    and (eligible is None or eligible(parent))):  # fmt: skip
                heapq.heappush(heap, (self.eviction_strategy.get_priority(parent), parent))
            self.kv_events.record_remove(leaf)
        self.update_eviction_metrics(freed_slots, start_time)
        return freed_cells, freed_slots


def create_kvzap_radix_cache(ctx) -> KvzapRadixCache:
    """``register_radix_cache_backend`` factory (``TreeCacheBuildContext`` → cache)."""
    if ctx.disable_radix_cache:
        from sglang.srt.mem_cache.registry import default_radix_cache_factory

        return default_radix_cache_factory(ctx)
    return KvzapRadixCache(ctx.params)
