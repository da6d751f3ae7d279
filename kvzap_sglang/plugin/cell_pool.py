"""SGLang's KV pool and token allocator, re-seated on the head-granular cell store (docs/design.md).

* ``KvzapCellPool`` keeps the ``MHATokenToKVPool`` interface SGLang's scheduler and model runner use, but its K/V
  live in a ``CellStore``: slot ids are *virtual* (``SLOTS_PER_TOKEN`` × the token capacity of the cells), and each
  written slot owns one cell per (layer, KV head). ``set_kv_buffer`` writes cells; the dense per-layer buffers of
  the stock pool do not exist (``get_key_buffer`` raises), so only the KVzap attention backend reads this pool.
* ``KvzapSlotAllocator`` hands out virtual slots and *reserves their cells at allocation time*: a slot handed out
  always has its ``layers × kv_heads`` cells, so a forward can never run out of cells half-way (SGLang admits
  requests by ``available_size()`` before the forward writes anything). Pruning frees cells at once; freeing a slot
  frees whatever cells it still holds. Capacity in token-equivalents:
  ``available_size() + evictable_size()`` (what SGLang admits by) ``= min(free + evictable cells // (layers ·
  kv_heads), free slots + slots of evictable cached prefixes)``, the tokens allocatable after evicting every
  unlocked cached prefix; when slots (not cells) run short, ``alloc`` has the radix cache evict leaves for slots
  (``slot_reclaimer``).

Sizing: ``--max-total-tokens N`` (or SGLang's memory-based size) buys exactly the memory of the stock pool,
``N · layers · kv_heads`` cells; the scheduler's total stays ``N`` so its idle invariant
``available == total`` holds once every request is gone.
"""

from __future__ import annotations

import logging
import os

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from kvzap_sglang.plugin import runtime
from kvzap_sglang.storage import CellStore, CellStoreConfig

logger = logging.getLogger(__name__)

# Virtual slots per token of cell capacity. A slot costs L·H·(4 + 4) bytes of map (≈0.7 KB for SmolLM2) vs
# 2·L·H·d·2 = 23 KB of bf16 K/V, so 4x slots is cheap and lets up to 75 % pruning turn into admitted tokens.
SLOTS_PER_TOKEN = 4
# Owner tags of slots held by the radix cache (CellStore.set_group); untagged (0) slots belong to requests.
EVICTABLE, PROTECTED = 1, 2


class KvzapCellPool(MHATokenToKVPool):
    """``MHATokenToKVPool`` whose storage is a ``CellStore`` (see module docstring)."""

    def __init__(self, size: int, page_size: int, dtype: torch.dtype, head_num: int, head_dim: int,
                 layer_num: int, device: str, enable_memory_saver: bool, v_head_dim: int | None = None,
                 **kwargs):  # fmt: skip
        if page_size != 1:
            raise ValueError("KVzap's cell pool needs page_size 1")
        self.token_capacity = size
        self.store = CellStore(
            CellStoreConfig(
                num_slots=size * SLOTS_PER_TOKEN,
                num_cells=size * layer_num * head_num,
                num_layers=layer_num,
                num_kv_heads=head_num,
                head_dim=head_dim,
                v_head_dim=v_head_dim,
                dtype=dtype,
                device=device,
            )
        )
        kwargs.pop("post_capture_active", None)
        super().__init__(size * SLOTS_PER_TOKEN, page_size, dtype, head_num, head_dim, layer_num, device,
                         enable_memory_saver, v_head_dim=v_head_dim, **kwargs)  # fmt: skip
        logger.info(
            "KVzap cell pool: %d cells (%.2f GB K+V) = %d tokens x %d layers x %d KV heads, %d virtual slots",
            self.store.config.num_cells, self.store.config.kv_bytes / 2**30, size, layer_num, head_num,
            self.store.config.num_slots,
        )  # fmt: skip

    def _create_buffers(self):
        # One placeholder row per layer keeps SGLang's pointer/descriptor bookkeeping valid; K/V live in cells.
        self.k_scale_buffer = self.v_scale_buffer = None
        self.native_k_scale_buffer = self.native_v_scale_buffer = None
        self.dq_k_buffer = self.dq_v_buffer = None
        shape = (1, self.head_num, self.head_dim)
        self.k_buffer = [torch.zeros(shape, dtype=self.store_dtype, device=self.device) for _ in range(self.layer_num)]
        self.v_buffer = [torch.zeros(shape, dtype=self.store_dtype, device=self.device) for _ in range(self.layer_num)]
        self._kv_buffer_descs = self._build_kv_buffer_descs()
        self._init_data_ptrs_and_strides()

    def _build_kv_buffer_descs(self):
        # The descriptors serve PD transfer and CUDA-VMM backing of dense buffers; the cell pool has neither.
        return ()

    def get_kv_size_bytes(self):
        half = self.store.config.kv_bytes // 2
        return half, half

    def _layer(self, layer_id: int) -> int:
        return layer_id - self.start_layer

    def set_kv_buffer(self, layer, loc, cache_k, cache_v, *args, **kwargs) -> None:
        """Write this forward's K/V ``[n, H, d]`` of layer ``layer`` into the cells of slots ``loc`` ``[n]``."""
        slots = getattr(loc, "loc", loc)
        self.store.write(self._layer(layer.layer_id), slots, cache_k, cache_v)

    def _dense_buffers_absent(self, *args, **kwargs):
        raise RuntimeError(
            "KVzap cell pool: K/V live in per-(layer, head) cells, not dense per-layer buffers; "
            "only the KVzap attention backend reads this pool"
        )

    get_key_buffer = get_value_buffer = get_kv_buffer = _dense_buffers_absent
    move_kv_cache = _dense_buffers_absent


class KvzapSlotAllocator(TokenToKVPoolAllocator):
    """Virtual slots with their cells reserved at allocation (see module docstring).

    ``size`` is SGLang's token capacity (``max_total_num_tokens``); the free list spans the pool's virtual slots.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: str, kvcache: KvzapCellPool, need_sort: bool):
        self.store: CellStore = kvcache.store
        self.entries_per_token = self.store.config.entries_per_token
        self.slot_reclaimer = None  # set by the KVzap radix cache: evicts cached leaves until n slots are free
        # KVZAP_CHECK_INVARIANTS=1: the idle check also recounts the whole store (O(slots · layers · heads)).
        self.deep_checks = os.environ.get("KVZAP_CHECK_INVARIANTS") == "1"
        self._changes = self._checked_at = 0
        self.idle_checks = 0
        self.slot_reclaims = 0  # allocations that had the tree evict for slots (heavy pruning: slots run out first)
        super().__init__(size, dtype, device, kvcache, need_sort)

    def clear(self):
        self.free_pages = torch.arange(1, self.store.config.num_slots + 1, dtype=torch.int64, device=self.device)
        self.free_group = None
        self.release_pages = torch.empty((0,), dtype=torch.int64, device=self.device)
        self.store.free_slots(self.free_pages)  # every slot: cells, tags and decisions (flush_cache, start-up)
        runtime.notify_cells_released()

    def free_slot_count(self) -> int:
        return len(self.free_pages) + len(self.release_pages)

    def reclaimable_tokens(self) -> int:
        """Tokens ``alloc`` could hand out once every evictable cached prefix were evicted: both the slots and the
        cells of the free lists plus those prefixes bound it (a heavily pruned prefix holds many slots, few cells)."""
        slots = self.free_slot_count() + self.store.group_slots[EVICTABLE]
        cells = self.store.free_cells() + self.store.group_cells[EVICTABLE]
        return min(slots, cells // self.entries_per_token)

    def evictable_tokens(self) -> int:
        """The radix cache's ``evictable_size``: its evictable cells in token-equivalents (rounded up, so that
        ``available + evictable == total`` at idle), but never more than eviction can actually make allocatable."""
        return min(-(-self.store.group_cells[EVICTABLE] // self.entries_per_token), self.reclaimable_tokens())

    def available_size(self):
        # SGLang admits by available + evictable (PrefillBudget) and evicts only the shortfall n - available before
        # alloc(n), so the sum must be what can really be allocated: counting the evictable prefixes' slots here and
        # their cells in evictable_size once admitted more than fits (allocation failed, the scheduler died).
        # available <= free cells // entries_per_token always holds; only slots can be short, and alloc reclaims them.
        return self.reclaimable_tokens() - self.evictable_tokens()

    def alloc(self, need_size: int):
        # What fits now, not available_size(): after SGLang evicted n - available tokens' worth of cells the cells are
        # there even where evictable_size's rounding keeps available_size one token lower.
        reclaimable_slots = self.free_slot_count() + self.store.group_slots[EVICTABLE]
        if need_size * self.entries_per_token > self.store.free_cells() or need_size > reclaimable_slots:
            return None
        short = need_size - self.free_slot_count()
        if short > 0 and self.slot_reclaimer is not None:
            self.slot_reclaims += 1
            self.slot_reclaimer(short)
        slots = super().alloc(need_size)
        if slots is None:
            return None
        reserved = self.store.reserve(slots)
        self._changes += 1
        rt = runtime.current()
        if rt is not None:
            rt.totals.entries_reserved += reserved
        return slots

    def free(self, free_index: torch.Tensor):
        if free_index.numel() == 0:
            return
        if self.free_group is None:  # grouped frees come back here once, at free_group_end()
            self.store.free_slots(free_index)
            runtime.notify_cells_released()
            self._changes += 1
        super().free(free_index)

    def verify_byte_accounting(self) -> list[str]:
        """SGLang's idle-time allocator diagnostic (violations are reported as leaks; they raise in SGLang's default
        strict idle mode). Checks, in cells, that every cell is free or held by the prefix cache, and that no
        request window is left; with ``KVZAP_CHECK_INVARIANTS=1`` also recounts the store and the slot free list."""
        problems = list(super().verify_byte_accounting())
        store = self.store
        cached = store.group_cells[EVICTABLE] + store.group_cells[PROTECTED]
        if store.free_cells() + cached != store.config.num_cells:
            problems.append(f"KVzap cells: {store.free_cells()} free + {cached} held by the prefix cache != "
                            f"{store.config.num_cells} (leak)")  # fmt: skip
        rt = runtime.current()
        if rt is not None and rt.windows is not None and bool(rt.windows.refs.any()):
            problems.append("KVzap: request windows still referenced at idle")
        if self.deep_checks and self._checked_at != self._changes:
            self._checked_at = self._changes
            problems += self._deep_check()
        self.idle_checks += 1
        return problems

    def _deep_check(self) -> list[str]:
        try:
            self.store.check_invariants()
            if self.free_group is None:
                free = torch.cat((self.free_pages, self.release_pages))
                assert torch.unique(free).numel() == free.numel(), "a slot is on the free list twice"
                assert not bool((self.store.slot_cells[free] > 0).any()), "a free slot holds cells"
                assert not bool((self.store.slot_group[free] != 0).any()), "a free slot is tagged as cached"
                # Nothing holds a radix-tree lock at idle; a leaked lock pins its cells for ever, and the identity
                # below (and SGLang's own, available + evictable + protected) still holds, so it is checked here.
                assert self.store.group_slots[PROTECTED] == 0, (
                    f"{self.store.group_slots[PROTECTED]} cached slots still locked at idle (a leaked tree lock)"
                )
                cached = self.store.group_slots[EVICTABLE] + self.store.group_slots[PROTECTED]
                assert free.numel() + cached == self.store.config.num_slots, (
                    f"{free.numel()} free + {cached} cached slots != {self.store.config.num_slots} at idle"
                )
        except AssertionError as error:
            return [f"KVzap store invariant: {error}"]
        return []
