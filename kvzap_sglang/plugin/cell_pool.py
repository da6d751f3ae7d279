"""SGLang's KV pool and token allocator, re-seated on the head-granular cell store (docs/design.md).

* ``KvzapCellPool`` keeps the ``MHATokenToKVPool`` interface SGLang's scheduler and model runner use, but its K/V
  live in a ``CellStore``: slot ids are *virtual* (``SLOTS_PER_TOKEN`` × the token capacity of the cells), and each
  written slot owns one cell per (layer, KV head). ``set_kv_buffer`` writes cells; the dense per-layer buffers of
  the stock pool do not exist (``get_key_buffer`` raises), so only the KVzap attention backend reads this pool.
* ``KvzapSlotAllocator`` hands out virtual slots and *reserves their cells at allocation time*: a slot handed out
  always has its ``layers × kv_heads`` cells, so a forward can never run out of cells half-way (SGLang admits
  requests by ``available_size()`` before the forward writes anything). Pruning frees cells at once; freeing a slot
  frees whatever cells it still holds. Capacity in token-equivalents:
  ``available_size() = min(free slots, free cells // (layers · kv_heads))``.

Sizing: ``--max-total-tokens N`` (or SGLang's memory-based size) buys exactly the memory of the stock pool,
``N · layers · kv_heads`` cells; the scheduler's total stays ``N`` so its idle invariant
``available == total`` holds once every request is gone.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from kvzap_sglang.plugin import runtime
from kvzap_sglang.storage import CellStore, CellStoreConfig

logger = logging.getLogger(__name__)

# Virtual slots per token of cell capacity. A slot costs L·H·(4 + 4) bytes of map (≈0.7 KB for SmolLM2) vs
# 2·L·H·d·2 = 23 KB of bf16 K/V, so 4x slots is cheap and lets up to 75 % pruning turn into admitted tokens.
SLOTS_PER_TOKEN = 4


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
        super().__init__(size, dtype, device, kvcache, need_sort)

    def clear(self):
        self.free_pages = torch.arange(1, self.store.config.num_slots + 1, dtype=torch.int64, device=self.device)
        self.free_group = None
        self.release_pages = torch.empty((0,), dtype=torch.int64, device=self.device)
        self.store.free_slots(torch.nonzero((self.store.slot_to_cell >= 0).any(dim=(1, 2))).reshape(-1))

    def available_size(self):
        free_slots = len(self.free_pages) + len(self.release_pages)
        return min(free_slots, self.store.free_cells() // self.entries_per_token)

    def alloc(self, need_size: int):
        if need_size > self.available_size():
            return None
        slots = super().alloc(need_size)
        if slots is None:
            return None
        cells = self.store.allocator.alloc(need_size * self.entries_per_token)
        self.store.slot_to_cell[slots] = cells.view(need_size, *self.store.slot_to_cell.shape[1:]).to(torch.int32)
        rt = runtime.current()
        if rt is not None:
            rt.totals.entries_reserved += cells.numel()
        return slots

    def free(self, free_index: torch.Tensor):
        if free_index.numel() == 0:
            return
        if self.free_group is None:  # grouped frees come back here once, at free_group_end()
            self.store.free_slots(free_index)
            runtime.notify_cells_released()
        super().free(free_index)
